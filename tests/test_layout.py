"""The rooms depend one way: `drivers`, `engines` and `smlm` never import `daemon`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_IMPORT_ALL = """
import importlib, sys
for m in sys.argv[2:]:
    try:
        importlib.import_module(f"dimscope.{sys.argv[1]}.{m}")
    except ImportError as exc:  # an optional extra (TensorRT) that is not installed
        if exc.name and exc.name.startswith("dimscope"):
            raise
bad = sorted(k for k in sys.modules if k.startswith("dimscope.daemon"))
print(bad)
sys.exit(1 if bad else 0)
"""


@pytest.mark.parametrize("package", ["drivers", "engines", "smlm"])
def test_subpackage_never_imports_daemon(package: str) -> None:
    # Not at run time: every module of the package imported in a fresh interpreter...
    root = REPO / package
    modules = sorted(".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
                     for p in root.rglob("*.py") if p != root / "__init__.py")
    result = subprocess.run([sys.executable, "-c", _IMPORT_ALL, package, *modules],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"imports daemon: {result.stdout} {result.stderr[-2000:]}"
    # ...and not for type checking either.
    for path in (REPO / package).rglob("*.py"):
        assert "dimscope.daemon" not in path.read_text(), f"{path} names dimscope.daemon"
