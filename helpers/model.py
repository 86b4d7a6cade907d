"""The caller's model process: what only root may grant it, within the catalogue's bounds.

- SetProcess: negative nice (every thread) and oom_score_adj for a running process the caller owns.
- StartModel / StopModel: the model as a transient systemd unit run as the caller, with CPUAffinity,
  scheduling, Nice, I/O class, OOMScoreAdjust, MemoryLow/MemoryHigh and LimitMEMLOCK; its output goes
  to a file descriptor the caller passed, so the caller reads its own log.

Nothing here is journaled: each setting lives and dies with the process or the transient unit.
A pidfd and a /proc directory fd pin the caller's process. setpriority and cgroup.procs still take numbers:
each write by number is checked just before (a thread through the pinned directory, the process through the
pidfd) and the pidfd is probed again just after, so a process that ends meanwhile is an error, not a write to
whatever gets its number next.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import threading
from collections.abc import Callable
from typing import Any

from dbus_fast import Variant

from .contract import procfs
from .contract.bus import HelperError
from .contract.catalogue import (
    ENV_NAME,
    IO_CLASS_NUMBERS,
    IO_CLASSES,
    IO_PRIORITY_RANGE,
    MODEL_MEMORY_SHARE_MAX,
    MODEL_NICE_RANGE,
    MODEL_OOM_SCORE_ADJ_RANGE,
    MODEL_UNIT_PREFIX,
    SCHED_NUMBERS,
    SCHED_POLICIES,
    clip,
    cpu_weight,
)
from .units import RUNNING, Systemd

Report = dict[str, Any]
UNIT_IO_CLASSES = tuple(c for c in IO_CLASSES if c != "realtime")  # realtime I/O is not granted to callers
UNIT_NAME = re.compile(re.escape(MODEL_UNIT_PREFIX) + r"([0-9]+)-([0-9]+)\.service")
MAX_ARGS = 512
MEMCG_V1 = "/sys/fs/cgroup/memory"
# A model's own v1 memory cgroup: autoglm-model-<owner uid>-<pid>-<start time in ticks>, unique per process.
MEMCG_NAME = re.compile(re.escape(MODEL_UNIT_PREFIX) + r"([0-9]+)-[0-9]+-[0-9]+")
MEMCGS_PER_UID = 4  # in-use model memory cgroups one user may have: each is a root-made directory
_memcg_lock = threading.Lock()  # SetProcess calls run in worker threads: the count and the mkdir go together
STOP_TIMEOUT_US = 10_000_000
TASKS_MAX = 1024  # a model server's threads (compute ≤ CPUs, HTTP workers, a tokenizer pool), not a fork loop
SESSION_SCOPE = r"/user\.slice/user-{uid}\.slice/(session-[A-Za-z0-9]+\.scope)(?:/|$)"  # logind's, from the root


def _echo(value: object) -> str:
    """A caller's value in an error message: as JSON, clipped (the audit log keeps every error)."""
    return clip(json.dumps(value))


def _bad(field: str, problem: str, allowed: str) -> HelperError:
    return HelperError("InvalidArgs", f"{field}: {problem}; allowed: {allowed}")


def _int_in(body: dict[str, Any], key: str, bounds: tuple[int, int]) -> int:
    value = body[key]
    if isinstance(value, bool) or not isinstance(value, int) or not bounds[0] <= value <= bounds[1]:
        raise _bad(key, f"{_echo(value)} is out of range", f"an integer {bounds[0]}–{bounds[1]}")
    return value


def _object(text: str, keys: dict[str, bool], what: str) -> dict[str, Any]:
    """Parse a JSON object with exactly the known keys (`keys`: name → required)."""
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise _bad(what, f"not JSON ({exc})", "a JSON object") from None
    if not isinstance(body, dict):
        raise _bad(what, "not a JSON object", "a JSON object")
    unknown = sorted(set(body) - set(keys))
    if unknown:
        raise _bad(f"{what}.{clip(unknown[0])}", "unknown key", ", ".join(keys))
    missing = [k for k, required in keys.items() if required and k not in body]
    if missing:
        raise _bad(f"{what}.{missing[0]}", "missing", ", ".join(keys))
    return body


# ---- SetProcess ---------------------------------------------------------------------------------

