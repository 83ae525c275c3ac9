"""Configuration: one TOML file, every key optional, each overridable by ``TIERD_*``.

Loading goes raw TOML -> environment overrides -> size strings parsed ->
``msgspec.convert`` into frozen structs (unknown keys refused, types checked)
-> checks against the machine (RAM, disk). Every failure is a
:class:`~tierd.errors.ConfigError` whose message names the key.

Environment overrides name the key path in upper case joined by ``_``:
``TIERD_TIERS_HOST_SIZE=8GiB`` sets ``[tiers.host] size``,
``TIERD_NAMESPACES_KV_CODEC=zstd`` sets ``[namespaces.kv] codec``.
"""

from __future__ import annotations

import logging
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from tierd.config_checks import resolve_for_machine
from tierd.errors import ConfigError
from tierd.units import parse_size

__all__ = [
    "Config",
    "HostTierConfig",
    "CxlTierConfig",
    "NvmeTierConfig",
    "RemoteTierConfig",
    "TiersConfig",
    "NamespaceConfig",
    "DaemonConfig",
    "TraceConfig",
    "load_config",
    "default_nvme_path",
    "default_socket_path",
]

CodecName = Literal["none", "zstd", "bytegroup"]
TierName = Literal["host", "cxl", "nvme", "remote"]

log = logging.getLogger("tierd.config")

# Environment variables that belong to the CLI rather than to the config.
# TIERD_* variables read by tierd for itself, not config overrides.
_ENV_NOT_CONFIG = frozenset({
    "TIERD_SOCKET", "TIERD_CONFIG", "TIERD_LOG_LEVEL",
    "TIERD_BENCH_DIR",  # tierd bench: where bench/ is
    "TIERD_CHECKPOINT_BARRIER_S",  # checkpoint: how long ranks wait for each other
})

_MIB = 1 << 20
_GIB = 1 << 30


