"""Unit changes through the real helper, D-Bus-activated inside a real systemd, with polkit: stop + disable or
mask, and exact restore of every enablement state; never-touch and bad input refused with nothing changed."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from autoglm_helper.contract.bus import ERROR_PREFIX
from container import ALIAS, CLI, ETC_UNIT, Client, Container, error, ok, plan, snapshot, unit_change
from dbus_fast import MessageType


@pytest.mark.parametrize(
    ("unit", "state", "target", "after"),
    [
        ("agt-enabled.service", "enabled", "disabled", "disabled"),
        ("agt-enabled.service", "enabled", "masked", "masked"),
        ("agt-handmade.service", "enabled", "disabled", "disabled"),  # plus a hand-made link in timers.target.wants
        ("agt-runtime.service", "enabled-runtime", "disabled", "disabled"),
        ("agt-disabled.service", "disabled", "masked", "masked"),
        ("agt-static.service", "static", "masked", "masked"),
        ("agt-runmasked.service", "masked-runtime", "masked", "masked"),
        (ALIAS, "alias", "masked", "masked"),
        ("agt-timer.timer", "enabled", "disabled", "disabled"),
    ],
)
def test_change_and_exact_restore(container: Container, client: Client, unit: str, state: str, target: str,
                                  after: str) -> None:
    before = snapshot(container, client, unit)
    assert before["state"] == state
    report = ok(client, "Apply", plan(unit_change(unit, state, target)), False, False)
    assert report["result"] == "committed"
    assert report["changes"] == [{"subject": f"unit {unit}", "old": state, "target": target, "new": after,
                                  "state": "done"}]
    changed = snapshot(container, client, unit)
    assert changed["state"] == after
    assert changed["active"] in ("inactive", "failed")
    if target == "disabled":
        assert changed["links"] == [] and changed["runtime_links"] == []
    status = ok(client, "Status")
    assert {"txid": report["txid"], "subject": f"unit {unit}", "old": state, "new": after, "live": after} in \
        status["applied"]

    back = ok(client, "Rollback", report["txid"], False, False)
    assert back["result"] == "rolled-back"
    assert snapshot(container, client, unit) == before


def test_already_masked_is_unchanged(container: Container, client: Client) -> None:
    before = snapshot(container, client, "agt-masked.service")
    report = ok(client, "Apply", plan(unit_change("agt-masked.service", "masked", "masked")), False, False)
    assert report["result"] == "unchanged"
    assert snapshot(container, client, "agt-masked.service") == before


def test_dry_run_changes_nothing(container: Container, client: Client) -> None:
    before = snapshot(container, client, "agt-enabled.service")
    report = ok(client, "Apply", plan(unit_change("agt-enabled.service", "enabled", "masked")), True, False)
    assert report["result"] == "dry-run" and report["changes"][0]["old"] == "enabled"
    assert snapshot(container, client, "agt-enabled.service") == before


def test_several_units_in_one_transaction_and_drift_on_rollback(container: Container, client: Client) -> None:
    units = ["agt-enabled.service", "agt-static.service"]
    before = [snapshot(container, client, u) for u in units]
    report = ok(client, "Apply", plan(unit_change(units[0], "enabled", "disabled"),
                                      unit_change(units[1], "static", "masked")), False, False)
    assert [c["new"] for c in report["changes"]] == ["disabled", "masked"]
    # someone masks the first unit meanwhile: rollback is compare-and-set and refuses
    container.run("systemctl", "mask", units[0])
    name, text = error(client, "Rollback", report["txid"], False, False)
    assert name == ERROR_PREFIX + "Drift" and f"unit {units[0]} is 'masked'" in text
    assert client.manager("GetUnitFileState", "s", units[1])[0] == "masked"  # nothing restored
    container.run("systemctl", "unmask", units[0])
    ok(client, "Rollback", report["txid"], False, False)
    assert [snapshot(container, client, u) for u in units] == before


@pytest.mark.parametrize(
    ("unit", "current", "target", "field", "problem"),
    [
        ("ssh.service", "enabled", "masked", "changes[0].unit", "never-touch"),
        ("systemd-journald.service", "static", "masked", "changes[0].unit", "never-touch"),
        ("dbus.service", "static", "disabled", "changes[0].unit", "never-touch"),
        ("autoglm-tune-helper.service", "static", "masked", "changes[0].unit", "never-touch"),
        ("dbus-io.github.autoglm_tune.Helper1.service", "alias", "masked", "changes[0].unit", "never-touch"),
        ("autoglm-tune.service", "disabled", "masked", "changes[0].unit", "never-touch"),
        ("not a unit", "enabled", "masked", "changes[0].unit", "is not a unit name"),
        ("/usr/lib/systemd/system/agt-enabled.service", "enabled", "masked", "changes[0].unit", "not a unit name"),
        ("../agt-enabled.service", "enabled", "masked", "changes[0].unit", "not a unit name"),
        ("agt-enabled", "enabled", "masked", "changes[0].unit", "not a unit name"),
        ("getty@.service", "static", "masked", "changes[0].unit", "template without an instance"),
        ("agt-nothere.service", "enabled", "masked", "changes[0].unit", "is not installed"),
        ("agt-enabled.service", "enabled", "stopped", "changes[0].target", "not a unit target state"),
        ("agt-static.service", "static", "disabled", "changes[0].target", "cannot be disabled"),
        (ETC_UNIT, "static", "masked", "changes[0].target", "where a mask cannot be put"),
    ],
)
def test_refused_with_nothing_changed(container: Container, client: Client, unit: str, current: str, target: str,
                                      field: str, problem: str) -> None:
    watched = ["agt-enabled.service", "agt-static.service", "ssh.service", "systemd-journald.service"]
    before = [snapshot(container, client, u) for u in watched if client.call(
        "org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
        "GetUnitFileState", "s", [u]).message_type == MessageType.METHOD_RETURN]
    name, text = error(client, "Apply", plan(unit_change(unit, current, target)), False, False)
    assert name == ERROR_PREFIX + "InvalidArgs", text
    assert text.startswith(f"{field}: ") and problem in text and "; allowed: " in text and "\n" not in text
    after = [snapshot(container, client, u) for u in watched if client.call(
        "org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager",
        "GetUnitFileState", "s", [u]).message_type == MessageType.METHOD_RETURN]
    assert after == before


def test_a_mixed_plan_with_a_never_touch_unit_changes_nothing(container: Container, client: Client) -> None:
    before = snapshot(container, client, "agt-enabled.service")
    name, text = error(client, "Apply", plan(unit_change("agt-enabled.service", "enabled", "disabled"),
                                             unit_change("ssh.service", "enabled", "disabled")), False, False)
    assert name == ERROR_PREFIX + "InvalidArgs" and text.startswith("changes[1].unit: ssh.service is on the never")
    assert snapshot(container, client, "agt-enabled.service") == before


def test_helper_is_the_dbus_activated_sandboxed_service(container: Container, client: Client) -> None:
    ok(client, "Status")
    assert client.unit_property("autoglm-tune-helper.service", "ActiveState") == "active"
    pid = client.ok("org.freedesktop.systemd1", client.manager("LoadUnit", "s", "autoglm-tune-helper.service")[0],
                    "org.freedesktop.DBus.Properties", "Get", "ss",
                    ["org.freedesktop.systemd1.Service", "MainPID"])[0].value
    status = Path(f"/proc/{container.leader}/root/proc/{pid}/status").read_text()  # the container's pid namespace
    assert "NoNewPrivs:\t1" in status and "Seccomp:\t2" in status
    cap_bnd = int(next(line.split()[1] for line in status.splitlines() if line.startswith("CapBnd:")), 16)
    # CAP_SYS_ADMIN (swapon), CAP_SYS_NICE, CAP_SYS_RESOURCE, CAP_DAC_OVERRIDE (the model process), and nothing
    # else (CAP_NET_ADMIN left with taskstats), as far as the host's own bounding set has them (the CI VM lacks
    # CAP_SYS_RESOURCE)
    host = int(next(x.split()[1] for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("CapBnd")),
               16)
    assert cap_bnd == (1 << 21 | 1 << 23 | 1 << 24 | 1 << 1) & host


def test_unprivileged_caller_is_denied_by_polkit(container: Container, client: Client) -> None:
    before = snapshot(container, client, "agt-enabled.service")
    plan_file = container.path("/var/tmp/agt-denied-plan.json")
    plan_file.write_text(plan(unit_change("agt-enabled.service", "enabled", "disabled")))
    plan_file.chmod(0o644)
    try:
        r = container.run(CLI, "apply", "--plan", "/var/tmp/agt-denied-plan.json",
                          "--yes", check=False, uid=65534)
    finally:
        plan_file.unlink()
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert "not authorized" in r.stderr
    assert snapshot(container, client, "agt-enabled.service") == before


def test_kernel_knobs_through_the_sandboxed_helper(client: Client) -> None:
    """ReadWritePaths, the capability set and the system call filter leave the helper its kernel knobs."""
    swappiness = Path("/proc/sys/vm/swappiness")
    pool = Path("/sys/module/zswap/parameters/max_pool_percent")
    old = int(swappiness.read_text()), int(pool.read_text())
    new = (old[0] + 7) % 200, old[1] % 90 + 3
    changes = [{"knob": "vm.swappiness", "current": old[0], "target": new[0], "persistence": "runtime",
                "reason": "test"},
               {"knob": "zswap.max_pool_percent", "current": old[1], "target": new[1], "persistence": "runtime",
                "reason": "test"}]
    report = ok(client, "Apply", json.dumps({"version": 1, "changes": changes}), False, False)
    try:
        assert report["result"] == "committed"
        assert (int(swappiness.read_text()), int(pool.read_text())) == new  # the host's kernel: it is global
    finally:
        ok(client, "Rollback", report["txid"], False, True)
    assert (int(swappiness.read_text()), int(pool.read_text())) == old


@pytest.mark.parametrize("earlier_boot", [False, True])
def test_crash_recovery_restores_unit_steps(container: Container, client: Client, earlier_boot: bool) -> None:
    """A transaction left pending by a crash (after the mask, before the commit) is rolled back when the helper
    next starts — unit steps are persistent, so also when the crash was in an earlier boot."""
    before = snapshot(container, client, "agt-static.service")
    report = ok(client, "Apply", plan(unit_change("agt-static.service", "static", "masked")), False, False)
    client.job("StopUnit", "autoglm-tune-helper.service")
    journal = container.path(f"/var/lib/autoglm-tune/tx/{report['txid']}.json")
    tx = json.loads(journal.read_text())
    tx["state"], tx["steps"][0]["state"] = "pending", "intent"
    if earlier_boot:
        tx["boot_id"] = "00000000-0000-0000-0000-000000000000"
    journal.write_text(json.dumps(tx))
    assert client.manager("GetUnitFileState", "s", "agt-static.service")[0] == "masked"
    status = ok(client, "Status")  # D-Bus activation starts the helper, which recovers before it answers
    assert next(t for t in status["transactions"] if t["txid"] == report["txid"])["state"] == "rolled-back"
    assert snapshot(container, client, "agt-static.service") == before


def test_polkit_decides_for_unprivileged_callers(container: Container, client: Client) -> None:
    """With a rule granting `nobody` the apply action, the same call that was denied goes through: the helper asks
    the container's polkitd (a uid-0 fallback would deny). Rollback (root) restores."""
    rule = container.path("/etc/polkit-1/rules.d/40-agt-test.rules")
    rule.write_text('polkit.addRule(function(action, subject) {\n  if (action.id == "io.github.autoglm_tune.apply" '
                    '&& subject.user == "nobody") { return polkit.Result.YES; }\n});\n')
    rule.chmod(0o644)
    plan_file = container.path("/var/tmp/agt-allowed-plan.json")
    plan_file.write_text(plan(unit_change("agt-static.service", "static", "masked")))
    plan_file.chmod(0o644)
    before = snapshot(container, client, "agt-static.service")
    try:
        deadline = time.monotonic() + 10
        while True:  # polkitd reloads rules on an inotify event
            r = container.run(CLI, "apply", "--plan", "/var/tmp/agt-allowed-plan.json",
                              "--yes", "--json", check=False, uid=65534)
            if r.returncode != 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert r.returncode == 0, (r.stdout, r.stderr)
        report = json.loads(r.stdout)
        assert report["result"] == "committed"
        assert client.manager("GetUnitFileState", "s", "agt-static.service")[0] == "masked"
        audit = container.path("/var/log/autoglm-tune/audit.jsonl").read_text().splitlines()
        assert json.loads(audit[-1])["uid"] == 65534 and json.loads(audit[-1])["result"] == "committed"
    finally:
        rule.unlink()
        plan_file.unlink()
    ok(client, "Rollback", report["txid"], False, False)
    assert snapshot(container, client, "agt-static.service") == before


