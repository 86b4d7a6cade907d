"""What `status` shows about the running model: the record `launch` keeps while the model runs, the process as
the kernel reports it (CPU set, threads, nice, scheduling, I/O priority, oom_score_adj, RSS, swap, locked), and
what it waited for: block I/O and a CPU per thread, and the memory pressure of its cgroup. All of it is readable by
the model's owner, so no privileged helper is asked (taskstats, which would add swap-in delays, needs
CAP_NET_ADMIN: the helper gave it up).

`read_process` (psutil, imported on use) and `read_delays` are the only I/O on /proc and /sys; `model_lines`
renders for a person and is pure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from autoglm_helper.contract.catalogue import IO_CLASS_NUMBERS

from .procsettings import cpu_ranges

SCHED_RESET_ON_FORK = 0x40000000  # a flag sched_getscheduler may OR into the policy
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


def read_process(pid: int, proc: str = "/proc") -> dict[str, Any] | None:
    """The model process as the kernel reports it, through psutil (imported here: `diff` and `plan` never need
    it); what psutil does not read (locked memory, oom_score_adj, the scheduling policy) from /proc. None when
    the process is gone or is not the caller's to read."""
    import psutil

    try:
        p = psutil.Process(pid)
        with p.oneshot():
            command, cpus, threads, nice = p.cmdline(), p.cpu_affinity(), p.num_threads(), p.nice()
            io = p.ionice()
            swap: int | None
            uss: int | None
            try:
                full = p.memory_full_info()  # swap and USS from smaps: the owner's (or root's) to read
                rss, swap, uss = full.rss, full.swap, full.uss
            except psutil.AccessDenied:
                rss, swap, uss = p.memory_info().rss, None, None
        policy = os.sched_getscheduler(pid) & ~SCHED_RESET_ON_FORK
        status = Path(f"{proc}/{pid}/status").read_text()
        oom = int(Path(f"{proc}/{pid}/oom_score_adj").read_text())
    except (psutil.Error, OSError, ValueError):
        return None
    locked = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmLck:")), None)
    return {
        "pid": pid,
        "command": command,
        "cpus": cpu_ranges(cpus),
        "threads": threads,
        "nice": nice,
        "sched_policy": SCHED_NAMES.get(policy, str(policy)),
        "io_class": IO_CLASS_NAMES.get(int(io.ioclass), str(int(io.ioclass))),
        "io_priority": io.value,
        "oom_score_adj": oom,
        "rss_kib": rss // 1024,
        "swap_kib": swap // 1024 if swap is not None else None,
        "uss_kib": uss // 1024 if uss is not None else None,
        "locked_kib": locked,
    }


def _pressure(text: str) -> dict[str, float]:
    """memory.pressure's two lines ("some avg10=0.00 avg60=0.00 avg300=0.00 total=123"): totals in ms."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        kind, *pairs = line.split()
        values = dict(pair.split("=", 1) for pair in pairs)
        out[f"{kind}_avg10"] = float(values["avg10"])
        out[f"{kind}_ms"] = int(values["total"]) / 1000
    return out


def read_delays(pid: int, proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> dict[str, Any] | None:
    """What the model waited for, summed over its live threads: block I/O (stat field 42, needs
    kernel.task_delayacct) and a CPU (schedstat); and its cgroup's memory pressure (PSI, cgroup v2: the model
    unit's own cgroup, or the session's when it was launched without one). None when the process is gone."""
    tick_ms = 1000 / os.sysconf("SC_CLK_TCK")
    blkio_ms = cpu_ms = 0.0
    threads = 0
    try:
        for task in Path(f"{proc}/{pid}/task").iterdir():
            try:
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                schedstat = (task / "schedstat").read_text().split()
            except (FileNotFoundError, ProcessLookupError):  # the thread ended meanwhile
                continue
            blkio_ms += int(fields[39]) * tick_ms  # field 42: delayacct_blkio_ticks
            cpu_ms += int(schedstat[1]) / 1e6  # time spent waiting on a run queue, ns
            threads += 1
        cgroup = next((line[3:] for line in Path(f"{proc}/{pid}/cgroup").read_text().splitlines()
                       if line.startswith("0::")), None)
    except (OSError, ValueError, IndexError):
        return None
    try:
        accounting: bool | None = Path(f"{proc}/sys/kernel/task_delayacct").read_text().strip() == "1"
    except FileNotFoundError:  # before 5.14 accounting is on unless booted with nodelayacct
        accounting = None
    pressure: dict[str, Any] | None = None
    if cgroup is not None:
        try:
            pressure = {"cgroup": cgroup, **_pressure(Path(cgroup_root, cgroup.lstrip("/"), "memory.pressure")
                                                      .read_text())}
        except (OSError, ValueError, KeyError):  # cgroup v1, or a kernel without PSI
            pressure = None
    return {"pid": pid, "threads": threads, "delay_accounting": accounting, "blkio_delay_ms": round(blkio_ms, 1),
            "cpu_delay_ms": round(cpu_ms, 1), "memory_pressure": pressure}


def model_lines(record: dict[str, Any], process: dict[str, Any] | None, delays: dict[str, Any] | None
                ) -> list[str]:
    """`status` text for the model, from its record, read_process and read_delays. Pure."""
    where = f", unit {record['unit']}" if record.get("unit") else ""
    lines = [f"model: {record.get('url', '?')} (pid {record['pid']}{where}, log {record.get('log', '?')})"]
    if process is None:
        return [*lines, "  the process is gone"]
    mib = {k: f"{process[k] / 1024:.0f} MiB" if process[k] is not None else "?"
           for k in ("rss_kib", "uss_kib", "swap_kib", "locked_kib")}
    io = f"{process['io_class']}/{process['io_priority']}" if process["io_class"] else "unknown"
    lines += [
        f"  cpus {process['cpus']}, threads {process['threads']}",
        f"  sched {process['sched_policy']}, nice {process['nice']}, io {io}, oom_score_adj {process['oom_score_adj']}",
        f"  memory RSS {mib['rss_kib']} (its own {mib['uss_kib']}), swap {mib['swap_kib']}, "
        f"locked {mib['locked_kib']}",
    ]
    if delays is None:
        return [*lines, "  delays: not read (the process ended)"]
    blkio = (f"block I/O {delays['blkio_delay_ms']:.0f} ms" if delays["delay_accounting"] is not False else
             "block I/O unknown (kernel.task_delayacct is off; [process] delay_accounting = true turns it on)")
    lines.append(f"  delays over {delays['threads']} threads: {blkio}, waiting for a CPU "
                 f"{delays['cpu_delay_ms']:.0f} ms")
    pressure = delays["memory_pressure"]
    if pressure is None:
        lines.append("  memory pressure: unknown (needs cgroup v2 with PSI)")
    else:
        lines.append(f"  memory pressure of {pressure['cgroup']}: stalled {pressure['some_ms']:.0f} ms "
                     f"(all tasks {pressure['full_ms']:.0f} ms); last 10 s {pressure['some_avg10']:.2f} % "
                     f"(all {pressure['full_avg10']:.2f} %)")
    return lines


def model_report(log_path: Path) -> dict[str, Any] | None:
    """Record + process + delays of the running model, or None when none runs."""
    record = read_record(record_path(log_path))
    if record is None:
        return None
    process = read_process(int(record["pid"]))
    delays = read_delays(process["pid"]) if process is not None else None
    return {"record": record, "process": process, "delays": delays}

