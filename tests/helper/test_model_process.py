"""The helper's model-process methods through the real polkitd, as unprivileged test users: SetProcess (negative
nice on every thread; negative oom_score_adj, refused with a warning where the helper lacks CAP_SYS_RESOURCE),
only for the caller's own process and within the catalogue's bounds; and
`autoglm-tune launch` asking the helper for what the launcher itself may not set."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from autoglm_helper.contract.bus import ERROR_PREFIX
from autoglm_helper.contract.catalogue import MODEL_NICE_RANGE, MODEL_OOM_SCORE_ADJ_RANGE
from helper_parts import ALLOWED_USER, BIN, DENIED_USER, Bus, Helper
from support import CAP_SYS_RESOURCE, free_port, has_capability

THREADED = (
    "import threading, time\n"
    "for _ in range(3):\n"
    "    threading.Thread(target=time.sleep, args=(600,), daemon=True).start()\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)
# A caller of the helper, run as a test user: member, signature and JSON body in argv; the reply as JSON.
CALLER = """
import asyncio, json, sys
from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus
from autoglm_helper.contract.bus import BUS_NAME, INTERFACE, OBJECT_PATH

async def main():
    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
    msg = Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member=sys.argv[1],
                  signature=sys.argv[2], body=json.loads(sys.argv[3]))
    reply = await bus.call(msg)
    if reply.message_type == MessageType.ERROR:
        print(json.dumps({"error": reply.error_name, "text": reply.body[0]}))
    else:
        print(json.dumps({"ok": json.loads(reply.body[0])}))

asyncio.run(main())
"""


def as_user(user: str) -> list[str]:
    pw = pwd.getpwnam(user)
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups"]


def call(bus: Bus, user: str, member: str, signature: str, *body: Any) -> dict[str, Any]:
    proc = subprocess.run([*as_user(user), str(BIN / "python"), "-c", CALLER, member, signature, json.dumps(body)],
                          env=bus.env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def nices(pid: int) -> list[int]:
    """nice of every thread (field 19 of /proc/PID/task/TID/stat)."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        out.append(int(fields[16]))
    return out


def oom_score_adj(pid: int) -> int:
    return int(Path(f"/proc/{pid}/oom_score_adj").read_text())


