"""Crash injection: kill -9 the real helper at random instants while it applies a full kernel-knob plan.
After every restart (recovery runs before the helper takes its bus name) the machine must be exactly in
its pre-apply state (or, if the kill came after the commit, in the planned state, and a rollback brings it
back), and the journal must be consistent."""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from autoglm_helper import transaction
from autoglm_helper.contract import catalogue
from helper_parts import (
    SWAP_DIR_ROOT,
    Bus,
    Helper,
    cli,
    full_plan,
    live,
    plan_json,
    read_knobs,
    restore_knobs,
    scalar_change,
)

ITERATIONS = int(os.environ.get("AUTOGLM_CRASH_ITERATIONS", "100"))
FINAL = ("committed", "rolled-back")


def assert_consistent(h: Helper) -> list[dict]:
    txs = h.journal()
    assert not list((h.state_dir / "tx").glob("*.tmp")), "recovery must clear interrupted journal writes"
    for tx in txs:
        assert tx["state"] in FINAL, tx
        done = {"committed": {"done"}, "rolled-back": {"pending", "undone"}}[tx["state"]]
        assert {s["state"] for s in tx["steps"]} <= done, tx
    return txs


def test_kill_9_at_random_points_during_apply_always_recovers(bus: Bus, workdir: Path) -> None:
    seed = int(os.environ.get("AUTOGLM_CRASH_SEED", str(time.time_ns())))
    rng = random.Random(seed)
    h = Helper(bus, workdir / "state-crash").start("--idle-timeout", "0")
    before = read_knobs()
    changes, targets = full_plan()
    plan = plan_json(*changes)
    durations = []
    for _ in range(3):
        started = time.monotonic()
        txid = h.c.ok("Apply", plan, False, False)["txid"]
        durations.append(time.monotonic() - started)
        h.c.ok("Rollback", txid, False, False)
    window = statistics.median(durations) * 1.3  # one apply, and a little beyond its end
    outcomes: Counter[str] = Counter()
    try:
        for i in range(ITERATIONS):
            known = len(h.journal())
            h.c.bus.send(h.c.message("Apply", "sbb", [plan, False, False]))
            h.c.settle(rng.uniform(0, window))
            h.kill()
            h.start("--idle-timeout", "0")
            new = assert_consistent(h)[known:]
            assert len(new) <= 1, f"iteration {i} (seed {seed})"
            if new and new[0]["state"] == "committed":
                assert {n: live(n) for n in targets} == targets, f"iteration {i} (seed {seed})"
                h.c.ok("Rollback", new[0]["txid"], False, False)
                outcomes["killed after the commit"] += 1
            elif new:
                assert new[0].get("recovered") is True
                outcomes["killed mid-transaction, recovered"] += 1
            else:
                outcomes["killed before the journal"] += 1
            assert read_knobs() == before, f"iteration {i} (seed {seed}): {dict(outcomes)}"
    finally:
        h.stop()
    print(f"crash injection, seed {seed}, window {window * 1000:.1f} ms: {dict(outcomes)}")
    assert outcomes["killed mid-transaction, recovered"] >= ITERATIONS // 4, dict(outcomes)


def test_a_transaction_pending_from_an_earlier_boot_rolls_back_only_its_persistent_steps(
    bus: Bus, workdir: Path
) -> None:
    h = Helper(bus, workdir / "state-boot").start("--idle-timeout", "0")
    now = live("vm.swappiness")
    path = f"{catalogue.SWAP_FILE_DIRS[0]}/{catalogue.SWAP_FILE_NAME}"
    swap_file = {"knob": "swap.file", "current": None, "target": 64, "persistence": "persistent",
                 "reason": "test", "path": path, "priority": 4}
    try:
        report = h.c.ok("Apply", plan_json(swap_file, scalar_change("vm.swappiness", now, now + 1)), False, False)
        h.kill()
        journal = h.state_dir / "tx" / f"{report['txid']}.json"
        tx = json.loads(journal.read_text())
        tx["state"], tx["boot_id"] = "pending", "00000000-0000-0000-0000-000000000000"
        journal.write_text(json.dumps(tx))
        subprocess.run(["swapoff", path], check=True)  # a reboot deactivated the swap file
        h.start("--idle-timeout", "0")
        tx = h.journal()[-1]
        assert tx["state"] == "rolled-back" and tx["recovered"] is True
        assert [s["state"] for s in tx["steps"]] == ["undone", "expired"]
        assert not os.path.exists(SWAP_DIR_ROOT)
        assert live("vm.swappiness") == now + 1  # runtime: left alone, a real reboot had reset it already
        recovered = h.audit()[-1]
        assert recovered["method"] == "Recover" and recovered["txid"] == tx["txid"]
        assert [c["subject"] for c in recovered["changes"]] == [f"swap.file {path}", "vm.swappiness"]
    finally:
        h.stop()
        restore_knobs({"vm.swappiness": str(now)})


