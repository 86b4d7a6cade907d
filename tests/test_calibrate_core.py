"""calibrate's pure core: the candidate CPU sets on the snapshot trees (hybrid 2P+8E, SMT 2c4t, ARM big.LITTLE),
the decision rule on given speeds, the drop-in as the policy schema reads it, and `plan` reasoning from it until
the model file or the CPU topology changes. The measurement itself needs a real machine: tests/bench."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from autoglm_tune import calibrate_core as core
from autoglm_tune.bench import stats
from autoglm_tune.collect import collect_facts
from autoglm_tune.errors import BadInput
from autoglm_tune.facts import Facts, facts_from_json
from autoglm_tune.planner import make_plan
from autoglm_tune.policy import load_policy
from support import CLI
from trees import built_trees


@pytest.fixture(scope="session")
def facts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Facts]:
    return {name: collect_facts(root) for name, root in built_trees(tmp_path_factory).items()}


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """An empty system policy directory, so the machine's /etc/autoglm-tune never leaks in."""
    (tmp_path / "etc" / "policy.d").mkdir(parents=True)
    return tmp_path / "etc"


def generated(f: Facts) -> list[tuple[str, tuple[int, ...], bool]]:
    default = make_plan(f, load_policy(None, Path("/nonexistent"))).process.cpus
    return [(c.name, c.cpus, c.default) for c in core.candidates(f.cpu, f.cpu.online, default)]


# ---- candidates on the trees ------------------------------------------------------------------


def test_smt_laptop_one_per_core_all_threads_and_one_core_left(facts: dict[str, Facts]) -> None:
    assert generated(facts["smt-2c4t"]) == [
        ("physical cores = the plan's default", (0, 1), True),
        ("physical cores minus one", (1,), False),
        ("all logical CPUs", (0, 1, 2, 3), False),
    ]


def test_hybrid_2p8e_has_p_cores_only_and_e_cores_in_the_others(facts: dict[str, Facts]) -> None:
    e_cores = tuple(range(4, 12))
    assert generated(facts["hybrid-2p8e"]) == [
        ("P-cores only = the plan's default", (0, 2), True),
        ("physical cores minus one", (2, *e_cores), False),
        ("physical cores", (0, 2, *e_cores), False),
        ("all logical CPUs", tuple(range(12)), False),
    ]


def test_arm_big_little_big_cores_only_and_no_smt(facts: dict[str, Facts]) -> None:
    assert generated(facts["arm-big-little"]) == [
        ("P-cores only = the plan's default", (4, 5, 6, 7), True),
        ("physical cores minus one", (1, 2, 3, 4, 5, 6, 7), False),
        ("physical cores = all logical CPUs", tuple(range(8)), False),
    ]


def test_candidates_stay_inside_the_allowed_cpus(facts: dict[str, Facts]) -> None:
    f = facts["smt-2c4t"]
    cands = core.candidates(f.cpu, [0, 1], [0, 1])
    assert [(c.name, c.cpus, c.threads) for c in cands] == [
        ("physical cores = all logical CPUs = the plan's default", (0, 1), 2),
        ("physical cores minus one", (1,), 1),
    ]


def test_threads_equal_each_set_and_no_set_twice(facts: dict[str, Facts]) -> None:
    for f in facts.values():
        cands = core.candidates(f.cpu, f.cpu.online, [])
        assert len({c.cpus for c in cands}) == len(cands)
        assert all(c.threads == len(c.cpus) > 0 for c in cands)


def test_topology_marks_cores_and_kinds(facts: dict[str, Facts]) -> None:
    assert core.topology(facts["smt-2c4t"].cpu) == "Intel(R) Core(TM) i5-7200U CPU @ 2.50GHz; cores 0,2 1,3"
    assert core.topology(facts["hybrid-2p8e"].cpu).endswith("; cores 0,1P 2,3P 4E 5E 6E 7E 8E 9E 10E 11E")


# ---- the decision rule ------------------------------------------------------------------------

A = core.Candidate("simple", (0,), default=True)
B = core.Candidate("wide", (0, 1))


