"""`autoglm-tune launch` with supervisor = "systemd" inside the real systemd: the D-Bus-activated helper starts
the llama.cpp server as a transient unit run as the (unprivileged) caller, with CPUAffinity, scheduling, Nice,
I/O class, OOMScoreAdjust, MemoryHigh and LimitMEMLOCK; its output goes to the caller's log; `status` shows it;
stopping the launcher stops the unit. Bad unit requests are refused with nothing started."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from autoglm_helper.contract.bus import BUS_NAME, ERROR_PREFIX, INTERFACE, OBJECT_PATH
from autoglm_helper.contract.catalogue import MODEL_UNIT_PREFIX
from autoglm_helper.model import TASKS_MAX
from autoglm_tune import gguf_header
from container import CLI, Client, Container
from dbus_fast import Message, MessageType
from support import CAP_SYS_RESOURCE, free_port, has_capability

ROOT = Path(__file__).resolve().parents[2]
USER, GROUP = "agt-model-user", "autoglm"
OUTSIDER = "agt-model-outsider"  # not in the group and without a session: polkit does not allow it
PAM_SERVICE = "agt-model-session"  # a PAM stack that only registers a logind session (pam_systemd)
LLAMA_PYTHON = Path(os.environ.get("AUTOGLM_LLAMA_VENV", "/opt/autoglm-llama-venv")) / "bin" / "python"
VOCAB = Path(os.environ.get("AUTOGLM_LLAMA_CACHE", "/opt/llama-build")) / "vocab" / "ggml-vocab-llama-spm.gguf"
WORK = "/srv/agt-model"  # inside the container (the overlay's upper directory)


@pytest.fixture(scope="module")
def model_user(container: Container) -> Iterator[int]:
    """A user in the `autoglm` group (polkit's example rule allows it), a work folder and the tiny model."""
    subprocess.run([str(ROOT / "tests/setup-llama.sh")], check=True, timeout=3600)
    container.run("groupadd", "-f", GROUP)
    container.run("useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", "-G", GROUP, USER)
    container.run("useradd", "-M", "-d", "/nonexistent", "-s", "/bin/sh", OUTSIDER)
    rules = container.path("/etc/polkit-1/rules.d/50-autoglm-tune.rules")
    shutil.copy(ROOT / "systemd/polkit/50-autoglm-tune.rules", rules)
    rules.chmod(0o644)
    pam = container.path(f"/etc/pam.d/{PAM_SERVICE}")
    pam.write_text("auth required pam_permit.so\naccount required pam_permit.so\nsession required pam_systemd.so\n")
    work = container.path(WORK)
    (work / "etc").mkdir(parents=True)
    work.chmod(0o777)
    worker = ROOT / "tuner" / "bench" / "worker.py"
    subprocess.run([str(LLAMA_PYTHON), str(worker), "model", "tiny", str(VOCAB), str(work / "tiny.gguf")],
                   check=True, timeout=120)
    uid = int(container.run("id", "-u", USER).stdout)
    yield uid
    for user in (USER, OUTSIDER):
        container.run("pkill", "-KILL", "-u", user, check=False)
        container.run("userdel", user, check=False)
    rules.unlink()
    pam.unlink()
    shutil.rmtree(work, ignore_errors=True)


def launcher(container: Container, uid: int, policy: dict, *extra: str, log: str = "model.log",
             session: bool = False) -> subprocess.Popen[str]:
    """`autoglm-tune launch` as `uid` inside the container; with `session`, in a logind session of its own: a
    transient service with PAMName= (pam_systemd registers a session and moves the process into its
    session-ID.scope in user-UID.slice, as a login does)."""
    path = container.path(f"{WORK}/policy.toml")
    path.write_text(tomli_w.dumps(policy))
    path.chmod(0o644)
    command = ["env", f"AUTOGLM_TUNE_ETC={WORK}/etc", f"HOME={WORK}", "PATH=/usr/bin:/bin",
               CLI, "launch", "--policy", f"{WORK}/policy.toml", "--json", "--log", f"{WORK}/{log}", *extra]
    user = (["systemd-run", "--quiet", "--pipe", "--wait", "--collect", f"--uid={uid}", "-p",
             f"PAMName={PAM_SERVICE}", "--"] if session else
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--init-groups"])
    argv = ["nsenter", "-t", str(container.leader), "-a", *user, *command]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def inside(container: Container, *argv: str) -> str:
    return container.run(*argv).stdout


def show(container: Container, unit: str,
         props: str = "User,CPUAffinity,Nice,CPUWeight,CPUSchedulingPolicy,IOSchedulingClass,OOMScoreAdjust,"
                      "MemoryHigh,LimitMEMLOCK,MainPID,ActiveState,NoNewPrivileges,Slice,TasksMax,BindsTo"
         ) -> dict[str, str]:
    text = inside(container, "systemctl", "show", unit, "-p", props)
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def completion(port: int) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({"prompt": "Hello", "max_tokens": 4, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=60) as response:
        return json.loads(response.read())


def test_model_runs_as_a_transient_unit_of_the_caller(container: Container, model_user: int) -> None:
    uid, port = model_user, free_port()
    unit = f"{MODEL_UNIT_PREFIX}{uid}-{port}.service"
    policy = {
        "process": {"cpus": [0], "threads": 1, "nice": -5, "sched_policy": "batch", "io_class": "idle",
                    "oom_score_adj": -400},
        "model": {"preset": "llama-cpp-python", "program": str(LLAMA_PYTHON), "model_path": f"{WORK}/tiny.gguf",
                  "port": port, "context_size": 256, "supervisor": "systemd", "keep_resident": "mlock",
                  "memory_high_mib": 768, "ready_timeout_s": 120},
    }
    proc = launcher(container, uid, policy)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        ready = json.loads(line)
        assert ready["event"] == "ready" and ready["unit"] == unit
        pid = ready["pid"]
        props = show(container, unit)
        assert props["ActiveState"] == "active" and props["MainPID"] == str(pid)
        assert props["User"] == str(uid) and props["NoNewPrivileges"] == "yes"
        assert props["CPUAffinity"] == "0" and props["Nice"] == "-5"
        assert props["CPUWeight"] == "305"  # nice -5 carried across cgroups
        assert props["CPUSchedulingPolicy"] == "3" and props["IOSchedulingClass"] == "3"
        assert props["OOMScoreAdjust"] == "-400" and props["MemoryHigh"] == str(768 << 20)
        # the user's limits hold for it, not system.slice's; the launcher is in no session here: nothing to bind to
        assert props["Slice"] == f"user-{uid}.slice" and props["TasksMax"] == str(TASKS_MAX)
        assert props["BindsTo"] == ""
        model_file = container.path(f"{WORK}/tiny.gguf")
        shape = gguf_header.model_shape(gguf_header.read_metadata(model_file), "tiny")
        need = model_file.stat().st_size + shape.kv_cache_bytes(256)
        mem_total = int(next(x for x in Path("/proc/meminfo").read_text().splitlines()
                             if x.startswith("MemTotal")).split()[1]) * 1024
        assert int(props["LimitMEMLOCK"]) == min(2 * need, int(mem_total * 0.75))  # launch's rule, not a default

        status = inside(container, "cat", f"/proc/{pid}/status")
        assert f"Uid:\t{uid}\t{uid}" in status
        assert "Cpus_allowed_list:\t0\n" in status
        stat = inside(container, "cat", f"/proc/{pid}/stat").rsplit(")", 1)[1].split()
        assert int(stat[16]) == -5 and int(stat[38]) == 3  # nice, SCHED_BATCH
        assert "idle" in inside(container, "ionice", "-p", str(pid))
        oom = int(inside(container, "cat", f"/proc/{pid}/oom_score_adj"))
        assert oom == (-400 if has_capability(CAP_SYS_RESOURCE, "CapBnd") else 0)

        answer = completion(port)
        assert answer["choices"][0]["text"] is not None and answer["usage"]["completion_tokens"] >= 1
        assert container.path(f"{WORK}/model.log").stat().st_size > 0  # the server wrote to the caller's log

        shown = container.run("setpriv", f"--reuid={uid}", f"--regid={uid}", "--init-groups", "env",
                              f"HOME={WORK}", CLI, "status", "--json", "--log",
                              f"{WORK}/model.log", check=False)
        assert shown.returncode == 0, shown.stderr
        model = json.loads(shown.stdout)["model"]
        assert model["record"]["unit"] == unit and model["process"]["nice"] == -5
        assert model["process"]["cpus"] == "0" and model["process"]["sched_policy"] == "batch"
        delays = model["delays"]  # read by the user from /proc and the unit's cgroup: no helper, no CAP_NET_ADMIN
        assert isinstance(delays, dict) and delays["pid"] == pid and delays["threads"] >= 1, delays
        assert delays["cpu_delay_ms"] >= 0 and delays["blkio_delay_ms"] >= 0, delays

        second = launcher(container, uid, {**policy, "model": {**policy["model"], "port": free_port()}})
        _, second_err = second.communicate(timeout=60)
        assert second.returncode == 2 and "one model unit per user" in second_err, second_err

        # another user may not stop it, even one the polkit rule allows to start units of its own
        outsider = container.run("setpriv", f"--reuid={OUTSIDER}", f"--regid={OUTSIDER}", "--init-groups",
                                 "busctl", "--system", "call", BUS_NAME, OBJECT_PATH, INTERFACE, "StopModel", "s",
                                 unit, check=False)
        assert outsider.returncode != 0 and f"belongs to uid {uid}, not to the caller" in outsider.stderr, outsider
        assert show(container, unit)["ActiveState"] == "active"
    finally:
        container.run("pkill", "-TERM", "-u", str(uid), "-f", "autoglm-tune launch", check=False)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    if not has_capability(CAP_SYS_RESOURCE, "CapBnd"):
        assert "OOMScoreAdjust = -400 did not take effect" in err and "CAP_SYS_RESOURCE" in err
    deadline = time.monotonic() + 30
    while (state := container.run("systemctl", "is-active", unit, check=False).stdout.strip()) not in (
            "inactive", "unknown") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert state in ("inactive", "unknown")
    assert container.run("pgrep", "-u", str(uid), check=False).stdout == ""
    assert not container.path(f"{WORK}/model.json").exists()


def helper_call(client: Client, member: str, signature: str, body: list) -> tuple[str, str]:
    reply = client.call(BUS_NAME, OBJECT_PATH, INTERFACE, member, signature, body, timeout=60)
    assert reply.message_type == MessageType.ERROR, reply.body
    return reply.error_name or "", reply.body[0]


@pytest.mark.parametrize(
    ("unit", "needles"),
    [
        ({"argv": ["python3"], "port": 8080, "cpus": [0]}, ["argv[0]", "not an absolute path"]),
        ({"argv": ["/bin/true"], "port": 8080, "cpus": [0], "nice": -20}, ["nice:", "allowed: an integer -10–19"]),
        ({"argv": ["/bin/true"], "port": 8080, "cpus": [4096]}, ["cpus:", "allowed: CPU numbers 0–"]),
        ({"argv": ["/bin/true"], "port": 8080, "cpus": [0], "io_class": "realtime"},
         ["io_class:", "allowed: none, best-effort, idle"]),
        ({"argv": ["/bin/true"], "port": 8080, "cpus": [0], "User": "root"}, ["unit.User: unknown key"]),
        ({"argv": ["/bin/true"], "port": 8080, "cpus": [0], "memory_low": 1 << 50}, ["memory_low:", "out of range"]),
    ],
)
def test_bad_unit_requests_start_nothing(container: Container, client: Client, unit: dict, needles: list[str],
                                         tmp_path: Path) -> None:
    before = inside(container, "systemctl", "list-units", "--all", "--plain", "--no-legend", f"{MODEL_UNIT_PREFIX}*")
    log = tmp_path / "log"
    with log.open("wb") as fh:
        msg = Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member="StartModel",
                      signature="sh", body=[json.dumps(unit), 0], unix_fds=[fh.fileno()])
        reply = client.loop.run_until_complete(client.bus.call(msg))
    assert reply.message_type == MessageType.ERROR, reply.body
    assert reply.error_name == ERROR_PREFIX + "InvalidArgs"
    for needle in needles:
        assert needle in reply.body[0], reply.body[0]
    after = inside(container, "systemctl", "list-units", "--all", "--plain", "--no-legend", f"{MODEL_UNIT_PREFIX}*")
    assert after == before


def test_start_model_without_a_log_descriptor_is_refused(container: Container, client: Client) -> None:
    name, text = helper_call(client, "StartModel", "sh", [json.dumps({"argv": ["/bin/true"], "port": 1, "cpus": [0]}),
                                                          0])
    assert name == ERROR_PREFIX + "InvalidArgs" and "log_fd: no file descriptor was passed" in text


def test_stop_model_refuses_units_that_are_not_model_units(container: Container, client: Client) -> None:
    name, text = helper_call(client, "StopModel", "s", ["dbus.service"])
    assert name == ERROR_PREFIX + "InvalidArgs" and "is not a model unit" in text
    assert inside(container, "systemctl", "is-active", "dbus.service").strip() == "active"


def _outsider_policy(port: int, supervisor: str) -> dict:
    return {"process": {"cpus": [0], "threads": 1, "nice": 0},
            "model": {"preset": "llama-cpp-python", "program": str(LLAMA_PYTHON), "model_path": f"{WORK}/tiny.gguf",
                      "port": port, "context_size": 256, "supervisor": supervisor, "keep_resident": "none",
                      "ready_timeout_s": 120}}


def test_a_user_polkit_refuses_gets_the_model_as_a_child_under_auto(container: Container, model_user: int) -> None:
    """supervisor = "auto" on a systemd machine with the helper installed means a unit; when polkit refuses the
    caller the launcher says so in one warning and runs the model itself. Asked for "systemd" explicitly, the
    refusal is the answer: exit 3, nothing started."""
    uid = int(container.run("id", "-u", OUTSIDER).stdout)
    port = free_port()
    refused = launcher(container, uid, _outsider_policy(port, "systemd"), log="outsider.log")
    _, err = refused.communicate(timeout=120)
    assert refused.returncode == 3 and "not authorized" in err.lower() and "Traceback" not in err, err
    assert container.run("pgrep", "-u", str(uid), check=False).stdout == ""
    assert inside(container, "systemctl", "list-units", "--all", "--plain", "--no-legend",
                  f"{MODEL_UNIT_PREFIX}{uid}-*") == ""

    proc = launcher(container, uid, _outsider_policy(port, "auto"), log="outsider.log")
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        ready = json.loads(line)
        assert ready["event"] == "ready" and "unit" not in ready
        status = inside(container, "cat", f"/proc/{ready['pid']}/status")
        assert f"Uid:\t{uid}\t{uid}" in status
        parent = int(next(x for x in status.splitlines() if x.startswith("PPid:")).split()[1])
        assert "autoglm-tune" in inside(container, "cat", f"/proc/{parent}/cmdline")  # the launcher's own child
        assert completion(port)["usage"]["completion_tokens"] >= 1
    finally:
        container.run("pkill", "-TERM", "-u", str(uid), "-f", "autoglm-tune launch", check=False)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    warnings = [x for x in err.splitlines() if "starting the model as a child of autoglm-tune" in x]
    assert len(warnings) == 1 and warnings[0].startswith("autoglm-tune: warning: "), err
    assert container.run("pgrep", "-u", str(uid), check=False).stdout == ""


SERVER = """
import http.server, sys
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Ok).serve_forever()
"""


def test_model_unit_is_bound_to_the_callers_login_session(container: Container, model_user: int) -> None:
    """Finding 4 of issue 14: a caller in a logind session gets a unit in its user slice, with TasksMax, bound to
    that session's scope (BindsTo= + After=, as systemd reports them). Killed with SIGKILL, the launcher cannot
    stop the unit, but its session ends with it, and the unit is stopped with the session's scope."""
    uid, port = model_user, free_port()
    unit = f"{MODEL_UNIT_PREFIX}{uid}-{port}.service"
    server = container.path(f"{WORK}/server.py")
    server.write_text(SERVER)
    server.chmod(0o644)
    policy = {"process": {"cpus": [0], "nice": 0},
              "model": {"preset": "llama-server", "port": port, "supervisor": "systemd", "keep_resident": "none",
                        "ready_timeout_s": 60}}
    proc = launcher(container, uid, policy, "--", "/usr/bin/python3", f"{WORK}/server.py", str(port),
                    log="session.log", session=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        assert json.loads(line)["unit"] == unit
        props = show(container, unit, "Slice,TasksMax,BindsTo,After,ActiveState")
        session = props["BindsTo"]
        assert re.fullmatch(r"session-[A-Za-z0-9]+\.scope", session), props
        assert session in props["After"].split(), props
        assert props["Slice"] == f"user-{uid}.slice" and props["TasksMax"] == str(TASKS_MAX), props
        assert show(container, session, "Slice,ActiveState") == {"Slice": f"user-{uid}.slice", "ActiveState": "active"}
        name = inside(container, "loginctl", "show-session", session[len("session-"):-len(".scope")], "-p", "Name",
                      "--value")
        assert name.strip() == USER  # a session of logind's, the caller's own
        container.run("pkill", "-KILL", "-u", str(uid), "-f", "autoglm-tune launch")
        deadline = time.monotonic() + 30
        while (state := container.run("systemctl", "is-active", unit, check=False).stdout.strip()) not in (
                "inactive", "unknown") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert state in ("inactive", "unknown"), show(container, session, "ActiveState,SubState")
    finally:
        container.run("pkill", "-KILL", "-u", str(uid), "-f", "autoglm-tune launch", check=False)
        proc.communicate(timeout=60)
        container.run("systemctl", "stop", unit, check=False)