@contextlib.contextmanager
def process_of(user: str) -> Iterator[int]:
    """A process with four threads owned by `user`; killed afterwards."""
    proc = subprocess.Popen([*as_user(user), str(BIN / "python"), "-c", THREADED], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(10)


def test_own_process_gets_negative_nice_on_every_thread_and_oom_score_adj_or_a_warning(helper: Helper) -> None:
    with process_of(ALLOWED_USER) as pid:
        assert nices(pid) == [0, 0, 0, 0]
        reply = call(helper.bus, ALLOWED_USER, "SetProcess", "usb", pid,
                     json.dumps({"nice": -5, "oom_score_adj": -500}), False)
        report = reply["ok"]
        assert report["result"] == "set" and report["pid"] == pid
        assert nices(pid) == [-5, -5, -5, -5]
        changes = {c["subject"]: c for c in report["changes"]}
        assert changes["nice"] == {"subject": "nice", "old": 0, "target": -5, "new": -5, "state": "done"}
        if has_capability(CAP_SYS_RESOURCE):
            assert oom_score_adj(pid) == -500 and changes["oom_score_adj"]["state"] == "done"
            assert report["warnings"] == []
        else:  # the CI machine: even root lacks CAP_SYS_RESOURCE, so the kernel says EACCES
            assert oom_score_adj(pid) == 0
            assert changes["oom_score_adj"] == {"subject": "oom_score_adj", "old": 0, "target": -500, "new": 0,
                                                "state": "refused"}
            assert len(report["warnings"]) == 1
            assert "oom_score_adj = -500 not set" in report["warnings"][0]
            assert "CAP_SYS_RESOURCE" in report["warnings"][0] and "stays 0" in report["warnings"][0]
        entry = helper.audit()[-1]
        assert entry["method"] == "SetProcess" and entry["uid"] == pwd.getpwnam(ALLOWED_USER).pw_uid
        assert entry["result"] == "set"


def test_someone_elses_process_is_refused(helper: Helper) -> None:
    with process_of(DENIED_USER) as pid:
        reply = call(helper.bus, ALLOWED_USER, "SetProcess", "usb", pid, json.dumps({"nice": -5}), False)
        assert reply["error"] == ERROR_PREFIX + "NotAuthorized"
        assert f"pid {pid} belongs to uid {pwd.getpwnam(DENIED_USER).pw_uid}" in reply["text"]
        assert nices(pid) == [0, 0, 0, 0]
    assert helper.proc is not None
    helper_pid = helper.proc.pid
    reply = call(helper.bus, ALLOWED_USER, "SetProcess", "usb", helper_pid, json.dumps({"nice": -5}), False)
    assert reply["error"] == ERROR_PREFIX + "NotAuthorized"
    assert os.getpriority(os.PRIO_PROCESS, helper_pid) == 0


def test_a_user_polkit_does_not_allow_is_refused_but_may_dry_run(helper: Helper) -> None:
    with process_of(DENIED_USER) as pid:
        reply = call(helper.bus, DENIED_USER, "SetProcess", "usb", pid, json.dumps({"nice": -3}), False)
        assert reply["error"] == ERROR_PREFIX + "NotAuthorized" and "io.github.autoglm_tune.model" in reply["text"]
        dry = call(helper.bus, DENIED_USER, "SetProcess", "usb", pid, json.dumps({"nice": -3}), True)["ok"]
        assert dry["result"] == "dry-run"
        assert dry["changes"] == [{"subject": "nice", "old": 0, "target": -3, "new": 0, "state": "dry-run"}]
        assert nices(pid) == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("settings", "needles"),
    [
        ({"nice": MODEL_NICE_RANGE[0] - 1}, ["nice:", "out of range", f"allowed: an integer {MODEL_NICE_RANGE[0]}–"]),
        ({"oom_score_adj": -1000}, ["oom_score_adj:", f"allowed: an integer {MODEL_OOM_SCORE_ADJ_RANGE[0]}–"]),
        ({"nice": "-5"}, ["nice:", "out of range"]),
        ({"nice": -5, "cpus": [0]}, ["settings.cpus: unknown key", "allowed: nice, oom_score_adj"]),
        ({}, ["settings: empty", "allowed: nice, oom_score_adj"]),
        ("not json", ["settings: not JSON"]),
    ],
)
def test_out_of_bounds_and_malformed_settings_are_refused(helper: Helper, settings: Any, needles: list[str]) -> None:
    with process_of(ALLOWED_USER) as pid:
        text = settings if isinstance(settings, str) else json.dumps(settings)
        reply = call(helper.bus, ALLOWED_USER, "SetProcess", "usb", pid, text, False)
        assert reply["error"] == ERROR_PREFIX + "InvalidArgs"
        for needle in needles:
            assert needle in reply["text"], reply["text"]
        assert nices(pid) == [0, 0, 0, 0] and oom_score_adj(pid) == 0


@pytest.mark.parametrize(("pid", "needle"), [(1, "1 is not a model process"), (0x7FFFFFF0, "no process")])
def test_bad_pids_are_refused(helper: Helper, pid: int, needle: str) -> None:
    reply = call(helper.bus, ALLOWED_USER, "SetProcess", "usb", pid, json.dumps({"nice": -5}), False)
    assert reply["error"] == ERROR_PREFIX + "InvalidArgs" and needle in reply["text"], reply


