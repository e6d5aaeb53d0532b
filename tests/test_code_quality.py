"""Lint, format and strict typing are part of the suite, so CI keeps them true."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("ruff") is None, reason="ruff is installed by the test extras")
def test_ruff_lint_and_format() -> None:
    lint = run("ruff", "check", "gateway", "tests", "bench")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    fmt = run("ruff", "format", "--check", "gateway", "tests", "bench")
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_mypy_strict() -> None:
    result = run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_wheel_carries_every_file_the_package_serves(tmp_path: Path) -> None:
    """A service install (`pip install .`) builds a wheel: data files must be in it.

    Built from a copy holding only what a clean clone has, since an editable install's
    egg-info would otherwise hand setuptools the file list and hide a missing declaration.
    """
    src = tmp_path / "src"
    shutil.copytree(ROOT / "gateway", src / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    built = run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(src)
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        packaged = set(zf.namelist())
    data = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "gateway").rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"}
    }
    assert data, "expected the dashboard's static files"
    assert data <= packaged, sorted(data - packaged)
