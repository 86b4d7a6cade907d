"""Never-touch decided on what a real systemd 252 acts on, not on the name sent (issue 14, finding 1): an alias
of a never-touch unit, and a unit a never-touch unit Requires, BindsTo or is PartOf, are refused in a dry-run and
in an apply with nothing changed and the never-touch unit still running. The alias cases are Debian's own
(procps.service → systemd-sysctl, kmod.service → systemd-modules-load, autovt@ → getty@), hand-made aliases of
them in /etc/systemd/system, and a vendor alias made by `systemctl enable` (agt-firewall.service →
nftables.service); the dependents are test units under stand-ins for networking, auditd and apparmor
(container.py)."""

from __future__ import annotations

import pytest
from autoglm_helper.contract.bus import ERROR_PREFIX
from container import Client, Container, error, ok, plan, snapshot, unit_change


def _refused(container: Container, client: Client, unit: str, watched: list[str], dry_run: bool) -> str:
    """Apply (or dry-run) masking `unit`, from the state it is in: refused, and `unit` and `watched` unchanged."""
    before = {u: snapshot(container, client, u) for u in [unit, *watched]}
    current = before[unit]["state"]
    name, text = error(client, "Apply", plan(unit_change(unit, current, "masked")), dry_run, False)
    assert name == ERROR_PREFIX + "InvalidArgs", text
    assert text.startswith("changes[0].unit: ") and "never-touch" in text and "; allowed: " in text, text
    assert {u: snapshot(container, client, u) for u in [unit, *watched]} == before
    return text


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "apply"])
@pytest.mark.parametrize(
    ("unit", "target", "reached"),
    [
        ("agt-firewall.service", "nftables.service", "nftables.service (a name of agt-firewall.service)"),
        ("agt-kmod.service", "systemd-modules-load.service", "systemd-modules-load.service (a name of agt-kmod"),
        # an alias of Debian's alias procps.service; systemd-sysctl is masked in the container, so the name loads
        # alone (Names: itself only) and only the symlinks tell what the unit-file calls would act on
        ("agt-procps.service", "systemd-sysctl.service", "procps.service (agt-procps.service is an alias of it)"),
    ],
)
def test_an_alias_of_a_never_touch_unit_is_refused(container: Container, client: Client, unit: str, target: str,
                                                    reached: str, dry_run: bool) -> None:
    was = client.unit_property(target, "ActiveState")
    text = _refused(container, client, unit, [target], dry_run)
    assert f"{unit} reaches {reached}" in text
    assert client.unit_property(target, "ActiveState") == was
    if target == "nftables.service":
        assert was == "active"


def test_the_alias_really_is_the_never_touch_unit(client: Client) -> None:
    """What the refusals above rest on: systemd loads these names as the never-touch unit."""
    for alias, unit in (("agt-firewall.service", "nftables.service"), ("kmod.service", "systemd-modules-load.service"),
                        ("agt-kmod.service", "systemd-modules-load.service"),
                        ("autovt@tty1.service", "getty@tty1.service")):
        assert client.unit_property(alias, "Id") == unit
        assert alias in client.unit_property(unit, "Names")


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "apply"])
@pytest.mark.parametrize(
    ("unit", "guarded", "why"),
    [
        ("agt-ifpre.service", "networking.service", "networking.service Requires agt-ifpre.service"),
        ("agt-ifdeep.service", "networking.service",
         "networking.service Requires agt-ifpre.service, and agt-ifpre.service Requires agt-ifdeep.service"),
        ("agt-bound.service", "auditd.service", "auditd.service BindsTo agt-bound.service"),
        ("agt-group.service", "apparmor.service", "apparmor.service is PartOf agt-group.service"),
    ],
)
def test_a_unit_a_never_touch_unit_depends_on_is_refused(container: Container, client: Client, unit: str,
                                                         guarded: str, why: str, dry_run: bool) -> None:
    """Stopping the unit in mode replace would stop the never-touch unit too (as ifupdown-pre → networking)."""
    assert client.unit_property(guarded, "ActiveState") == "active"
    assert client.unit_property(unit, "ActiveState") == "active"
    text = _refused(container, client, unit, [guarded], dry_run)
    assert f"{unit} reaches {guarded} ({why}), which is on the never-touch list (matches {guarded})" in text
    assert client.unit_property(guarded, "ActiveState") == "active"
    assert client.unit_property(unit, "ActiveState") == "active"


@pytest.mark.parametrize(
    ("unit", "rule"),
    [("nftables.service", "matches nftables.service"), ("procps.service", "matches procps.service"),
     ("kmod.service", "matches kmod.service"), ("networking.service", "matches networking.service"),
     ("autovt@tty1.service", "no instance of a template"), ("getty@tty1.service", "no instance of a template"),
     ("console-getty.service", "matches console-getty.service"), ("user@0.service", "no instance of a template"),
     ("dev-mqueue.mount", "only .service")],
)
def test_the_names_found_in_the_audit_are_refused_by_name(container: Container, client: Client, unit: str,
                                                           rule: str) -> None:
    text = _refused(container, client, unit, [], dry_run=False)
    assert f"{unit} is on the never-touch list ({rule}" in text


def test_an_ordinary_unit_with_an_ordinary_alias_still_changes(container: Container, client: Client) -> None:
    """The resolution refuses what reaches a never-touch unit, nothing else: agt-alias.service (→ agt-aliased) is
    masked in a dry-run and an apply, and rolled back exactly."""
    before = snapshot(container, client, "agt-alias.service")
    change = plan(unit_change("agt-alias.service", "alias", "masked"))
    assert ok(client, "Apply", change, True, False)["result"] == "dry-run"
    report = ok(client, "Apply", change, False, False)
    assert report["result"] == "committed"
    assert client.unit_property("agt-aliased.service", "ActiveState") in ("inactive", "failed")
    ok(client, "Rollback", report["txid"], False, False)
    assert snapshot(container, client, "agt-alias.service") == before