SERVER = """
import http.server, threading, sys
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
for _ in range(2):
    threading.Thread(target=threading.Event().wait, daemon=True).start()
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""


def test_launch_asks_the_helper_for_what_it_may_not_set(helper: Helper) -> None:
    """The launcher (an unprivileged user) is refused nice -4 and oom_score_adj -300 before exec; the helper
    sets them on the running server; whatever still cannot be set is one plain warning."""
    with tempfile.TemporaryDirectory(prefix="agt-launch-") as tmp:
        work = Path(tmp)
        work.chmod(0o777)
        (work / "etc").mkdir()
        port = free_port()
        policy = work / "policy.toml"
        policy.write_text(tomli_w.dumps({
            "process": {"nice": -4, "oom_score_adj": -300, "sched_policy": "other"},
            "model": {"preset": "llama-server", "port": port, "supervisor": "launch"},
        }))
        (work / "server.py").write_text(SERVER)
        env = {**helper.bus.env(), "AUTOGLM_TUNE_ETC": str(work / "etc"), "HOME": str(work)}
        env = {k: v for k, v in env.items() if "proxy" not in k.lower()}
        argv = [*as_user(ALLOWED_USER), str(BIN / "autoglm-tune"), "launch", "--policy", str(policy), "--json",
                "--log", str(work / "model.log"), "--", str(BIN / "python"), str(work / "server.py"), str(port)]
        launcher = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert launcher.stdout is not None
            line = launcher.stdout.readline()
            assert line, launcher.stderr.read() if launcher.stderr else ""
            ready = json.loads(line)
            pid = ready["pid"]
            assert ready["event"] == "ready"
            assert nices(pid) == [-4] * len(nices(pid)) and len(nices(pid)) >= 3
            assert oom_score_adj(pid) == (-300 if has_capability(CAP_SYS_RESOURCE) else 0)
        finally:
            launcher.send_signal(signal.SIGTERM)
            _, err = launcher.communicate(timeout=30)
        assert launcher.returncode == 0, err
        warnings = [line for line in err.splitlines() if line.startswith("autoglm-tune: warning:")]
        assert not any("nice" in w for w in warnings), warnings  # the helper set it: no warning left
        if has_capability(CAP_SYS_RESOURCE):
            assert warnings == [], err
        else:
            assert len(warnings) == 1 and "oom_score_adj = -300 not set" in warnings[0], err
            assert "CAP_SYS_RESOURCE" in warnings[0]
        assert not Path(f"/proc/{pid}").exists()
        entry = [e for e in helper.audit() if e["method"] == "SetProcess"][-1]
        assert entry["uid"] == pwd.getpwnam(ALLOWED_USER).pw_uid and entry["result"] == "set"


MEMCG_V1 = Path("/sys/fs/cgroup/memory")


def memory_cgroup(pid: int) -> str:
    line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if ":memory:" in x)
    return line.split(":", 2)[2]


def start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22


def own_cgroup(parent: str, user: str, pid: int) -> str:
    """The memory cgroup the helper makes for `pid`: beside the others, named for owner, PID and start time."""
    return f"{parent.rstrip('/')}/autoglm-model-{pwd.getpwnam(user).pw_uid}-{pid}-{start_time(pid)}"


def remove_cgroups(paths: list[Path]) -> None:
    """rmdir what a test made, once the processes in it have gone (an exit leaves the cgroup a moment later)."""
    for path in paths:
        for _ in range(100):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.05)


def test_own_memory_cgroup_with_swappiness_0_on_cgroup_v1(helper: Helper) -> None:
    """keep_resident = cgroup on cgroup v1: the process moves into a new memory cgroup of its own (named for its
    owner, PID and start time) whose swappiness (used for its pages in global reclaim too) is 0; an empty one
    is removed on a later call."""
    v1 = (MEMCG_V1 / "memory.swappiness").exists()
    made = []
    try:
        for _ in range(2):
            with process_of(ALLOWED_USER) as pid:
                parent = memory_cgroup(pid) if v1 else ""
                report = call(helper.bus, ALLOWED_USER, "SetProcess", "usb", pid, json.dumps({"swappiness": 0}),
                              False)["ok"]
                change = report["changes"][0]
                if not v1:
                    assert change["state"] == "refused" and "cgroup v1 memory controller" in report["warnings"][0]
                    return
                own = memory_cgroup(pid)
                assert own == own_cgroup(parent, ALLOWED_USER, pid), own
                path = MEMCG_V1 / own.lstrip("/")
                assert path.joinpath("memory.swappiness").read_text().strip() == "0"
                assert str(pid) in path.joinpath("cgroup.procs").read_text().split()
                assert change["subject"] == "swappiness" and change["new"] == 0 and change["state"] == "done"
                made.append(path)
        assert not made[0].exists()  # the first, empty after its process ended, went with the second call
    finally:
        remove_cgroups(made)


# Forks on SIGUSR1: the child prints its PID and does the same, so each process is the child of the last one.
CHAIN = (
    "import os, signal, time\n"
    "def spawn(*_):\n"
    "    if os.fork() == 0:\n"
    "        print(os.getpid(), flush=True)\n"
    "signal.signal(signal.SIGUSR1, spawn)\n"
    "print(os.getpid(), flush=True)\n"
    "while True:\n"
    "    time.sleep(600)\n"
)


def test_model_cgroups_are_never_nested_never_reused_and_capped_per_user(helper: Helper) -> None:
    """cgroup v1 (finding 3 of issue 14): a directory with the name the helper would use, with someone else's
    process in it, is refused, not joined; a chain of processes gets sibling cgroups, not nested ones; the fifth
    in use for one user is refused with the limit named, and nothing is made for it."""
    if not (MEMCG_V1 / "memory.swappiness").exists():
        with process_of(ALLOWED_USER) as pid:
            report = call(helper.bus, ALLOWED_USER, "SetProcess", "usb", pid, json.dumps({"swappiness": 0}), False)
            assert "cgroup v1 memory controller" in report["ok"]["warnings"][0]
        return
    made: list[Path] = []
    chain = subprocess.Popen([*as_user(ALLOWED_USER), str(BIN / "python"), "-c", CHAIN], stdout=subprocess.PIPE,
                             text=True)
    assert chain.stdout is not None
    first = int(chain.stdout.readline())
    parent = memory_cgroup(first)
    pids: list[int] = []
    try:
        name = own_cgroup(parent, ALLOWED_USER, first)
        squatted = MEMCG_V1 / name.lstrip("/")
        squatted.mkdir()  # made before the helper, with another user's process in it: never to be joined
        made.append(squatted)
        squatted.joinpath("memory.swappiness").write_text("60")
        with process_of(DENIED_USER) as other:
            squatted.joinpath("cgroup.procs").write_text(str(other))
            report = call(helper.bus, ALLOWED_USER, "SetProcess", "usb", first, json.dumps({"swappiness": 0}),
                          False)["ok"]
            assert report["changes"][0]["state"] == "refused", report
            assert report["warnings"] == [f"swappiness = 0 for the model not set: {name} exists already (a memory "
                                          "cgroup is never reused)"]
            assert memory_cgroup(first) == parent
            assert squatted.joinpath("cgroup.procs").read_text().split() == [str(other)]
            assert squatted.joinpath("memory.swappiness").read_text().strip() == "60"
        remove_cgroups([squatted])
        made.remove(squatted)

        chain.send_signal(signal.SIGUSR1)  # the first process keeps its place; its child starts the chain
        for depth in range(5):
            pids.append(int(chain.stdout.readline()))
            value = depth % 2  # not the swappiness it was born with: asked the same, it stays where it is
            report = call(helper.bus, ALLOWED_USER, "SetProcess", "usb", pids[-1],
                          json.dumps({"swappiness": value}), False)["ok"]
            if depth < 4:
                own = own_cgroup(parent, ALLOWED_USER, pids[-1])
                assert memory_cgroup(pids[-1]) == own, (depth, memory_cgroup(pids[-1]))  # a sibling, not nested
                made.append(MEMCG_V1 / own.lstrip("/"))
                assert report["changes"][0]["state"] == "done" and report["warnings"] == []
                os.kill(pids[-1], signal.SIGUSR1)
            else:
                assert report["changes"][0]["state"] == "refused", report
                assert report["warnings"] == [f"swappiness = {value} for the model not set: uid "
                                              f"{pwd.getpwnam(ALLOWED_USER).pw_uid} has 4 model memory cgroups in "
                                              "use, and 4 is the limit (one per running model; end one first)"]
                assert memory_cgroup(pids[-1]) == memory_cgroup(pids[-2])  # left where it was born
        siblings = sorted(p.name for p in (MEMCG_V1 / parent.lstrip("/")).iterdir()
                          if p.name.startswith("autoglm-model-"))
        assert siblings == sorted(p.name for p in made)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        chain.kill()
        chain.wait(10)
        remove_cgroups(made)


# Run as PID 1 of a new PID namespace, so that a number can be handed to the next process on purpose
# (ns_last_pid): the model process ends between the helper's check and its write by number, and a bystander
# gets its PID. The helper must answer with a clear error and leave the bystander as it was.
RACE = """
import json, os, subprocess, sys
from autoglm_helper import model
from autoglm_helper.contract.bus import HelperError

