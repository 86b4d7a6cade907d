"""apply and rollback against the real helper: TOML plans, nothing to roll back, the exit-3 and exit-5 hints,
and Ctrl-C as a real SIGINT to the real CLI process before the call, while it is in flight and after the reply."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import tomli_w
from conftest import KNOB
from helper_parts import BIN, Bus, Helper, cli, live, scalar_change

CLI = str(BIN / "autoglm-tune")


def plan_at(helper: Helper, name: str, delta: int = 1, toml: bool = False) -> Path:
    """A saved plan changing KNOB by `delta`, readable by any user."""
    now = live(KNOB)
    plan = {"version": 1, "changes": [scalar_change(KNOB, now, now + delta)]}
    path = helper.bus.dir.parent / name
    path.write_text(tomli_w.dumps(plan) if toml else json.dumps(plan))
    path.chmod(0o644)
    return path


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoglm-tune: error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def wait_for(predicate, what: str, timeout: float = 20) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_a_toml_plan_applies_like_the_json_one(helper: Helper) -> None:
    reports = []
    for name, toml in (("p.json", False), ("p.toml", True), ("p-no-suffix", True)):
        proc = cli(helper.bus, "apply", "--plan", str(plan_at(helper, name, toml=toml)), "--dry-run", "--json")
        assert proc.returncode == 0, proc.stderr
        reports.append(json.loads(proc.stdout))
    assert reports[0] == reports[1] == reports[2] and reports[0]["changed"] is True
    # the planner's own TOML output goes through as it is (no unit changes: this private bus has no systemd)
    saved, policy = helper.bus.dir.parent / "planned.toml", helper.bus.dir.parent / "no-units.toml"
    policy.write_text("[services]\ndisable = []\n")
    assert cli(helper.bus, "plan", "--policy", str(policy), "--toml", "-o", str(saved)).returncode == 0
    proc = cli(helper.bus, "apply", "--plan", str(saved), "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr


def test_rollback_with_nothing_to_undo_is_done_already(helper: Helper) -> None:
    assert not [tx for tx in helper.journal() if tx["state"] in ("committed", "conflict")]
    for args in (("--yes",), ("--last", "--yes"), ("--dry-run",), ()):
        proc = cli(helper.bus, "rollback", *args)
        assert proc.returncode == 0 and proc.stdout == "nothing to roll back\n" and proc.stderr == "", proc
    proc = cli(helper.bus, "rollback", "--yes", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["changed"] is False
    bad = cli(helper.bus, "rollback", "20240101-000000-deadbeef", "--yes")  # a transaction that is not there
    assert bad.returncode == 2 and "is not a committed transaction" in one_line(bad.stderr)


def test_not_authorized_names_the_polkit_action_and_the_group_rule(helper: Helper) -> None:
    proc = cli(helper.bus, "apply", "--plan", str(plan_at(helper, "denied.json")), "--yes", user="nobody")
    assert proc.returncode == 3, proc
    line = one_line(proc.stderr)
    for needle in ("polkit action io.github.autoglm_tune.apply", "systemd/polkit/50-autoglm-tune.rules",
                   "group autoglm", "sudo usermod -aG autoglm $USER", "or run with sudo"):
        assert needle in line, line
    proc = cli(helper.bus, "rollback", "--yes", user="nobody")
    assert proc.returncode == 3 and "polkit action io.github.autoglm_tune.rollback" in one_line(proc.stderr)


def test_a_bus_without_the_helper_names_the_bus_and_the_install_command(workdir: Path) -> None:
    bus = Bus(workdir / "empty-bus", with_polkit=False)
    try:
        proc = cli(bus, "status")
        assert proc.returncode == 5
        line = one_line(proc.stderr)
        assert f"system bus {bus.address} (from DBUS_SYSTEM_BUS_ADDRESS)" in line
        assert "sudo autoglm-tune system install" in line and "dbus is running" in line
    finally:
        bus.stop()


# ---- Ctrl-C: a real SIGINT to the real CLI ---------------------------------------------------------


def stack(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stack").read_text()
    except OSError:
        return ""


def full_pipe() -> tuple[int, int]:
    """A pipe with no room left: the CLI's first write to it blocks until the test reads."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    os.write(w, b"\0" * fcntl.fcntl(w, fcntl.F_GETPIPE_SZ))
    return r, w


def drain(fd: int) -> threading.Thread:
    def read_all() -> None:
        while os.read(fd, 65536):
            pass
        os.close(fd)

    t = threading.Thread(target=read_all, daemon=True)
    t.start()
    return t


def audited(helper: Helper, method: str) -> list[dict]:  # type: ignore[type-arg]
    return [e for e in helper.audit() if e["method"] == method]


