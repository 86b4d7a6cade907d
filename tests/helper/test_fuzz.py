"""Hypothesis fuzzing of the D-Bus method arguments against one real helper over one bus connection.

Properties for every input: the helper answers (a report or one of its own typed errors, never an internal
error), keeps running, and writes nothing: no knob, no swap area, no journal file changes. Non-dry-run
plans get a precondition that can never be live, so a plan that passes validation ends at the drift check.
10 × AUTOGLM_FUZZ_EXAMPLES cases in all; most plans are valid ones from the catalogue with at most one field
changed, so that at least 30 % of all cases get past the schema into the engine (the last test checks both).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

import hypothesis.strategies as st
from autoglm_helper import knobs
from autoglm_helper.contract import catalogue, plan_schema
from autoglm_helper.contract.bus import ERROR_PREFIX
from dbus_fast import MessageType
from helper_parts import Helper, live, machine, plan_json
from hypothesis import HealthCheck, event, given, settings


def text(size: int) -> st.SearchStrategy[str]:
    """Any text a D-Bus string can carry (no NUL, no lone surrogates)."""
    return st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=size)


EXPECTED_ERRORS = {ERROR_PREFIX + kind for kind in ("InvalidArgs", "Drift", "NotSupported")}
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), database=None)
EXAMPLES = int(os.environ.get("AUTOGLM_FUZZ_EXAMPLES", "1000"))
CASES = {"text": 3 * EXAMPLES // 2, "plan_shaped": EXAMPLES, "mutated": 6 * EXAMPLES, "rollback": 3 * EXAMPLES // 4,
         "signatures": 3 * EXAMPLES // 4}
SEEN: Counter[str] = Counter()  # cases run, and those whose plan passed the schema (what the engine then checks)

scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | text(12)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(text(8), c,
                                                                                         max_size=3), max_leaves=6)
swap_paths = st.sampled_from([f"{d}/{catalogue.SWAP_FILE_NAME}" for d in catalogue.SWAP_FILE_DIRS]
                             + ["/etc/passwd", "/var/swap/../etc/x", "relative", "/swap/autoglm-tune.swap\0"])
targets = (st.integers(-2, 300000) | st.booleans() | st.sampled_from(["lzo", "lzo-rle", "deflate", "lz4", "zstd",
                                                                      "Lzo", "a" * 40, "../x", "disabled", "masked"])
           | scalars)
changes = st.fixed_dictionaries(
    {
        "knob": st.sampled_from(catalogue.KNOB_NAMES) | text(20),
        "current": targets,
        "target": targets,
        "persistence": st.sampled_from(["runtime", "persistent", "boot", ""]),
        "reason": text(40) | st.integers(),
    },
    optional={
        "area": st.sampled_from(["/dev/vda", "/nonexistent", "relative"]) | text(20),
        "path": swap_paths | text(20),
        "priority": st.integers(-5, 40000) | scalars,
        "unit": st.sampled_from(["cups.service", "ssh.service", "x@.service", "../a.service"]) | text(20),
        "extra": json_values,
    },
)
plans = st.builds(
    lambda plan, extra: {**plan, **extra},
    st.fixed_dictionaries(
        {"version": st.sampled_from([1] * 9 + [2, "1", True]), "changes": st.lists(changes, max_size=4)},
        optional={"plan_id": scalars, "notes": json_values},
    ),
    st.sampled_from([{}] * 9 + [{"bogus": 1}, {"changes": [[]]}, {"unchanged": None}]),
)


def _valid_change(knob: str) -> st.SearchStrategy[dict[str, Any]]:
    """A change of `knob` that the schema accepts (the engine may still refuse it: no such area, too big)."""
    fields: dict[str, st.SearchStrategy[Any]] = {"knob": st.just(knob), "reason": text(40)}
    if knob in catalogue.SCALAR_KNOBS:
        k = catalogue.SCALAR_KNOBS[knob]
        values = (st.booleans() if k.kind == "bool" else st.sampled_from(catalogue.ZSWAP_COMPRESSORS)
                  if k.kind == "word" else st.integers(k.minimum, k.maximum))
        fields |= {"current": values, "target": values, "persistence": st.just(k.persistence)}
    elif knob == "swap.priority":
        fields |= {"current": st.integers(-5, 32767), "target": st.integers(0, 32767),
                   "persistence": st.just("runtime"),
                   "area": st.sampled_from([*knobs.swap_areas(), "/dev/vda", "/nonexistent"])}
    elif knob == "swap.file":
        fields |= {"current": st.none(), "target": st.integers(64, 262144), "persistence": st.just("persistent"),
                   "path": st.sampled_from([f"{d}/{catalogue.SWAP_FILE_NAME}" for d in catalogue.SWAP_FILE_DIRS]),
                   "priority": st.integers(0, 32767)}
    else:
        fields |= {"current": st.sampled_from([None, "enabled", "disabled", "masked", "static"]),
                   "target": st.sampled_from(catalogue.UNIT_TARGET_STATES), "persistence": st.just("persistent"),
                   "unit": st.sampled_from(["cups.service", "bluetooth.service", "fstrim.timer",
                                            "avahi-daemon.socket"])}
    return st.fixed_dictionaries(fields)


valid_changes = st.one_of([_valid_change(knob) for knob in catalogue.KNOB_NAMES])
MUTABLE = ("knob", "current", "target", "persistence", "reason", "area", "path", "priority", "unit", "extra")


@st.composite
def mutated_plans(draw: st.DrawFn) -> dict[str, Any]:
    """A valid plan of 1–4 changes from the catalogue; one in four has one field of one change replaced or
    removed (an extra one added), the only mistake the schema then has to find."""
    changes = draw(st.lists(valid_changes, min_size=1, max_size=4,
                            unique_by=lambda c: (c["knob"], c.get("area"), c.get("path"), c.get("unit"))))
    if draw(st.integers(0, 3)) == 0:
        change, key = draw(st.sampled_from(changes)), draw(st.sampled_from(MUTABLE))
        if key in change and draw(st.booleans()):
            del change[key]
        else:
            change[key] = draw(targets | json_values)
    return {"version": 1, "changes": changes}


def never_live(change: dict[str, Any]) -> Any:
    """A precondition no live system can match, of a type the schema accepts for the knob."""
    knob = change.get("knob") if isinstance(change.get("knob"), str) else None
    if knob in ("zswap.enabled", "zswap.shrinker_enabled") and os.path.exists("/" + catalogue.SCALAR_KNOBS[knob].path):
        return not live(knob)
    if knob == "zswap.compressor":
        return "no-such-compressor"
    return -99999 if knob in catalogue.SCALAR_KNOBS or knob == "swap.priority" else 1


def state(helper: Helper) -> tuple[dict[str, Any], list[str]]:
    return machine(), sorted(os.listdir(helper.state_dir / "tx"))


def past_the_schema(plan: str) -> bool:
    """The plan has changes and the schema (what the helper checks first) accepts it."""
    try:
        return bool(plan_schema.plan_from_json(plan))
    except catalogue.CatalogueError:
        return False


def check(helper: Helper, member: str, signature: str, body: list[Any]) -> None:
    SEEN["cases"] += 1
    SEEN["engine"] += member == "Apply" and signature == "sbb" and past_the_schema(body[0])
    before = state(helper)
    reply = helper.c.call(member, signature, body)
    event(f"{reply.error_name or 'ok'}: {reply.body[0].split(':')[0] if reply.body else ''}"[:60])
    assert reply.message_type == MessageType.METHOD_RETURN or reply.error_name in EXPECTED_ERRORS, (
        reply.error_name, reply.body)
    assert helper.proc is not None and helper.proc.poll() is None, "the helper died"
    assert state(helper) == before, "the helper wrote something"


@settings(FUZZ, max_examples=CASES["text"])
@given(text=text(300) | st.builds(plan_json) | json_values.map(repr), dry_run=st.booleans(),
       force=st.booleans())
def test_fuzz_apply_with_arbitrary_text(helper: Helper, text: str, dry_run: bool, force: bool) -> None:
    check(helper, "Apply", "sbb", [text, dry_run, force])


def apply_plan(helper: Helper, plan: dict[str, Any], dry_run: bool, force: bool) -> None:
    if not dry_run:
        force = False
        for change in plan["changes"]:
            if isinstance(change, dict):
                change["current"] = never_live(change)
    check(helper, "Apply", "sbb", [json.dumps(plan), dry_run, force])


@settings(FUZZ, max_examples=CASES["plan_shaped"])
@given(plan=plans, dry_run=st.booleans(), force=st.booleans())
def test_fuzz_apply_with_plan_shaped_json(helper: Helper, plan: dict[str, Any], dry_run: bool, force: bool) -> None:
    apply_plan(helper, plan, dry_run, force)


@settings(FUZZ, max_examples=CASES["mutated"])
@given(plan=mutated_plans(), dry_run=st.booleans(), force=st.booleans())
def test_fuzz_apply_with_catalogue_plans_one_field_off(helper: Helper, plan: dict[str, Any], dry_run: bool,
                                                       force: bool) -> None:
    apply_plan(helper, plan, dry_run, force)


@settings(FUZZ, max_examples=CASES["rollback"])
@given(txid=text(40) | st.from_regex(r"\d{8}-\d{6}-[0-9a-f]{8}", fullmatch=True),
       dry_run=st.booleans(), force=st.booleans())
def test_fuzz_rollback(helper: Helper, txid: str, dry_run: bool, force: bool) -> None:
    check(helper, "Rollback", "sbb", [txid, dry_run, force])


bodies = st.sampled_from(["Apply", "Rollback", "Status"]).flatmap(lambda m: st.tuples(st.just(m), st.one_of(
    st.tuples(st.just(""), st.just([])),
    st.tuples(st.just("s"), st.tuples(text(20)).map(list)),
    st.tuples(st.just("i"), st.tuples(st.integers(-(2**31), 2**31 - 1)).map(list)),
    st.tuples(st.just("sbbs"), st.tuples(text(9), st.booleans(), st.booleans(), text(9))
              .map(list)),
    st.tuples(st.just("bbb"), st.tuples(st.booleans(), st.booleans(), st.booleans()).map(list)),
    st.tuples(st.just("as"), st.tuples(st.lists(text(5), max_size=3)).map(list)),
    st.tuples(st.just("a{ss}"), st.tuples(st.dictionaries(text(5), text(5), max_size=3))
              .map(list)),
))).filter(lambda call: call != ("Status", ("", [])))  # the one right call here: covered by the other tests


@settings(FUZZ, max_examples=CASES["signatures"])
@given(call=bodies)
def test_fuzz_wrong_signatures(helper: Helper, call: tuple[str, tuple[str, list[Any]]]) -> None:
    member, (signature, body) = call
    check(helper, member, signature, body)


def test_fuzz_ran_every_case_and_most_plans_reached_the_engine() -> None:
    """After the tests above (pytest keeps the file's order): all cases ran, and enough got past the schema
    for the drift check and the live preconditions to be fuzzed as well."""
    assert SEEN["cases"] == sum(CASES.values()) and (EXAMPLES < 1000 or SEEN["cases"] >= 10_000), SEEN
    assert SEEN["engine"] >= 0.3 * SEEN["cases"], SEEN