mode, threaded = sys.argv[1], sys.argv[2]


def memcg(pid):
    lines = open(f"/proc/{pid}/cgroup").read().splitlines()
    return next((x.split(":", 2)[2] for x in lines if ":memory:" in x), None)


def nice(pid):
    return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[16])


own = memcg("self")
mine = f"/sys/fs/cgroup/memory{own.rstrip('/')}" if own else None
made = lambda: sorted(set(os.listdir(mine)) - before) if mine else []
before = set(os.listdir(mine)) if mine else set()
target = subprocess.Popen([sys.executable, "-c", threaded], stdout=subprocess.PIPE, text=True)
assert target.stdout.readline() == "ready\\n"
bystander = []


def race(number):
    target.kill()
    target.wait()  # reaped: its PID and TIDs are free
    with open("/proc/sys/kernel/ns_last_pid", "w") as fh:
        fh.write(str(number - 1))
    bystander.append(subprocess.Popen(["sleep", "600"]))
    assert bystander[0].pid == number, (bystander[0].pid, number)


class Racing(model.OwnedProcess):
    armed = True

    def threads(self):  # the helper has listed the threads; the process ends before the first setpriority
        tids = super().threads()
        if mode == "nice" and self.armed:
            self.armed = False
            race(tids[0])
        return tids

    def alive(self):  # checked; the process ends before the write to cgroup.procs of the cgroup just made
        super().alive()
        if mode == "swappiness" and self.armed and made():
            self.armed = False
            race(self.pid)


