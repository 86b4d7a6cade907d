"""Transactions: validate, check preconditions, journal, apply, read back, commit; undo on failure.

The undo journal is one JSON file per transaction in <state-dir>/tx/, replaced atomically (temp
file, fsync, rename, fsync the folder). A step's intent is journaled before it is performed, so a
kill -9 at any instant leaves a journal from which start-up recovery restores the old state.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import time
from typing import Any, Protocol

from . import knobs, units
from .contract import plan_schema
from .contract.bus import SUMMARY_KEYS, HelperError
from .contract.catalogue import CatalogueError, clip

Tx = dict[str, Any]
TXID = re.compile(r"\d{8}-\d{6}-[0-9a-f]{8}")
ACTIVE = ("pending", "rolling-back")  # states a crash can leave behind
UNDOABLE = ("committed", "conflict")  # states Rollback accepts
LEFT = ("conflict", "failed")  # steps an undo could not (or would not) restore
TX_STATES = (*ACTIVE, "committed", "rolled-back", "conflict")
STEP_STATES = ("pending", "intent", "done", "undone", "expired", *LEFT)
QUARANTINE = "tx-quarantine"  # next to tx/: journal files that do not parse or fail validation, kept for a person
REASON_SUFFIX = ".reason"
log = logging.getLogger("autoglm-tune-helper")


class KnobKind(Protocol):
    """What acts on a step: a kind of kernel knob (knobs.kinds) or systemd (units.Systemd)."""

    def check(self, step: knobs.Step, where: str) -> None: ...
    def read(self, step: knobs.Step) -> Any: ...
    def write(self, step: knobs.Step) -> None: ...
    def restore(self, step: knobs.Step) -> None: ...


class JournalError(ValueError):
    """A journal file that cannot be trusted: it does not parse, or a step is not one this helper would make."""


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write fewer bytes than asked (a signal, a full disk's last blocks): write until all are."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _is_scalar(value: object) -> bool:
    return value is None or isinstance(value, bool | int) or (isinstance(value, str) and len(value) <= 64)


def check_step(step: object, where: str) -> None:
    """A journaled step, re-validated against the catalogue as if it came from a plan: a crafted or damaged
    step (an unknown knob, a path outside the swap directories) is refused before anything acts on it."""
    if not isinstance(step, dict) or step.get("state") not in STEP_STATES:
        raise JournalError(f"{where}: not a step in one of the states {', '.join(STEP_STATES)}")
    change = {k: step[k] for k in ("knob", "target", "persistence", "area", "path", "priority", "unit") if k in step}
    for value in (step.get("old"), step.get("new")):
        try:
            parsed = plan_schema.change_from_dict({**change, "current": value, "reason": "journal"}, where)
        except CatalogueError as exc:
            raise JournalError(str(exc)) from None
    if step.get("subject") != parsed.subject or not all(_is_scalar(step.get(k)) for k in ("old", "new")):
        raise JournalError(f"{where}: subject, old or new do not match the change; allowed: {parsed.subject}")
    if not isinstance(step.get("error", ""), str) or not isinstance(step.get("activate", False), bool):
        raise JournalError(f"{where}: error or activate of the wrong type")
    dirs = step.get("dirs", [])
    if not isinstance(dirs, list) or not all(
            isinstance(d, str) and d != "/" and os.path.normpath(d) == d and parsed.path is not None
            and parsed.path.startswith(d + "/") for d in dirs):
        raise JournalError(f"{where}.dirs: not directories above the swap file")
    for key in ("links", "runtime_links"):
        links = step.get(key, {})
        if not isinstance(links, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in links.items()):
            raise JournalError(f"{where}.{key}: not a map of link paths to targets")
    if not isinstance(step.get("active", ""), str):
        raise JournalError(f"{where}.active: not a unit state")


def check_tx(tx: object, name: str) -> Tx:
    """A loaded journal file: the transaction's own fields, then every step."""
    if not isinstance(tx, dict):
        raise JournalError("not a JSON object")
    fields: dict[str, type | tuple[type, ...]] = {"txid": str, "started_ns": int, "time": str, "boot_id": str,
                                                  "caller": dict, "plan_hash": str, "state": str, "steps": list}
    wrong = [k for k, t in fields.items() if not isinstance(tx.get(k), t)]
    if wrong:
        raise JournalError(f"{wrong[0]}: missing or of the wrong type")
    if tx["txid"] + ".json" != name or tx["state"] not in TX_STATES or not tx["steps"]:
        raise JournalError(f"txid, state or steps do not fit the file {name}")
    for i, step in enumerate(tx["steps"]):
        check_step(step, f"steps[{i}]")
    return tx


