"""The helper's D-Bus contract: names, one declaration per method, error kinds and the shape of a reply."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .plan_schema import MAX_PLAN_BYTES

BUS_NAME = INTERFACE = "io.github.autoglm_tune.Helper1"
OBJECT_PATH = "/io/github/autoglm_tune/Helper1"
ERROR_PREFIX = INTERFACE + ".Error."
MODEL_ACTION = "io.github.autoglm_tune.model"
NAME_BYTES = 256  # a unit name or a transaction id


@dataclass(frozen=True)
class Arg:
    name: str
    type: str  # its D-Bus type code
    max_bytes: int | None = None  # a string's most UTF-8 bytes, checked before anything parses it


@dataclass(frozen=True)
class Method:
    """One method of the interface: its arguments (in, each returns one string: the report as JSON), the polkit
    action it needs (None: none), the argument that makes it a dry-run (then no action is needed), and whether it
    runs alone (under the helper's one lock: a transaction, or a unit start)."""

    name: str
    args: tuple[Arg, ...]
    action: str | None = None
    dry_run_arg: str | None = None
    exclusive: bool = False

    @property
    def signature(self) -> str:
        return "".join(a.type for a in self.args)

    def is_dry_run(self, body: list[Any]) -> bool:
        names = [a.name for a in self.args]
        return self.dry_run_arg is not None and bool(body[names.index(self.dry_run_arg)])


# Status only reads. StopModel needs no action: only the unit's owner may stop it (a launcher must be able to stop
# what it started). A plan of every knob is a few KiB, settings under 100 bytes, a model unit request with a long
# command line a few KiB; the other arguments (u, b, h) have a fixed size.
METHODS = {m.name: m for m in (
    Method("Apply", (Arg("plan_json", "s", MAX_PLAN_BYTES), Arg("dry_run", "b"), Arg("force", "b")),
           "io.github.autoglm_tune.apply", dry_run_arg="dry_run", exclusive=True),
    Method("Rollback", (Arg("txid", "s", NAME_BYTES), Arg("dry_run", "b"), Arg("force", "b")),
           "io.github.autoglm_tune.rollback", dry_run_arg="dry_run", exclusive=True),
    Method("Status", ()),
    Method("SetProcess", (Arg("pid", "u"), Arg("settings_json", "s", 4096), Arg("dry_run", "b")),
           MODEL_ACTION, dry_run_arg="dry_run"),
    Method("StartModel", (Arg("unit_json", "s", 64 * 1024), Arg("log_fd", "h")), MODEL_ACTION, exclusive=True),
    Method("StopModel", (Arg("unit", "s", NAME_BYTES),)),
)}

# The last part of every error name the helper replies with (ERROR_PREFIX + kind), and what it means.
ERROR_KINDS = {
    "InvalidArgs": "the call's arguments were refused (the text names the field); nothing was done",
    "NotSupported": "this machine cannot do it (no systemd on the bus); nothing was done",
    "Drift": "live values differ from what the plan or the transaction expected; nothing was done",
    "NotAuthorized": "polkit (or the owner check) refused the caller; nothing was done",
    "Failed": "a step failed; the steps already done were undone",
    "Busy": "too many calls of this uid in flight; nothing was done, try again",
}

# A reply is one JSON object: {"result": …, …}; Apply and Rollback also carry "txid" and "changes", each change
# summarised with these keys (Rollback's dry-run adds "live", and "error" or "conflict" where they apply).
Report = dict[str, Any]
SUMMARY_KEYS = ("subject", "old", "target", "new", "state")
CHANGED_RESULTS = ("committed", "rolled-back", "conflict")  # results after which the Changed signal is sent


class HelperError(Exception):
    """A refused or failed call: `kind` (one of ERROR_KINDS) is the last part of the D-Bus error name."""

    def __init__(self, kind: str, text: str, report: Report | None = None) -> None:
        super().__init__(text)
        self.kind = kind
        self.report = report or {}
