"""The helper's D-Bus contract: names, polkit actions, error kinds and the shape of a reply."""

from __future__ import annotations

from typing import Any

BUS_NAME = INTERFACE = "io.github.autoglm_tune.Helper1"
OBJECT_PATH = "/io/github/autoglm_tune/Helper1"
ERROR_PREFIX = INTERFACE + ".Error."
MODEL_ACTION = "io.github.autoglm_tune.model"
# The polkit action each changing method needs (Status only reads).
# StopModel needs no action: only the unit's owner may stop it (a launcher must be able to stop what it started).
ACTIONS = {"Apply": "io.github.autoglm_tune.apply", "Rollback": "io.github.autoglm_tune.rollback",
           "SetProcess": MODEL_ACTION, "StartModel": MODEL_ACTION}

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
