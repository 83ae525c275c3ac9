#!/usr/bin/env bash
# LMCache 0.5.6's own tests of its L2 adapters, run against tierd's connector (after .ci/engines).
#
#   bash tests/engines/run_lmcache_suite.sh
#
# Downloads LMCache's source distribution (which carries its tests) without building it,
# unpacks only its tests/ and pytest.ini into a temporary directory (so `import lmcache` stays
# the installed package), and runs three of its test files with the plugin lmcache_suite.py
# (beside this script), which replaces only the fixtures that build the backend with tierd's
# connector built through LMCache's own native_plugin factory. See lmcache_suite.py for which
# tests run, which are deselected and why one is an expected failure.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/lmcache-suite-XXXXXX")
trap 'rm -rf "$work"' EXIT

# pip prepares an sdist's metadata even to download it: NO_NATIVE_EXT skips LMCache's CUDA
# extensions and the version is given (no git checkout for setuptools_scm to read).
NO_NATIVE_EXT=1 SETUPTOOLS_SCM_PRETEND_VERSION=0.5.6 \
  pip download --quiet --no-deps --no-binary :all: --no-build-isolation lmcache==0.5.6 -d "$work"
tar xzf "$work/lmcache-0.5.6.tar.gz" -C "$work" --strip-components=1 lmcache-0.5.6/tests lmcache-0.5.6/pytest.ini

cd "$work"
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" python -m pytest -p lmcache_suite -p no:cacheprovider \
  -o log_cli=false -q -rxX -W 'ignore:`LoggingHandler` in `opentelemetry-sdk`:DeprecationWarning' \
  tests/v1/distributed/test_fs_l2_adapter_delete.py \
  tests/v1/distributed/test_native_connector_l2_adapter.py \
  tests/v1/distributed/test_mock_l2_adapter.py