def process_request(text: str) -> dict[str, int]:
    """{"nice": n, "oom_score_adj": n, "swappiness": n}, any of them, within the catalogue's model bounds."""
    body = _object(text, {"nice": False, "oom_score_adj": False, "swappiness": False}, "settings")
    if not body:
        raise _bad("settings", "empty", "nice, oom_score_adj, swappiness")
    out = {}
    if "swappiness" in body:
        out["swappiness"] = _int_in(body, "swappiness", (0, 200))
    if "nice" in body:
        out["nice"] = _int_in(body, "nice", MODEL_NICE_RANGE)
    if "oom_score_adj" in body:
        out["oom_score_adj"] = _int_in(body, "oom_score_adj", MODEL_OOM_SCORE_ADJ_RANGE)
    return out


class OwnedProcess:
    """A caller's process, pinned: a pidfd proves it is alive, and every /proc read and write goes through a
    directory fd opened while the pidfd showed it alive — so a PID reused meanwhile is never read or written."""

    def __init__(self, pid: int, caller_uid: int, proc: str = "/proc") -> None:
        self.allowed = f"the PID of a running process of uid {caller_uid}"
        if pid <= 1:
            raise _bad("pid", f"{pid} is not a model process", self.allowed)
        self.pid = pid
        try:
            self.pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise _bad("pid", f"no process {pid}", self.allowed) from None
        except OSError:  # EINVAL: a thread ID, not a process
            raise _bad("pid", f"{pid} is not a process ID", self.allowed) from None
        try:
            self.dirfd = os.open(f"{proc}/{pid}", os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            os.close(self.pidfd)
            raise _bad("pid", f"no process {pid}", self.allowed) from None
        try:
            self.alive()
            fields = self.read("status").split("Uid:", 1)[1].split("\n", 1)[0].split()
            uids = {int(u) for u in fields}  # real, effective, saved and fs uid
            self.uid = int(fields[0])  # the owner, as a model memory cgroup's name records it
            self.start = int(self.stat()[19])  # field 22: start time in clock ticks since boot
        except (ProcessLookupError, IndexError, ValueError, OSError):
            self.close()
            raise _bad("pid", f"no process {pid}", self.allowed) from None
        if caller_uid != 0 and uids != {caller_uid}:
            self.close()
            raise HelperError("NotAuthorized", f"pid {pid} belongs to uid {min(uids - {caller_uid})}, not to the "
                              f"caller (uid {caller_uid})")

    def alive(self) -> None:
        """Raises ProcessLookupError once the process has ended (a pidfd polls readable then; unlike a signal
        probe this needs no CAP_KILL, which the sandboxed helper does not have)."""
        if select.select([self.pidfd], [], [], 0)[0]:
            raise ProcessLookupError(self.pid)

    def _open(self, name: str, flags: int) -> int:
        try:
            return os.open(name, flags, dir_fd=self.dirfd)
        except OSError:
            self.alive()  # an ended process's directory is empty: that is the error, not ENOENT
            raise

    def read(self, name: str) -> str:
        fd = self._open(name, os.O_RDONLY)
        try:
            return os.read(fd, 65536).decode()
        finally:
            os.close(fd)

    def write(self, name: str, text: str) -> None:
        fd = self._open(name, os.O_WRONLY)
        try:
            os.write(fd, text.encode())
        finally:
            os.close(fd)

    def stat(self) -> list[str]:
        """/proc/PID/stat from field 3 on (after the command name, which may hold spaces and parentheses)."""
        return self.read("stat").rsplit(")", 1)[1].split()

    def nice(self) -> int:
        return int(self.stat()[16])  # field 19: the main thread's nice

    def threads(self) -> list[int]:
        fd = self._open("task", os.O_RDONLY | os.O_DIRECTORY)
        try:
            return sorted(int(t) for t in os.listdir(fd))
        finally:
            os.close(fd)

    def has_thread(self, tid: int) -> bool:
        """Whether `tid` is a live thread of this process: looked up through the pinned directory, so a number
        another process has taken meanwhile is not found."""
        try:
            os.close(self._open(f"task/{tid}", os.O_RDONLY | os.O_DIRECTORY))
        except FileNotFoundError:
            return False
        return True

    def close(self) -> None:
        os.close(self.dirfd)
        os.close(self.pidfd)


def _set_nice(target: OwnedProcess, nice: int) -> str | None:
    """Every thread (nice is per thread; threads started later inherit it from their creator). setpriority takes
    a number: each thread is looked up through the pinned directory right before its write, and the pidfd is
    probed right after, so threads that end while they are walked are skipped and a process that ends is an
    error. The few instructions between lookup and write are left: no interface sets nice through a pidfd."""
    for tid in target.threads():
        if not target.has_thread(tid):  # ended since the listing
            continue
        try:
            os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
        except OSError as exc:
            return f"nice = {nice} not set ({exc.strerror}); it stays {target.nice()}"
        target.alive()
    return None


def _set_oom(target: OwnedProcess, value: int) -> str | None:
    try:
        target.write("oom_score_adj", str(value))
    except PermissionError:
        return (f"oom_score_adj = {value} not set: lowering it needs CAP_SYS_RESOURCE, which the helper lacks here "
                f"(a container or a restricted bounding set); it stays {int(target.read('oom_score_adj'))}")
    return None


def _memcg(target: OwnedProcess) -> str | None:
    """The process's cgroup v1 memory cgroup (a path under MEMCG_V1), or None without one."""
    if not os.path.isdir(MEMCG_V1):
        return None
    for line in target.read("cgroup").splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return path
    return None


def _read_swappiness(target: OwnedProcess) -> int | None:
    path = _memcg(target)
    if path is None:
        return None
    with open(f"{MEMCG_V1}{path.rstrip('/')}/memory.swappiness") as fh:
        return int(fh.read())


def _set_swappiness(target: OwnedProcess, value: int) -> str | None:
    """cgroup v1 keeps a swappiness per memory cgroup, used for its pages in global reclaim too: the model is
    moved into a new child cgroup of its own with `value` (limits of the parent still apply). Pages charged
    before the move stay with the old cgroup (6.18 has no charge moving), so launch asks right after exec,
    before the weights are loaded.

    The new cgroup is made in the process's cgroup or, when that is one of ours, beside it: never inside one of
    ours, so a chain of processes cannot nest them. Its name records the owner, the PID and the start time, so
    no other process has the same one; a directory that exists is never joined; a user has at most
    MEMCGS_PER_UID in use."""
    path = _memcg(target)
    if path is None:
        return (f"swappiness = {value} for the model not set: it needs the cgroup v1 memory controller (on cgroup v2 "
                "the model's systemd unit gets MemoryLow= instead)")
    parent = f"{MEMCG_V1}{path.rstrip('/')}"
    while MEMCG_NAME.fullmatch(os.path.basename(parent)):
        parent = os.path.dirname(parent)
    own = f"{parent}/{MODEL_UNIT_PREFIX}{target.uid}-{target.pid}-{target.start}"
    with _memcg_lock:
        owned = [p for p in remove_stale_cgroups() if _memcg_owner(p) == target.uid]
        if len(owned) >= MEMCGS_PER_UID:
            return (f"swappiness = {value} for the model not set: uid {target.uid} has {len(owned)} model memory "
                    f"cgroups in use, and {MEMCGS_PER_UID} is the limit (one per running model; end one first)")
        try:
            os.mkdir(own)  # not exist_ok: a directory that is there already is never joined
        except FileExistsError:
            return (f"swappiness = {value} for the model not set: {own.removeprefix(MEMCG_V1)} exists already "
                    "(a memory cgroup is never reused)")
        except OSError as exc:  # e.g. the sandboxed helper unit sees /sys/fs/cgroup read-only
            return f"swappiness = {value} for the model not set ({exc.strerror}); it stays in {path}"
        try:
            with open(f"{own}/memory.swappiness", "w") as fh:
                fh.write(str(value))
            _join(target, own, parent)
        except ProcessLookupError:
            raise
        except OSError as exc:
            with contextlib.suppress(OSError):  # else removed as stale on a later call
                os.rmdir(own)
            return f"swappiness = {value} for the model not set ({exc.strerror}); it stays in {path}"
    return None


def _join(target: OwnedProcess, cgroup: str, parent: str) -> None:
    """Move the process (every thread) into the new `cgroup`. cgroup.procs takes a number: the pidfd is probed
    right before and right after the write. Had the process ended in between, whatever the write moved took its
    number in that instant; it goes to `parent` (the model's former cgroup) and the new cgroup is removed."""
    try:
        target.alive()
        with open(f"{cgroup}/cgroup.procs", "w") as fh:
            fh.write(str(target.pid))
        target.alive()
    except ProcessLookupError:
        with open(f"{cgroup}/cgroup.procs") as fh:
            taken = fh.read().split()
        for pid in taken:
            with contextlib.suppress(ProcessLookupError), open(f"{parent}/cgroup.procs", "w") as fh:
                fh.write(pid)
        with contextlib.suppress(OSError):  # else removed as stale on a later call
            os.rmdir(cgroup)
        raise


def _memcg_owner(path: str) -> int | None:
    match = MEMCG_NAME.fullmatch(os.path.basename(path))
    return int(match.group(1)) if match else None


def remove_stale_cgroups() -> list[str]:
    """Remove the model memory cgroups whose models have ended (rmdir fails on one in use); return those in use."""
    in_use = []
    for dirpath, _, _ in os.walk(MEMCG_V1, topdown=False):
        if _memcg_owner(dirpath) is not None:
            try:
                os.rmdir(dirpath)
            except OSError:  # still in use
                in_use.append(dirpath)
    return in_use


def set_process(pid: int, caller_uid: int, request: dict[str, int], dry_run: bool, proc: str = "/proc") -> Report:
    """Apply `request` to the caller's process `pid` (see apply_settings)."""
    target = OwnedProcess(pid, caller_uid, proc)
    try:
        return apply_settings(target, request, dry_run)
    finally:
        target.close()


def apply_settings(target: OwnedProcess, request: dict[str, int], dry_run: bool) -> Report:
    """Apply `request` to the pinned process; each setting is read back. A refusal is a warning, not an error:
    the model runs either way. Not journaled: the settings end with the process."""
    readers = {"nice": target.nice,
               "oom_score_adj": lambda: int(target.read("oom_score_adj")),
               "swappiness": lambda: _read_swappiness(target)}
    writers = {"nice": _set_nice, "oom_score_adj": _set_oom, "swappiness": _set_swappiness}
    changes, warnings = [], []
    try:
        for name, value in request.items():
            old = readers[name]()
            target.alive()
            problem = None if dry_run or old == value else writers[name](target, value)
            new = old if dry_run else readers[name]()
            if problem:
                warnings.append(problem)
            state = "dry-run" if dry_run else "refused" if problem else "done" if new == value else "differs"
            changes.append({"subject": name, "old": old, "target": value, "new": new, "state": state})
        target.alive()
    except ProcessLookupError:
        raise _bad("pid", f"process {target.pid} ended", target.allowed) from None
    return {"result": "dry-run" if dry_run else "set", "pid": target.pid, "changes": changes, "warnings": warnings}


# ---- StartModel / StopModel ---------------------------------------------------------------------

UNIT_KEYS = {
    "argv": True, "environment": False, "working_directory": False, "port": True, "cpus": True,
    "sched_policy": False, "nice": False, "io_class": False, "io_priority": False, "oom_score_adj": False,
    "memory_low": False, "memory_high": False, "memlock": False,
}


def mem_total() -> int:
    with open("/proc/meminfo") as fh:
        total = procfs.parse_meminfo(fh.read()).get("MemTotal")
    if total is None:
        raise OSError("/proc/meminfo has no MemTotal")
    return total * 1024


def unit_request(text: str, cpu_count: int, mem_total: int) -> dict[str, Any]:
    """The transient unit a caller may ask for: its command, environment and process settings, in bounds."""
    body = _object(text, UNIT_KEYS, "unit")
    argv = body["argv"]
    if (not isinstance(argv, list) or not argv or len(argv) > MAX_ARGS
            or not all(isinstance(a, str) and "\0" not in a for a in argv)):
        raise _bad("argv", "not a list of strings", f"1–{MAX_ARGS} strings without NUL")
    if not argv[0].startswith("/"):
        raise _bad("argv[0]", f"{_echo(argv[0])} is not an absolute path", "the program's absolute path")
    cwd = body.get("working_directory", "/")
    if not isinstance(cwd, str) or not cwd.startswith("/") or "\0" in cwd:
        raise _bad("working_directory", f"{_echo(cwd)} is not an absolute path", "an absolute path")
    env = body.get("environment", {})
    if not isinstance(env, dict) or not all(
            isinstance(k, str) and ENV_NAME.fullmatch(k) and isinstance(v, str) and "\0" not in v
            for k, v in env.items()):
        raise _bad("environment", "not an object of NAME: value strings", "names of letters, digits and _")
    cpus = body["cpus"]
    if (not isinstance(cpus, list) or not cpus
            or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c < cpu_count for c in cpus)):
        raise _bad("cpus", f"{_echo(cpus)} is not a list of CPUs", f"CPU numbers 0–{cpu_count - 1}")
    out: dict[str, Any] = {"argv": argv, "environment": env, "working_directory": cwd, "cpus": sorted(set(cpus)),
                           "port": _int_in(body, "port", (1, 65535))}
    for key, choices in (("sched_policy", SCHED_POLICIES), ("io_class", UNIT_IO_CLASSES)):
        if key in body:
            if body[key] not in choices:
                raise _bad(key, f"{_echo(body[key])} is not allowed", ", ".join(choices))
            out[key] = body[key]
    for key, bounds in (("nice", MODEL_NICE_RANGE), ("io_priority", IO_PRIORITY_RANGE),
                        ("oom_score_adj", MODEL_OOM_SCORE_ADJ_RANGE), ("memory_high", (0, mem_total)),
                        ("memory_low", (0, int(mem_total * MODEL_MEMORY_SHARE_MAX))),
                        ("memlock", (0, int(mem_total * MODEL_MEMORY_SHARE_MAX)))):
        if key in body:
            out[key] = _int_in(body, key, bounds)
    return out


