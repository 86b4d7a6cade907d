"""`plan --facts DIR` over a fleet of varied hosts gives, host for host, the plan each file gets alone.

The batch runs in one process, where whatever is cached for speed lives across hosts; each file alone
runs in a fresh process. A cache that lets one host's facts or plan leak into another's shows here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from support import run_cli
from trees import REPO

spec = importlib.util.spec_from_file_location("fleet_facts", REPO / "bench" / "fleet_facts.py")
assert spec is not None and spec.loader is not None
fleet_facts = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fleet_facts)


def test_batch_plans_equal_each_host_planned_alone(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    env = {"PATH": "/usr/bin:/bin", "AUTOGLM_TUNE_ETC": str(etc)}
    folder = tmp_path / "fleet"
    shapes = fleet_facts.write_fleet(3 * 15, folder)
    assert len(shapes) >= 13  # the hand-made trees, the host snapshots (when present) and this machine

    batch = run_cli("plan", "--json", "--facts", str(folder), env=env)
    assert batch.returncode == 0, batch.stderr
    plans = json.loads(batch.stdout)
    assert list(plans) == sorted(p.name for p in folder.glob("*.json"))
    assert len({json.dumps(p, sort_keys=True) for p in plans.values()}) == len(plans)  # every host its own plan
    for name, plan in plans.items():
        alone = run_cli("plan", "--json", "--facts", str(folder / name), env=env)
        assert alone.returncode == 0, alone.stderr
        assert json.loads(alone.stdout) == plan, name
