"""Apply, dry-run, drift, rollback and bad input against the real helper, real sysctls and zswap."""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from autoglm_helper.contract.bus import BUS_NAME, ERROR_PREFIX, INTERFACE, OBJECT_PATH
from autoglm_helper.contract.plan_schema import MAX_PLAN_BYTES
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from helper_parts import BIN, Bus, Helper, cli, full_plan, live, machine, plan_json, read_knobs, scalar_change

POLICY = """
[vm]
swappiness = {swappiness}
vfs_cache_pressure = "keep"
page-cluster = "keep"
[zswap]
enabled = "keep"
compressor = "keep"
max_pool_percent = "keep"
shrinker_enabled = "keep"
[swap]
prioritize = false
file = "off"
[services]
disable = []
"""


def plan_file(bus: Bus, *changes: dict[str, Any]) -> str:
    """A saved plan the test users can read, for `apply --plan`."""
    path = Path(tempfile.mkstemp(dir=bus.dir.parent, suffix=".json")[1])
    path.write_text(plan_json(*changes))
    path.chmod(0o644)
    return str(path)


def test_full_kernel_plan_applies_reads_back_and_rolls_back_exactly(helper: Helper) -> None:
    before = read_knobs()
    changes, targets = full_plan()
    assert len(changes) >= 10, "this kernel should have every vm sysctl and zswap parameter of the catalogue"
    report = helper.c.ok("Apply", plan_json(*changes), False, False)
    assert report["result"] == "committed"
    assert {c["subject"]: c["new"] for c in report["changes"]} == targets
    assert {name: live(name) for name in targets} == targets
    tx = helper.journal()[-1]
    assert tx["txid"] == report["txid"] and tx["state"] == "committed"
    assert Path("/proc/sys/kernel/random/boot_id").read_text().strip() == tx["boot_id"]
    assert tx["caller"]["uid"] == 0 and tx["caller"]["pid"] > 0 and len(tx["plan_hash"]) == 64
    assert all(s["state"] == "done" for s in tx["steps"])

    back = helper.c.ok("Rollback", "", False, False)
    assert back["result"] == "rolled-back" and back["txid"] == report["txid"]
    assert read_knobs() == before
    assert helper.journal()[-1]["state"] == "rolled-back"
    audit = [a for a in helper.audit() if a["txid"] == report["txid"]]
    assert [a["method"] for a in audit] == ["Apply", "Rollback"]
    assert audit[0]["changes"][0] == {"subject": changes[0]["knob"], "old": changes[0]["current"],
                                      "new": changes[0]["target"]}


def test_dry_run_writes_nothing_not_even_the_journal(helper: Helper) -> None:
    changes, targets = full_plan()
    journal, before = helper.journal(), machine()
    report = helper.c.ok("Apply", plan_json(*changes), True, False)
    assert report["result"] == "dry-run"
    assert {c["subject"]: c["target"] for c in report["changes"]} == targets
    assert machine() == before and helper.journal() == journal


def test_drift_is_refused_naming_the_knob_unless_forced(helper: Helper) -> None:
    now = live("vm.swappiness")
    other = live("vm.vfs_cache_pressure")
    plan = plan_json(scalar_change("vm.vfs_cache_pressure", other, other + 1),
                     scalar_change("vm.swappiness", now + 3, now + 1))
    journal = helper.journal()
    name, text = helper.c.error("Apply", plan, False, False)
    assert name == ERROR_PREFIX + "Drift" and "vm.swappiness" in text and "vm.vfs_cache_pressure" not in text
    assert live("vm.swappiness") == now and live("vm.vfs_cache_pressure") == other
    assert helper.journal() == journal
    report = helper.c.ok("Apply", plan, False, True)
    assert report["result"] == "committed" and live("vm.swappiness") == now + 1
    helper.c.ok("Rollback", report["txid"], False, False)
    assert live("vm.swappiness") == now and live("vm.vfs_cache_pressure") == other


