"""Authorization through the real polkitd (group rule), the uid-0 fallback without polkit, the audit trail,
and the helper's own lifecycle (idle exit, one owner of the name)."""

from __future__ import annotations

import json
import os
import pwd
import shlex
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from helper_parts import ALLOWED_USER, BIN, DENIED_USER, Bus, Helper, cli, live, plan_json, scalar_change
from test_apply import plan_file


def test_unprivileged_user_is_denied_with_exit_3_and_the_denial_is_audited(helper: Helper) -> None:
    now = live("vm.swappiness")
    policy = plan_file(helper.bus, scalar_change("vm.swappiness", now, now + 5))
    denied = cli(helper.bus, "apply", "--plan", policy, "--yes", "--json", user=DENIED_USER)
    assert denied.returncode == 3, denied.stderr
    assert json.loads(denied.stdout)["error"] == "NotAuthorized" and live("vm.swappiness") == now
    assert "polkit action io.github.autoglm_tune.apply" in denied.stderr  # what to grant, and how
    assert "systemd/polkit/50-autoglm-tune.rules" in denied.stderr and "usermod -aG autoglm" in denied.stderr
    entry = helper.audit()[-1]
    assert entry["uid"] == pwd.getpwnam(DENIED_USER).pw_uid and entry["method"] == "Apply"
    assert entry["result"] == "denied" and entry["pid"] > 0

    dry = cli(helper.bus, "apply", "--plan", policy, "--dry-run", "--json", user=DENIED_USER)
    assert dry.returncode == 0, dry.stderr  # dry-run and status are open
    assert json.loads(dry.stdout)["changed"] is True and live("vm.swappiness") == now
    assert cli(helper.bus, "status", user=DENIED_USER).returncode == 0
    assert cli(helper.bus, "rollback", "--yes", user=DENIED_USER).returncode == 3


def test_a_member_of_the_autoglm_group_is_allowed_through_polkit(helper: Helper) -> None:
    now = live("vm.swappiness")
    policy = plan_file(helper.bus, scalar_change("vm.swappiness", now, now + 6))
    done = cli(helper.bus, "apply", "--plan", policy, "--yes", "--json", user=ALLOWED_USER)
    assert done.returncode == 0, done.stderr
    txid = json.loads(done.stdout)["txid"]
    assert live("vm.swappiness") == now + 6
    assert helper.journal()[-1]["caller"]["uid"] == pwd.getpwnam(ALLOWED_USER).pw_uid
    back = cli(helper.bus, "rollback", txid, "--yes", user=ALLOWED_USER)
    assert back.returncode == 0, back.stderr
    assert live("vm.swappiness") == now


@pytest.fixture
def bare_bus(workdir: Path) -> Iterator[Bus]:
    """A second private bus without polkitd (inside the session's world-readable work directory)."""
    directory = Path(tempfile.mkdtemp(dir=workdir))
    directory.chmod(0o755)
    b = Bus(directory / "bus", with_polkit=False)
    yield b
    b.stop()


def test_without_polkit_only_root_is_allowed(bare_bus: Bus, tmp_path: Path, users: None) -> None:
    h = Helper(bare_bus, tmp_path / "state").start("--idle-timeout", "0")
    try:
        now = live("vm.swappiness")
        plan = plan_json(scalar_change("vm.swappiness", now, now + 2))
        report = h.c.ok("Apply", plan, False, False)
        assert live("vm.swappiness") == now + 2
        h.c.ok("Rollback", report["txid"], False, False)
        policy = plan_file(bare_bus, scalar_change("vm.swappiness", now, now + 2))
        assert cli(bare_bus, "apply", "--plan", policy, "--yes", user=ALLOWED_USER).returncode == 3
        assert live("vm.swappiness") == now
    finally:
        h.stop()


def test_the_helper_exits_when_idle_and_refuses_a_second_instance(bare_bus: Bus, tmp_path: Path) -> None:
    h = Helper(bare_bus, tmp_path / "state").start("--idle-timeout", "0.5")
    try:
        second = subprocess.run([str(BIN / "autoglm-tune-helper"), "--state-dir", str(tmp_path / "s2")],
                                env=bare_bus.env(), capture_output=True, text=True, timeout=30)
        assert second.returncode != 0 and "already owned" in second.stderr
        started = time.monotonic()
        assert h.proc is not None
        assert h.proc.wait(10) == 0
        assert time.monotonic() - started < 5
    finally:
        h.stop()


def test_status_and_dry_run_need_no_authorization_but_are_audited(helper: Helper) -> None:
    uid = pwd.getpwnam(DENIED_USER).pw_uid
    result = cli(helper.bus, "verify", "--json", user=DENIED_USER)
    assert result.returncode in (0, 1) and "in_sync" in json.loads(result.stdout)
    assert helper.audit()[-1]["method"] == "Status" and helper.audit()[-1]["uid"] == uid
    dry = cli(helper.bus, "rollback", "--dry-run", user=DENIED_USER)  # open, and nothing is committed here
    assert dry.returncode == 0 and dry.stdout == "nothing to roll back\n"
    assert helper.audit()[-1]["method"] == "Rollback" and helper.audit()[-1]["result"] == "unchanged"


def test_every_call_also_goes_to_syslog(bare_bus: Bus, workdir: Path) -> None:
    if os.path.exists("/dev/log"):
        pytest.skip("a syslog daemon owns /dev/log on this machine; the CI machine has none")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("/dev/log")
    sock.settimeout(10)
    h = Helper(bare_bus, Path(tempfile.mkdtemp(dir=workdir)) / "state")
    try:
        h.start("--idle-timeout", "0")
        h.c.ok("Status")
        line = sock.recv(65536).decode()
        assert f"autoglm-tune-helper[{h.proc.pid if h.proc else ''}]" in line and '"method": "Status"' in line
    finally:
        h.stop()
        sock.close()
        os.unlink("/dev/log")


def test_the_shipped_policy_files_are_what_polkitd_and_the_bus_enforce(helper: Helper) -> None:
    action = subprocess.run(["pkaction", "--verbose", "--action-id", "io.github.autoglm_tune.rollback"],
                            env=helper.bus.env(), capture_output=True, text=True)
    assert action.returncode == 0 and "auth_admin_keep" in action.stdout
    own = ("import asyncio; from dbus_fast.aio import MessageBus; from dbus_fast import BusType\n"
           "async def main():\n    bus = await MessageBus(bus_type=BusType.SYSTEM).connect()\n"
           "    await bus.request_name('io.github.autoglm_tune.Helper1')\nasyncio.run(main())")
    command = f"DBUS_SYSTEM_BUS_ADDRESS={helper.bus.address} exec {BIN / 'python'} -c {shlex.quote(own)}"
    squat = subprocess.run(["su", "-s", "/bin/sh", DENIED_USER, "-c", command], capture_output=True, text=True)
    assert squat.returncode != 0 and "not allowed to own the service" in squat.stderr


def test_the_helper_exits_when_its_bus_goes_away(workdir: Path, tmp_path: Path) -> None:
    """A helper that can no longer be reached (its bus daemon died) exits instead of lingering, idle timeout 0."""
    bus = Bus(Path(tempfile.mkdtemp(dir=workdir)) / "bus", with_polkit=False)
    h = Helper(bus, tmp_path / "state")
    try:
        h.start("--idle-timeout", "0")
        h.c.ok("Status")
        bus.stop()
        assert h.proc is not None and h.proc.wait(10) == 0
    finally:
        if h.proc is not None and h.proc.poll() is None:
            h.proc.kill()
            h.proc.wait(10)
        if h.client is not None:
            h.client.close()
        bus.stop()
