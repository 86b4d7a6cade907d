"""The transaction engine on a temporary tree (Engine(state, root=tree)): the knob kinds read and write the
tree's proc/sys and sys/module/zswap files, so the journal, the read-back, undo and recovery across a "reboot"
(a new boot id) are checked on files, beside the real-kernel tests of the other files here. Swap areas and
files have no tree (swapon takes no root): tests/helper/test_swap.py has them on the real kernel."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from autoglm_helper import knobs, transaction
from autoglm_helper.contract.bus import HelperError
from helper_parts import plan_json, scalar_change

CALLER = {"uid": 1000, "pid": 1}
BEFORE = {
    "proc/sys/vm/swappiness": "60",
    "proc/sys/vm/vfs_cache_pressure": "100",
    "sys/module/zswap/parameters/enabled": "N",
    "sys/module/zswap/parameters/compressor": "lzo",
    "sys/module/zswap/parameters/max_pool_percent": "20",
}
CRYPTO = "name         : lzo\ndriver       : lzo-scomp\ntype         : scomp\n\n" \
         "name         : lz4\ndriver       : lz4-scomp\ntype         : scomp\n\n" \
         "name         : sha256\ndriver       : sha256-generic\ntype         : shash\n"


def make_tree(root: Path, boot: str = "boot-a") -> Path:
    for rel, text in {**BEFORE, "proc/sys/kernel/random/boot_id": boot}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")  # as the kernel shows them
    (root / "proc/crypto").write_text(CRYPTO)
    return root


def files(root: Path) -> dict[str, str]:
    """The tree's knob files, as a kernel would show them (the helper writes zswap's without a newline)."""
    return {rel: (root / rel).read_text().strip() for rel in BEFORE}


def journal(state: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((state / "tx").glob("*.json"))]


PLAN = plan_json(
    scalar_change("vm.swappiness", 60, 100),
    scalar_change("zswap.compressor", "lzo", "lz4"),
    scalar_change("zswap.max_pool_percent", 20, 25),
    scalar_change("zswap.enabled", False, True),
)


def test_each_knob_has_one_kind_and_the_zswap_parameters_theirs() -> None:
    kinds = knobs.kinds("/")
    assert isinstance(kinds["vm.swappiness"], knobs.Sysctl) and not isinstance(kinds["vm.swappiness"],
                                                                               knobs.ZswapParameter)
    assert all(isinstance(kinds[k], knobs.ZswapParameter) for k in kinds if k.startswith("zswap."))
    assert isinstance(kinds["swap.priority"], knobs.SwapArea) and isinstance(kinds["swap.file"], knobs.SwapFile)


def test_apply_commits_on_the_tree_and_rollback_restores_it_exactly(tmp_path: Path) -> None:
    tree, state = make_tree(tmp_path / "root"), tmp_path / "state"
    engine = transaction.Engine(str(state), root=str(tree))
    dry = engine.apply(PLAN, dry_run=True, force=False, caller=CALLER)
    assert dry["result"] == "dry-run" and files(tree) == BEFORE and journal(state) == []
    report = engine.apply(PLAN, dry_run=False, force=False, caller=CALLER)
    assert report["result"] == "committed", report
    assert files(tree) == {**BEFORE, "proc/sys/vm/swappiness": "100", "sys/module/zswap/parameters/enabled": "Y",
                           "sys/module/zswap/parameters/compressor": "lz4",
                           "sys/module/zswap/parameters/max_pool_percent": "25"}
    [tx] = journal(state)
    assert tx["state"] == "committed" and [s["state"] for s in tx["steps"]] == ["done"] * 4
    assert [(s["old"], s["new"]) for s in tx["steps"]] == [(60, 100), ("lzo", "lz4"), (20, 25), (False, True)]
    assert engine.status()["drift"] == []
    rolled = engine.rollback("", dry_run=False, force=False)
    assert rolled["result"] == "rolled-back" and files(tree) == BEFORE
    assert journal(state)[0]["state"] == "rolled-back"


def test_a_write_that_fails_midway_undoes_the_earlier_steps(tmp_path: Path) -> None:
    """The third write fails (its file is a read-only sysctl linked into the tree, which the kernel refuses even
    root): the two steps done are undone, the fourth never started, and the journal says so."""
    tree, state = make_tree(tmp_path / "root"), tmp_path / "state"
    pool = tree / "sys/module/zswap/parameters/max_pool_percent"
    pool.unlink()
    pool.symlink_to("/proc/sys/kernel/cap_last_cap")
    last_cap = int(pool.read_text())
    plan = json.loads(PLAN)
    plan["changes"][2].update(current=last_cap, target=last_cap - 1)
    engine = transaction.Engine(str(state), root=str(tree))
    with pytest.raises(HelperError) as failed:
        engine.apply(json.dumps(plan), dry_run=False, force=False, caller=CALLER)
    assert failed.value.kind == "Failed" and "rolled-back" in str(failed.value), failed.value
    assert {rel: text for rel, text in files(tree).items() if "max_pool" not in rel} == \
        {rel: text for rel, text in BEFORE.items() if "max_pool" not in rel}
    [tx] = journal(state)
    assert tx["state"] == "rolled-back"
    assert [s["state"] for s in tx["steps"]] == ["undone", "undone", "undone", "pending"], tx["steps"]


def test_a_compressor_the_tree_lacks_is_refused_naming_the_field_and_nothing_is_written(tmp_path: Path) -> None:
    tree, state = make_tree(tmp_path / "root"), tmp_path / "state"
    engine = transaction.Engine(str(state), root=str(tree))
    with pytest.raises(HelperError) as refused:
        engine.apply(plan_json(scalar_change("vm.swappiness", 60, 100), scalar_change("zswap.compressor", "lzo",
                                                                                      "zstd")),
                     dry_run=False, force=False, caller=CALLER)
    assert refused.value.kind == "InvalidArgs"
    assert str(refused.value) == "changes[1].target: 'zstd' is not available; allowed: lz4, lzo"
    assert files(tree) == BEFORE and journal(state) == []


def test_recovery_after_a_reboot_expires_runtime_steps_and_leaves_what_the_boot_reset(tmp_path: Path) -> None:
    """A crash mid-apply, then a boot: the kernel came up with its defaults, so recovery writes nothing back
    (restoring the pre-crash value would undo the boot's, which may differ) and says the steps expired."""
    tree, state = make_tree(tmp_path / "root"), tmp_path / "state"
    engine = transaction.Engine(str(state), root=str(tree))
    engine.apply(PLAN, dry_run=False, force=False, caller=CALLER)
    path = next((state / "tx").glob("*.json"))
    tx = json.loads(path.read_text())
    tx["state"] = "pending"  # as a kill -9 before the commit left it
    path.write_text(json.dumps(tx))
    make_tree(tree, boot="boot-b")  # the reboot: a new boot id, the kernel's defaults back
    (tree / "proc/sys/vm/swappiness").write_text("30\n")  # this boot's own value, not the journal's old 60
    after = transaction.Engine(str(state), root=str(tree))
    [recovered] = after.recover()
    assert recovered["state"] == "rolled-back" and {s["state"] for s in recovered["steps"]} == {"expired"}
    assert files(tree) == {**BEFORE, "proc/sys/vm/swappiness": "30"}
    assert after.status()["applied"] == [] and after.status()["transactions"][0]["this_boot"] is False


def test_recovery_in_the_same_boot_restores_what_the_crash_left_written(tmp_path: Path) -> None:
    tree, state = make_tree(tmp_path / "root"), tmp_path / "state"
    transaction.Engine(str(state), root=str(tree)).apply(PLAN, dry_run=False, force=False, caller=CALLER)
    path = next((state / "tx").glob("*.json"))
    tx = json.loads(path.read_text())
    tx["state"], tx["steps"][3]["state"] = "pending", "intent"  # killed while writing zswap.enabled
    del tx["steps"][3]["new"]
    path.write_text(json.dumps(tx))
    [recovered] = transaction.Engine(str(state), root=str(tree)).recover()
    assert recovered["state"] == "rolled-back" and files(tree) == BEFORE
    assert [s["state"] for s in recovered["steps"]] == ["undone"] * 4


def test_an_unparsable_live_value_marks_the_step_failed_and_recovery_goes_on(tmp_path: Path) -> None:
    tree, state = make_tree(tmp_path / "root"), tmp_path / "state"
    transaction.Engine(str(state), root=str(tree)).apply(PLAN, dry_run=False, force=False, caller=CALLER)
    path = next((state / "tx").glob("*.json"))
    tx = json.loads(path.read_text())
    tx["state"] = "pending"
    path.write_text(json.dumps(tx))
    (tree / "proc/sys/vm/swappiness").write_text("garbage\n")
    engine = transaction.Engine(str(state), root=str(tree))
    [recovered] = engine.recover()
    swappiness = recovered["steps"][0]
    assert recovered["state"] == "conflict" and swappiness["state"] == "failed" and "garbage" in swappiness["error"]
    assert [s["state"] for s in recovered["steps"][1:]] == ["undone"] * 3  # the others restored all the same
    assert files(tree) == {**BEFORE, "proc/sys/vm/swappiness": "garbage"}
    assert engine.status()["transactions"][0]["state"] == "conflict"
    assert os.listdir(state / "tx") == [path.name]  # the journal kept, not quarantined
