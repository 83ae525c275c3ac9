"""Every config key with a bad value: a ConfigError whose message names the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tierd.config import Config, NamespaceConfig
from tierd.errors import ConfigError


def _keys(struct: Any, prefix: str = "") -> list[str]:
    out = []
    for f in msgspec.structs.fields(struct):
        if f.name == "namespaces":
            out += [f"namespaces.x.{g.name}" for g in msgspec.structs.fields(NamespaceConfig)]
        elif isinstance(f.type, type) and issubclass(f.type, msgspec.Struct):
            out += _keys(f.type, f"{prefix}{f.name}.")
        else:
            out.append(f"{prefix}{f.name}")
    return out


KEYS = _keys(Config)
_TABLES = st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), min_size=1, max_size=2)
# Containers are wrong for every scalar key. tiers.cxl.node also takes a list of
# node numbers; for the uid list key, tables and lists of what no uid can be.
LIST_OF_INTS_OK = {"tiers.cxl.node"}
BAD = st.one_of(st.lists(st.integers(), min_size=1, max_size=3), _TABLES)
BAD_FOR = {"daemon.trusted_uids": st.one_of(_TABLES, st.lists(st.integers(max_value=-1), min_size=1, max_size=3),
                                            st.lists(st.text(alphabet="xyz", min_size=1), min_size=1, max_size=2))}


def _nest(path: str, value: Any, nvme: Path) -> dict[str, Any]:
    raw: dict[str, Any] = {"tiers": {"nvme": {"path": str(nvme)}}}
    node = raw
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return raw


def test_the_schema_has_keys() -> None:
    assert "tiers.host.size" in KEYS and "namespaces.x.codec" in KEYS and "daemon.lease_s" in KEYS


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(), key=st.sampled_from(KEYS))
def test_bad_value_names_the_key(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject, key: str) -> None:
    from tierd.config import load_config

    value = data.draw(BAD_FOR.get(key, BAD))
    assume(not (key in LIST_OF_INTS_OK and isinstance(value, list)))
    nvme = tmp_path_factory.mktemp("n")
    with pytest.raises(ConfigError) as err:
        load_config(_nest(key, value, nvme), env={})
    assert key in str(err.value), f"{key!r} not named in: {err.value}"
