"""`autoglm-tune calibrate`'s pure core: the candidate CPU sets a machine's topology offers, the decision rule
over interleaved rounds, the memory-bandwidth limit, the policy drop-in that records the choice, and whether
such a record still describes the machine and model it was measured on. No I/O here.

Decision rule: every round runs each candidate once (the order rotated round by round, so drift hits all
alike). A comparison is the paired ratio candidate ÷ leader over the rounds (bench.stats.paired_ratio, a
t-interval of the log-ratio): decided when its interval excludes 1 (the candidate is slower) or lies inside
±EQUIVALENT (as fast, for any practical purpose). The leader has the highest geometric-mean speed. When all
comparisons are decided, or the budget is spent, the choice is the simplest of the leader and every candidate
not shown slower: a tie keeps the simpler choice.

Looks: the rounds are looked at only after MIN_ROUNDS of them and each time their number doubles (3, 6, 12, 24,
48, 96: MAX_LOOKS), and once when the budget ends, each at LOOK_LEVEL = 1 − 5 %/(MAX_LOOKS + 1), so the chance
that any look calls a difference that is not there stays within 5 % (Bonferroni). A 95 % interval looked at
after every round, as before 2026-12-03, called a direction in 4 of 10 calibrations of two equally fast
settings (docs/BENCHMARKS.md, "Calibration").

Nice: after the CPU sets, the chosen set is measured at the plan's nice and at nice 0, interleaved the same way,
while a light background load runs (LOAD_WORK_MS of CPU work every LOAD_PERIOD_MS at nice 0). The simpler of the
two is the plan's nice: it is what `plan` does without a calibration, and its reason is a measurement under heavy
contention that a light load cannot repeat. So a tie, or an undecided comparison, keeps the plan's nice; nice 0
is chosen only where it is shown faster.
"""

from __future__ import annotations

import json
import math
import os.path
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .bench.stats import paired_ratio
from .facts import CalibrationFacts, CpuFacts
from .policy import Calibration, ModelStamp
from .procsettings import cpu_ranges

PHYSICAL = "physical cores"
P_ONLY = "P-cores only"
ALL = "all logical CPUs"
MINUS_ONE = "physical cores minus one"
DEFAULT = "the plan's default"

MIN_ROUNDS = 3  # a t-interval from 2 pairs is 12.7 standard errors wide: nothing is decided before 3
EQUIVALENT = 0.03  # within ±3 % two candidates are as fast as each other: the simpler one is kept
MAX_LOOKS = 6  # the decision is looked at after 3, 6, 12, 24, 48 and 96 rounds (and when the budget ends)
MAX_ROUNDS = MIN_ROUNDS * 2 ** (MAX_LOOKS - 1)
LOOK_LEVEL = 1 - 0.05 / (MAX_LOOKS + 1)  # each look's interval: 99.3 %
BURST_S = 1.0  # the decode time one burst aims at
MIN_TOKENS, MAX_TOKENS = 8, 512
MIN_BURST_S = 0.5  # the least one burst (load + decode) takes: what a budget must allow per burst
PROBE_S = 3.0  # the memcpy probe and the warm-up burst
LOAD_WORK_MS, LOAD_PERIOD_MS = 2, 10  # the background load of the nice comparison: 20 % of one CPU, in bursts
NICE_ZERO = "nice 0"


@dataclass(frozen=True)
class Candidate:
    """A CPU set to measure, with threads = its size. `default`: the plan's own choice without a calibration."""

    name: str
    cpus: tuple[int, ...]
    default: bool = False
    nice: int | None = None  # the burst's nice; None: calibrate's own

    @property
    def threads(self) -> int:
        return len(self.cpus)

    def label(self) -> str:
        at = f", nice {self.nice}" if self.nice is not None else ""
        return f"{self.name} (CPUs {cpu_ranges(self.cpus)}, {self.threads} thread{'s' * (self.threads != 1)}{at})"


