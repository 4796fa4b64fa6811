"""Constitutions and templates ship inside the wheel and are found after a normal install."""

from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_contains_shipped_data(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    wheel = next(tmp_path.glob("cai-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ROOT.glob("constitutions/*.yaml"):
        assert f"cai/constitutions/{path.name}" in names
    for path in ROOT.glob("prompts/*/*.jinja"):
        assert f"cai/prompts/{path.parent.name}/{path.name}" in names
    assert "cai/backends/hf.py" in names
    assert "cai/backends/decode_attention.c" in names       # compiled on first use by cai.backends.kernels
    assert "cai/backends/linear_bf16.c" in names
    for path in (ROOT / "cai" / "review" / "static").iterdir():   # the review page, served from the package
        assert f"cai/review/static/{path.name}" in names, path
    for path in (ROOT / "cai").rglob("*.py"):               # every module, so a package left off pyproject fails
        assert path.relative_to(ROOT).as_posix() in names, path