# ---- recovery does not trust the journal (issue 14, finding 5) -------------------------------------------------

TXID = "20240101-000000-0badf00d"


def crafted_tx(state: str, *steps: dict) -> dict:
    return {"txid": TXID, "started_ns": 1, "time": "2024-01-01T00:00:00Z", "boot_id": transaction.boot_id(),
            "caller": {"uid": 0, "pid": 1}, "plan_hash": "0" * 64, "state": state, "steps": list(steps)}


def swappiness_step(state: str, **extra: object) -> dict:
    return {"subject": "vm.swappiness", "state": state, "persistence": "runtime", "knob": "vm.swappiness",
            "target": 1, "old": live("vm.swappiness"), **extra}


def test_a_crafted_step_with_an_unknown_knob_is_quarantined_and_nothing_is_done(bus: Bus, workdir: Path) -> None:
    victim_dir = workdir / "victim"
    victim_dir.mkdir()
    (victim_dir / "precious").write_text("keep me")
    state = workdir / "state-unknown-knob"
    (state / "tx").mkdir(parents=True)
    step = {"subject": "bogus.knob", "state": "done", "persistence": "persistent", "knob": "bogus.knob",
            "target": 64, "old": None, "new": 0, "path": str(victim_dir / "precious"), "dirs": [str(victim_dir)]}
    (state / "tx" / f"{TXID}.json").write_text(json.dumps(crafted_tx("pending", step)))
    h = Helper(bus, state).start("--idle-timeout", "0")
    try:
        assert (victim_dir / "precious").read_text() == "keep me"
        assert not (state / "tx" / f"{TXID}.json").exists()
        assert json.loads((state / "tx-quarantine" / f"{TXID}.json").read_text())["steps"] == [step]
        (entry,) = h.c.ok("Status")["quarantined"]
        assert entry["file"] == str(state / "tx-quarantine" / f"{TXID}.json") and "'bogus.knob'" in entry["reason"]
        shown = cli(bus, "status")
        assert shown.returncode == 0 and f"quarantined journal file: {entry['file']}: " in shown.stdout
    finally:
        h.stop()


def test_a_truncated_journal_file_is_quarantined_and_the_helper_still_starts(bus: Bus, workdir: Path) -> None:
    state = workdir / "state-truncated"
    (state / "tx").mkdir(parents=True)
    text = json.dumps(crafted_tx("pending", swappiness_step("done", new=1)))[:100]
    (state / "tx" / f"{TXID}.json").write_text(text)
    h = Helper(bus, state).start("--idle-timeout", "0")
    try:
        (entry,) = h.c.ok("Status")["quarantined"]
        assert (state / "tx-quarantine" / f"{TXID}.json").read_text() == text  # kept as it was, for a person
        assert entry["reason"].startswith("Unterminated string") or "Expecting" in entry["reason"], entry
        assert h.c.ok("Status")["transactions"] == []
    finally:
        h.stop()


def test_a_step_that_failed_at_intent_rolls_back_without_an_internal_error(bus: Bus, workdir: Path) -> None:
    state = workdir / "state-intent"
    (state / "tx").mkdir(parents=True)
    (state / "tx" / f"{TXID}.json").write_text(json.dumps(crafted_tx("conflict", swappiness_step("failed",
                                                                                                 error="EIO"))))
    h = Helper(bus, state).start("--idle-timeout", "0")
    try:
        report = h.c.ok("Rollback", TXID, False, False)
        assert report["result"] == "rolled-back" and report["changes"][0]["state"] == "undone"
    finally:
        h.stop()


def test_a_short_write_is_continued_until_the_whole_journal_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = transaction.Engine(str(tmp_path))
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:100])))  # as a signal would
    tx = crafted_tx("pending", swappiness_step("done", new=1))
    engine.save(tx)
    monkeypatch.undo()
    assert json.loads((tmp_path / "tx" / f"{TXID}.json").read_text()) == tx