def topology(cpu: CpuFacts) -> str:
    """The CPU topology as one line: the CPU model, then each physical core's online CPUs, P/E marked.
    A calibration is stale when this differs."""
    cores: dict[str, list[int]] = {}
    kinds: dict[str, str] = {}
    for c in sorted(cpu.cpus, key=lambda c: c.id):
        if c.id in cpu.online:
            cores.setdefault(c.core, []).append(c.id)
            kinds[c.core] = c.kind
    mark = {"performance": "P", "efficiency": "E"}
    parts = [",".join(map(str, ids)) + mark.get(kinds[core], "") for core, ids in cores.items()]
    return f"{cpu.model or 'unknown CPU'}; cores {' '.join(parts) or 'unknown'}"


def candidates(cpu: CpuFacts, allowed: Sequence[int], default_cpus: Sequence[int]) -> list[Candidate]:
    """The candidate sets, simplest first: the plan's default, then by fewer threads. Sets equal to each other are
    measured once, under all their names (“physical cores = all logical CPUs”). Only CPUs in `allowed` (this
    process's affinity) are used."""
    pool = sorted((c for c in cpu.cpus if c.id in cpu.online and c.id in allowed), key=lambda c: c.id)
    firsts: dict[str, int] = {}
    for c in pool:
        firsts.setdefault(c.core, c.id)
    physical = sorted(firsts.values())
    kind = {c.id: c.kind for c in pool}
    sets: list[tuple[str, list[int]]] = [(PHYSICAL, physical)]
    if any(k == "performance" for k in kind.values()) and any(k == "efficiency" for k in kind.values()):
        sets.append((P_ONLY, [i for i in physical if kind[i] == "performance"]))
    sets.append((ALL, [c.id for c in pool]))
    if len(physical) >= 2:
        sets.append((MINUS_ONE, physical[1:]))  # the first core left to the system, as [process] reserve_cores does
    default = tuple(sorted(default_cpus))
    if default and set(default) <= set(allowed):
        sets.append((DEFAULT, list(default)))
    names: dict[tuple[int, ...], list[str]] = {}
    for name, ids in sets:
        if ids:
            names.setdefault(tuple(ids), []).append(name)
    out = [Candidate(" = ".join(n), ids, ids == default) for ids, n in names.items()]
    return sorted(out, key=simplicity)


def nice_candidates(chosen: Candidate, plan_nice: int) -> list[Candidate]:
    """The chosen CPU set at the plan's nice (the default, so the simpler) and at nice 0."""
    return [Candidate(f"nice {plan_nice} (the plan's)", chosen.cpus, True, plan_nice),
            Candidate(NICE_ZERO, chosen.cpus, False, 0)]


def nice_skipped(plan_nice: int, can_set: bool, uid: int) -> str | None:
    """Why the nice comparison does not run, or None when it does. `can_set`: this process may start a burst at
    min(0, plan_nice) (a lower nice needs CAP_SYS_NICE)."""
    if plan_nice == 0:
        return "the plan's nice is 0 already: nothing to compare"
    if not can_set:
        return (f"nice {min(0, plan_nice)} needs root (CAP_SYS_NICE) and this runs as uid {uid}; "
                "run calibrate with sudo to compare it")
    return None


def phase_budget_s(budget_s: int, n_cpu: int, n_nice: int) -> float:
    """The part of the budget the CPU sets may use before the nice comparison: in proportion to the candidates
    (the nice comparison then has what is left, more when the CPU sets were decided early)."""
    return budget_s * n_cpu / (n_cpu + n_nice)


def simplicity(c: Candidate) -> tuple[bool, int]:
    """Sort key, simplest first: the plan's default (nothing changes), then fewer threads (more left to the
    system); equal keys keep generation order (sorted() is stable)."""
    return (not c.default, c.threads)


def rotated(items: Sequence[Candidate], round_no: int) -> list[Candidate]:
    """The run order of round `round_no`: rotated by one each round."""
    k = round_no % len(items) if items else 0
    return [*items[k:], *items[:k]]


