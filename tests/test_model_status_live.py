"""What `status` reads about the running model, without the helper: real processes on this machine, their settings
through psutil and their delays from the kernel's own counters."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from autoglm_tune.model_status import read_delays, read_process

# hashlib releases the GIL on large buffers: the four threads really run (and wait) at once
SPINNERS = """
import hashlib, threading, time
block = bytes(1 << 20)
def spin():
    end = time.monotonic() + 1.5
    while time.monotonic() < end:
        hashlib.sha256(block).digest()
threads = [threading.Thread(target=spin) for _ in range(4)]
for t in threads:
    t.start()
print("go", flush=True)
for t in threads:
    t.join()
time.sleep(30)
"""


def test_cpu_wait_is_summed_over_the_threads_and_pressure_is_the_processes_cgroup() -> None:
    """Only live threads are summed (ended ones leave /proc/PID/task), the pressure is that of the process's own
    cgroup, and a process that is gone reads as None."""
    proc = subprocess.Popen([sys.executable, "-c", SPINNERS], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "go\n"
        time.sleep(1.7)  # the spinners are done; their threads have exited, so only what lives is summed
        report = read_delays(proc.pid)
        assert report is not None and report["pid"] == proc.pid
        assert report["threads"] == 1, report  # the ended threads are gone from /proc/PID/task
        main = int(Path(f"/proc/{proc.pid}/task/{proc.pid}/schedstat").read_text().split()[1]) / 1e6
        assert abs(report["cpu_delay_ms"] - main) < 1, report
        cgroup = next(line[3:] for line in Path(f"/proc/{proc.pid}/cgroup").read_text().splitlines()
                      if line.startswith("0::"))
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():  # cgroup v2: its cgroup's PSI
            assert report["memory_pressure"]["cgroup"] == cgroup, report
            assert report["memory_pressure"]["some_ms"] >= report["memory_pressure"]["full_ms"] >= 0
        else:  # cgroup v1 (the CI host): no per-cgroup PSI, said as unknown
            assert report["memory_pressure"] is None, report
    finally:
        proc.kill()
        proc.wait()
    assert read_delays(proc.pid) is None  # gone


def test_cpu_wait_of_live_threads() -> None:
    """While four threads share one CPU for 1.5 s, about three wait at any time: ≈ 4.5 s summed, where one thread
    alone has waited ≈ 1.1 s (a reader of the main thread or of one thread only stays far below 2.5 s)."""
    code = SPINNERS.replace("end = time.monotonic() + 1.5", "end = time.monotonic() + 60")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}))
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "go\n"
        time.sleep(1.5)
        report = read_delays(proc.pid)
        assert report is not None and report["threads"] == 5, report
        assert report["cpu_delay_ms"] > 2500, report
    finally:
        proc.kill()
        proc.wait()


def test_process_settings_as_the_kernel_has_them() -> None:
    """A process started with nice 5, SCHED_BATCH, the idle I/O class and one CPU reads back as exactly that."""

    def settle() -> None:
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
        os.sched_setscheduler(0, os.SCHED_BATCH | os.SCHED_RESET_ON_FORK, os.sched_param(0))  # flag ORed in
        os.nice(5)

    proc = subprocess.Popen(["ionice", "-c", "3", sys.executable, "-c", "import time; b = b'x' * (64 << 20); "
                             "print('go', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True,
                            preexec_fn=settle)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "go\n"
        got = read_process(proc.pid)
        assert got is not None
        assert got["cpus"] == str(max(os.sched_getaffinity(0))) and got["threads"] == 1
        assert (got["nice"], got["sched_policy"], got["io_class"]) == (5, "batch", "idle"), got
        assert got["oom_score_adj"] == 0 and got["command"][0] == sys.executable
        assert got["rss_kib"] >= 64 * 1024 and got["uss_kib"] >= 60 * 1024 and got["swap_kib"] is not None, got
    finally:
        proc.kill()
        proc.wait()
    assert read_process(proc.pid) is None