def test_ctrl_c_before_the_call_changes_nothing(helper: Helper) -> None:
    """The plan comes from a FIFO nobody writes: the CLI waits before anything goes to the helper."""
    fifo = helper.bus.dir.parent / "plan.fifo"
    os.mkfifo(fifo)
    applies = len(audited(helper, "Apply"))
    proc = subprocess.Popen([CLI, "apply", "--plan", str(fifo), "--yes"], env=helper.bus.env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: "fifo" in stack(proc.pid) or "pipe_" in stack(proc.pid), "the CLI to open the FIFO")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    fifo.unlink()
    assert proc.returncode == 130 and out == ""
    assert "interrupted before anything was sent to the root helper: nothing changed" in one_line(err)
    assert len(audited(helper, "Apply")) == applies


def test_ctrl_c_after_the_reply_says_committed_and_the_txid(helper: Helper) -> None:
    """stdout is a full pipe, so the CLI blocks writing the report after the helper committed: then Ctrl-C."""
    r, w = full_pipe()
    proc = subprocess.Popen([CLI, "apply", "--plan", str(plan_at(helper, "late.json")), "--yes", "--json"],
                            env=helper.bus.env(), stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    wait_for(lambda: any(tx["state"] == "committed" for tx in helper.journal()) and "pipe_write" in stack(proc.pid),
             "the commit and the CLI blocked writing its report")
    txid = next(tx["txid"] for tx in helper.journal() if tx["state"] == "committed")
    proc.send_signal(signal.SIGINT)
    reader = drain(r)
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.wait(30) == 130
    reader.join(10)
    line = one_line(err)
    assert f"interrupted after the root helper replied: committed {txid}" in line
    assert f"'autoglm-tune rollback {txid}' undoes it" in line
    back = cli(helper.bus, "rollback", txid, "--yes")
    assert back.returncode == 0, back.stderr


def test_ctrl_c_while_the_call_is_in_flight_says_it_may_have_committed(helper: Helper) -> None:
    """The helper is stopped (SIGSTOP) with the call on its socket: Ctrl-C cannot know; status and rollback can."""
    assert helper.proc is not None
    plan = plan_at(helper, "inflight.json")
    before, applies = live(KNOB), len(audited(helper, "Apply"))
    helper.proc.send_signal(signal.SIGSTOP)
    try:
        proc = subprocess.Popen([CLI, "apply", "--plan", str(plan), "--yes"], env=helper.bus.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        assert proc.stdout.readline().endswith("setting(s) to change:\n")
        proc.stdout.readline()  # the change; then the call goes out and waits for the stopped helper
        wait_for(lambda: "epoll_wait" in stack(proc.pid), "the CLI to wait for the reply")
        time.sleep(1)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        helper.proc.send_signal(signal.SIGCONT)
    assert proc.returncode == 130 and out == ""
    line = one_line(err)
    assert "interrupted while the root helper was running apply: it may have committed" in line
    assert "'autoglm-tune status' tells, 'autoglm-tune rollback --last' undoes it" in line
    # here the caller was gone before the helper woke up, so the helper refused the call; status says so
    wait_for(lambda: len(audited(helper, "Apply")) > applies, "the helper to take the call")
    assert audited(helper, "Apply")[-1]["result"] == "denied" and live(KNOB) == before
    status = json.loads(cli(helper.bus, "status", "--json").stdout)
    assert not [tx for tx in status["transactions"] if tx["state"] == "committed"]
    back = cli(helper.bus, "rollback", "--last", "--yes")
    assert back.returncode == 0 and back.stdout == "nothing to roll back\n", back


def test_verify_with_a_policy_compares_the_machine_with_its_plan(helper: Helper) -> None:
    policy = helper.bus.dir.parent / "other.toml"
    policy.write_text(f"[vm]\nvfs_cache_pressure = {live(KNOB) + 7}\n")
    proc = cli(helper.bus, "verify", "--policy", str(policy))
    line = f"differs from the plan: {KNOB} is {live(KNOB)}, planned {live(KNOB) + 7}"
    assert proc.returncode == 1 and line in proc.stdout, proc
    out = json.loads(cli(helper.bus, "status", "--policy", str(policy), "--json").stdout)
    assert any(c["subject"] == KNOB for c in out["plan"]["changes"])


def test_the_default_apply_succeeds_where_systemd_is_not_pid_1_and_leaves_units_alone(helper: Helper) -> None:
    """This machine runs no systemd (like a container, WSL or a plain VM): the default plan held unit changes,
    which the helper refused with exit 2; now it leaves units alone, says so, and apply goes through."""
    assert not Path("/run/systemd/system").exists()
    plan = json.loads(cli(helper.bus, "plan", "--json").stdout)
    assert not [c for c in plan["changes"] if c["knob"] == "unit"]
    assert any(n.startswith("services left alone: systemd is not PID 1") for n in plan["notes"]), plan["notes"]
    for args in (("--dry-run", "--yes"), ("--yes",)):
        proc = cli(helper.bus, "apply", *args)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    rolled = cli(helper.bus, "rollback", "--yes")  # what the real apply changed, if anything, is put back
    assert rolled.returncode == 0, rolled.stderr
