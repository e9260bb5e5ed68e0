"""Every benchmark command that benchmarks/README.md gives starts as written: run from the
repository root in a fresh interpreter with no PYTHONPATH, it parses its arguments (its
``--help``). The benchmarks themselves take minutes and run by hand (see that README)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = sorted(
    set(
        re.findall(
            r"`\.venv/bin/python (benchmarks/\w+\.py)",
            (ROOT / "benchmarks" / "README.md").read_text(),
        )
    )
)


def test_the_readme_lists_every_benchmark() -> None:
    scripts = {f"benchmarks/{p.name}" for p in (ROOT / "benchmarks").glob("*.py")}
    runnable = {s for s in scripts if "def main(" in (ROOT / s).read_text()}
    assert runnable and set(COMMANDS) == runnable


@pytest.mark.parametrize("script", COMMANDS)
def test_a_benchmark_command_starts_from_the_repository_root(script: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, script, "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:") and "--quick" in done.stdout
