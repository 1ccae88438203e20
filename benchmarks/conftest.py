"""pytest configuration of the benchmark suite (benchmarks/test_*.py).

The suite measures, it checks nothing: it runs only when asked for with
``pytest benchmarks/ --benchmark-only`` (or ``--benchmark-enable``). A plain
``pytest`` over the repository skips it, and ``pytest tests/`` never collects it.
"""
import pytest


def pytest_collection_modifyitems(config, items):
    asked = config.getoption("benchmark_only", False) or config.getoption("benchmark_enable", False)
    if asked:
        return
    skip = pytest.mark.skip(reason="benchmark: run with `pytest benchmarks/ --benchmark-only`")
    for item in items:
        if "benchmark" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)
