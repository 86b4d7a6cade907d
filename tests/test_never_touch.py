"""Never-touch on what systemd acts on, without a machine: the rule for one name, the plan schema's literal check,
and the helper's walk over a unit's names, alias symlinks and the units a stop takes down (fed from a table
that stands in for systemd). tests/systemd/test_never_touch_resolved.py does the same against a real systemd."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from autoglm_helper import units
from autoglm_helper.contract import catalogue, plan_schema
from autoglm_helper.contract.catalogue import CatalogueError
from autoglm_helper.units import UnitInfo, alias_targets, related_units


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("procps.service", "matches procps.service"),
        ("kmod.service", "matches kmod.service"),
        ("systemd-sysctl.service", "matches systemd-*"),
        ("console-getty.service", "matches console-getty.service"),
        ("nftables.service", "matches nftables.service"),
        ("ufw.service", "matches ufw.service"),
        ("firewalld.service", "matches firewalld.service"),
        ("apparmor.service", "matches apparmor.service"),
        ("auditd.service", "matches auditd.service"),
        ("ifupdown-pre.service", "matches ifupdown*"),
        ("getty-static.service", "matches getty*"),
        ("multi-user.target", "only .service"),
        ("home.mount", "only .service"),
        ("dev-sda2.swap", "only .service"),
        ("user-1000.slice", "only .service"),
        ("autovt@tty1.service", "no instance of a template"),
        ("ssh@3-10.0.0.1:22-10.0.0.2:50000.service", "no instance of a template"),
        ("user@1000.service", "no instance of a template"),
        ("user-runtime-dir@1000.service", "no instance of a template"),
        ("ifup@eth0.service", "no instance of a template"),
        ("container-getty@1.service", "no instance of a template"),
        ("openvpn@office.service", "no instance of a template"),
    ],
)
def test_never_touch_rule(name: str, rule: str) -> None:
    assert (catalogue.never_touch_rule(name) or "").startswith(rule)
    assert catalogue.is_never_touch(name)


@pytest.mark.parametrize("name", ["cups.service", "cups.socket", "cups.path", "apt-daily.timer", "bluetooth.service"])
def test_ordinary_units_may_be_changed(name: str) -> None:
    assert catalogue.never_touch_rule(name) is None
    assert catalogue.never_touch_rule(name, ("cups*",)) == ("matches cups*" if name.startswith("cups") else None)


def _change(unit: str) -> str:
    return json.dumps({"version": 1, "changes": [{"knob": "unit", "unit": unit, "current": "enabled",
                                                  "target": "masked", "persistence": "persistent", "reason": "t"}]})


@pytest.mark.parametrize("unit", ["procps.service", "kmod.service", "autovt@tty1.service", "nftables.service",
                                  "user@1000.service", "home.mount"])
def test_the_schema_refuses_the_literal_names(unit: str) -> None:
    with pytest.raises(CatalogueError) as err:
        plan_schema.plan_from_json(_change(unit))
    assert err.value.field == "changes[0].unit" and "never-touch" in err.value.problem


# A stand-in for systemd: what LoadUnit + GetAll would say for each name (aliases load as their target).
SYSTEMD: dict[str, UnitInfo] = {
    "kmod.service": {"Id": "systemd-modules-load.service", "Names": ["systemd-modules-load.service", "kmod.service"]},
    "systemd-modules-load.service": {"Id": "systemd-modules-load.service",
                                     "Names": ["systemd-modules-load.service", "kmod.service"]},
    "agt-ifpre.service": {"Id": "agt-ifpre.service", "Names": ["agt-ifpre.service"],
                              "RequiredBy": ["agt-mid.service"]},
    "agt-mid.service": {"Id": "agt-mid.service", "Names": ["agt-mid.service"], "RequiredBy": ["networking.service"]},
    "agt-bound.service": {"Id": "agt-bound.service", "Names": ["agt-bound.service"], "BoundBy": ["auditd.service"]},
    "agt-requisite.service": {"Id": "agt-requisite.service", "RequisiteOf": ["ufw.service"]},
    "agt-group.service": {"Id": "agt-group.service", "ConsistsOf": ["apparmor.service"]},
    "agt-mount-dep.service": {"Id": "agt-mount-dep.service", "RequiredBy": ["srv.mount"]},
    "cups.socket": {"Id": "cups.socket", "Names": ["cups.socket"], "RequiredBy": ["cups.service"]},
    "cups.service": {"Id": "cups.service", "Names": ["cups.service"], "TriggeredBy": ["cups.socket"]},
    "agt-alias.service": {"Id": "agt-alias.service", "Names": ["agt-alias.service"]},  # its target is masked
}


def _lookup(name: str) -> UnitInfo:
    return SYSTEMD.get(name, {"Id": name, "Names": [name]})


def _check(unit: str, aliases: dict[str, list[str]] | None = None) -> None:
    table = aliases or {}
    catalogue.check_unit_closure(unit, related_units(unit, _lookup, lambda n: table.get(n, []), "changes[0]"),
                                 "changes[0]")


@pytest.mark.parametrize(
    ("unit", "aliases", "reached", "why", "rule"),
    [
        ("agt-alias.service", {"agt-alias.service": ["systemd-sysctl.service"]}, "systemd-sysctl.service",
         "agt-alias.service is an alias of it", "matches systemd-*"),
        ("agt-ifpre.service", None, "networking.service",
         "networking.service Requires agt-mid.service, and agt-mid.service Requires agt-ifpre.service",
         "matches networking.service"),
        ("agt-bound.service", None, "auditd.service", "auditd.service BindsTo agt-bound.service",
         "matches auditd.service"),
        ("agt-requisite.service", None, "ufw.service", "ufw.service is Requisite= of agt-requisite.service",
         "matches ufw.service"),
        ("agt-group.service", None, "apparmor.service", "apparmor.service is PartOf agt-group.service",
         "matches apparmor.service"),
        ("agt-mount-dep.service", None, "srv.mount", "srv.mount Requires agt-mount-dep.service", "only .service"),
    ],
)
def test_a_name_or_dependent_systemd_reaches_is_refused(unit: str, aliases: dict[str, list[str]] | None,
                                                         reached: str, why: str, rule: str) -> None:
    with pytest.raises(CatalogueError) as err:
        _check(unit, aliases)
    assert err.value.field == "changes[0].unit"
    assert err.value.problem.startswith(f"{unit} reaches {reached} ({why}), which is on the never-touch list ({rule}")


def test_an_alias_loaded_as_its_never_touch_target_is_refused() -> None:
    with pytest.raises(CatalogueError, match=r"kmod\.service is on the never-touch list"):
        _check("kmod.service")
    # the same through a name that is not itself on the list
    SYSTEMD["agt-kmod.service"] = {"Id": "systemd-modules-load.service",
                                   "Names": ["systemd-modules-load.service", "agt-kmod.service"]}
    try:
        with pytest.raises(CatalogueError) as err:
            _check("agt-kmod.service")
        assert "reaches systemd-modules-load.service (a name of agt-kmod.service)" in err.value.problem
    finally:
        del SYSTEMD["agt-kmod.service"]


def test_ordinary_units_and_dependents_pass() -> None:
    _check("cups.socket")  # cups.service Requires it: stopped with it, and not never-touch
    _check("cups.service")  # TriggeredBy is not a dependency a stop propagates along
    _check("agt-nothere.service")


def test_too_many_units_reached_is_refused() -> None:
    def lookup(name: str) -> UnitInfo:
        n = int(name.removeprefix("agt-").removesuffix(".service"))
        return {"Id": name, "RequiredBy": [f"agt-{n + 1}.service"]}

    with pytest.raises(CatalogueError, match="reaches more than"):
        catalogue.check_unit_closure("agt-0.service", related_units("agt-0.service", lookup, lambda n: []), "c")


def test_alias_targets_follow_symlink_chains(tmp_path: Path) -> None:
    etc, lib = tmp_path / "etc", tmp_path / "lib"
    etc.mkdir()
    lib.mkdir()
    (lib / "systemd-sysctl.service").write_text("[Service]\n")
    (lib / "procps.service").symlink_to("systemd-sysctl.service")
    (etc / "agt-two.service").symlink_to(lib / "procps.service")  # an alias of an alias
    (etc / "agt-masked.service").symlink_to("/dev/null")
    path = [str(etc), str(lib)]
    assert alias_targets("procps.service", path) == ["systemd-sysctl.service"]
    assert alias_targets("agt-two.service", path) == ["procps.service", "systemd-sysctl.service"]
    assert alias_targets("agt-masked.service", path) == []
    assert alias_targets("systemd-sysctl.service", path) == []
    assert os.path.exists(lib / "procps.service")


def test_the_walk_stops_along_what_a_stop_propagates() -> None:
    assert set(units.STOPPED_WITH) == {"RequiredBy", "RequisiteOf", "BoundBy", "ConsistsOf"}
    found: list[Any] = list(related_units("agt-ifpre.service", _lookup, lambda n: []))
    assert [n for n, _ in found] == ["agt-mid.service", "networking.service"]
