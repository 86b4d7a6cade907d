"""Live unit states as facts: read over D-Bus from the running systemd by an unprivileged user, shown by
facts, plan and diff, with co-resident tuners and their live state."""

from __future__ import annotations

import json

from container import CLI, FAKE_TUNER, Client, Container

NOBODY = 65534


def test_facts_read_live_unit_states_unprivileged(container: Container, client: Client) -> None:
    r = container.run(CLI, "facts", "--json", uid=NOBODY)
    facts = json.loads(r.stdout)
    assert facts["systemd_running"] is True
    units = {u["name"]: u for u in facts["units"]}
    assert {u["source"] for u in facts["units"]} == {"systemd"}
    for name in ("agt-enabled.service", "agt-disabled.service", "agt-static.service", "agt-masked.service",
                 "agt-runmasked.service", "agt-runtime.service", "agt-alias.service", "ssh.service",
                 "dbus.service"):
        if name in units:
            assert units[name]["state"] == client.manager("GetUnitFileState", "s", name)[0], name
            assert units[name]["active"] == client.unit_property(name, "ActiveState"), name
    assert units["agt-enabled.service"] == {"name": "agt-enabled.service", "state": "enabled", "active": "active",
                                            "source": "systemd"}
    assert units["agt-runmasked.service"]["state"] == "masked-runtime"
    assert units["agt-runtime.service"]["state"] == "enabled-runtime"
    assert units["agt-disabled.service"]["active"] == "active"  # started by hand, not enabled
    assert {"name": "tuned", "evidence": FAKE_TUNER, "enabled": True,
            "conflicts_on": ["vm sysctls", "transparent hugepages", "CPU governor"]} in facts["tuners"]

    text = container.run(CLI, "facts", uid=NOBODY).stdout
    assert "units read live over D-Bus" in text
    assert f"tuner       tuned ({FAKE_TUNER}, tuned.service enabled, active)" in text


def test_plan_and_diff_show_live_units_and_tuners(container: Container) -> None:
    policy = container.path("/var/tmp/agt-facts-policy.toml")
    policy.write_text('[services]\ndisable = ["agt-enabled.service", "ssh.service"]\nmask = ["agt-static.service"]\n')
    policy.chmod(0o644)
    try:
        plan = json.loads(container.run(CLI, "plan", "--json", "--policy", "/var/tmp/agt-facts-policy.toml",
                                        uid=NOBODY).stdout)
        diff = container.run(CLI, "diff", "--policy", "/var/tmp/agt-facts-policy.toml", uid=NOBODY, check=False)
    finally:
        policy.unlink()
    units = {c["unit"]: c for c in plan["changes"] if c["knob"] == "unit"}
    assert units["agt-enabled.service"]["current"] == "enabled" and units["agt-enabled.service"]["target"] == \
        "disabled"
    assert units["agt-static.service"]["current"] == "static" and units["agt-static.service"]["target"] == "masked"
    assert "ssh.service" not in units
    assert any(c.startswith("tuned is installed") and "enabled" in c for c in plan["conflicts"])
    assert diff.returncode == 1
    assert "unit agt-enabled.service" in diff.stdout and "tuned" in diff.stdout
