"""The machine under `autoglm-tune bench`: its settings, swap areas and counters, and `Guard`, which records every
setting before anything is touched and puts all of it back at the end — also on Ctrl-C, SIGTERM or SIGHUP — and
checks that it did."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from autoglm_helper.contract import procfs

from ..errors import TuneError
from .design import MIB
from .stats import percentile

CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def read_value(path: str | Path) -> str:
    return Path(path).read_text().strip()


def write_value(path: str | Path, value: str) -> None:
    Path(path).write_text(value)


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB (HugePages_* are counts)."""
    return procfs.parse_meminfo(Path("/proc/meminfo").read_text())


def vmstat(key: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name == key:
            return int(value)
    return 0


def setting_paths() -> dict[str, str]:
    """Every setting a bench configuration may change (the helper's catalogue, hugetlb, and what TuneD's
    throughput-performance profile writes) → its file, for those this kernel has."""
    from autoglm_helper.contract import catalogue

    paths = {name: f"/{knob.path}" for name, knob in catalogue.SCALAR_KNOBS.items()}
    paths |= {
        "vm.nr_hugepages": "/proc/sys/vm/nr_hugepages",
        "vm.min_free_kbytes": "/proc/sys/vm/min_free_kbytes",  # the emulated box's watermarks
        "vm.watermark_scale_factor": "/proc/sys/vm/watermark_scale_factor",
        "vm.dirty_ratio": "/proc/sys/vm/dirty_ratio",
        "vm.dirty_background_ratio": "/proc/sys/vm/dirty_background_ratio",
        "thp.enabled": "/sys/kernel/mm/transparent_hugepage/enabled",
        "thp.defrag": "/sys/kernel/mm/transparent_hugepage/defrag",
    }
    return {name: p for name, p in paths.items() if os.path.exists(p)}


def _selected(text: str) -> str:
    """ "always [madvise] never" → "madvise"; other values unchanged."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text


def read_settings(paths: dict[str, str]) -> dict[str, str]:
    return {name: _selected(read_value(p)) for name, p in paths.items()}


def read_swaps() -> dict[str, int]:
    """Active swap areas (as /proc/swaps shows them) → priority."""
    return {a.shown: a.priority for a in procfs.parse_swaps(Path("/proc/swaps").read_text())}


class Guard:
    """Records every setting first; `restore` stops what the bench started, rolls back its helper transactions,
    removes its swap file and cgroups and writes back every setting it touched — compare-and-set: a value
    another process wrote since is left alone and noted — and returns what is still not back (empty: all
    restored). Signals raise Interrupted, so that the code unwinds through its finally blocks; from the first
    signal on, further ones are ignored."""

    def __init__(self) -> None:
        self.paths = setting_paths()
        self.settings = read_settings(self.paths)
        self.swaps = read_swaps()
        self.procs: list[subprocess.Popen[Any]] = []
        self.cgroups: list[Path] = []
        self.files: list[Path] = []
        self.txids: list[str] = []
        self.touched: set[str] = set()  # settings the bench (or what it ran) may have changed
        self.expected: dict[str, str] = {}  # what the bench (or the helper for it) wrote there
        self.foreign: dict[str, str] = {}  # touched settings another process changed since: left alone
        self.notes: list[str] = []
        self.previous: dict[int, Any] = {}  # read by _raise, which may run while the next line runs
        self.previous = {s: signal.signal(s, self._raise) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def _raise(self, signum: int, _frame: object) -> None:
        for s in self.previous:  # one signal is enough: the rest of the way is clean-up
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    def set(self, name: str, value: str) -> None:
        self.touched.add(name)
        self.expected[name] = value
        write_value(self.paths[name], value)

    def applied(self, changes: list[dict[str, Any]]) -> None:
        """Settings the helper wrote for the bench (its report's subject and read-back value)."""
        for c in changes:
            if c["subject"] in self.paths:
                self.touched.add(c["subject"])
                new = c["new"]
                self.expected[c["subject"]] = ("Y" if new else "N") if isinstance(new, bool) else str(new)

    def start(self, argv: list[str], cgroup: Path | None, **kwargs: Any) -> subprocess.Popen[Any]:
        """A child in its own process group (killed as a group), in `cgroup` before it allocates anything."""
        procs_file = str(cgroup / "cgroup.procs") if cgroup else None

        def enter() -> None:
            if procs_file:
                with open(procs_file, "w") as fh:
                    fh.write("0")

        proc = subprocess.Popen(argv, process_group=0, preexec_fn=enter, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 15.0) -> None:
        from ..launch import stop_group

        stop_group(proc, grace)
        if proc in self.procs:
            self.procs.remove(proc)

    def adopt_live(self) -> None:
        """The live values are what the bench wrote: after a tuner the bench started (TuneD) has stopped, its
        writes are the bench's to undo, not another process's to leave alone."""
        self.expected.update(read_settings(self.paths))

    def rollback(self, txid: str) -> None:
        """Through the helper; when it refuses (another process changed a value since: drift), the settings are
        put back knob by knob by `reset_settings`, which leaves the other process's values alone."""
        from .. import helper_client

        self.txids.remove(txid)
        try:
            helper_client.rollback(txid, False, False)
        except TuneError as exc:
            self.notes.append(f"helper rollback of {txid} refused ({exc}); restored knob by knob instead")

    def reset_settings(self) -> None:
        """Every touched setting back where it differs: hugetlb pages first (they free RAM for the rest), zswap
        off last. Settings the bench did not touch are left alone: others may change them on a shared machine."""
        for name in sorted(self.touched, key=lambda n: (n != "vm.nr_hugepages", n == "zswap.enabled")):
            with contextlib.suppress(OSError):
                live = _selected(read_value(self.paths[name]))
                if live == self.settings[name]:
                    continue
                if name in self.expected and live != self.expected[name]:
                    self.foreign[name] = live
                    continue
                write_value(self.paths[name], self.settings[name])

    def remove_cgroup(self, cg: Path) -> None:
        """rmdir (children first: launch gives the model a memory cgroup of its own inside the run's), retried
        while the last task is still on its way out (EBUSY)."""
        for _ in range(50):
            try:
                for child in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                    child.rmdir()
                cg.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        if not cg.exists() and cg in self.cgroups:
            self.cgroups.remove(cg)

    def restore(self) -> list[str]:
        for s in self.previous:
            signal.signal(s, signal.SIG_IGN)
        problems = []
        for proc in list(self.procs):
            self.stop(proc, grace=10.0)
        for txid in list(self.txids):
            self.rollback(txid)
        for path in self.files:
            if str(path) in read_swaps():
                subprocess.run(["swapoff", str(path)], check=False, capture_output=True)
        # priorities the helper changed and could not roll back; areas others added or removed meanwhile are theirs
        for area, priority in self.swaps.items():
            if read_swaps().get(area, priority) != priority:
                subprocess.run(["swapoff", area], check=False, capture_output=True)
                prio = ["-p", str(priority)] if priority >= 0 else []
                subprocess.run(["swapon", *prio, area], check=False, capture_output=True)
        self.reset_settings()
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for cg in list(self.cgroups):
            self.remove_cgroup(cg)
        now = read_settings(self.paths)
        was = self.settings
        problems += [
            f"{n} is {now[n]}, was {was[n]}" for n in sorted(self.touched) if now[n] != was[n] and n not in self.foreign
        ]
        self.notes += [
            f"{n} was changed by another process during the bench (to {v}); left alone" for n, v in self.foreign.items()
        ]
        swaps = read_swaps()
        problems += [f"swap area {a} has priority {swaps[a]}, had {p}" for a, p in self.swaps.items()
                     if swaps.get(a, p) != p]
        problems += [f"swap file {p} is still active" for p in self.files if str(p) in swaps]
        problems += [f"{p} is still there" for p in [*self.files, *self.cgroups] if p.exists()]
        problems += [f"process {p.pid} still runs" for p in self.procs if p.poll() is None]
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return problems


def memory_cgroup_of(pid: int) -> tuple[str | None, int | None]:
    """The process's cgroup v1 memory cgroup and that cgroup's swappiness (None on cgroup v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            knob = Path(f"/sys/fs/cgroup/memory{path.rstrip('/')}/memory.swappiness")
            return path, int(knob.read_text()) if knob.exists() else None
    return None, None


def physical_cores() -> int:
    """What llama.cpp's default -t would be: distinct thread_siblings masks (research §4.1)."""
    cpus = sorted(os.sched_getaffinity(0))
    siblings = set()
    for c in cpus:
        try:
            siblings.add(read_value(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings"))
        except OSError:
            siblings.add(str(c))
    return max(1, len(siblings))


DAMON_ADMIN = Path("/sys/kernel/mm/damon/admin/kdamonds")


def damon_schemes() -> list[dict[str, Any]]:
    """Proactive reclaim that runs beside the bench: DAMON schemes of kdamonds that are on (a VM host may set one
    up: the CI VM pages out cold unmapped page cache). Each as its action, access pattern and filters."""
    out = []
    for scheme in sorted(DAMON_ADMIN.glob("*/contexts/*/schemes/[0-9]*")):
        with contextlib.suppress(OSError, ValueError):
            if read_value(scheme.parents[3] / "state") != "on":
                continue
            filters = [f"{'allow' if read_value(f / 'allow') == 'Y' else 'reject'} {read_value(f / 'type')}"
                       for f in sorted((scheme / "ops_filters").glob("[0-9]*"))]
            out.append({
                "operations": read_value(scheme.parents[1] / "operations"),
                "action": read_value(scheme / "action"),
                "min_age_intervals": int(read_value(scheme / "access_pattern" / "age" / "min")),
                "max_accesses": int(read_value(scheme / "access_pattern" / "nr_accesses" / "max")),
                "quota_bytes_per_s": int(read_value(scheme / "quotas" / "bytes")),
                "filters": filters,
            })
    return out


def machine_info() -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        "unknown CPU",
    )
    cgroup = "v1" if (CGROUP_V1_MEMORY / "cgroup.procs").exists() else "v2"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_total_mib": meminfo()["MemTotal"] // 1024,
        "kernel": os.uname().release,
        "cgroup_memory": cgroup,
        "hostname": os.uname().nodename,
        "damon": damon_schemes(),
    }


def vm_counters() -> dict[str, int]:
    """The reclaim and swap counters that explain a result (/proc/vmstat), PSI totals in ms (/proc/pressure)."""
    wanted = {"pswpin", "pswpout", "zswpin", "zswpout", "oom_kill", "workingset_refault_anon",
              "workingset_refault_file"}
    out = dict.fromkeys(("pgscan", "pgsteal", "allocstall"), 0)
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name in wanted:
            out[name] = int(value)
        for prefix in ("pgscan", "pgsteal", "allocstall"):
            if name.startswith(prefix + "_") and not name.startswith("pgscan_skip"):
                out[prefix] += int(value)
    for resource in ("memory", "io", "cpu"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/pressure/{resource}").read_text().splitlines():
                kind, *fields = line.split()
                total = dict(f.split("=") for f in fields)["total"]
                out[f"psi_{resource}_{kind}_ms"] = int(total) // 1000
    return out


def swap_latency(work: Path, mib: int = 64, samples: int = 200) -> dict[str, float]:
    """4 KiB random reads and synchronous writes with O_DIRECT on a scratch file in the swap file's directory:
    what a swap-in costs here (a virtio disk the host probably caches is far faster than a laptop's HDD)."""
    import mmap
    import random

    path = work / "latency.probe"
    with path.open("wb") as fh:
        fh.write(os.urandom(mib * MIB))
        fh.flush()
        os.fsync(fh.fileno())
    buf = mmap.mmap(-1, 4096)
    rng = random.Random(1)
    reads, writes = [], []
    fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    try:
        for _ in range(samples):
            offset = rng.randrange(mib * MIB // 4096) * 4096
            t = time.perf_counter()
            os.preadv(fd, [buf], offset)
            reads.append((time.perf_counter() - t) * 1e6)
            t = time.perf_counter()
            os.pwritev(fd, [buf], offset)
            writes.append((time.perf_counter() - t) * 1e6)
    finally:
        os.close(fd)
        path.unlink()
    return {"read_p50_us": round(percentile(reads, 50), 1), "read_p99_us": round(percentile(reads, 99), 1),
            "write_p50_us": round(percentile(writes, 50), 1), "write_p99_us": round(percentile(writes, 99), 1)}


def zone_watermarks() -> dict[str, dict[str, int]]:
    """/proc/zoneinfo's min/low/high (pages) and managed pages per zone that has memory."""
    zones: dict[str, dict[str, int]] = {}
    name = None
    for line in Path("/proc/zoneinfo").read_text().splitlines():
        words = line.split()
        if line.startswith("Node"):
            name = f"{words[1].rstrip(',')}/{words[3]}"
        elif name and len(words) == 2 and words[0] in ("min", "low", "high", "managed"):
            zones.setdefault(name, {})[words[0]] = int(words[1])
    return {z: v for z, v in zones.items() if v.get("managed")}


def emulated_watermarks(ram_mib: int, total_mib: int, scale_factor: int) -> dict[str, str]:
    """min_free_kbytes and watermark_scale_factor for a box of `ram_mib`: the kernel sizes both from the
    zone's managed pages, which still include the hugetlb reservation (min_free_kbytes = √(16 × KiB of RAM),
    clamped to 128–262144; the low–high gap is scale_factor / 10000 of the zone)."""
    import math

    min_free = max(128, min(262144, math.isqrt(ram_mib * 1024 * 16)))
    return {"vm.min_free_kbytes": str(min_free),
            "vm.watermark_scale_factor": str(max(1, round(scale_factor * ram_mib / total_mib)))}


def _copier(cpu: int, size: int, repeats: int, ready: int, go: int, done: int) -> None:
    """A forked child of memcpy_gbs_on: pinned to `cpu`, its buffers touched, then `repeats` copies on "go"."""
    code = 0
    try:
        os.sched_setaffinity(0, {cpu})
        src = bytearray(os.urandom(1 << 20)) * (size // MIB)
        dst = bytearray(size)
        os.write(ready, b".")
        if os.read(go, 1):
            for _ in range(repeats):
                memoryview(dst)[:] = src
            os.write(done, b".")
    except BaseException:  # a child reports any failure as "!" and exits: it never returns into the caller
        code = 1
        with contextlib.suppress(OSError):
            os.write(ready, b"!")
            os.write(done, b"!")
    os._exit(code)


def memcpy_gbs_on(cpus: set[int], mib: int = 128, repeats: int = 3) -> float:
    """The memory bandwidth the model's threads share: one copier per CPU in `cpus`, pinned, all copying at
    once (`mib` MiB split among them, at least 32 MiB each); GB/s copied by all together. One copier measures
    one core, which on many machines reaches a fraction of what all cores read together (on the CI VM on
    2026-12-03 the 9B model decoded at 117 % of the limit one copier gave)."""
    order = sorted(cpus)
    size = max(32, mib // len(order)) * MIB
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    pids: list[int] = []
    try:
        for cpu in order:
            pid = os.fork()
            if pid == 0:
                _copier(cpu, size, repeats, ready_w, go_r, done_w)
            pids.append(pid)
        for fd in (ready_w, go_r, done_w):  # a copier that dies leaves EOF here, not a wait for ever
            os.close(fd)
        ready_w = go_r = done_w = -1

        def collect(fd: int, what: str) -> None:
            got = b""
            while len(got) < len(order):
                chunk = os.read(fd, len(order) - len(got))
                if not chunk or b"!" in chunk:
                    raise TuneError(f"the memcpy probe failed {what} (a copier ended early)")
                got += chunk

        collect(ready_r, "to start")
        t = time.perf_counter()
        os.write(go_w, b"." * len(order))
        collect(done_r, "while copying")
        wall = time.perf_counter() - t
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, go_r, go_w, done_r, done_w):
            if fd >= 0:
                os.close(fd)
    return round(len(order) * repeats * size / wall / 1e9, 2)


def memcpy_gbs(mib: int = 256, repeats: int = 3) -> float:
    """The calibration probe's memory bandwidth: the best of a few memcpys of `mib` MiB."""
    src = bytearray(os.urandom(1 << 20)) * mib
    dst = bytearray(len(src))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        memoryview(dst)[:] = src
        best = min(best, time.perf_counter() - t)
    return round(len(src) / best / 1e9, 2)