def rounds(a: list[float], b: list[float]) -> list[dict[str, float]]:
    return [{"simple": x, "wide": y} for x, y in zip(a, b, strict=True)]


def test_a_clearly_faster_candidate_wins_over_the_simpler() -> None:
    d = core.decide([A, B], rounds([50, 52, 49], [100, 98, 101]))
    assert (d.leader, d.choice, d.decided) == ("wide", "wide", True)
    [k] = d.comparisons
    assert (k.candidate, k.versus, k.verdict) == ("simple", "wide", "slower") and k.interval["high"] < 1


def test_equal_speeds_are_a_tie_kept_at_the_simpler_choice() -> None:
    d = core.decide([A, B], rounds([100, 100.5, 99.8, 100.2], [100.4, 100.1, 100.3, 99.9]), final=True)
    assert d.decided and d.leader == "wide" and d.choice == "simple"
    assert d.comparisons[0].verdict == "same"


def test_undecided_keeps_the_simpler_choice_and_says_so() -> None:
    d = core.decide([A, B], rounds([100, 60, 130], [90, 120, 95]))
    assert not d.decided and d.choice == "simple"


def test_nothing_is_decided_before_the_minimum_rounds() -> None:
    assert not core.decide([A, B], rounds([50, 51], [100, 101])).decided
    assert core.decide([A, B], rounds([50, 51, 50], [100, 101, 100])).decided


def test_a_difference_is_decided_only_at_a_look() -> None:
    """Looks after 3, 6, 12, 24, 48 and 96 rounds, and the one when measuring ends (final)."""
    assert [n for n in range(1, 200) if core.is_look(n)] == [3, 6, 12, 24, 48, 96] and core.MAX_ROUNDS == 96
    clear = rounds([50, 52, 49, 51, 50, 50], [100, 98, 101, 99, 100, 100])
    assert [core.decide([A, B], clear[:n]).decided for n in range(3, 7)] == [True, False, False, True]
    assert core.decide([A, B], clear[:5], final=True).decided


def _calibrations_calling_a_difference(decide: Callable[[list[dict[str, float]], bool], core.Decision],
                                       runs: int, max_rounds: int, seed: int) -> float:
    """The share of simulated calibrations of two equally fast candidates (5 % noise per burst) that end with a
    comparison called slower or faster, each stopped when decided or after `max_rounds` (the budget)."""
    rng = random.Random(seed)
    called = 0
    for _ in range(runs):
        measured: list[dict[str, float]] = []
        while True:
            measured.append({"simple": 100 * math.exp(rng.gauss(0, 0.05)), "wide": 100 * math.exp(rng.gauss(0, 0.05))})
            last = len(measured) == max_rounds
            d = decide(measured, last)
            if d.decided or last:
                break
        called += any(k.verdict in ("slower", "faster") for k in d.comparisons)
    return called / runs


def test_the_looks_keep_the_chance_of_calling_a_difference_that_is_not_there_within_5_percent() -> None:
    """Two equally fast settings, 60 rounds of budget: the looks call a difference in at most 5 % of
    calibrations; a 95 % interval looked at after every round (the rule before) calls one far more often."""
    looks = _calibrations_calling_a_difference(lambda m, last: core.decide([A, B], m, final=last), 400, 60, 1)
    assert looks <= 0.05

    def every_round_at_95(measured: list[dict[str, float]], last: bool) -> core.Decision:
        interval = stats.paired_ratio([(r["simple"], r["wide"]) for r in measured])
        k = core.Comparison("simple", "wide", interval, core.verdict(interval))
        return core.Decision("wide", "simple", len(measured) >= 3 and k.verdict != "undecided", [k])

    assert _calibrations_calling_a_difference(every_round_at_95, 400, 60, 1) > 3 * max(looks, 0.02)


def test_rounds_are_rotated_so_no_candidate_always_runs_first() -> None:
    c = core.Candidate("third", (1,))
    assert [[x.name for x in core.rotated([A, B, c], r)] for r in range(3)] == [
        ["simple", "wide", "third"], ["wide", "third", "simple"], ["third", "simple", "wide"]]