try:
    model.apply_settings(Racing(target.pid, 0), {mode: -5 if mode == "nice" else 0}, False)
    error = None
except HelperError as exc:
    error = [exc.kind, str(exc)]
b = bystander[0].pid
print(json.dumps({"error": error, "pid": target.pid, "nice": [nice(b), nice("self")], "memcg": [memcg(b), own],
                  "left": made()}))
"""


@pytest.mark.parametrize("mode", ["nice", "swappiness"])
def test_a_process_that_ends_before_a_write_by_number_is_an_error_and_nobody_else_is_touched(
        workdir: Path, mode: str) -> None:
    """Finding 6 of issue 14: setpriority and cgroup.procs take numbers. The model process ends (and is reaped)
    after the helper's last check, and a bystander gets its number: a clear error, and the bystander keeps its
    nice and its memory cgroup; no cgroup is left behind."""
    v1 = (MEMCG_V1 / "memory.swappiness").exists()
    if mode == "swappiness" and not v1:
        mode = "nice"  # without a v1 memory controller nothing is written to cgroup.procs
    parent = MEMCG_V1 / memory_cgroup(os.getpid()).lstrip("/") if v1 else None

    def ours() -> set[Path]:
        return {p for p in parent.iterdir() if p.name.startswith("autoglm-model-")} if parent else set()

    before = ours()
    try:
        proc = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", str(BIN / "python"), "-c", RACE, mode,
                               THREADED], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["error"] == ["InvalidArgs", f"pid: process {result['pid']} ended; allowed: the PID of a "
                                   "running process of uid 0"], result
        assert result["nice"][0] == result["nice"][1], result  # the bystander's nice is the one it was born with
        assert result["memcg"][0] == result["memcg"][1] and result["left"] == [], result
    finally:
        remove_cgroups(sorted(ours() - before))
