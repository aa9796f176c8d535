"""A script of bench/ imported as a module, for the unit tests of its parsing and printing."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def loaded(script: str) -> Iterator[ModuleType]:
    """bench/`script` as a module for as long as the generator runs (a fixture's body)."""
    name = f"{Path(script).stem}_under_test"
    sys.path.insert(0, str(BENCH))  # a script imports its neighbours (route_bench, proxy_bench)
    try:
        spec = importlib.util.spec_from_file_location(name, BENCH / script)
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    yield module
    del sys.modules[name]