# ---- budget, burst and limit ------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [("120s", 120), ("2m", 120), ("90", 90), (" 45S ", 45)])
def test_budget_parses(text: str, seconds: int) -> None:
    assert core.parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["", "0s", "-5s", "1.5m", "2h", "s", "ten"])
def test_budget_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        core.parse_budget(text)


def test_burst_tokens_follow_speed_within_bounds_and_context() -> None:
    assert core.burst_tokens(2.0, 4096) == core.MIN_TOKENS
    assert core.burst_tokens(100.0, 4096) == 100
    assert core.burst_tokens(5000.0, None) == core.MAX_TOKENS
    assert core.burst_tokens(5000.0, 128) == 127


def test_limit_is_bandwidth_over_the_bytes_read_per_token() -> None:
    assert core.limit_tok_s(7.3, 1_000_000_000) == pytest.approx(14.6)  # a memcpy reads and writes each byte
    assert core.minimum_budget_s(4) > core.minimum_budget_s(2) >= core.PROBE_S + core.MIN_ROUNDS


# ---- the drop-in, the policy schema and plan ---------------------------------------------------


def result_for(f: Facts, model: Path) -> core.Result:
    default = make_plan(f, load_policy(None, Path("/nonexistent"))).process.cpus
    cands = core.candidates(f.cpu, f.cpu.online, default)  # smt-2c4t: [0,1] default, [1], [0-3]
    speeds = {cands[0].name: [10.0, 10.2, 9.9], cands[1].name: [6.0, 6.1, 5.9], cands[2].name: [12.0, 12.3, 11.9]}
    measured = [{n: v[i] for n, v in speeds.items()} for i in range(3)]
    st = model.stat()
    return core.Result(cands=cands, rounds=measured, decision=core.decide(cands, measured), memcpy_gbs=4.0,
                       model_path=str(model), model_bytes=st.st_size, model_mtime_ns=st.st_mtime_ns,
                       topology=core.topology(f.cpu), date="2026-12-02T03:00:00Z", host="smt-laptop", elapsed_s=42.0,
                       budget_s=120, tokens=64)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    with path.open("wb") as fh:
        fh.write(b"GGUF")
        fh.truncate(500_000_000)  # sparse: a memcpy of 4 GB/s moves 8 GB/s; ÷ 500 MB = 16 tok/s
    return path


def test_drop_in_parses_with_the_policy_schema_and_carries_the_measurements(
    facts: dict[str, Facts], model: Path, etc: Path
) -> None:
    r = result_for(facts["smt-2c4t"], model)
    text = core.drop_in(r)
    (etc / "policy.d" / "50-calibrated.toml").write_text(text)
    cal = load_policy(None, etc).calibration
    assert cal is not None and cal.source == str(etc / "policy.d" / "50-calibrated.toml")
    assert cal.values["cpus"] == (0, 1, 2, 3) and cal.values["threads"] == 4
    assert (cal.values["model_bytes"], cal.values["model_mtime_ns"]) == (cal.found.size, cal.found.mtime_ns)
    comments = [line for line in text.splitlines() if line.startswith("#")]
    for needle in (str(model), "2026-12-02T03:00:00Z", r.topology, "memcpy 4.00 GB/s copied = 8.00 GB/s read + written",
                   "limit 16.0 tok/s",
                   "all logical CPUs", "75 %", "0.83× ["):
        assert any(needle in line for line in comments), needle


def test_any_model_path_round_trips_through_the_drop_in(facts: dict[str, Facts], tmp_path: Path, etc: Path) -> None:
    odd = tmp_path / 'mödel "q4" \\ 😀\x7f\t.gguf'
    odd.write_bytes(b"GGUF")
    (etc / "policy.d" / "50-calibrated.toml").write_text(core.drop_in(result_for(facts["smt-2c4t"], odd)))
    cal = load_policy(None, etc).calibration
    assert cal is not None and cal.values["model_path"] == str(odd) and cal.found.size == 4