def geomean(values: Sequence[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


@dataclass(frozen=True)
class Comparison:
    candidate: str
    versus: str
    interval: dict[str, Any]  # paired_ratio of candidate ÷ versus
    verdict: str  # "slower", "faster", "same" (within ±EQUIVALENT) or "undecided"


def verdict(interval: dict[str, Any]) -> str:
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None:
        return "undecided"
    if low >= 1 / (1 + EQUIVALENT) and high <= 1 + EQUIVALENT:  # first: 0.99× [0.985–0.995] is a tie, not slower
        return "same"
    if high < 1:
        return "slower"
    if low > 1:
        return "faster"
    return "undecided"


def compare(rounds: Sequence[Mapping[str, float]], a: str, b: str) -> Comparison:
    interval = paired_ratio([(r[a], r[b]) for r in rounds], LOOK_LEVEL)
    return Comparison(a, b, interval, verdict(interval))


def is_look(n_rounds: int) -> bool:
    """Whether the decision is looked at after `n_rounds` rounds: MIN_ROUNDS × 2^k, up to MAX_ROUNDS."""
    k, rest = divmod(n_rounds, MIN_ROUNDS)
    return rest == 0 and 1 <= k <= MAX_ROUNDS // MIN_ROUNDS and k & (k - 1) == 0


@dataclass(frozen=True)
class Decision:
    leader: str
    choice: str
    decided: bool  # every comparison with the leader decided, after at least MIN_ROUNDS rounds
    comparisons: list[Comparison] = field(default_factory=list)  # each other candidate ÷ the choice


def decide(cands: Sequence[Candidate], rounds: Sequence[Mapping[str, float]], final: bool = False) -> Decision:
    """The leader, whether every comparison with it is decided, and the choice (`cands` simplest first;
    `rounds`: each a complete round, candidate name → tok/s). Decided only at a look: a scheduled one
    (is_look) or, `final`, the one when the measuring ends."""
    if not rounds:
        raise ValueError("decide: no rounds measured")
    speed = {c.name: geomean([r[c.name] for r in rounds]) for c in cands}
    leader = max(cands, key=lambda c: speed[c.name]).name  # max() keeps the first, i.e. simplest, of equals
    versus_leader = {c.name: compare(rounds, c.name, leader) for c in cands if c.name != leader}
    looked = final or is_look(len(rounds))
    decided = looked and len(rounds) >= MIN_ROUNDS and all(v.verdict != "undecided" for v in versus_leader.values())
    tied = [c for c in cands if c.name == leader or versus_leader[c.name].verdict != "slower"]
    choice = tied[0].name
    return Decision(leader, choice, decided, [compare(rounds, c.name, choice) for c in cands if c.name != choice])


def burst_tokens(tok_s: float, context_length: int | None) -> int:
    """Tokens per burst: about BURST_S of decoding at the warm-up speed, within MIN_TOKENS–MAX_TOKENS and the
    model's context."""
    n = max(MIN_TOKENS, min(MAX_TOKENS, round(BURST_S * tok_s)))
    return min(n, context_length - 1) if context_length and context_length > MIN_TOKENS else n


def minimum_budget_s(n_candidates: int) -> int:
    """The least budget that can measure MIN_ROUNDS rounds of `n_candidates` short bursts (all phases)."""
    return math.ceil(PROBE_S + MIN_ROUNDS * n_candidates * MIN_BURST_S)


def parse_budget(text: str) -> int:
    """ "120s", "2m", "90" → seconds; ValueError on anything else."""
    t = text.strip().lower()
    scale = 60 if t.endswith("m") else 1
    digits = t.removesuffix("m").removesuffix("s")
    if not digits.isdigit() or int(digits) == 0:
        raise ValueError(text)
    return int(digits) * scale


def bandwidth_gbs(memcpy_gbs: float) -> float:
    """Memory bandwidth from a memcpy's rate: each byte copied is read once and written once (STREAM's Copy
    counts both)."""
    return 2 * memcpy_gbs


def limit_tok_s(memcpy_gbs: float, model_bytes: int) -> float:
    """The decode speed memory bandwidth allows: every weight is read once per token, so bandwidth ÷ model size."""
    return bandwidth_gbs(memcpy_gbs) * 1e9 / model_bytes


# ---- the drop-in and its staleness ------------------------------------------------------------


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def speed_line(tok_s: float, limit: float) -> str:
    return f"{tok_s:.1f} tok/s, {100 * tok_s / limit:.0f} % of this box's {limit:.1f} tok/s limit"


def ratio_text(interval: dict[str, Any]) -> str:
    if interval.get("low") is None:
        return f"{interval.get('ratio')}× (no interval)"
    return f"{interval['ratio']:.2f}× [{interval['low']:.2f}–{interval['high']:.2f}]"


LOAD_TEXT = f"{LOAD_WORK_MS} ms of CPU work every {LOAD_PERIOD_MS} ms at nice 0"


@dataclass(frozen=True)
class NiceResult:
    """The nice comparison: the chosen CPU set at the plan's nice and at nice 0 under the background load."""

    cands: list[Candidate]
    rounds: list[dict[str, float]]
    decision: Decision
    load_cpu_s: float  # CPU time the background load took: it ran

    def median(self, name: str) -> float:
        return statistics.median(r[name] for r in self.rounds)

    def chosen(self) -> Candidate:
        return next(c for c in self.cands if c.name == self.decision.choice)

    def why(self) -> str:
        c = self.chosen()
        if c.default:
            return "the plan's nice kept" + ("" if self.decision.decided else " (the simpler)")
        return "nice 0 shown faster"

    def reason(self, date: str, model_path: str) -> str:
        """One line for `plan`'s nice."""
        c = self.chosen()
        how = "decided" if self.decision.decided else "undecided when the budget ran out"
        versus = "; ".join(f"{_inverse(k.interval)} {k.candidate}" for k in self.decision.comparisons)
        return (f"calibrated {date[:10]} on this machine with {model_path}: on CPUs {cpu_ranges(c.cpus)} under a "
                f"light background load ({LOAD_TEXT}) nice {c.nice} ran {self.median(c.name):.1f} tok/s, {versus}; "
                f"{len(self.rounds)} interleaved rounds, {how}: {self.why()}")

    def to_dict(self) -> dict[str, Any]:
        d = self.decision
        return {
            "load": {"work_ms": LOAD_WORK_MS, "period_ms": LOAD_PERIOD_MS, "nice": 0,
                     "cpu_s": round(self.load_cpu_s, 2)},
            "rounds": len(self.rounds), "decided": d.decided, "leader": d.leader, "choice": d.choice,
            "nice": self.chosen().nice, "interval_level": round(LOOK_LEVEL, 4),
            "candidates": [{"name": c.name, "nice": c.nice, "cpus": list(c.cpus), "default": c.default,
                            "tok_s": [r[c.name] for r in self.rounds], "median_tok_s": round(self.median(c.name), 2)}
                           for c in self.cands],
            "comparisons": [{"candidate": k.candidate, "versus": k.versus, **k.interval, "verdict": k.verdict}
                            for k in d.comparisons],
        }


@dataclass(frozen=True)
class Result:
    """One calibration: what was measured and chosen, and on what."""

    cands: list[Candidate]
    rounds: list[dict[str, float]]
    decision: Decision
    memcpy_gbs: float
    model_path: str
    model_bytes: int
    model_mtime_ns: int
    topology: str
    date: str  # UTC, ISO 8601
    host: str
    elapsed_s: float
    budget_s: int
    tokens: int  # per burst
    nice: NiceResult | None = None
    nice_skipped: str | None = None  # why there is no nice comparison

    @property
    def limit(self) -> float:
        return limit_tok_s(self.memcpy_gbs, self.model_bytes)

    def median(self, name: str) -> float:
        return statistics.median(r[name] for r in self.rounds)

    def chosen(self) -> Candidate:
        return next(c for c in self.cands if c.name == self.decision.choice)

    def reason(self) -> str:
        """One line for `plan`: what was measured, what it chose, against what."""
        c = self.chosen()
        how = "decided" if self.decision.decided else "undecided when the budget ran out, the simpler kept"
        versus = "; ".join(f"{_inverse(k.interval)} {k.candidate}" for k in self.decision.comparisons)
        return (f"calibrated {self.date[:10]} on this machine with {self.model_path}: {c.label()} ran "
                f"{speed_line(self.median(c.name), self.limit)} (memory {bandwidth_gbs(self.memcpy_gbs):.1f} GB/s ÷ "
                f"{_mib(self.model_bytes)} per token)" + (f"; vs {versus}" if versus else "")
                + f"; {len(self.rounds)} interleaved rounds, {how}")

    def to_dict(self) -> dict[str, Any]:
        d = self.decision
        return {
            "model": {"path": self.model_path, "bytes": self.model_bytes, "mtime_ns": self.model_mtime_ns},
            "date": self.date, "host": self.host, "topology": self.topology,
            "memcpy_gbs": self.memcpy_gbs, "limit_tok_s": round(self.limit, 1),
            "budget_s": self.budget_s, "elapsed_s": round(self.elapsed_s, 1), "tokens_per_burst": self.tokens,
            "rounds": len(self.rounds), "decided": d.decided, "leader": d.leader, "choice": d.choice,
            "interval_level": round(LOOK_LEVEL, 4),
            "candidates": [
                {"name": c.name, "cpus": list(c.cpus), "threads": c.threads, "default": c.default,
                 "tok_s": [r[c.name] for r in self.rounds], "median_tok_s": round(self.median(c.name), 2),
                 "of_limit": round(self.median(c.name) / self.limit, 3)}
                for c in self.cands
            ],
            "comparisons": [{"candidate": k.candidate, "versus": k.versus, **k.interval, "verdict": k.verdict}
                            for k in d.comparisons],
            "nice": self.nice.to_dict() if self.nice is not None else {"skipped": self.nice_skipped},
        }


def _inverse(interval: dict[str, Any]) -> str:
    """choice ÷ candidate from candidate ÷ choice: the figure a reason states ("1.69× [1.60–1.78] of X")."""
    ratio, low, high = interval["ratio"], interval["low"], interval["high"]
    if low is None or high is None:
        return f"{_reciprocal(ratio)}× of"
    return f"{_reciprocal(ratio)}× [{_reciprocal(high)}–{_reciprocal(low)}] of"


def _reciprocal(x: float) -> str:
    """1/x to 2 places; paired_ratio rounds to 3, so a candidate 2000× slower has ratio 0: "over 1000"."""
    return f"{1 / x:.2f}" if x > 0 else "over 1000"


def drop_in(r: Result) -> str:
    """The policy drop-in recording `r`: comments a person reads, a [calibration] table `plan` reads."""
    c = r.chosen()
    lines = [
        "# Written by autoglm-tune calibrate; `plan` uses it while the CPU topology and the model file are unchanged.",
        f"# date      {r.date}   host {r.host}",
        f"# model     {r.model_path} ({r.model_bytes} bytes, mtime_ns {r.model_mtime_ns})",
        f"# CPU       {r.topology}",
        f"# memory    memcpy {r.memcpy_gbs:.2f} GB/s copied = {bandwidth_gbs(r.memcpy_gbs):.2f} GB/s read + written "
        f"→ limit {r.limit:.1f} tok/s with this model (÷ {_mib(r.model_bytes)} read per token)",
        f"# measured  {len(r.rounds)} interleaved rounds of {r.tokens}-token decode bursts (llama-bench -p 0), "
        f"{r.elapsed_s:.0f} s of a {r.budget_s} s budget",
        "#",
    ]
    w = max(len(cand.name) for cand in r.cands)
    lines.append(f"# {'candidate':<{w}}  {'CPUs':<10} {'threads':>7} {'median tok/s':>13} {'of limit':>9}  vs chosen")
    by_name = {k.candidate: k for k in r.decision.comparisons}
    for cand in r.cands:
        med = r.median(cand.name)
        k = by_name.get(cand.name)
        vs = f"{ratio_text(k.interval)} {k.verdict}" if k else "chosen"
        lines.append(f"# {cand.name:<{w}}  {cpu_ranges(cand.cpus):<10} "
                     f"{cand.threads:>7} {med:>13.1f} {100 * med / r.limit:>8.0f} %  {vs}")
    lines += [
        "#",
        f"# chosen: {c.label()}, {'decided' if r.decision.decided else 'undecided at the end of the budget'}",
        "#",
        *_nice_lines(r),
        "",
    ]
    table = [
        "[calibration]",
        f"cpus = [{', '.join(map(str, c.cpus))}]",
        f"threads = {c.threads}",
        *([f"nice = {r.nice.chosen().nice}", f"nice_reason = {_toml_string(r.nice.reason(r.date, r.model_path))}"]
          if r.nice is not None else []),
        f"host = {_toml_string(r.host)}",
        f"model_path = {_toml_string(r.model_path)}",
        f"model_bytes = {r.model_bytes}",
        f"model_mtime_ns = {r.model_mtime_ns}",
        f"topology = {_toml_string(r.topology)}",
        f"date = {_toml_string(r.date)}",
        f"reason = {_toml_string(r.reason())}",
    ]
    return "\n".join([*map(_comment, lines), *table]) + "\n"


def _nice_lines(r: Result) -> list[str]:
    """The drop-in's comment lines on the nice comparison, or on why it was skipped."""
    n = r.nice
    if n is None:
        return [f"# nice      comparison skipped: {r.nice_skipped}"]
    w = max(len(cand.name) for cand in n.cands)
    lines = [f"# nice      the chosen CPUs under a light background load ({LOAD_TEXT}, pinned to the CPUs "
             f"calibrate may use; it took {n.load_cpu_s:.1f} CPU s), {len(n.rounds)} interleaved rounds:",
             f"# {'candidate':<{w}}  {'median tok/s':>13}  vs chosen"]
    by_name = {k.candidate: k for k in n.decision.comparisons}
    for cand in n.cands:
        k = by_name.get(cand.name)
        lines.append(f"# {cand.name:<{w}}  {n.median(cand.name):>13.1f}  "
                     + (f"{ratio_text(k.interval)} {k.verdict}" if k else "chosen"))
    chosen = n.chosen()
    how = "decided" if n.decision.decided else "undecided at the end of the budget"
    return [*lines, f"# nice chosen: {chosen.nice}, {how}: {n.why()}"]


def _comment(line: str) -> str:
    """A comment line with the control characters TOML forbids there (a file name may hold them) shown as ?."""
    return "".join(ch if ch == "\t" or (ch >= " " and ch != "\x7f") else "?" for ch in line)


def _toml_string(s: str) -> str:
    """A TOML basic string: JSON's escapes are TOML's, but TOML wants characters raw (no surrogate pairs) and DEL
    escaped."""
    return json.dumps(s, ensure_ascii=False).replace("\x7f", "\\u007f")


def stale_because(cal: Mapping[str, Any], found: ModelStamp, cpu: CpuFacts, model_path: str) -> str | None:
    """Why a [calibration] no longer describes this machine and model, or None while it does.
    `model_path`: the policy's [model] model_path ("" when unset)."""
    if cal["topology"] != topology(cpu):
        return f"the CPU topology differs (calibrated: {cal['topology']}; now: {topology(cpu)})"
    if model_path and os.path.normpath(model_path) != os.path.normpath(cal["model_path"]):
        return f"the policy's model is {model_path}, the calibration measured {cal['model_path']}"
    if found.size is None:
        return f"the model file {cal['model_path']} is gone"
    if (found.size, found.mtime_ns) != (cal["model_bytes"], cal["model_mtime_ns"]):
        return (f"the model file {cal['model_path']} changed ({found.size} bytes, mtime_ns {found.mtime_ns}; "
                f"calibrated: {cal['model_bytes']} bytes, mtime_ns {cal['model_mtime_ns']})")
    return None


def calibration_facts(cal: Calibration, cpu: CpuFacts, model_path: str) -> CalibrationFacts:
    """The policy's calibration as `facts --json` reports it, stale or not on this machine (`model_path`: the
    policy's [model] model_path)."""
    v = cal.values
    why = stale_because(v, cal.found, cpu, model_path)
    return CalibrationFacts(
        source=cal.source, date=v["date"], host=v["host"], model_path=v["model_path"], model_bytes=v["model_bytes"],
        model_mtime_ns=v["model_mtime_ns"], topology=v["topology"], cpus=list(v["cpus"]), threads=v["threads"],
        nice=v.get("nice"), reason=v["reason"], nice_reason=v.get("nice_reason"), stale=why is not None,
        stale_because=why,
    )