def test_rollback_does_not_clobber_a_value_changed_since_unless_forced(helper: Helper) -> None:
    now = live("vm.page-cluster")
    report = helper.c.ok("Apply", plan_json(scalar_change("vm.page-cluster", now, (now + 1) % 11)), False, False)
    Path("/proc/sys/vm/page-cluster").write_text(str((now + 2) % 11))  # someone else changes it
    name, text = helper.c.error("Rollback", report["txid"], False, False)
    assert name == ERROR_PREFIX + "Drift" and "vm.page-cluster" in text
    assert live("vm.page-cluster") == (now + 2) % 11
    assert helper.journal()[-1]["state"] == "committed"
    assert helper.c.ok("Rollback", report["txid"], True, True)["result"] == "dry-run"
    assert live("vm.page-cluster") == (now + 2) % 11
    assert helper.c.ok("Rollback", report["txid"], False, True)["result"] == "rolled-back"
    assert live("vm.page-cluster") == now


def test_a_failing_step_undoes_the_done_steps_and_the_cli_exits_4(helper: Helper) -> None:
    """An immutable /var/swap passes every check, then refuses the swap file: the sysctls written before go back."""
    directory = Path("/var/swap")
    assert not directory.exists()
    directory.mkdir(mode=0o700)
    subprocess.run(["chattr", "+i", str(directory)], check=True)
    try:
        before = read_knobs()
        changes, _ = full_plan()
        swap_file = {"knob": "swap.file", "current": None, "target": 64, "persistence": "persistent",
                     "reason": "test", "path": f"{directory}/autoglm-tune.swap", "priority": 3}
        name, text = helper.c.error("Apply", plan_json(*changes, swap_file), False, False)
        assert name == ERROR_PREFIX + "Failed" and "rolled-back" in text
        assert read_knobs() == before
        tx = helper.journal()[-1]
        assert tx["state"] == "rolled-back"
        assert all(s["state"] == "undone" for s in tx["steps"])
        assert helper.audit()[-1]["result"] == "Failed"
        failed = cli(helper.bus, "apply", "--plan", plan_file(helper.bus, *changes, swap_file), "--yes")
        assert failed.returncode == 4, failed.stdout + failed.stderr
        assert "swap.file" in failed.stdout and "rolled-back" in failed.stderr
        assert read_knobs() == before
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.rmdir()


def test_unit_changes_without_systemd_on_the_bus_are_not_supported(helper: Helper) -> None:
    """The private test bus has no systemd: unit changes are refused (tests/systemd applies them for real)."""
    plan = plan_json({"knob": "unit", "current": "enabled", "target": "disabled", "persistence": "persistent",
                      "reason": "test", "unit": "cups.service"})
    name, text = helper.c.error("Apply", plan, False, False)
    assert name == ERROR_PREFIX + "NotSupported" and "unit cups.service" in text and "systemd is not running" in text


@pytest.mark.parametrize(
    ("unit", "problem"),
    [("ssh.service", "never-touch"), ("systemd-journald.service", "never-touch"), ("autoglm-tune.service",
     "never-touch"), ("dbus-io.github.autoglm_tune.Helper1.service", "never-touch"),
     ("../etc/cups.service", "is not a unit name"), ("/usr/lib/systemd/system/cups.service", "is not a unit name"),
     ("getty@.service", "template without an instance"), ("cups", "is not a unit name")],
)
def test_unit_bad_names_and_never_touch_are_refused_by_the_schema(helper: Helper, unit: str, problem: str) -> None:
    plan = plan_json({"knob": "unit", "current": "enabled", "target": "masked", "persistence": "persistent",
                      "reason": "test", "unit": unit})
    name, text = helper.c.error("Apply", plan, False, False)
    assert name == ERROR_PREFIX + "InvalidArgs" and text.startswith("changes[0].unit: ") and problem in text
    assert "allowed: " in text and "\n" not in text