def boot_id(root: str = "/") -> str:
    with open(os.path.join(root, "proc/sys/kernel/random/boot_id")) as f:
        return f.read().strip()


def _summary(step: knobs.Step) -> dict[str, Any]:
    return {k: step.get(k) for k in SUMMARY_KEYS}


def undo_order(steps: list[knobs.Step]) -> list[knobs.Step]:
    """The reverse of the apply order, except that swap areas going back to a kernel-assigned (negative)
    priority are swapped on again from the highest old priority down: the kernel hands out -2, -3, … in swapon
    order, so this order gives them back their old ranking (swapon cannot ask for a negative priority)."""
    order = list(reversed(steps))
    slots = [i for i, s in enumerate(order) if s["knob"] == "swap.priority" and s["old"] is not None and s["old"] < 0]
    ranked = sorted((order[i] for i in slots), key=lambda s: s["old"], reverse=True)
    for i, step in zip(slots, ranked, strict=True):
        order[i] = step
    return order


class Engine:
    """The journal and the transactions over it; `root` is where the knobs' /proc and /sys files and the boot id
    are ("/" in the helper, a temporary tree in tests: see knobs)."""

    def __init__(self, state_dir: str, root: str = "/") -> None:
        self.dir = os.path.join(state_dir, "tx")
        self.quarantine_dir = os.path.join(state_dir, QUARANTINE)
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.boot = boot_id(root)
        self.kinds = knobs.kinds(root)
        self.systemd: units.Systemd | None = None  # set by use_systemd when PID 1 is systemd on the bus

    def use_systemd(self, systemd: units.Systemd) -> None:
        """Units are changed through systemd, and swap areas swapped on by it (knobs._Swap says why)."""
        self.systemd = systemd
        for kind in self.kinds.values():
            if isinstance(kind, knobs.SwapArea | knobs.SwapFile):
                kind.host_swapon = systemd.swapon

    def _kind(self, step: knobs.Step) -> KnobKind:
        """What reads, checks, writes and restores this step: its kind of kernel knob, or systemd."""
        if step["knob"] != "unit":
            return self.kinds[step["knob"]]
        if self.systemd is None:
            raise HelperError("NotSupported", f"{step['subject']}: systemd is not running on this bus, so units "
                              "cannot be changed; allowed: kernel and swap knobs only")
        return self.systemd

    # ---- journal ------------------------------------------------------------------------

    def save(self, tx: Tx) -> None:
        final = os.path.join(self.dir, tx["txid"] + ".json")
        tmp = final + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            _write_all(fd, json.dumps(tx, indent=1).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, final)
        _fsync_dir(self.dir)

    def transactions(self) -> list[Tx]:
        """All journaled transactions, oldest first (left-over temp files are ignored). A file that does not
        parse or validate is moved to the quarantine folder, untouched, and nothing acts on it."""
        txs = []
        for name in os.listdir(self.dir):
            if name.endswith(".json") and TXID.fullmatch(name[:-5]):
                try:
                    with open(os.path.join(self.dir, name), "rb") as f:
                        txs.append(check_tx(json.loads(f.read()), name))
                except (ValueError, RecursionError) as exc:  # JSON, UTF-8 and JournalError are ValueErrors
                    self.quarantine(name, str(exc) or type(exc).__name__)
        return sorted(txs, key=lambda tx: tx["started_ns"])

    def quarantine(self, name: str, reason: str) -> None:
        """Move tx/NAME to the quarantine folder (never over an earlier one) with a NAME.reason beside it."""
        log.warning("journal file %s quarantined: %s", name, reason)
        os.makedirs(self.quarantine_dir, mode=0o700, exist_ok=True)
        kept, n = name, 1
        while os.path.lexists(os.path.join(self.quarantine_dir, kept)):
            kept, n = f"{name}.{n}", n + 1
        fd = os.open(os.path.join(self.quarantine_dir, kept + REASON_SUFFIX),
                     os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            _write_all(fd, clip(reason, 400).encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(os.path.join(self.dir, name), os.path.join(self.quarantine_dir, kept))
        _fsync_dir(self.quarantine_dir)
        _fsync_dir(self.dir)

    def quarantined(self) -> list[dict[str, str]]:
        """The quarantined journal files and why each was set aside."""
        if not os.path.isdir(self.quarantine_dir):
            return []
        out = []
        for name in sorted(os.listdir(self.quarantine_dir)):
            if name.endswith(REASON_SUFFIX):
                continue
            try:
                with open(os.path.join(self.quarantine_dir, name + REASON_SUFFIX), errors="replace") as f:
                    reason = f.read(1000).strip()
            except OSError:
                reason = "(no reason recorded)"
            out.append({"file": os.path.join(self.quarantine_dir, name), "reason": reason})
        return out

    # ---- apply --------------------------------------------------------------------------

    def _steps(self, plan_json: str, force: bool) -> list[knobs.Step]:
        """Validate the plan and the live preconditions; drift is refused unless forced."""
        try:
            changes = plan_schema.plan_from_json(plan_json)
        except CatalogueError as exc:
            raise HelperError("InvalidArgs", str(exc)) from None
        steps, drift = [], []
        for i, c in enumerate(changes):
            step = {"subject": c.subject, "state": "pending", "persistence": c.persistence, **c.to_dict()}
            del step["reason"], step["current"]
            try:
                self._kind(step).check(step, f"changes[{i}]")
                step["old"] = self._kind(step).read(step)
            except CatalogueError as exc:
                raise HelperError("InvalidArgs", str(exc)) from None
            found = (step["old"], type(step["old"]))
            if found not in ((c.current, type(c.current)), (c.target, type(c.target))):  # at the target: no drift
                drift.append(f"{c.subject} is {step['old']!r}, the plan expected {c.current!r}")
            steps.append(step)
        if drift and not force:
            report = {"txid": "", "changes": [_summary(s) for s in steps]}
            raise HelperError("Drift", "changed since the plan was made: " + "; ".join(drift), report)
        return steps

    def apply(self, plan_json: str, dry_run: bool, force: bool, caller: dict[str, Any]) -> dict[str, Any]:
        steps = self._steps(plan_json, force)
        changes = [s for s in steps if s["old"] != s["target"] or s.get("activate")]
        if dry_run or not changes:
            result = "dry-run" if dry_run else "unchanged"
            return {"result": result, "txid": "", "changes": [_summary(s) for s in steps]}
        now = time.time_ns()
        tx: Tx = {
            "txid": time.strftime("%Y%m%d-%H%M%S", time.gmtime(now / 1e9)) + "-" + secrets.token_hex(4),
            "started_ns": now,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now / 1e9)),
            "boot_id": self.boot,
            "caller": caller,
            "plan_hash": hashlib.sha256(plan_json.encode()).hexdigest(),
            "state": "pending",
            "steps": changes,
        }
        self.save(tx)
        try:
            for step in changes:
                step["state"] = "intent"
                self.save(tx)
                self._kind(step).write(step)
                durable(step)
                step["new"] = self._kind(step).read(step)
                step["state"] = "done"
                self.save(tx)
            for step in changes:  # read back again: a later write (zswap.enabled) may change an earlier one
                step["new"] = self._kind(step).read(step)
                if step["new"] != step["target"]:
                    raise OSError(f"{step['subject']}: reads back {step['new']!r} after writing {step['target']!r}")
        except (OSError, CatalogueError) as exc:
            self._undo(tx, force=False)
            report = {"result": tx["state"], "txid": tx["txid"], "changes": [_summary(s) for s in changes]}
            raise HelperError("Failed", f"{exc}; transaction {tx['txid']} {tx['state']}", report) from None
        tx["state"] = "committed"
        self.save(tx)
        return {"result": "committed", "txid": tx["txid"], "changes": [_summary(s) for s in changes]}

    # ---- undo ---------------------------------------------------------------------------

    def _live(self, step: knobs.Step) -> tuple[Any, str]:
        """The live value and "", or None and why it cannot be read (systemd gone, a value that does not parse)."""
        try:
            return self._kind(step).read(step), ""
        except (OSError, CatalogueError, HelperError) as exc:
            return None, str(exc)

    def _undo(self, tx: Tx, force: bool) -> None:
        """Undo the started steps in reverse, compare-and-set unless forced; journal each one."""
        tx["state"] = "rolling-back"
        self.save(tx)
        for step in undo_order(tx["steps"]):
            if step["state"] not in ("intent", "done", *LEFT):
                continue
            try:
                if step["persistence"] == "runtime" and tx["boot_id"] != self.boot:
                    step["state"] = "expired"  # gone with the reboot
                elif (force or step["state"] == "intent"
                      or self._kind(step).read(step) in (step["old"], step.get("new"))):
                    self._kind(step).restore(step)
                    durable(step)
                    step["state"] = "undone"
                else:
                    step["state"] = "conflict"
            except (OSError, HelperError, CatalogueError) as exc:  # cannot be undone: say so, go on
                step["state"], step["error"] = "failed", str(exc)
            self.save(tx)
        tx["state"] = "conflict" if any(s["state"] in LEFT for s in tx["steps"]) else "rolled-back"
        self.save(tx)

    def rollback(self, txid: str, dry_run: bool, force: bool) -> dict[str, Any]:
        candidates = [tx for tx in self.transactions() if tx["state"] in UNDOABLE]
        if txid:
            if not TXID.fullmatch(txid) or txid not in {tx["txid"] for tx in candidates}:
                raise HelperError("InvalidArgs", f"txid: {txid[:40]!r} is not a committed transaction; allowed: "
                                  + (", ".join(tx["txid"] for tx in candidates) or "none, nothing to roll back"))
            tx = next(tx for tx in candidates if tx["txid"] == txid)
        elif candidates:
            tx = candidates[-1]
        else:  # "the last one" when there is none: nothing to do, like stopping a stopped unit
            return {"result": "unchanged", "txid": "", "changes": []}
        report = []
        for step in tx["steps"]:
            started = step["state"] in ("done", *LEFT)
            live, unreadable = self._live(step) if started else (None, "")
            report.append({**_summary(step), "live": live, **({"error": unreadable} if unreadable else {})})
            still_live = step["persistence"] == "persistent" or tx["boot_id"] == self.boot
            if started and still_live and not force and (unreadable or live not in (step["old"], step.get("new"))):
                report[-1]["conflict"] = True
        conflicts = [f"{r['subject']} is {r.get('error') or repr(r['live'])}, applied {r['new']!r}"
                     for r in report if r.get("conflict")]
        if conflicts:
            raise HelperError("Drift", "changed since it was applied (use force to restore anyway): "
                              + "; ".join(conflicts), {"txid": tx["txid"], "changes": report})
        if dry_run:
            return {"result": "dry-run", "txid": tx["txid"], "changes": report}
        self._undo(tx, force)
        return {"result": tx["state"], "txid": tx["txid"], "changes": [_summary(s) for s in tx["steps"]]}

    def recover(self) -> list[Tx]:
        """Roll back what a crash left pending: all steps from this boot, persistent ones from earlier boots."""
        for name in os.listdir(self.dir):
            if name.endswith(".tmp"):  # a save interrupted before its rename: the old version stands
                os.unlink(os.path.join(self.dir, name))
        left = [tx for tx in self.transactions() if tx["state"] in ACTIVE]
        for tx in left:
            tx["recovered"] = True
            try:
                self._undo(tx, force=False)
            except Exception:  # never block start-up: the journal keeps what is left, Status shows it
                log.exception("recovery of %s did not finish", tx["txid"])
        return left

    # ---- status -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        txs = self.transactions()
        applied: dict[str, dict[str, Any]] = {}
        for tx in (tx for tx in txs if tx["state"] == "committed"):
            for step in tx["steps"]:
                if tx["boot_id"] == self.boot or step["persistence"] == "persistent":
                    live, unreadable = self._live(step)
                    applied[step["subject"]] = {"txid": tx["txid"], "subject": step["subject"], "old": step["old"],
                                                "new": step.get("new"), "live": live,
                                                **({"error": unreadable} if unreadable else {})}
        return {
            "boot_id": self.boot,
            "transactions": [
                {"txid": tx["txid"], "time": tx["time"], "caller": tx["caller"], "state": tx["state"],
                 "this_boot": tx["boot_id"] == self.boot, "changes": [_summary(s) for s in tx["steps"]]}
                for tx in txs[-50:]
            ],
            "applied": list(applied.values()),
            "drift": [a for a in applied.values() if a["live"] != a["new"]],
            "quarantined": self.quarantined(),
        }


def durable(step: knobs.Step) -> None:
    """A persistent step's effect (a swap file made or removed, unit links that systemd wrote) reaches the disk
    before the journal says it happened: otherwise a power cut could leave a journal that says "rolled back" or
    "committed" over a disk that holds neither (found by the guest's power-cut test). sync(2), not one fsync:
    systemd, not the helper, writes the unit links."""
    if step["persistence"] == "persistent":
        os.sync()


def _fsync_dir(path: str) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