class _Section(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class HostTierConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[tiers.host]``: the shared-memory arena.

    ``size`` defaults to 25 % of RAM, at most 8 GiB.
    """

    size: int = -1
    hugepages: bool = False
    numa_node: int | None = None
    high_watermark: float = 0.90
    low_watermark: float = 0.75


class CxlTierConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[tiers.cxl]``: an arena between host and nvme; off while ``size`` is 0.

    ``node`` (one NUMA node or a list) or ``devdax`` (a ``/dev/daxX.Y`` path)
    says where its memory is. With neither, the machine's CPU-less nodes are
    used, if it has any; otherwise the tier stays off.
    """

    node: int | list[int] | None = None
    devdax: str = ""
    size: int = 0
    high_watermark: float = 0.90
    low_watermark: float = 0.75

    @property
    def nodes(self) -> tuple[int, ...]:
        """``node`` as a tuple (empty when unset)."""
        if self.node is None:
            return ()
        return (self.node,) if isinstance(self.node, int) else tuple(self.node)

    @property
    def enabled(self) -> bool:
        return self.size > 0 and bool(self.nodes or self.devdax)


class NvmeTierConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[tiers.nvme]``: slab files on local disk.

    ``path`` defaults to ``$XDG_CACHE_HOME/tierd`` (or ``~/.cache/tierd``);
    ``size`` to min(2 x host size, 10 % of the free disk there).
    """

    path: str = ""
    size: int = -1
    direct: bool = True
    slab_size: int = 1 * _GIB
    chunk_size: int = 4 * _MIB
    io_threads: int = 8
    gds: Literal["auto", "off"] = "auto"  # kvikio file <-> GPU where it imports and CUDA is present


class RemoteTierConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[tiers.remote]``: Redis or Valkey; off unless ``url`` is set.

    ``url`` carries password and TLS (``rediss://user:pass@host:6379/0``);
    ``cluster = true`` speaks Redis Cluster.
    """

    url: str = ""
    size: int = 1 << 40  # what tierd may store there (the server has its own maxmemory)
    cluster: bool = False
    ttl_s: float | None = None
    chunk_size: int = 1 << 20
    timeout_s: float = 5.0
    prefix: str = "tierd"


class GpuTierConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[tiers.gpu]``: each client's device cache, and how clients pin the host arena.

    The tier is off (``budget`` and ``fraction`` 0) unless configured, and
    always off without CUDA. ``pin`` registers the mapped host arena with
    cudaHostRegister, in pieces of ``pin_piece`` (Note [pinned arena] in
    tiers/gpu.py); it costs nothing until a CUDA tensor is stored or fetched.
    """

    budget: int = 0  # bytes of device memory per process
    fraction: float = 0.0  # or this fraction of the device's free memory when the store opens
    pin: bool = True
    pin_piece: int = 1 * _GIB


class TiersConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    host: HostTierConfig = HostTierConfig()
    cxl: CxlTierConfig = CxlTierConfig()
    nvme: NvmeTierConfig = NvmeTierConfig()
    remote: RemoteTierConfig = RemoteTierConfig()
    gpu: GpuTierConfig = GpuTierConfig()


class DaemonConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[daemon]``: ``tierd serve``.

    ``socket`` defaults to ``$XDG_RUNTIME_DIR/tierd.sock``, else
    ``/run/tierd/tierd.sock`` as root, else ``/tmp/tierd-UID/tierd.sock``.

    ``trusted_uids`` lists the uids, besides the daemon's own and root, that
    are handed the host arena's memfd at the handshake (zero-copy puts and
    gets). A client holding the arena can read every object in the host
    tier, whatever its namespace or owner; every other uid moves its bytes
    through the socket and sees only its own objects and shared namespaces.
    """

    socket: str = ""
    metrics: str = "127.0.0.1:9464"  # "" turns the Prometheus endpoint off
    lease_s: float = 30.0
    uid_quota: int | None = None
    max_frame_bytes: int = 64 * _MIB
    max_inflight: int = 256  # requests in flight per connection
    max_connections_per_uid: int = 256
    inline_max_bytes: int = 64 * 1024  # objects this small travel in the frame
    drain_timeout_s: float = 30.0
    trusted_uids: list[int] = []  # besides the daemon's uid and root; see the docstring


class NamespaceConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[namespaces.NAME]``: what objects under ``NAME/`` get by default.

    ``access = "cyclic"`` says the namespace repeats one access order (training
    steps): its policy and prefetch default to ``schedule``, learned from the
    stream. ``access = "prefix"`` says it is a prefix cache (KV blocks): its
    policy and admission default to ``prefix`` (tierd.policies.prefix).
    """

    policy: Literal["lru", "s3fifo", "gdsf", "schedule", "prefix"] | None = None
    prefetch: Literal["none", "sequential", "schedule"] | None = None
    prefetch_depth: int = 2
    access: Literal["random", "cyclic", "prefix"] = "random"
    admission: Literal["all", "prefix"] | None = None  # which new objects may enter the host tier
    admit_max: int | None = None  # larger objects skip the host tier (admission)
    write_through: bool = False  # also keep a copy on the remote tier (shared between machines)
    codec: CodecName = "none"
    durable: bool = False
    tier: TierName | None = None  # highest tier objects may land in
    quota: int | None = None
    shared: bool = False  # every uid of the daemon may use it
    # A cache: when the lowest tier has no room, its volatile objects are dropped to admit new ones
    # (None: true for the KV namespaces, see Config.is_cache). ``share``: the fraction of each tier it
    # may keep before it gives up space first (None: equal among the namespaces using the tier).
    cache: bool | None = None
    share: float | None = None

    @property
    def eviction_policy(self) -> str:
        return self.policy or {"cyclic": "schedule", "prefix": "prefix"}.get(self.access, "lru")

    @property
    def prefetch_policy(self) -> str:
        return self.prefetch or ("schedule" if self.access == "cyclic" else "none")

    @property
    def admission_policy(self) -> str:
        return self.admission or ("prefix" if self.access == "prefix" else "all")


class TraceConfig(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """``[trace]``: record every put, get and delete as JSON lines for ``tierd simulate``."""

    path: str = ""


class Config(_Section, frozen=True, forbid_unknown_fields=True, kw_only=True):
    """The whole configuration, validated; build one with :func:`load_config`."""

    tiers: TiersConfig = TiersConfig()
    daemon: DaemonConfig = DaemonConfig()
    namespaces: dict[str, NamespaceConfig] = {}
    trace: TraceConfig = TraceConfig()

    def namespace(self, name: str) -> NamespaceConfig:
        return self.namespaces.get(name) or _DEFAULT_NAMESPACE

    def is_cache(self, name: str) -> bool:
        """Whether namespace ``name`` is a cache: its ``cache`` setting, else true for a prefix cache
        (``access = "prefix"``) and for the namespaces tierd's KV clients use by default."""
        cfg = self.namespace(name)
        if cfg.cache is not None:
            return cfg.cache
        return cfg.access == "prefix" or name in CACHE_NAMESPACES


# PrefixKVStore's, the LMCache connector's and the SGLang backend's default namespaces.
CACHE_NAMESPACES = frozenset({"kv", "lmcache", "sglang"})


_DEFAULT_NAMESPACE = NamespaceConfig()

# Keys whose values are sizes ("8GiB"), by path below the root.
_SIZE_KEYS = {
    ("tiers", "host", "size"),
    ("tiers", "cxl", "size"),
    ("tiers", "nvme", "size"),
    ("tiers", "nvme", "slab_size"),
    ("tiers", "nvme", "chunk_size"),
    ("tiers", "remote", "size"),
    ("tiers", "remote", "chunk_size"),
    ("tiers", "gpu", "budget"),
    ("tiers", "gpu", "pin_piece"),
    ("namespaces", "*", "quota"),
    ("namespaces", "*", "admit_max"),
    ("daemon", "", "uid_quota"),
    ("daemon", "", "max_frame_bytes"),
    ("daemon", "", "inline_max_bytes"),
}


def default_nvme_path() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "tierd"


def _struct_fields(struct: type[msgspec.Struct]) -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(struct)}


