"""tierd's benchmarks: one module a suite, run together by ``tierd bench`` (bench/suite.py)."""
