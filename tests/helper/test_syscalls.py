"""What kill -9 cannot tell, seen in the real helper's system calls (strace attached to it, tests/run installs it):
the journal reaches the disk before the first knob write, and a write the kernel silently does not keep is caught
by the read-back and rolled back."""

from __future__ import annotations

import contextlib
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

from autoglm_helper import knobs
from autoglm_helper.contract import catalogue
from autoglm_helper.contract.bus import ERROR_PREFIX
from helper_parts import SWAP_DIR_ROOT, Helper, _wait, live, plan_json, scalar_change

LINE = re.compile(r"(?:(\d+) +)?(?:<\.\.\. (\w+) resumed>(.*)|(\w+)\((.*))")


@contextlib.contextmanager
def traced(helper: Helper, out: Path, *options: str) -> Iterator[None]:
    """strace -f attached to every thread of the running helper (and those it starts), detached on exit."""
    assert shutil.which("strace"), "strace is missing (tests/run installs it)"
    assert helper.proc is not None
    pid = helper.proc.pid
    tracer = subprocess.Popen(["strace", "-f", "-qq", "-o", str(out), *options, "-p", str(pid)])
    tasks = Path(f"/proc/{pid}/task")

    def attached() -> bool:
        try:
            return all("TracerPid:\t0\n" not in (task / "status").read_text() for task in tasks.iterdir())
        except FileNotFoundError:  # a thread ended meanwhile
            return False

    try:
        _wait(attached, "strace to attach to the helper")
        yield
    finally:
        tracer.send_signal(signal.SIGINT)  # strace detaches, the helper runs on
        tracer.wait(10)


def calls(trace: Path) -> list[tuple[str, str]]:
    """(syscall, arguments and result) in the order the calls returned; a call another thread interrupted
    ("<unfinished ...>", then "<... resumed>") is put together; signals and exits are left out."""
    started: dict[str, tuple[str, str]] = {}
    out = []
    for line in trace.read_text().splitlines():
        m = LINE.match(line)
        if m is None:
            continue
        pid, resumed, rest, name, args = m.groups()
        if resumed:
            name, args = resumed, started.pop(pid, (resumed, ""))[1] + rest  # "": begun before strace attached
        if args.endswith("<unfinished ...>"):
            started[pid] = (name, args.removesuffix("<unfinished ...>"))
        else:
            out.append((name, args))
    return out


def on(args: str, path: str) -> bool:
    """The call's first argument is an fd open on `path` (strace -y writes it as N<path>)."""
    return re.match(r"\d+<" + re.escape(path) + ">", args) is not None


def test_the_journal_and_its_folder_are_fsynced_before_the_first_knob_write(helper: Helper, tmp_path: Path) -> None:
    """The last journal save before the knob write: the step's intent written to the temp file, the file fsynced,
    renamed over the journal, and the tx folder fsynced, all before the knob's file is written."""
    knob, old = "vm.swappiness", live("vm.swappiness")
    knob_path = "/" + catalogue.SCALAR_KNOBS[knob].path
    trace, tx = tmp_path / "trace", str(helper.state_dir / "tx")
    with traced(helper, trace, "-y", "-s", "65536",
                "-e", "trace=openat,write,fsync,fdatasync,rename,renameat,renameat2"):
        report = helper.c.ok("Apply", plan_json(scalar_change(knob, old, old + 1 if old < 200 else old - 1)),
                             False, False)
    helper.c.ok("Rollback", report["txid"], False, False)
    journal = f"{tx}/{report['txid']}.json"
    seen = calls(trace)
    knob_write = next(i for i, (name, args) in enumerate(seen) if name == "write" and on(args, knob_path))
    renames = [i for i, (name, args) in enumerate(seen[:knob_write])
               if name.startswith("rename") and f'"{journal}.tmp", ' in args and f'"{journal}"' in args]
    assert renames, "the journal was not saved before the knob write"
    before = seen[max([i + 1 for i in renames[:-1]], default=0):renames[-1]]  # since the previous save
    written = [i for i, (name, args) in enumerate(before) if name == "write" and on(args, journal + ".tmp")]
    assert written and '\\"state\\": \\"intent\\"' in before[written[-1]][1], "the step's intent was not journaled"
    assert any(name in ("fsync", "fdatasync") and on(args, journal + ".tmp")
               for name, args in before[written[-1]:]), "the journal's temp file was not fsynced before its rename"
    assert any(name in ("fsync", "fdatasync") and on(args, tx)
               for name, args in seen[renames[-1]:knob_write]), "the tx folder was not fsynced before the knob write"