def _env_path(var: str) -> list[str]:
    """Map ``TIERD_TIERS_HOST_SIZE`` to ``["tiers", "host", "size"]`` using the schema."""
    words = var[len("TIERD_"):].lower().split("_")
    path: list[str] = []
    struct: Any = Config
    i = 0
    while i < len(words):
        if struct is NamespaceConfig or struct is None:
            break
        fields = _struct_fields(struct)
        for j in range(len(words), i, -1):  # longest field name first: lease_s
            name = "_".join(words[i:j])
            if name in fields:
                path.append(name)
                i = j
                ftype = fields[name]
                if name == "namespaces":
                    struct = NamespaceConfig
                    # NAME may hold underscores: the field is the longest known suffix.
                    ns_fields = _struct_fields(NamespaceConfig)
                    for k in range(i + 1, len(words)):
                        suffix = "_".join(words[k:])
                        if suffix in ns_fields:
                            return [*path, "_".join(words[i:k]), suffix]
                    raise ConfigError(f"environment variable {var} names no namespace key")
                struct = ftype if isinstance(ftype, type) and issubclass(ftype, msgspec.Struct) else None
                break
        else:
            raise ConfigError(f"environment variable {var} names no config key (near {words[i]!r})")
    if struct is not None:
        raise ConfigError(f"environment variable {var} names a section, not a key")
    return path