def test_plan_reasons_from_a_fresh_calibration(facts: dict[str, Facts], model: Path, etc: Path) -> None:
    f = facts["smt-2c4t"]
    (etc / "policy.d" / "50-calibrated.toml").write_text(core.drop_in(result_for(f, model)))
    process = make_plan(f, load_policy(None, etc)).process
    assert (process.cpus, process.threads) == ([0, 1, 2, 3], 4)
    assert process.reasons[0].startswith(f"CPU set and threads from {etc}/policy.d/50-calibrated.toml: calibrated "
                                         f"2026-12-02 on this machine with {model}: all logical CPUs (CPUs 0-3, 4 "
                                         "threads) ran 12.0 tok/s, 75 % of this box's 16.0 tok/s limit")
    assert "1.20× [" in process.reasons[0] and "threads 4: as calibrated" in process.reasons


def test_a_changed_model_file_makes_the_calibration_stale(facts: dict[str, Facts], model: Path, etc: Path) -> None:
    f = facts["smt-2c4t"]
    (etc / "policy.d" / "50-calibrated.toml").write_text(core.drop_in(result_for(f, model)))
    with model.open("ab") as fh:
        fh.write(b"x")
    process = make_plan(f, load_policy(None, etc)).process
    assert process.reasons[0].startswith(f"calibration {etc}/policy.d/50-calibrated.toml is stale: the model file "
                                         f"{model} changed")
    assert (process.cpus, process.threads) == ([0, 1], 2)  # the rules' default