def test_a_write_the_kernel_does_not_keep_fails_the_read_back_and_is_rolled_back(helper: Helper,
                                                                                   tmp_path: Path) -> None:
    """The compressor write is answered "done" (all bytes written) and leaves the old compressor: what the kernel
    does when it falls back from an algorithm. strace makes it so: the write to that one file returns its length
    without reaching the kernel."""
    knob, old = "zswap.compressor", live("zswap.compressor")
    target = next(c for c in knobs.compressors() if c != old)
    path = "/" + catalogue.SCALAR_KNOBS[knob].path
    trace = tmp_path / "trace"
    with traced(helper, trace, "-P", path, "-e", "trace=write", "-e", f"inject=write:retval={len(target)}"):
        name, text = helper.c.error("Apply", plan_json(scalar_change(knob, old, target)), False, False)
    assert [line for line in trace.read_text().splitlines() if "(INJECTED)" in line], "strace injected nothing"
    assert name == ERROR_PREFIX + "Failed"
    assert text.startswith(f"{knob}: reads back {old!r} after writing {target!r}; transaction ")
    assert text.endswith(" rolled-back") and live(knob) == old
    tx = helper.journal()[-1]
    assert tx["state"] == "rolled-back" and [s["state"] for s in tx["steps"]] == ["undone"]


def test_a_swap_file_is_made_swapped_on_and_removed_through_fds_not_by_its_path(helper: Helper,
                                                                                 tmp_path: Path) -> None:
    """Issue 14, finding 7: once the walk from / has opened each directory (no symbolic link followed, each one
    checked on its fd), no call names a path below the swap directories again: the directories and the file are
    made and removed relative to their directory's fd, swapon and swapoff go through /proc/self/fd."""
    directory = catalogue.SWAP_FILE_DIRS[0]
    change = {"knob": "swap.file", "current": None, "target": 64, "persistence": "persistent", "reason": "test",
              "path": f"{directory}/{catalogue.SWAP_FILE_NAME}", "priority": 3}
    trace = tmp_path / "trace"
    with traced(helper, trace, "-y", "-e", "trace=openat,mkdir,mkdirat,unlink,unlinkat,rmdir,swapon,swapoff"):
        report = helper.c.ok("Apply", plan_json(change), False, False)
        helper.c.ok("Rollback", report["txid"], False, False)
    seen = calls(trace)
    swaps = [(name, args) for name, args in seen if name in ("swapon", "swapoff")]
    assert [name for name, _ in swaps] == ["swapon", "swapoff"], swaps
    assert all(re.match(r'"/proc/self/fd/\d+"[,)]', args) for _, args in swaps), swaps
    assert [(name, args) for name, args in seen if f'"{SWAP_DIR_ROOT}' in args] == []  # no path names it

    def relative(call: str) -> list[tuple[str, str]]:
        """(the directory fd's path, the name) of each `call`."""
        found = (re.match(r'\d+<([^>]*)>, "([^"]*)"', args) for name, args in seen if name == call)
        return [m.groups() if m else ("", "") for m in found]

    assert relative("mkdirat") == [("/var/lib", "autoglm-tune"), (SWAP_DIR_ROOT, "swap")]
    made, walk = (directory, catalogue.SWAP_FILE_NAME), (SWAP_DIR_ROOT, "swap")  # the file, its directory
    assert [call for call in relative("openat") if SWAP_DIR_ROOT in call[0]] == [walk, made, walk, made]
    assert relative("unlinkat") == [(directory, catalogue.SWAP_FILE_NAME), (SWAP_DIR_ROOT, "swap"),
                                    ("/var/lib", "autoglm-tune")]