def unit_name(uid: int, port: int) -> str:
    return f"{MODEL_UNIT_PREFIX}{uid}-{port}.service"


def caller_session(pid: int | None, uid: int) -> str | None:
    """The logind session scope the caller runs in (session-ID.scope in user-UID.slice), from its cgroup in
    systemd's hierarchy; None without one (a cron job, a service, a shell that pam_systemd did not register)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/cgroup") as fh:
            lines = fh.read().splitlines()
    except OSError:  # the caller has gone
        return None
    scope = re.compile(SESSION_SCOPE.format(uid=uid))  # another uid's session (a PID reused) does not match
    for line in lines:
        _, controllers, path = line.split(":", 2)
        match = scope.match(path) if controllers in ("", "name=systemd") else None  # anchored: no look-alike below
        if match:
            return match.group(1)
    return None


def unit_properties(req: dict[str, Any], uid: int, log_fd_index: int | None, session: str | None = None
                    ) -> list[list[Any]]:
    """StartTransientUnit's a(sv) for `req`, run as `uid`, bound to the caller's `session` scope if any. Pure."""
    mask = sum(1 << c for c in req["cpus"])
    argv = [a.replace("$", "$$") for a in req["argv"]]  # systemd expands $NAME in ExecStart= arguments
    props: list[list[Any]] = [
        ["Description", Variant("s", f"autoglm-tune model server for uid {uid} on port {req['port']}")],
        ["Type", Variant("s", "exec")],  # the start job ends after exec, with every setting applied
        ["ExecStart", Variant("a(sasb)", [[req["argv"][0], argv, False]])],
        ["User", Variant("s", str(uid))],
        ["WorkingDirectory", Variant("s", req.get("working_directory", "/"))],
        ["Environment", Variant("as", [f"{k}={v}" for k, v in sorted(req["environment"].items())])],
        ["CPUAffinity", Variant("ay", mask.to_bytes((max(req["cpus"]) // 8) + 1, "little"))],
        ["NoNewPrivileges", Variant("b", True)],
        ["CollectMode", Variant("s", "inactive-or-failed")],
        ["TimeoutStopUSec", Variant("t", STOP_TIMEOUT_US)],
        # In the user's slice, not system.slice: what limits the user's sessions (user-.slice.d, TasksMax=33% by
        # default, or the admin's MemoryMax=) limits the model too, with nice -10 and LimitMEMLOCK or not.
        ["Slice", Variant("s", f"user-{uid}.slice")],
        ["TasksMax", Variant("t", TASKS_MAX)],
    ]
    if session is not None:
        # BindsTo= + After= the caller's session scope: the model is stopped when the session's scope stops (at
        # logout with KillUserProcesses=yes, else once its last process is gone) and before it. Transient units
        # take dependencies as properties; a scope cannot be started, so BindsTo= never pulls one up. Not
        # PartOf=user@UID.service: lingering keeps the user's manager running past every session.
        props += [["BindsTo", Variant("as", [session])], ["After", Variant("as", [session])]]
    simple: dict[str, tuple[str, str, Callable[[Any], Any]]] = {
        "sched_policy": ("CPUSchedulingPolicy", "i", SCHED_NUMBERS.get),
        "nice": ("Nice", "i", int), "io_class": ("IOSchedulingClass", "i", IO_CLASS_NUMBERS.get),
        "io_priority": ("IOSchedulingPriority", "i", int), "oom_score_adj": ("OOMScoreAdjust", "i", int),
        "memory_low": ("MemoryLow", "t", int), "memory_high": ("MemoryHigh", "t", int)}
    for key, (prop, sig, convert) in simple.items():
        if key in req and (key not in ("memory_low", "memory_high") or req[key] > 0):
            props.append([prop, Variant(sig, convert(req[key]))])
    if "nice" in req:  # nice does not weigh against sibling cgroups (the user's sessions): the weight does
        props.append(["CPUWeight", Variant("t", cpu_weight(int(req["nice"])))])
    if req.get("memlock"):
        props += [["LimitMEMLOCK", Variant("t", req["memlock"])], ["LimitMEMLOCKSoft", Variant("t", req["memlock"])]]
    if log_fd_index is not None:
        props += [["StandardOutputFileDescriptor", Variant("h", log_fd_index)],
                  ["StandardErrorFileDescriptor", Variant("h", log_fd_index)]]
    return props


def start_model(systemd: Systemd | None, req: dict[str, Any], uid: int, log_fd: int | None,
                caller_pid: int | None) -> Report:
    """Start the transient unit, wait for its job, and read back what the process got."""
    if systemd is None:
        raise HelperError("NotSupported", "systemd is not PID 1 on this machine; allowed: launch without a unit")
    unit = unit_name(uid, req["port"])
    running = [u[0] for u in systemd.manager("ListUnitsByPatterns", "asas", list(RUNNING),
                                             [f"{MODEL_UNIT_PREFIX}{uid}-*.service"])[0]]
    if running and uid != 0:  # the bounds hold per user, not per unit
        raise _bad("port", f"{running[0]} is already running: one model unit per user",
                   f"stop it first: systemctl stop {running[0]}")
    props = unit_properties(req, uid, 0 if log_fd is not None else None, caller_session(caller_pid, uid))
    try:
        systemd.start_transient(unit, props, [log_fd] if log_fd is not None else [])
    except FileExistsError:
        raise _bad("port", f"{unit} is already loaded (a model for this user on port {req['port']})",
                   f"another port, or stop it first: systemctl stop {unit}") from None
    state = systemd.unit_property(unit, "org.freedesktop.systemd1.Unit", "ActiveState")
    pid = int(systemd.unit_property(unit, "org.freedesktop.systemd1.Service", "MainPID") or 0)
    if state not in RUNNING or not pid:
        result = systemd.unit_property(unit, "org.freedesktop.systemd1.Service", "Result")
        raise HelperError("Failed", f"{unit} did not start ({state}, result {result}); see the model log")
    warnings = []
    target = OwnedProcess(pid, uid)
    try:
        nice, oom = target.nice(), int(target.read("oom_score_adj"))
    finally:
        target.close()
    if "nice" in req and nice != req["nice"]:
        warnings.append(f"nice = {req['nice']} did not take effect in {unit}; the model runs with nice {nice}")
    if "oom_score_adj" in req and oom != req["oom_score_adj"]:
        warnings.append(f"OOMScoreAdjust = {req['oom_score_adj']} did not take effect in {unit} (systemd lacks "
                        f"CAP_SYS_RESOURCE here and ignores it); the model runs with oom_score_adj {oom}")
    notes = []
    if os.path.isdir("/sys/fs/cgroup/memory"):
        notes.append(f"cgroup v1: {unit} has its own memory.swappiness, copied from its parent cgroup when it "
                     "was made; vm.swappiness changes after boot do not reach it")
    return {"result": "started", "unit": unit, "pid": pid, "nice": nice, "oom_score_adj": oom,
            "warnings": warnings, "notes": notes}


def stop_model(systemd: Systemd | None, unit: object, uid: int) -> Report:
    """Stop a model unit the caller started (root may stop any)."""
    allowed = f"{MODEL_UNIT_PREFIX}{uid}-PORT.service"
    match = UNIT_NAME.fullmatch(unit) if isinstance(unit, str) else None
    if match is None or not isinstance(unit, str):
        raise _bad("unit", f"{_echo(unit)} is not a model unit", allowed)
    if uid != 0 and int(match.group(1)) != uid:
        raise HelperError("NotAuthorized", f"{unit} belongs to uid {match.group(1)}, not to the caller (uid {uid})")
    if systemd is None:
        raise HelperError("NotSupported", "systemd is not PID 1 on this machine; allowed: launch without a unit")
    state = systemd.unit_property(unit, "org.freedesktop.systemd1.Unit", "ActiveState")
    if state in RUNNING:
        systemd.run_job("StopUnit", unit)
    return {"result": "stopped", "unit": unit, "was": state}
