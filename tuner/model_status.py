"""What `status` shows about the running model: the record `launch` keeps while the model runs, the process as
the kernel reports it (CPU set, threads, nice, scheduling, I/O priority, oom_score_adj, RSS, swap, locked), and
its taskstats delays, which only the root helper can read.

`read_process` is the only I/O on /proc; `model_lines` renders for a person and is pure.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path
from typing import Any

from autoglm_helper.catalogue import IO_CLASS_NUMBERS

from .errors import TuneError
from .procsettings import IOPRIO_CLASS_SHIFT, IOPRIO_WHO_PROCESS, ioprio_syscalls

SCHED_NAMES = {0: "other", 1: "fifo", 2: "rr", 3: "batch", 5: "idle", 6: "deadline"}
IO_CLASS_NAMES = {number: name for name, number in IO_CLASS_NUMBERS.items()}


def record_path(log_path: Path) -> Path:
    """The running model's record sits beside its log, named after it (model.log → model.json)."""
    return log_path.with_suffix(".json")


def write_record(path: Path, info: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info) + "\n")
    tmp.replace(path)


def read_record(path: Path) -> dict[str, Any] | None:
    """The record, or None when no model launched by this user is running (a stale record is ignored)."""
    try:
        info = json.loads(path.read_text())
        pid = int(info["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return info if Path(f"/proc/{pid}").exists() else None


def _ioprio(pid: int) -> tuple[str, int] | None:
    numbers = ioprio_syscalls()
    if numbers is None:
        return None
    value = ctypes.CDLL(None, use_errno=True).syscall(numbers[1], IOPRIO_WHO_PROCESS, pid)
    if value < 0:
        return None
    return IO_CLASS_NAMES.get(value >> IOPRIO_CLASS_SHIFT, str(value >> IOPRIO_CLASS_SHIFT)), value & 0x1FFF


def read_process(pid: int, proc: str = "/proc") -> dict[str, Any] | None:
    """The model process as the kernel reports it; None when it is gone."""
    try:
        status = dict(
            line.split(":", 1) for line in Path(f"{proc}/{pid}/status").read_text().splitlines() if ":" in line
        )
        fields = Path(f"{proc}/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        oom = int(Path(f"{proc}/{pid}/oom_score_adj").read_text())
        cmdline = Path(f"{proc}/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None

    def kib(name: str) -> int | None:
        value = status.get(name, "").split()
        return int(value[0]) if value else None

    io = _ioprio(pid)
    return {
        "pid": pid,
        "command": [a.decode(errors="replace") for a in cmdline if a],
        "cpus": status.get("Cpus_allowed_list", "").strip(),
        "threads": int(status.get("Threads", "0").strip() or 0),
        "nice": int(fields[16]),  # stat field 19; field 3 is index 0 after the command name
        "sched_policy": SCHED_NAMES.get(int(fields[38]), fields[38]),
        "io_class": io[0] if io else None,
        "io_priority": io[1] if io else None,
        "oom_score_adj": oom,
        "rss_kib": kib("VmRSS"),
        "swap_kib": kib("VmSwap"),
        "locked_kib": kib("VmLck"),
    }


def model_lines(record: dict[str, Any], process: dict[str, Any] | None, delays: dict[str, Any] | str | None
                ) -> list[str]:
    """`status` text for the model. `delays`: the helper's ProcessDelays report, or why there is none. Pure."""
    where = f", unit {record['unit']}" if record.get("unit") else ""
    lines = [f"model: {record.get('url', '?')} (pid {record['pid']}{where}, log {record.get('log', '?')})"]
    if process is None:
        return [*lines, "  the process is gone"]
    mib = {k: f"{process[k] / 1024:.0f} MiB" if process[k] is not None else "?"
           for k in ("rss_kib", "swap_kib", "locked_kib")}
    io = f"{process['io_class']}/{process['io_priority']}" if process["io_class"] else "unknown"
    lines += [
        f"  cpus {process['cpus']}, threads {process['threads']}",
        f"  sched {process['sched_policy']}, nice {process['nice']}, io {io}, oom_score_adj {process['oom_score_adj']}",
        f"  memory RSS {mib['rss_kib']}, swap {mib['swap_kib']}, locked {mib['locked_kib']}",
    ]
    if isinstance(delays, str) or delays is None:
        lines.append(f"  delays: {delays or 'not read'}")
    elif not delays["delay_accounting"]:
        lines.append("  delays: kernel.task_delayacct is off ([process] delay_accounting = true turns it on)")
    else:
        lines.append(
            f"  delays: swap-in {delays['swapin_delay_ms']:.0f} ms ({delays['swapin_count']}), "
            f"block I/O {delays['blkio_delay_ms']:.0f} ms ({delays['blkio_count']}), "
            f"waiting for a CPU {delays['cpu_delay_ms']:.0f} ms"
        )
    return lines


def model_report(log_path: Path, delays_of: Any) -> dict[str, Any] | None:
    """Record + process + delays (`delays_of(pid)` asks the helper; a TuneError becomes the reason)."""
    record = read_record(record_path(log_path))
    if record is None:
        return None
    process = read_process(int(record["pid"]))
    delays: dict[str, Any] | str | None = None
    if process is not None:
        try:
            delays = delays_of(process["pid"])
        except TuneError as exc:
            delays = f"not available ({exc})"
    return {"record": record, "process": process, "delays": delays}

