"""The README followed word for word on a real Debian 13 machine by alice, a user with sudo (not root): install,
`diff`, `sudo autoglm-tune apply --yes`, `status`, `verify`, `rollback`; the helper as the D-Bus-activated,
sandboxed systemd unit under the real polkitd; the example group rule; the default policy's plan there."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable

from guest import Guest, Installed


def sysctls(g: Guest, names: list[str]) -> dict[str, str]:
    paths = " ".join(shlex.quote("/proc/sys/" + n.replace(".", "/")) for n in names)
    values = g.ssh(f"cat {paths}").stdout.split("\n")
    return dict(zip(names, values, strict=False))


def like_a_fresh_debian_install(g: Guest) -> None:
    """What the image leaves out to boot fast under TCG and a Debian install has: swap on the disk, and the apt
    timers enabled (the default policy disables them on a machine that serves a model)."""
    g.ssh("mkswap -q /dev/sda && swapon /dev/sda && systemctl unmask -q apt-daily.timer apt-daily-upgrade.timer "
          "&& systemctl enable -q apt-daily.timer apt-daily-upgrade.timer")


def runtime_state(g: Guest) -> str:
    """Everything a plan may change at runtime: the managed sysctls, zswap, swap areas."""
    return g.ssh("grep -r . /proc/sys/vm/swappiness /proc/sys/vm/vfs_cache_pressure /proc/sys/vm/page-cluster "
                 "/sys/module/zswap/parameters; cat /proc/swaps; systemctl list-unit-files --state=masked,disabled "
                 "--no-legend | sort").stdout


def test_the_readme_install_then_apply_status_verify_rollback_as_a_sudo_user(
        installed: Installed, guest_from: Callable[..., Guest]) -> None:
    result = installed.result
    # `diff`, the command's last word, exits 1 while the machine differs from the plan
    assert result.returncode in (0, 1), f"{installed.command}\n{result.stdout}\n{result.stderr}"
    assert "installed  /usr/local/bin/autoglm-tune\n" in result.stdout
    assert "installed  /usr/local/lib/systemd/system/autoglm-tune-helper.service" in result.stdout
    assert "differ from the plan" in result.stdout or "in sync" in result.stdout

    g = guest_from(installed.snapshot)
    helper_unit = g.ssh("cat /usr/local/lib/systemd/system/autoglm-tune-helper.service").stdout
    assert "ExecStart=/opt/autoglm-tune/bin/autoglm-tune-helper " in helper_unit  # reachable under ProtectHome=yes
    assert g.ssh("sudo sh -c 'command -v autoglm-tune'", user="alice").stdout.strip() == "/usr/local/bin/autoglm-tune"

    like_a_fresh_debian_install(g)
    plan = json.loads(g.ssh("autoglm-tune plan --json", user="alice").stdout)
    planned = {(c["knob"], c.get("unit") or c.get("area")): c["target"] for c in plan["changes"]}
    assert planned[("swap.priority", "/dev/sda")] == 10, planned
    for timer in ("apt-daily.timer", "apt-daily-upgrade.timer"):
        assert planned[("unit", timer)] == "disabled", planned
    before = runtime_state(g)

    applied = g.ssh("sudo autoglm-tune apply --yes", user="alice", check=False, timeout=300)
    assert applied.returncode == 0, (applied.stdout, applied.stderr, g.journal("autoglm-tune-helper.service"))
    assert "committed" in applied.stdout
    # the real D-Bus-activated, sandboxed unit did it
    shown = g.ssh("systemctl show autoglm-tune-helper.service -p ExecMainStartTimestampMonotonic -p ProtectHome "
                  "-p NoNewPrivileges -p ExecMainStatus").stdout
    assert "ProtectHome=yes" in shown and "NoNewPrivileges=yes" in shown
    assert "ExecMainStartTimestampMonotonic=0\n" not in shown
    for change in plan["changes"]:
        if change["knob"].startswith("vm."):
            assert sysctls(g, [change["knob"]])[change["knob"]] == str(change["target"]), change
        if change["knob"] == "unit":
            state = g.ssh(f"systemctl is-enabled {shlex.quote(change['unit'])}", check=False).stdout.strip()
            assert state == change["target"], change
    areas = {line.split()[0]: line.split()[4] for line in g.ssh("cat /proc/swaps").stdout.splitlines()[1:]}
    assert areas == {"/dev/sda": "10"}, areas

    assert g.ssh("autoglm-tune verify", user="alice", check=False).returncode == 0
    status = g.ssh("autoglm-tune status", user="alice", check=False)
    assert status.returncode == 0 and "committed" in status.stdout, status
    diff = g.ssh("autoglm-tune diff", user="alice", check=False)
    assert diff.returncode == 0 and "in sync" in diff.stdout, diff

    back = g.ssh("sudo autoglm-tune rollback --yes", user="alice", check=False, timeout=300)
    assert back.returncode == 0, (back.stdout, back.stderr)
    assert runtime_state(g) == before
    again = g.ssh("sudo autoglm-tune rollback --yes", user="alice", check=False)
    assert again.returncode == 0 and "nothing to roll back" in again.stdout, again


def test_polkit_lets_the_autoglm_group_apply_without_a_password_and_denies_others_with_a_hint(
        installed: Installed, guest_from: Callable[..., Guest]) -> None:
    g = guest_from(installed.snapshot)
    like_a_fresh_debian_install(g)
    before = runtime_state(g)
    for user in ("bob", "alice"):  # neither in the group yet: polkit asks for an admin, no agent answers
        denied = g.ssh("autoglm-tune apply --yes", user=user, check=False, timeout=300)
        assert denied.returncode == 3, (user, denied.stdout, denied.stderr)
        assert "io.github.autoglm_tune.apply" in denied.stderr and "autoglm" in denied.stderr
        assert "Traceback" not in denied.stderr
    assert runtime_state(g) == before

    # the README's way: the example rule, and alice in the group (a new login to take it up)
    g.ssh("groupadd --system autoglm && usermod -aG autoglm alice && install -m 0644 "
          "/home/alice/autoglm-tune/systemd/polkit/50-autoglm-tune.rules /etc/polkit-1/rules.d/")
    g.close_ssh()
    g.ssh("for i in $(seq 50); do journalctl -u polkit -q --no-pager | grep -q 'Finished loading, compiling and "
          "executing 2 rules' && exit 0; sleep 0.2; done; exit 0")
    applied = g.ssh("autoglm-tune apply --yes", user="alice", check=False, timeout=300)
    assert applied.returncode == 0, (applied.stdout, applied.stderr)
    # the machine is in sync now, so bob's apply has nothing to send; his rollback is denied
    denied = g.ssh("autoglm-tune rollback --yes", user="bob", check=False, timeout=300)
    assert denied.returncode == 3 and "io.github.autoglm_tune.rollback" in denied.stderr, denied
    back = g.ssh("autoglm-tune rollback --yes", user="alice", check=False, timeout=300)
    assert back.returncode == 0, (back.stdout, back.stderr)
    assert runtime_state(g) == before
    audit = g.ssh("cat /var/log/autoglm-tune/audit.jsonl").stdout.splitlines()
    results = [(json.loads(line)["uid"], json.loads(line)["result"]) for line in audit]
    assert (1001, "denied") in results and (1000, "committed") in results, results


def test_the_default_policy_plans_sensibly_for_a_4g_nvme_box_with_systemd(
        installed: Installed, guest_from: Callable[..., Guest]) -> None:
    g = guest_from(installed.snapshot)
    facts = json.loads(g.ssh("autoglm-tune facts --json", user="alice").stdout)
    assert facts["systemd_running"] is True
    plan = json.loads(g.ssh("autoglm-tune plan --json", user="alice").stdout)
    knobs = {c["knob"]: c for c in plan["changes"]}
    assert not plan["conflicts"], plan["conflicts"]
    # zswap auto stays off (measured, docs/BENCHMARKS.md), so no swap file to back it
    assert "zswap.enabled" not in knobs and "swap.file" not in knobs, knobs
    assert plan["process"]["cpus"] == [0, 1] and plan["process"]["threads"] == 2
    units = [c["unit"] for c in plan["changes"] if c["knob"] == "unit"]
    for unit in units:  # only units present on this machine, never one of the never-touch list
        assert g.ssh(f"systemctl cat {shlex.quote(unit)} >/dev/null", check=False).returncode == 0, unit
        assert not unit.startswith(("ssh", "dbus", "systemd-", "polkit", "getty")), unit
    dry = g.ssh("sudo autoglm-tune apply --dry-run --yes", user="alice", check=False, timeout=300)
    assert dry.returncode == 0, (dry.stdout, dry.stderr)
