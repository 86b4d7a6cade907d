"""Golden plans: `plan --json` under the built-in default policy for every host snapshot and every
hand-made tree, compared byte for byte with tests/golden/*.json.

Regenerate after an intended planner change with

    UPDATE_GOLDEN=1 /opt/autoglm-venv/bin/python -m pytest tests/test_golden_plans.py

and read every changed file before committing it.
"""

from __future__ import annotations

import json
import os
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
from autoglm_helper.contract.plan_schema import changes_from_plan
from autoglm_tune.cli import app
from support import CLI
from trees import REPO, TREES, build_tree, built_trees, host_snapshots, host_tarballs, no_snapshots, snapshot_names
from typer.testing import CliRunner

GOLDEN = REPO / "tests" / "golden"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"

SOURCES = [f"host-{n}" for n in snapshot_names()] + [f"tree-{n}" for n in TREES]


@pytest.fixture(scope="session")
def empty_etc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("etc-autoglm-tune")


@pytest.fixture(autouse=True)
def no_system_policy(empty_etc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Golden plans use the built-in default alone, whatever /etc/autoglm-tune holds here."""
    monkeypatch.setenv("AUTOGLM_TUNE_ETC", str(empty_etc))


class Sysroots:
    """source → the tree to pass as --sysroot; host snapshots are extracted only when asked for, so
    the hand-made trees are tested even where ../shared is missing."""

    def __init__(self, factory: pytest.TempPathFactory) -> None:
        self.factory = factory

    def __getitem__(self, source: str) -> Path:
        kind, _, name = source.partition("-")
        if kind == "host":
            snapshots = host_snapshots(self.factory)
            if name not in snapshots:
                pytest.fail(f"host snapshot {name} was listed but not extracted")
            return snapshots[name] / "root"
        return built_trees(self.factory)[name]


@pytest.fixture(scope="session")
def sysroots(tmp_path_factory: pytest.TempPathFactory) -> Sysroots:
    return Sysroots(tmp_path_factory)


def cli(*args: str) -> tuple[int, str]:
    """The CLI in-process: (exit code, stdout). An exception inside is re-raised, not hidden."""
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout


def golden_text(source: str, actual: str | None = None) -> str:
    """The stored golden plan; with UPDATE_GOLDEN=1, `actual` is written first."""
    if source.startswith("host-") and not host_tarballs():
        no_snapshots()
    path = GOLDEN / f"{source}.json"
    if UPDATE and actual is not None:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(actual)
    if not path.exists():
        pytest.fail(f"{path} is missing; run with UPDATE_GOLDEN=1 to write it, then review it")
    return path.read_text()


def plan_json(sysroot: Path) -> str:
    code, out = cli("plan", "--json", "--sysroot", str(sysroot))
    assert code == 0, out
    return out


@pytest.mark.parametrize("source", SOURCES)
def test_plan_matches_golden(source: str, sysroots: Sysroots) -> None:
    actual = plan_json(sysroots[source])
    plan = json.loads(actual)
    assert plan["policy_sources"] == ["built-in default"], "a system policy leaked into the golden test"
    assert actual == golden_text(source, actual)


@pytest.mark.parametrize("source", SOURCES)
def test_golden_plan_passes_the_helper_schema(source: str, sysroots: Sysroots) -> None:
    plan = json.loads(golden_text(source))
    changes = changes_from_plan(plan)
    assert [c.to_dict() for c in changes] == plan["changes"]
    process = plan["process"]
    assert process["cpus"] == sorted(set(process["cpus"])) and process["threads"] == len(process["cpus"])
    for change in plan["changes"] + plan["unchanged"]:
        assert change["reason"], change
    assert all(c["current"] != c["target"] for c in plan["changes"])
    assert all(c["current"] == c["target"] for c in plan["unchanged"])


@pytest.mark.parametrize("source", SOURCES)
def test_plan_from_facts_json_matches_golden(source: str, sysroots: Sysroots, tmp_path: Path) -> None:
    """Facts taken on one host and planned elsewhere (--facts) give the very same plan."""
    code, facts = cli("facts", "--json", "--sysroot", str(sysroots[source]))
    assert code == 0
    facts_file = tmp_path / "facts.json"
    facts_file.write_text(facts)
    code, out = cli("plan", "--json", "--facts", str(facts_file))
    assert code == 0, out
    assert out == golden_text(source)


@pytest.mark.parametrize("source", SOURCES)
def test_diff_exit_status_follows_the_golden_plan(source: str, sysroots: Sysroots) -> None:
    plan = json.loads(golden_text(source))
    code, out = cli("diff", "--json", "--sysroot", str(sysroots[source]))
    assert code == (1 if plan["changes"] else 0), out


@pytest.mark.parametrize("name", ["hybrid-2p8e", "nvme-hdd-swap", "no-swap-4g"])
def test_plan_does_not_depend_on_where_the_tree_lies(name: str, tmp_path: Path) -> None:
    """A second copy of a tree in another folder: byte-identical plan, equal to the golden one."""
    root = build_tree(name, tmp_path / "elsewhere" / name)
    first, second = plan_json(root), plan_json(root)
    assert first == second == golden_text(f"tree-{name}")


@pytest.mark.parametrize("source", [SOURCES[0], "tree-hybrid-2p8e", "tree-nvme-hdd-swap", "tree-zram-active"])
def test_installed_command_prints_the_golden_plan(source: str, sysroots: Sysroots, empty_etc: Path) -> None:
    """End to end through the installed console script, in a fresh process."""
    env = {**os.environ, "AUTOGLM_TUNE_ETC": str(empty_etc)}
    proc = subprocess.run(
        [CLI, "plan", "--json", "--sysroot", str(sysroots[source])],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout == golden_text(source)


def _drop_none(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


@pytest.mark.parametrize("source", ["tree-no-swap-4g", "tree-nvme-hdd-swap"])
def test_toml_plan_says_what_the_golden_json_says(source: str, sysroots: Sysroots) -> None:
    code, out = cli("plan", "--toml", "--sysroot", str(sysroots[source]))
    assert code == 0, out
    assert tomllib.loads(out) == _drop_none(json.loads(golden_text(source)))


def test_every_golden_file_has_a_source() -> None:
    """No stale golden files: each one belongs to a snapshot or a tree of today."""
    if not host_tarballs():
        no_snapshots()
    stored = sorted(p.stem for p in GOLDEN.glob("*.json"))
    assert stored == sorted(SOURCES)


def test_plan_without_any_cpu_information_does_not_crash(tmp_path: Path) -> None:
    """A tree with none of the files the collector reads: every fact unknown, still a valid plan
    (this crashed with an IndexError on the reserved core before)."""
    (tmp_path / "proc").mkdir()
    code, out = cli("plan", "--json", "--sysroot", str(tmp_path))
    assert code == 0, out
    plan = json.loads(out)
    assert changes_from_plan(plan) == []
    assert plan["process"]["cpus"] == []