def _set_path(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: cannot override inside a non-table value")
        node = child
    node[path[-1]] = value


def _parse_sizes(raw: dict[str, Any]) -> None:
    for sec, sub, key in _SIZE_KEYS:
        section = raw.get(sec)
        if not isinstance(section, dict):
            continue
        if sub == "*":
            subs, names = list(section.values()), list(section)
        elif sub == "":
            subs, names = [section], [""]
        else:
            subs, names = [section.get(sub)], [sub]
        for name, table in zip(names, subs, strict=True):
            if isinstance(table, dict) and key in table and table[key] is not None:
                try:
                    table[key] = parse_size(table[key])
                except ValueError as exc:
                    path = ".".join(p for p in (sec, name, key) if p)
                    raise ConfigError(f"{path}: {exc}") from None


def _parse_node_lists(raw: dict[str, Any]) -> None:
    """``TIERD_TIERS_CXL_NODE=2,3`` arrives as the string ``"2,3"``: make it the list it means."""
    cxl = raw.get("tiers", {}).get("cxl") if isinstance(raw.get("tiers"), dict) else None
    if isinstance(cxl, dict) and isinstance(cxl.get("node"), str) and "," in cxl["node"]:
        try:
            cxl["node"] = [int(part) for part in cxl["node"].split(",")]
        except ValueError:
            raise ConfigError(f"tiers.cxl.node: expected node numbers like 2 or 2,3, got {cxl['node']!r}") from None


def _convert_error(exc: msgspec.ValidationError, prefix: str = "") -> ConfigError:
    # msgspec says "Object contains unknown field `x` - at `$.tiers.host`";
    # users think in TOML key paths.
    text = str(exc)
    where = ""
    if " - at `$" in text:
        text, _, where = text.partition(" - at `$")
        where = where.rstrip("`").lstrip(".")
    where = ".".join(p for p in (prefix, where) if p)
    if text.startswith("Object contains unknown field"):
        field = text.split("`")[1]
        key = f"{where}.{field}" if where else field
        return ConfigError(f"unknown config key {key!r}: check its spelling against deploy/tierd.toml")
    return ConfigError(f"{where or 'config'}: {text[0].lower()}{text[1:]}")


def load_config(
    source: str | os.PathLike[str] | Mapping[str, Any] | Config | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build a validated :class:`Config`.

    Args:
        source: a TOML file path, a dict shaped like the TOML, a ``Config``
            (returned with defaults resolved), or None for the defaults.
        env: environment to read ``TIERD_*`` overrides from (default ``os.environ``).

    Raises:
        ConfigError: the file is missing or not TOML, a key is unknown, a value
            has the wrong type or does not fit this machine.
    """
    if isinstance(source, Config):
        return resolve_for_machine(source, default_nvme_path())
    raw: dict[str, Any]
    if source is None:
        raw = {}
    elif isinstance(source, Mapping):
        raw = msgspec.convert(msgspec.to_builtins(source), dict)  # deep copy
    else:
        try:
            with open(source, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config file {os.fspath(source)!r} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {os.fspath(source)!r} is not valid TOML: {exc}") from None
    environ = os.environ if env is None else env
    for var, value in sorted(environ.items()):
        if var.startswith("TIERD_") and var not in _ENV_NOT_CONFIG:
            _set_path(raw, _env_path(var), value)
    _parse_sizes(raw)
    _parse_node_lists(raw)
    daemon = raw.get("daemon")
    if isinstance(daemon, dict) and isinstance(daemon.get("trusted_uids"), str):
        # From the environment: TIERD_DAEMON_TRUSTED_UIDS=1000,1001
        daemon["trusted_uids"] = [u.strip() for u in daemon["trusted_uids"].split(",") if u.strip()]
    # Namespaces are converted one by one so an error can name the namespace
    # (msgspec reports dict keys as "[...]").
    tables = raw.pop("namespaces", {})
    if not isinstance(tables, dict):
        raise ConfigError("namespaces must be a table of [namespaces.NAME] tables")
    namespaces: dict[str, NamespaceConfig] = {}
    for name, table in tables.items():
        try:
            namespaces[name] = msgspec.convert(table, NamespaceConfig, strict=False)
        except msgspec.ValidationError as exc:
            raise _convert_error(exc, f"namespaces.{name}") from None
    try:
        cfg = msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        raise _convert_error(exc) from None
    return resolve_for_machine(msgspec.structs.replace(cfg, namespaces=namespaces), default_nvme_path())


def default_socket_path(cfg: Config | None = None) -> Path:
    """Where ``tierd serve`` listens and clients connect by default.

    ``[daemon] socket`` if set; else ``$TIERD_SOCKET``; else
    ``$XDG_RUNTIME_DIR/tierd.sock``; else ``/run/tierd/tierd.sock`` as root;
    else ``/tmp/tierd-UID/tierd.sock``.
    """
    if cfg is not None and cfg.daemon.socket:
        return Path(cfg.daemon.socket).expanduser()
    if os.environ.get("TIERD_SOCKET"):
        return Path(os.environ["TIERD_SOCKET"]).expanduser()
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "tierd.sock"
    if os.geteuid() == 0:
        return Path("/run/tierd/tierd.sock")
    return Path(f"/tmp/tierd-{os.geteuid()}") / "tierd.sock"