@pytest.mark.parametrize(
    ("plan", "field"),
    [
        ('{"version": 2, "changes": []}', "plan.version"),
        ("[1, 2]", "plan"),
        ("not json", "plan"),
        ("x" * (MAX_PLAN_BYTES + 1), "plan"),
        (plan_json(scalar_change("vm.dirty_ratio", 20, 10)), "changes[0].knob"),
        (plan_json(scalar_change("vm.swappiness", 60, 201)), "vm.swappiness"),
        (plan_json(scalar_change("vm.swappiness", 60, "61")), "vm.swappiness"),
        (plan_json(scalar_change("zswap.max_pool_percent", 20, 101)), "zswap.max_pool_percent"),
        (plan_json(scalar_change("zswap.compressor", "lzo", "lz4")), "changes[0].target"),
        (plan_json(scalar_change("zswap.compressor", "lzo", "../../x")), "zswap.compressor"),
        (plan_json({**scalar_change("vm.swappiness", 60, 61), "persistence": "persistent"}), "changes[0].persistence"),
        (plan_json({"knob": "swap.file", "current": None, "target": 64, "persistence": "persistent",
                    "reason": "t", "path": "/etc/passwd", "priority": 1}), "swap.file path"),
        (plan_json({"knob": "swap.file", "current": None, "target": 32, "persistence": "persistent",
                    "reason": "t", "path": "/swap/autoglm-tune.swap", "priority": 1}), "swap.file"),
    ],
)
def test_bad_input_is_an_invalid_args_error_naming_the_field(helper: Helper, plan: str, field: str) -> None:
    before, journal = machine(), helper.journal()
    name, text = helper.c.error("Apply", plan, False, False)
    assert name == ERROR_PREFIX + "InvalidArgs"
    assert text.startswith(field) and "allowed:" in text
    assert machine() == before and helper.journal() == journal


def test_wrong_argument_types_name_the_expected_arguments(helper: Helper) -> None:
    reply = helper.c.call("Apply", "sb", ["{}", False])
    assert reply.error_name == ERROR_PREFIX + "InvalidArgs" and "plan_json s, dry_run b, force b" in reply.body[0]
    name, text = helper.c.error("Rollback", "../../etc/passwd", False, False)
    assert name == ERROR_PREFIX + "InvalidArgs" and text.startswith("txid:")


def test_concurrent_applies_never_interleave(helper: Helper) -> None:
    now = live("vm.swappiness")
    plans = [plan_json(scalar_change("vm.swappiness", now, now + i)) for i in range(1, 5)]

    async def race() -> list[Message]:
        buses = [await MessageBus(bus_address=helper.bus.address).connect() for _ in plans]
        try:
            return await asyncio.gather(*(b.call(helper.c.message("Apply", "sbb", [p, False, False]))
                                          for b, p in zip(buses, plans, strict=True)))
        finally:
            for b in buses:
                b.disconnect()

    replies = helper.c.loop.run_until_complete(race())
    ok = [json.loads(r.body[0]) for r in replies if r.message_type == MessageType.METHOD_RETURN]
    refused = [r for r in replies if r.message_type == MessageType.ERROR]
    assert len(ok) == 1 and ok[0]["result"] == "committed"
    assert all(r.error_name == ERROR_PREFIX + "Drift" for r in refused) and len(refused) == 3
    assert live("vm.swappiness") == ok[0]["changes"][0]["new"]
    helper.c.ok("Rollback", ok[0]["txid"], False, False)
    assert live("vm.swappiness") == now


def test_version_introspection_and_changed_signal(helper: Helper) -> None:
    async def run() -> tuple[Any, str, list[str]]:
        bus = await MessageBus(bus_address=helper.bus.address).connect()
        try:
            intro = await bus.introspect(BUS_NAME, OBJECT_PATH)
            proxy = bus.get_proxy_object(BUS_NAME, OBJECT_PATH, intro).get_interface(INTERFACE)
            seen: list[str] = []
            proxy.on_changed(seen.append)
            now = live("vm.swappiness")
            report = json.loads(await proxy.call_apply(plan_json(scalar_change("vm.swappiness", now, now + 1)),
                                                       False, False))
            await proxy.call_rollback(report["txid"], False, False)
            await asyncio.sleep(0.2)
            return await proxy.get_version(), report["txid"], seen
        finally:
            bus.disconnect()

    version, txid, seen = helper.c.loop.run_until_complete(run())
    assert version == "0.1.0"
    assert seen == [txid, txid]


