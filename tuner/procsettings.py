"""Process settings for the model: CPU affinity, scheduling policy, nice, I/O priority, oom_score_adj.

Pure parts (CPU list formats, ioprio values, privilege hints) and the one imperative piece that runs
in the forked child before exec (`Applier`), so that every thread the model starts inherits them.
A setting the caller may not make is skipped with a warning naming it and why; the rest still apply.
(research: kernel-and-platform.md §5)
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import platform
import resource
import signal
from dataclasses import asdict, dataclass

from autoglm_helper.contract.catalogue import IO_CLASS_NUMBERS, SCHED_NUMBERS

IOPRIO_WHO_PROCESS = 1
IOPRIO_CLASS_SHIFT = 13
# ioprio_set/ioprio_get have no glibc wrapper. asm-generic (aarch64, riscv64, loongarch64) 30/31.
IOPRIO_SYSCALLS = {"x86_64": (251, 252), "aarch64": (30, 31), "riscv64": (30, 31), "i686": (289, 290)}
PR_SET_PDEATHSIG = 1
# Schedulers that ignore I/O priority (ananicy-rs docs; research §5).
IOPRIO_BLIND_SCHEDULERS = ("none", "kyber")


@dataclass(frozen=True)
class ProcessSettings:
    """What the model process gets before exec."""

    cpus: tuple[int, ...]
    threads: int
    sched_policy: str
    nice: int
    io_class: str
    io_priority: int
    oom_score_adj: int
    raise_memlock: bool  # lift the soft RLIMIT_MEMLOCK to the hard limit (for mlock)

    def to_dict(self) -> dict[str, object]:
        body = asdict(self)
        body["cpus"] = list(self.cpus)
        body["cpu_list"] = cpu_ranges(self.cpus)
        return body


def cpu_ranges(cpus: tuple[int, ...] | list[int]) -> str:
    """[0, 1, 2, 3, 6] → "0-3,6" (the kernel's cpulist format, also systemd's CPUAffinity=)."""
    out: list[str] = []
    ids = sorted(set(cpus))
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        out.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(out)


def cpu_mask(cpus: tuple[int, ...] | list[int]) -> str:
    """[0, 1, 2, 3, 6] → "0x4f" (taskset, llama.cpp -C)."""
    return hex(sum(1 << c for c in set(cpus)))


def ioprio_value(io_class: str, io_priority: int) -> int:
    """The ioprio_set value: class << 13 | data; classes none and idle carry no data."""
    cls = IO_CLASS_NUMBERS[io_class]
    return cls << IOPRIO_CLASS_SHIFT | (io_priority if cls in (1, 2) else 0)


def ioprio_syscalls(machine: str | None = None) -> tuple[int, int] | None:
    """(ioprio_set, ioprio_get) syscall numbers for this architecture, or None if unknown."""
    return IOPRIO_SYSCALLS.get(machine or platform.machine())


_CAP_HINT = {
    "nice": "lowering nice needs CAP_SYS_NICE or a high enough RLIMIT_NICE",
    "sched_policy": "leaving SCHED_IDLE needs CAP_SYS_NICE or RLIMIT_NICE",
    "io_class": "the realtime I/O class needs CAP_SYS_ADMIN",
    "oom_score_adj": "lowering oom_score_adj below 0 needs CAP_SYS_RESOURCE, which this process lacks "
    "(even root can lack it, e.g. in a container); the root helper or a systemd unit "
    "(OOMScoreAdjust=, launch --unit) can set it",
    "cpus": "the CPU set lies outside this process's cgroup cpuset",
}


def explain(setting: str, value: object, err: int, kept: object) -> str:
    """One line for a setting that could not be made."""
    why = os.strerror(err)
    if err in (errno.EPERM, errno.EACCES, errno.EINVAL) and setting in _CAP_HINT:
        why = f"{why}: {_CAP_HINT[setting]}"
    return f"{setting} = {value} not set ({why}); the model runs with {setting} = {kept}"


class Applier:
    """Applies ProcessSettings in the child between fork and exec (subprocess preexec_fn).

    Everything that allocates or loads a library happens in __init__, in the parent. Failures are
    written as JSON lines to `report_fd` (close-on-exec, so the parent reads them up to EOF).
    """

    def __init__(self, settings: ProcessSettings, report_fd: int) -> None:
        self.s = settings
        self.fd = report_fd
        self.parent = os.getpid()
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.ioprio = ioprio_syscalls()
        self.ioprio_value = ioprio_value(settings.io_class, settings.io_priority)
        self.sched = SCHED_NUMBERS[settings.sched_policy]
        self.param = os.sched_param(0)
        self.oom = str(settings.oom_score_adj).encode()

    def _fail(self, setting: str, value: object, err: int, kept: object) -> None:
        report = {"setting": setting, "warning": explain(setting, value, err, kept)}
        os.write(self.fd, json.dumps(report).encode() + b"\n")

    def __call__(self) -> None:
        s = self.s
        # the model dies with the launcher: nothing is left running if the launcher is killed
        self.libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != self.parent:
            os._exit(1)
        try:
            os.sched_setaffinity(0, s.cpus)
        except OSError as exc:
            self._fail("cpus", cpu_ranges(s.cpus), exc.errno or 0, cpu_ranges(sorted(os.sched_getaffinity(0))))
        try:
            os.sched_setscheduler(0, self.sched, self.param)
        except OSError as exc:
            self._fail("sched_policy", s.sched_policy, exc.errno or 0, "unchanged")
        try:
            os.setpriority(os.PRIO_PROCESS, 0, s.nice)
        except OSError as exc:
            self._fail("nice", s.nice, exc.errno or 0, os.getpriority(os.PRIO_PROCESS, 0))
        if self.ioprio is None:
            self._fail("io_class", s.io_class, errno.ENOSYS, "unchanged")
        elif self.libc.syscall(self.ioprio[0], IOPRIO_WHO_PROCESS, 0, self.ioprio_value) != 0:
            self._fail("io_class", f"{s.io_class}/{s.io_priority}", ctypes.get_errno(), "unchanged")
        try:
            fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY)
            try:
                os.write(fd, self.oom)
            finally:
                os.close(fd)
        except OSError as exc:
            with open("/proc/self/oom_score_adj", "rb") as fh:
                kept = int(fh.read())
            self._fail("oom_score_adj", s.oom_score_adj, exc.errno or 0, kept)
        if s.raise_memlock:
            _, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
            try:
                resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
            except (OSError, ValueError) as exc:
                self._fail("memlock", hard, getattr(exc, "errno", 0) or errno.EPERM, "the old limit")


def active_scheduler(line: str) -> str | None:
    """ "none [mq-deadline] kyber bfq" → "mq-deadline"."""
    for word in line.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return None


def ioprio_note(io_class: str, schedulers: dict[str, str | None], model_path: str) -> str | None:
    """Say plainly when the planned I/O priority cannot take effect for reads of the model file.

    `schedulers`: the disks under the model file → their active scheduler ({} when it is on no block
    device, e.g. tmpfs). Pure."""
    if io_class == "none":
        return None
    if not schedulers:
        return f"io_class = {io_class} has no effect on loading the model: {model_path} is not on a block device"
    blind = {d: s for d, s in schedulers.items() if s in IOPRIO_BLIND_SCHEDULERS}
    if len(blind) == len(schedulers):
        which = ", ".join(f"{d} uses the {s} scheduler" for d, s in sorted(blind.items()))
        return (
            f"io_class = {io_class} has no effect on {model_path}: {which}, which ignores I/O priority "
            "(bfq and mq-deadline honour it)"
        )
    return None


def schedulers_of(path: str, sys_root: str = "/sys") -> dict[str, str | None]:
    """The disks holding `path` (partitions → their disk, dm/md → their member disks) → active scheduler."""
    try:
        dev = os.stat(path).st_dev
    except OSError:
        return {}
    node = os.path.realpath(f"{sys_root}/dev/block/{os.major(dev)}:{os.minor(dev)}")
    if not os.path.isdir(node):
        return {}
    out: dict[str, str | None] = {}
    _collect(node, out, 0)
    return out


def _collect(node: str, out: dict[str, str | None], depth: int) -> None:
    if os.path.exists(f"{node}/partition"):
        node = os.path.dirname(node)
    slaves = f"{node}/slaves"
    members = sorted(os.listdir(slaves)) if os.path.isdir(slaves) else []
    if members and depth < 8:
        for m in members:
            _collect(os.path.realpath(f"{slaves}/{m}"), out, depth + 1)
        return
    try:
        with open(f"{node}/queue/scheduler") as fh:
            out[os.path.basename(node)] = active_scheduler(fh.read())
    except OSError:
        out[os.path.basename(node)] = None
