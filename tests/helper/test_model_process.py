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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from autoglm_helper.catalogue import MODEL_NICE_RANGE, MODEL_OOM_SCORE_ADJ_RANGE
from autoglm_helper.service import ERROR_PREFIX
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
from autoglm_helper.service import BUS_NAME, INTERFACE, OBJECT_PATH

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


def memory_cgroup(pid: int) -> str:
    line = next(x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if ":memory:" in x)
    return line.split(":", 2)[2]


def test_own_memory_cgroup_with_swappiness_0_on_cgroup_v1(helper: Helper) -> None:
    """keep_resident = cgroup on cgroup v1: the process moves into a child memory cgroup of its own whose
    swappiness (used for its pages in global reclaim too) is 0; an empty one is removed on a later call."""
    v1 = Path("/sys/fs/cgroup/memory/memory.swappiness").exists()
    made = []
    try:
        for _ in range(2):
            with process_of(ALLOWED_USER) as pid:
                parent = memory_cgroup(pid) if v1 else None
                report = call(helper.bus, ALLOWED_USER, "SetProcess", "usb", pid, json.dumps({"swappiness": 0}),
                              False)["ok"]
                change = report["changes"][0]
                if not v1:
                    assert change["state"] == "refused" and "cgroup v1 memory controller" in report["warnings"][0]
                    return
                own = memory_cgroup(pid)
                assert own == f"{parent.rstrip('/')}/autoglm-model-{pid}", own
                path = Path(f"/sys/fs/cgroup/memory{own}")
                assert path.joinpath("memory.swappiness").read_text().strip() == "0"
                assert str(pid) in path.joinpath("cgroup.procs").read_text().split()
                assert change["subject"] == "swappiness" and change["new"] == 0 and change["state"] == "done"
                made.append(path)
        assert not made[0].exists()  # the first, empty after its process ended, went with the second call
    finally:
        for path in made:
            if path.exists():
                path.rmdir()