def test_a_link_no_systemd_call_can_put_back_is_refused_before_anything_changes(container: Container,
                                                                                  client: Client) -> None:
    """An .upholds link (systemd 249+) has no Manager call that writes it again: the unit is refused at the check,
    in the dry-run already, instead of being found out at rollback."""
    unit = "agt-enabled.service"
    link = container.path(f"/etc/systemd/system/multi-user.target.upholds/{unit}")
    link.parent.mkdir()
    link.symlink_to(f"/usr/lib/systemd/system/{unit}")
    container.run("systemctl", "daemon-reload")
    try:
        before = snapshot(container, client, unit)
        assert f"/etc/systemd/system/multi-user.target.upholds/{unit}" in before["links"]
        name, text = error(client, "Apply", plan(unit_change(unit, "enabled", "disabled")), True, False)
        assert name == ERROR_PREFIX + "InvalidArgs" and "no systemd call recreates" in text, text
        assert snapshot(container, client, unit) == before
    finally:
        link.unlink()
        link.parent.rmdir()
        container.run("systemctl", "daemon-reload")


def test_a_restore_that_would_add_links_says_so(container: Container, client: Client) -> None:
    """Only an alias left (the admin removed the unit's wants link): disabling removes the alias, and putting it
    back by EnableUnitFiles writes the wants link too. The rollback says so rather than claim it is exact."""
    unit, alias = "agt-twofold.service", "agt-twofold-alias.service"
    container.path(f"/usr/lib/systemd/system/{unit}").write_text(
        "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\nAlias=" + alias + "\n")
    container.run("systemctl", "daemon-reload")
    container.run("systemctl", "enable", unit)
    container.path(f"/etc/systemd/system/multi-user.target.wants/{unit}").unlink()
    container.run("systemctl", "daemon-reload")
    txid = ""
    try:
        before = snapshot(container, client, unit)
        assert list(before["links"]) == [f"/etc/systemd/system/{alias}"], before["links"]
        report = ok(client, "Apply", plan(unit_change(unit, before["state"], "disabled")), False, False)
        txid = report["txid"]
        assert report["result"] == "committed"
        back = ok(client, "Rollback", report["txid"], False, False)
        assert back["result"] == "conflict", back
        wants = f"/etc/systemd/system/multi-user.target.wants/{unit}"
        assert os.path.lexists(container.path(wants))  # what EnableUnitFiles wrote besides the alias
        status = ok(client, "Status")
        tx = next(t for t in status["transactions"] if t["txid"] == report["txid"])
        assert tx["state"] == "conflict", tx
    finally:
        container.run("systemctl", "disable", unit, check=False)
        container.path(f"/usr/lib/systemd/system/{unit}").unlink()
        container.run("systemctl", "daemon-reload")
        if txid:  # the conflict stays in the journal by design; later tests roll back "the last" transaction
            container.path(f"/var/lib/autoglm-tune/tx/{txid}.json").unlink(missing_ok=True)
