"""The package stays mypy-clean (house style), checked with every test run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gateway_package_is_mypy_clean(tmp_path):
    """`mypy gateway` with the pyproject settings reports no error."""
    out = subprocess.run([sys.executable, "-m", "mypy", "gateway", "--cache-dir", str(tmp_path)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
