"""The plan's wire schema: one definition, used by the planner to build plans and by the helper to
refuse anything else. Standard library only.

A plan is a JSON object: {"version": PLAN_VERSION, "changes": [Change…], …}. Each change names a
knob from the catalogue, the value expected to be live now (the precondition), the target, its
persistence and a reason; swap and unit changes also name what they act on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import catalogue
from .catalogue import CatalogueError, Value

PLAN_VERSION = 1
MAX_PLAN_BYTES = 256 * 1024
MAX_CHANGES = 512
MAX_REASON = 400

# Keys a plan object may carry besides "version" and "changes" (informational for the helper).
PLAN_INFO_KEYS = ("host", "policy_sources", "unchanged", "process", "notes", "conflicts", "plan_id")


@dataclass(frozen=True)
class Change:
    knob: str
    current: Value | None
    target: Value
    persistence: str
    reason: str
    area: str | None = None  # swap.priority: the path as /proc/swaps shows it
    path: str | None = None  # swap.file: the file to create
    priority: int | None = None  # swap.file: priority to swapon it with
    unit: str | None = None  # unit: the unit name

    @property
    def subject(self) -> str:
        """What the change acts on, for display: the knob, plus its area, file or unit."""
        extra = self.area or self.path or self.unit
        return f"{self.knob} {extra}" if extra else self.knob

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "knob": self.knob,
            "current": self.current,
            "target": self.target,
            "persistence": self.persistence,
            "reason": self.reason,
        }
        for key in ("area", "path", "priority", "unit"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def _require(obj: dict[str, Any], key: str, where: str) -> Any:
    if key not in obj:
        raise CatalogueError(f"{where}.{key}", "is missing", "see the plan schema")
    return obj[key]


def _check_current(knob: catalogue.Knob | None, value: object, where: str) -> Value | None:
    if value is None:
        return None
    if knob is None or knob.kind == "word" or knob.name == "swap.priority":
        if isinstance(value, bool | int | str) and not (isinstance(value, str) and len(value) > 64):
            return value
        raise CatalogueError(f"{where}.current", f"{value!r} is not a scalar", "null, a boolean, integer or name")
    # current values come from the machine and may lie outside the range we write (e.g. swappiness 0)
    if knob.kind == "bool" and isinstance(value, bool):
        return value
    if knob.kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise CatalogueError(f"{where}.current", f"{value!r} is not of the knob's type", knob.allowed)


def change_from_dict(obj: object, where: str = "changes[?]") -> Change:
    """Validate one change against the catalogue. Raises CatalogueError naming the field."""
    if not isinstance(obj, dict):
        raise CatalogueError(where, "is not an object", "an object with knob, current, target, persistence, reason")
    allowed_keys = {"knob", "current", "target", "persistence", "reason", "area", "path", "priority", "unit"}
    unknown = sorted(set(obj) - allowed_keys)
    if unknown:
        raise CatalogueError(f"{where}.{unknown[0]}", "is not a change field", ", ".join(sorted(allowed_keys)))
    name = _require(obj, "knob", where)
    if name not in catalogue.KNOB_NAMES:
        raise CatalogueError(f"{where}.knob", f"{name!r} is not a known knob", ", ".join(catalogue.KNOB_NAMES))
    reason = _require(obj, "reason", where)
    if not isinstance(reason, str) or len(reason) > MAX_REASON:
        raise CatalogueError(f"{where}.reason", "is not a short text", f"a string of at most {MAX_REASON} characters")
    persistence = _require(obj, "persistence", where)
    target = _require(obj, "target", where)
    fields: dict[str, Any] = {}

    if name in catalogue.SCALAR_KNOBS:
        knob: catalogue.Knob | None = catalogue.SCALAR_KNOBS[name]
        assert knob is not None
        _no_extras(obj, where, ())
        target = knob.check(target)
    elif name == catalogue.SWAP_PRIORITY.name:
        knob = catalogue.SWAP_PRIORITY
        _no_extras(obj, where, ("area",))
        area = _require(obj, "area", where)
        if not isinstance(area, str) or not area.startswith("/") or len(area) > 4096 or "\0" in area:
            raise CatalogueError(
                f"{where}.area", f"{area!r} is not a swap area path", "an absolute path from /proc/swaps"
            )
        fields["area"] = area
        target = knob.check(target)
    elif name == catalogue.SWAP_FILE_SIZE.name:
        knob = catalogue.SWAP_FILE_SIZE
        _no_extras(obj, where, ("path", "priority"))
        fields["path"] = catalogue.check_swap_file_path(_require(obj, "path", where))
        fields["priority"] = catalogue.SWAP_PRIORITY.check(_require(obj, "priority", where))
        target = knob.check(target)
    else:  # unit
        knob = None
        _no_extras(obj, where, ("unit",))
        try:
            fields["unit"] = catalogue.check_unit_name(_require(obj, "unit", where))
        except CatalogueError as exc:  # name the change's field
            raise CatalogueError(f"{where}.unit", exc.problem, exc.allowed) from None
        # the name as sent, whatever a policy or a plan says (the helper checks what systemd resolves it to as well)
        catalogue.check_unit_closure(fields["unit"], (), where)
        if target not in catalogue.UNIT_TARGET_STATES:
            raise CatalogueError(
                f"{where}.target", f"{target!r} is not a unit target state", " or ".join(catalogue.UNIT_TARGET_STATES)
            )
    expected_persistence = knob.persistence if knob is not None else "persistent"
    if persistence != expected_persistence:
        raise CatalogueError(f"{where}.persistence", f"{persistence!r} does not match the knob", expected_persistence)
    current = _check_current(knob, obj.get("current"), where)
    return Change(knob=name, current=current, target=target, persistence=persistence, reason=reason, **fields)


def _no_extras(obj: dict[str, Any], where: str, permitted: tuple[str, ...]) -> None:
    for key in ("area", "path", "priority", "unit"):
        if key in obj and key not in permitted:
            raise CatalogueError(
                f"{where}.{key}", f"does not apply to {obj['knob']}", ", ".join(permitted) or "no extra fields"
            )


def changes_from_plan(obj: object) -> list[Change]:
    """Validate a whole plan object (already decoded) and return its changes."""
    if not isinstance(obj, dict):
        raise CatalogueError("plan", "is not a JSON object", "an object with version and changes")
    version = obj.get("version")
    if version != PLAN_VERSION:
        raise CatalogueError("plan.version", f"{version!r} is not supported", str(PLAN_VERSION))
    unknown = sorted(set(obj) - {"version", "changes", *PLAN_INFO_KEYS})
    if unknown:
        raise CatalogueError(
            f"plan.{unknown[0]}", "is not a plan field", ", ".join(("version", "changes", *PLAN_INFO_KEYS))
        )
    raw_changes = obj.get("changes")
    if not isinstance(raw_changes, list) or len(raw_changes) > MAX_CHANGES:
        raise CatalogueError("plan.changes", "is not a list of changes", f"a list of at most {MAX_CHANGES} changes")
    changes = [change_from_dict(c, f"changes[{i}]") for i, c in enumerate(raw_changes)]
    seen: set[str] = set()
    for i, change in enumerate(changes):
        if change.subject in seen:
            raise CatalogueError(f"changes[{i}]", f"{change.subject} appears twice", "each knob at most once")
        seen.add(change.subject)
    return changes


def plan_from_json(text: str | bytes) -> list[Change]:
    """Decode and validate plan JSON text, refusing oversize input before parsing it."""
    if len(text) > MAX_PLAN_BYTES:
        raise CatalogueError("plan", f"is {len(text)} bytes", f"at most {MAX_PLAN_BYTES} bytes")
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CatalogueError("plan", f"is not valid JSON ({exc})", "a JSON object") from None
    return changes_from_plan(obj)
