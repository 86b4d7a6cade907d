"""Small helpers shared by the test files."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

# The console script installed next to the interpreter running the tests (the test venv).
CLI = shutil.which("autoglm-tune", path=str(Path(sys.executable).parent)) or "autoglm-tune"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=120)

def processes_mentioning(marker: str) -> list[int]:
    """PIDs whose command line contains `marker` (a unique temp path): what a test may have left running."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmdline and state != "Z":
            found.append(int(entry))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CAP_SYS_RESOURCE = 24


def has_capability(cap: int, field: str = "CapEff") -> bool:
    """Whether this test process has `cap` in its /proc/self/status set `field` (CapEff, CapBnd)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return bool(int(line.split()[1], 16) >> cap & 1)
