"""Small helpers shared by the test files."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

# The console script installed next to the interpreter running the tests (the test venv).
CLI = shutil.which("autoglm-tune", path=str(Path(sys.executable).parent)) or "autoglm-tune"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=120)