def test_a_touched_or_removed_model_is_stale_too(facts: dict[str, Facts], model: Path, etc: Path) -> None:
    f = facts["smt-2c4t"]
    (etc / "policy.d" / "50-calibrated.toml").write_text(core.drop_in(result_for(f, model)))
    st = model.stat()
    os.utime(model, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert "is stale: the model file" in make_plan(f, load_policy(None, etc)).process.reasons[0]
    model.unlink()
    assert f"the model file {model} is gone" in make_plan(f, load_policy(None, etc)).process.reasons[0]


def test_other_cpu_topology_makes_it_stale(facts: dict[str, Facts], model: Path, etc: Path) -> None:
    (etc / "policy.d" / "50-calibrated.toml").write_text(core.drop_in(result_for(facts["smt-2c4t"], model)))
    other = facts["hybrid-2p8e"]
    process = make_plan(other, load_policy(None, etc)).process
    assert "is stale: the CPU topology differs" in process.reasons[0]
    assert process.cpus == [0, 2]


def test_another_model_in_the_policy_makes_it_stale(
    facts: dict[str, Facts], model: Path, etc: Path, tmp_path: Path
) -> None:
    f = facts["smt-2c4t"]
    (etc / "policy.d" / "50-calibrated.toml").write_text(core.drop_in(result_for(f, model)))
    (etc / "policy.d" / "60-model.toml").write_text(f'[model]\nmodel_path = "{tmp_path}/other.gguf"\n')
    assert f"the policy's model is {tmp_path}/other.gguf" in make_plan(f, load_policy(None, etc)).process.reasons[0]


def test_explicit_process_settings_win_over_the_calibration(facts: dict[str, Facts], model: Path, etc: Path) -> None:
    f = facts["smt-2c4t"]
    (etc / "policy.d" / "50-calibrated.toml").write_text(core.drop_in(result_for(f, model)))
    (etc / "policy.d" / "60-threads.toml").write_text("[process]\nthreads = 1\n")
    process = make_plan(f, load_policy(None, etc)).process
    assert process.reasons[0].endswith("not used: [process] threads set by the policy")
    assert (process.cpus, process.threads) == ([0, 1], 1)


def test_a_partial_or_bad_calibration_is_refused_naming_the_key(model: Path, etc: Path) -> None:
    path = etc / "policy.d" / "50-calibrated.toml"
    path.write_text("[calibration]\ncpus = [0]\nthreads = 1\n")
    with pytest.raises(BadInput, match=r"50-calibrated.toml: \[calibration\] lacks model_path, model_bytes"):
        load_policy(None, etc)
    path.write_text('[calibration]\ncpus = "auto"\n')
    with pytest.raises(BadInput, match=r'\[calibration\] cpus = "auto": .* allowed: a list of CPU numbers'):
        load_policy(None, etc)



def test_a_difference_inside_the_band_is_a_tie_even_when_decided() -> None:
    """Many rounds can show a 1 % difference beyond doubt; for the choice it is still a tie (the simpler wins)."""
    assert core.verdict({"low": 0.985, "high": 0.995}) == "same"
    assert core.verdict({"low": 1.005, "high": 1.02}) == "same"
    assert core.verdict({"low": 0.90, "high": 0.96}) == "slower"
    assert core.verdict({"low": 0.95, "high": 1.10}) == "undecided"


# ---- nice under a light background load ---------------------------------------------------------


CHOSEN = core.Candidate("physical cores", (0, 1))


def nice_rounds(plan: list[float], zero: list[float]) -> list[dict[str, float]]:
    return [{"nice -10 (the plan's)": x, "nice 0": y} for x, y in zip(plan, zero, strict=True)]


def test_nice_candidates_are_the_chosen_set_at_the_plans_nice_first_then_nice_0() -> None:
    plan, zero = core.nice_candidates(CHOSEN, -10)
    assert (plan.name, plan.cpus, plan.nice, plan.default) == ("nice -10 (the plan's)", (0, 1), -10, True)
    assert (zero.name, zero.cpus, zero.nice, zero.default) == ("nice 0", (0, 1), 0, False)
    assert zero.label() == "nice 0 (CPUs 0-1, 2 threads, nice 0)"


@pytest.mark.parametrize(
    ("plan", "zero", "choice", "decided"),
    [
        ([10.0, 10.1, 9.9, 10.0, 10.05, 9.95], [10.05, 10.0, 10.0, 9.95, 10.0, 10.0], "nice -10 (the plan's)",
         True),  # a tie: the plan's
        ([8.0, 8.1, 7.9], [10.0, 10.2, 9.9], "nice 0", True),  # nice 0 shown faster
        ([10.0, 10.2, 9.9], [8.0, 8.1, 7.9], "nice -10 (the plan's)", True),  # the plan's shown faster
        ([10.0, 6.0, 13.0], [9.0, 12.0, 9.5], "nice -10 (the plan's)", False),  # undecided: the plan's
    ],
)
def test_the_plans_nice_is_kept_unless_nice_0_is_shown_faster(
    plan: list[float], zero: list[float], choice: str, decided: bool
) -> None:
    cands = core.nice_candidates(CHOSEN, -10)
    d = core.decide(cands, nice_rounds(plan, zero), final=True)
    assert (d.choice, d.decided) == (choice, decided)


def test_the_nice_comparison_is_skipped_without_the_right_to_lower_nice_or_at_nice_0() -> None:
    assert core.nice_skipped(-10, True, 0) is None
    assert core.nice_skipped(-10, False, 1000) == ("nice -10 needs root (CAP_SYS_NICE) and this runs as uid 1000; "
                                                   "run calibrate with sudo to compare it")
    assert core.nice_skipped(0, True, 0) == "the plan's nice is 0 already: nothing to compare"
    assert core.nice_skipped(5, False, 1000) == ("nice 0 needs root (CAP_SYS_NICE) and this runs as uid 1000; run "
                                                 "calibrate with sudo to compare it")


def test_the_cpu_sets_get_their_share_of_the_budget_and_the_minimum_counts_both() -> None:
    assert core.phase_budget_s(120, 2, 2) == 60 and core.phase_budget_s(120, 4, 0) == 120
    assert core.minimum_budget_s(4) > core.minimum_budget_s(2)


def with_nice(r: core.Result, plan: list[float], zero: list[float]) -> core.Result:
    from dataclasses import replace

    cands = core.nice_candidates(r.chosen(), -10)
    measured = nice_rounds(plan, zero)
    return replace(r, nice=core.NiceResult(cands, measured, core.decide(cands, measured), 1.5))


def test_a_measured_nice_goes_into_the_drop_in_and_plan_reasons_from_it(
    facts: dict[str, Facts], model: Path, etc: Path
) -> None:
    f = facts["smt-2c4t"]
    r = with_nice(result_for(f, model), [8.0, 8.1, 7.9], [10.0, 10.2, 9.9])
    text = core.drop_in(r)
    (etc / "policy.d" / "50-calibrated.toml").write_text(text)
    assert "\nnice = 0\n" in text and "# nice chosen: 0, decided: nice 0 shown faster" in text
    assert "2 ms of CPU work every 10 ms at nice 0" in text and "it took 1.5 CPU s" in text
    cal = load_policy(None, etc).calibration
    assert cal is not None and cal.values["nice"] == 0 and cal.values["host"] == "smt-laptop"
    process = make_plan(f, load_policy(None, etc)).process
    assert process.nice == 0
    [line] = [x for x in process.reasons if x.startswith("nice 0: ")]
    assert line.startswith(f"nice 0: calibrated 2026-12-02 on this machine with {model}: on CPUs 0-3 under a light "
                           "background load (2 ms of CPU work every 10 ms at nice 0) nice 0 ran 10.0 tok/s, 1.25× [")
    assert line.endswith("3 interleaved rounds, decided: nice 0 shown faster")
    assert r.to_dict()["nice"]["nice"] == 0 and r.to_dict()["nice"]["load"]["cpu_s"] == 1.5

    (etc / "policy.d" / "60-nice.toml").write_text("[process]\nnice = -5\n")
    process = make_plan(f, load_policy(None, etc)).process
    assert process.nice == -5 and "nice -5: set by the policy ([process] nice = -5); the calibrated nice 0 is not " \
        "used" in process.reasons


def test_a_stale_calibration_leaves_nice_to_the_rules(facts: dict[str, Facts], model: Path, etc: Path) -> None:
    f = facts["smt-2c4t"]
    (etc / "policy.d" / "50-calibrated.toml").write_text(
        core.drop_in(with_nice(result_for(f, model), [8.0, 8.1, 7.9], [10.0, 10.2, 9.9])))
    with model.open("ab") as fh:
        fh.write(b"x")
    assert make_plan(f, load_policy(None, etc)).process.nice == -10


def test_a_skipped_nice_comparison_says_why_and_plan_keeps_the_rules_nice(
    facts: dict[str, Facts], model: Path, etc: Path
) -> None:
    from dataclasses import replace

    f = facts["smt-2c4t"]
    r = replace(result_for(f, model), nice_skipped="nice -10 needs root (CAP_SYS_NICE) and this runs as uid 1000; "
                "run calibrate with sudo to compare it")
    text = core.drop_in(r)
    assert "# nice      comparison skipped: nice -10 needs root (CAP_SYS_NICE)" in text and "\nnice =" not in text
    assert r.to_dict()["nice"] == {"skipped": r.nice_skipped}
    (etc / "policy.d" / "50-calibrated.toml").write_text(text)
    process = make_plan(f, load_policy(None, etc)).process
    assert process.nice == -10 and any(x.startswith("nice -10: under CPU contention") for x in process.reasons)


def test_nice_without_its_reason_is_refused(model: Path, etc: Path, facts: dict[str, Facts]) -> None:
    path = etc / "policy.d" / "50-calibrated.toml"
    text = core.drop_in(with_nice(result_for(facts["smt-2c4t"], model), [8.0, 8.1, 7.9], [10.0, 10.2, 9.9]))
    path.write_text("\n".join(x for x in text.splitlines() if not x.startswith("nice_reason")))
    with pytest.raises(BadInput, match=r"50-calibrated.toml: \[calibration\] lacks nice_reason;"):
        load_policy(None, etc)
    path.write_text(text.replace("\nnice = 0\n", "\nnice = -20\n"))
    with pytest.raises(BadInput, match=r"\[calibration\] nice = -20: -20 is out of range; allowed: an integer -10"):
        load_policy(None, etc)


# ---- the calibration in collected facts ---------------------------------------------------------


def live_drop_in(model: Path) -> str:
    """A drop-in for this machine (its real topology), CPU set all online CPUs, nice 0 measured."""
    f = collect_facts(Path("/"))
    cands = [core.Candidate("physical cores", tuple(f.cpu.online), default=True)]
    measured = [{"physical cores": v} for v in (10.0, 10.1, 9.9)]
    st = model.stat()
    r = core.Result(cands=cands, rounds=measured, decision=core.decide(cands, measured), memcpy_gbs=4.0,
                    model_path=str(model), model_bytes=st.st_size, model_mtime_ns=st.st_mtime_ns,
                    topology=core.topology(f.cpu), date="2026-12-02T03:00:00Z", host="calibrated-host", elapsed_s=9.0,
                    budget_s=60, tokens=64)
    return core.drop_in(with_nice(r, [8.0, 8.1, 7.9], [10.0, 10.2, 9.9]))


def cli(etc: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "AUTOGLM_TUNE_ETC": str(etc)})


