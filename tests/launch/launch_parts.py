"""Helpers for the launch tests: policy files, free ports, reading a process back from /proc."""

from __future__ import annotations

import ctypes
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import tomli_w
from support import CLI

SCHED_NAMES = {0: "other", 3: "batch", 5: "idle"}
IOPRIO_GET = {"x86_64": 252, "aarch64": 31}[platform.machine()]
IO_CLASSES = {0: "none", 1: "realtime", 2: "best-effort", 3: "idle"}


def write_policy(path: Path, doc: dict[str, Any]) -> Path:
    path.write_bytes(tomli_w.dumps(doc).encode())
    return path


def cli_env(etc: Path) -> dict[str, str]:
    """No system policy and no proxy: the tests see the built-in default plus what they pass."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["AUTOGLM_TUNE_ETC"] = str(etc)
    return env


def launch(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "launch", *args], capture_output=True, text=True, env=env, timeout=timeout)




def thread_view(pid: int, tid: int) -> dict[str, Any]:
    """One thread as the kernel reports it: affinity, scheduling policy, nice."""
    status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
    allowed = next(
        line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("Cpus_allowed_list")
    )
    fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
    # after the command name: field 3 is index 0, so nice (19) is [16] and policy (41) is [38]
    return {"cpus": allowed, "nice": int(fields[16]), "policy": SCHED_NAMES.get(int(fields[38]), fields[38])}


def ioprio_of(pid: int) -> tuple[str, int]:
    libc = ctypes.CDLL(None, use_errno=True)
    value = libc.syscall(IOPRIO_GET, 1, pid)
    assert value >= 0, os.strerror(ctypes.get_errno())
    return IO_CLASSES[value >> 13], value & 0x1FFF