def test_cli_apply_status_verify_rollback(helper: Helper) -> None:
    bus, now = helper.bus, live("vm.swappiness")
    target = now + 7
    plan = plan_file(bus, scalar_change("vm.swappiness", now, target))
    refused = cli(bus, "apply", "--plan", plan, stdin="")
    assert refused.returncode == 2 and "--yes" in refused.stderr and live("vm.swappiness") == now
    dry = cli(bus, "apply", "--plan", plan, "--dry-run", "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["changed"] is True and live("vm.swappiness") == now
    done = cli(bus, "apply", "--plan", plan, "--yes", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["changed"] is True and out["result"] == "committed" and live("vm.swappiness") == target
    again = cli(bus, "apply", "--plan", plan, "--yes", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)["changed"] is False

    rollback_dry = cli(bus, "rollback", "--dry-run", "--json")
    assert rollback_dry.returncode == 0 and live("vm.swappiness") == target
    assert json.loads(rollback_dry.stdout)["changed"] is True  # it would put back the old value

    status = cli(bus, "status")
    assert status.returncode == 0 and out["txid"] in status.stdout and "committed" in status.stdout
    assert cli(bus, "verify").returncode == 0
    Path("/proc/sys/vm/swappiness").write_text(str(target + 1))
    drift = cli(bus, "verify", "--json")
    assert drift.returncode == 1 and json.loads(drift.stdout)["drift"][0]["subject"] == "vm.swappiness"
    assert cli(bus, "rollback", "--yes").returncode == 1  # changed since: reported, not clobbered
    assert live("vm.swappiness") == target + 1
    forced = cli(bus, "rollback", out["txid"], "--yes", "--force", "--json")
    assert forced.returncode == 0 and json.loads(forced.stdout)["result"] == "rolled-back"
    assert live("vm.swappiness") == now
    nothing = cli(bus, "rollback", "--last", "--yes")  # nothing left to roll back: done already
    assert (nothing.returncode, nothing.stdout) == (0, "nothing to roll back\n")
    Path("/proc/sys/vm/swappiness").write_text(str(now + 1))  # drift against the saved plan
    assert cli(bus, "apply", "--plan", plan, "--yes").returncode == 1 and live("vm.swappiness") == now + 1
    plan_drift = cli(bus, "apply", "--plan", plan, "--yes", "--force")
    assert plan_drift.returncode == 0 and live("vm.swappiness") == target
    assert cli(bus, "rollback", "--yes").returncode == 0 and live("vm.swappiness") == now + 1  # the value forced over
    Path("/proc/sys/vm/swappiness").write_text(str(now))


def test_cli_apply_with_a_policy_plans_from_this_machine(helper: Helper) -> None:
    path = helper.bus.dir.parent / "policy-keep.toml"
    path.write_text(POLICY.format(swappiness=live("vm.swappiness")))
    result = cli(helper.bus, "apply", "--policy", str(path), "--yes", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"changed": False, "result": "unchanged", "txid": "", "changes": []}
    both = cli(helper.bus, "apply", "--policy", str(path), "--plan", str(path), "--yes")
    assert both.returncode == 2 and "--plan and --policy" in both.stderr


def test_cli_reports_an_unreachable_helper_with_exit_5(helper: Helper, tmp_path: Path) -> None:
    env_bus = Bus.__new__(Bus)
    env_bus.address, env_bus.dir = f"unix:path={tmp_path}/no-such-socket", tmp_path
    assert cli(env_bus, "status").returncode == 5


def test_cli_asks_on_a_terminal_and_does_nothing_when_told_no(helper: Helper) -> None:
    now = live("vm.swappiness")
    plan = plan_file(helper.bus, scalar_change("vm.swappiness", now, now + 3))
    command = f"{BIN / 'autoglm-tune'} apply --plan {plan}"

    def on_a_terminal(answer: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["script", "-qec", command, "/dev/null"], input=answer, env=helper.bus.env(),
                              capture_output=True, text=True, timeout=60)

    declined = on_a_terminal("n\n")
    assert declined.returncode == 0 and "Apply these changes?" in declined.stdout
    assert "nothing changed" in declined.stdout and live("vm.swappiness") == now
    accepted = on_a_terminal("y\n")
    assert accepted.returncode == 0 and "committed" in accepted.stdout and live("vm.swappiness") == now + 3
    helper.c.ok("Rollback", "", False, False)
    assert live("vm.swappiness") == now