def test_facts_json_carries_the_calibration_and_plan_from_those_facts_uses_it(
    model: Path, etc: Path, tmp_path: Path
) -> None:
    drop_in = etc / "policy.d" / "50-calibrated.toml"
    drop_in.write_text(live_drop_in(model))
    done = cli(etc, "facts", "--json")
    assert done.returncode == 0, done.stderr
    cal = json.loads(done.stdout)["calibration"]
    st = model.stat()
    assert cal == {**cal, "source": str(drop_in), "date": "2026-12-02T03:00:00Z", "host": "calibrated-host",
                   "model_path": str(model), "model_bytes": st.st_size, "model_mtime_ns": st.st_mtime_ns,
                   "nice": 0, "stale": False, "stale_because": None}
    assert cal["reason"].startswith("calibrated 2026-12-02") and cal["nice_reason"].endswith("nice 0 shown faster")
    text = cli(etc, "facts").stdout
    assert f"calibrated  2026-12-02T03:00:00Z on calibrated-host with {model}: CPUs " in text and "fresh)" in text

    collected = tmp_path / "host.json"
    collected.write_text(done.stdout)
    elsewhere = tmp_path / "admin-etc"  # the admin's machine: no calibration of its own
    elsewhere.mkdir()
    planned = cli(elsewhere, "plan", "--facts", str(collected), "--json")
    assert planned.returncode == 0, planned.stderr
    process = json.loads(planned.stdout)["process"]
    assert process["reasons"][0].startswith(f"CPU set and threads from {drop_in} (in the facts of calibrated-host): "
                                            "calibrated 2026-12-02")
    assert process["nice"] == 0 and (process["cpus"], process["threads"]) == (cal["cpus"], cal["threads"])

    with model.open("ab") as fh:  # the model changes on the host: its next facts say stale, and so does plan
        fh.write(b"x")
    done = cli(etc, "facts", "--json")
    cal = json.loads(done.stdout)["calibration"]
    assert cal["stale"] is True and cal["stale_because"].startswith(f"the model file {model} changed")
    collected.write_text(done.stdout)
    process = json.loads(cli(elsewhere, "plan", "--facts", str(collected), "--json").stdout)["process"]
    assert process["reasons"][0].startswith(f"calibration {drop_in} (in the facts of calibrated-host) is stale: the "
                                            f"model file {model} changed")
    assert process["nice"] == -10


def test_facts_without_a_calibration_still_load_and_a_bad_one_is_one_line(
    model: Path, etc: Path, tmp_path: Path
) -> None:
    (etc / "policy.d" / "50-calibrated.toml").write_text(live_drop_in(model))
    doc = json.loads(cli(etc, "facts", "--json").stdout)
    old = dict(doc)
    del old["calibration"]  # facts collected before calibrate existed
    assert facts_from_json(json.dumps(old), "old.json").calibration is None
    doc["calibration"]["nice"] = "low"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    done = cli(tmp_path, "plan", "--facts", str(bad))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"autoglm-tune: error: --facts {bad}: facts.calibration.nice: expected int, got 'low'\n"


def test_a_ratio_rounded_to_0_is_stated_not_divided_by() -> None:
    """paired_ratio rounds to 3 places: a candidate measured 2000× slower (a stalled burst) has ratio 0.0."""
    interval = {"n": 3, "ratio": 0.002, "low": 0.0, "high": 0.01}
    assert core._inverse(interval) == "500.00× [100.00–over 1000] of"
    assert core._inverse({"n": 1, "ratio": 0.0, "low": None, "high": None}) == "over 1000× of"
