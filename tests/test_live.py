"""facts and diff on the machine the tests run on, checked against independent readers (lscpu, lsblk,
psutil, os) — and, as root, against a real sysctl write that the test restores."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from autoglm_tune.collect import collect_facts
from autoglm_tune.planner import make_plan
from autoglm_tune.policy import load_policy
from support import run_cli

SWAPPINESS = Path("/proc/sys/vm/swappiness")


@pytest.fixture(scope="module")
def facts():
    return collect_facts("/")


def test_cpus_match_lscpu(facts) -> None:
    rows = json.loads(
        subprocess.run(["lscpu", "-J", "-e=CPU,CORE,SOCKET,ONLINE"], capture_output=True, text=True, check=True).stdout
    )["cpus"]
    online = sorted(int(r["cpu"]) for r in rows if r["online"] in (True, "yes"))
    assert facts.cpu.online == online
    assert len({c.core for c in facts.cpu.cpus}) == len(
        {(r["socket"], r["core"]) for r in rows if int(r["cpu"]) in online}
    )
    assert len(facts.cpu.online) == os.cpu_count()


def test_memory_and_swap_match_psutil(facts) -> None:
    assert facts.memory.total_kib == psutil.virtual_memory().total // 1024
    assert sum(a.size_kib for a in facts.swaps) * 1024 == psutil.swap_memory().total


def test_mount_classes_match_lsblk(facts) -> None:
    devices = json.loads(
        subprocess.run(["lsblk", "-J", "-o", "KNAME,ROTA,TYPE"], capture_output=True, text=True, check=True).stdout
    )["blockdevices"]
    rota = {d["kname"]: d["rota"] in (True, "1") for d in devices}
    checked = 0
    for mount in facts.mounts:
        if mount.device in rota and mount.device_class in ("hdd", "ssd"):
            assert (mount.device_class == "hdd") == rota[mount.device], mount
            checked += 1
    root = next(m for m in facts.mounts if m.mount_point == "/")
    assert root.device_class != "unknown" and checked >= 1


def test_zswap_parameters_are_discovered_not_assumed(facts) -> None:
    params = Path("/sys/module/zswap/parameters")
    assert facts.zswap.parameters == sorted(os.listdir(params)) if params.is_dir() else []
    for name in facts.zswap.parameters:
        if f"zswap.{name}" in facts.knobs:
            assert facts.knobs[f"zswap.{name}"] == (params / name).read_text().strip()


@pytest.fixture
def swappiness_restored() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("writes /proc/sys/vm/swappiness: needs root (CI runs as root)")
    original = SWAPPINESS.read_text().strip()
    try:
        yield original
    finally:
        SWAPPINESS.write_text(original)
    assert SWAPPINESS.read_text().strip() == original


def test_diff_sees_a_real_sysctl_change(swappiness_restored: str, tmp_path: Path) -> None:
    """Only vm.swappiness is managed; the test moves the live value onto and off the target."""
    pol = tmp_path / "p.toml"
    pol.write_text(
        '[vm]\nswappiness = 77\nvfs_cache_pressure = "keep"\npage-cluster = "keep"\n'
        '[zswap]\nenabled = "keep"\n[swap]\nprioritize = false\nfile = "off"\n[services]\ndisable = []\n'
    )
    env = {**os.environ, "AUTOGLM_TUNE_ETC": str(tmp_path)}
    SWAPPINESS.write_text("76")
    differs = run_cli("diff", "--json", "--policy", str(pol), env=env)
    assert differs.returncode == 1
    (change,) = json.loads(differs.stdout)["changes"]
    assert (change["knob"], change["current"], change["target"]) == ("vm.swappiness", 76, 77)
    SWAPPINESS.write_text("77")
    same = run_cli("diff", "--policy", str(pol), env=env)
    assert same.returncode == 0, same.stdout
    plan = make_plan(collect_facts("/"), load_policy(pol, tmp_path))
    assert [c.knob for c in plan.unchanged] == ["vm.swappiness"]
