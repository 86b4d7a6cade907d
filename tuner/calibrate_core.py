"""`autoglm-tune calibrate`'s pure core: the candidate CPU sets a machine's topology offers, the decision rule
over interleaved rounds, the memory-bandwidth limit, the policy drop-in that records the choice, and whether
such a record still describes the machine and model it was measured on. No I/O here.

Decision rule: every round runs each candidate once (the order rotated round by round, so drift hits all
alike). A comparison is the paired ratio candidate ÷ leader over the rounds (bench.stats.paired_ratio, a 95 %
t-interval of the log-ratio): decided when its interval excludes 1 (the candidate is slower) or lies inside
±EQUIVALENT (as fast, for any practical purpose). The leader has the highest geometric-mean speed. When all
comparisons are decided, or the budget is spent, the choice is the simplest of the leader and every candidate
not shown slower: a tie keeps the simpler choice.
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
from .facts import CpuFacts
from .policy import ModelStamp
from .procsettings import cpu_ranges

PHYSICAL = "physical cores"
P_ONLY = "P-cores only"
ALL = "all logical CPUs"
MINUS_ONE = "physical cores minus one"
DEFAULT = "the plan's default"

MIN_ROUNDS = 3  # a t-interval from 2 pairs is 12.7 standard errors wide: nothing is decided before 3
EQUIVALENT = 0.03  # within ±3 % two candidates are as fast as each other: the simpler one is kept
BURST_S = 1.0  # the decode time one burst aims at
MIN_TOKENS, MAX_TOKENS = 8, 512
MIN_BURST_S = 0.5  # the least one burst (load + decode) takes: what a budget must allow per burst
PROBE_S = 3.0  # the memcpy probe and the warm-up burst


@dataclass(frozen=True)
class Candidate:
    """A CPU set to measure, with threads = its size. `default`: the plan's own choice without a calibration."""

    name: str
    cpus: tuple[int, ...]
    default: bool = False

    @property
    def threads(self) -> int:
        return len(self.cpus)

    def label(self) -> str:
        return f"{self.name} (CPUs {cpu_ranges(self.cpus)}, {self.threads} thread{'s' * (self.threads != 1)})"


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
    interval = paired_ratio([(r[a], r[b]) for r in rounds])
    return Comparison(a, b, interval, verdict(interval))


@dataclass(frozen=True)
class Decision:
    leader: str
    choice: str
    decided: bool  # every comparison with the leader decided, after at least MIN_ROUNDS rounds
    comparisons: list[Comparison] = field(default_factory=list)  # each other candidate ÷ the choice


def decide(cands: Sequence[Candidate], rounds: Sequence[Mapping[str, float]]) -> Decision:
    """The leader, whether every comparison with it is decided, and the choice (`cands` simplest first;
    `rounds`: each a complete round, candidate name → tok/s)."""
    if not rounds:
        raise ValueError("decide: no rounds measured")
    speed = {c.name: geomean([r[c.name] for r in rounds]) for c in cands}
    leader = max(cands, key=lambda c: speed[c.name]).name  # max() keeps the first, i.e. simplest, of equals
    versus_leader = {c.name: compare(rounds, c.name, leader) for c in cands if c.name != leader}
    decided = len(rounds) >= MIN_ROUNDS and all(v.verdict != "undecided" for v in versus_leader.values())
    tied = [c for c in cands if c.name == leader or versus_leader[c.name].verdict != "slower"]
    choice = tied[0].name
    return Decision(leader, choice, decided, [compare(rounds, c.name, choice) for c in cands if c.name != choice])


def burst_tokens(tok_s: float, context_length: int | None) -> int:
    """Tokens per burst: about BURST_S of decoding at the warm-up speed, within MIN_TOKENS–MAX_TOKENS and the
    model's context."""
    n = max(MIN_TOKENS, min(MAX_TOKENS, round(BURST_S * tok_s)))
    return min(n, context_length - 1) if context_length and context_length > MIN_TOKENS else n


def minimum_budget_s(n_candidates: int) -> int:
    """The least budget that can measure MIN_ROUNDS rounds of `n_candidates` short bursts."""
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
            "candidates": [
                {"name": c.name, "cpus": list(c.cpus), "threads": c.threads, "default": c.default,
                 "tok_s": [r[c.name] for r in self.rounds], "median_tok_s": round(self.median(c.name), 2),
                 "of_limit": round(self.median(c.name) / self.limit, 3)}
                for c in self.cands
            ],
            "comparisons": [{"candidate": k.candidate, "versus": k.versus, **k.interval, "verdict": k.verdict}
                            for k in d.comparisons],
        }


def _inverse(interval: dict[str, Any]) -> str:
    """choice ÷ candidate from candidate ÷ choice: the figure a reason states ("1.69× [1.60–1.78] of X")."""
    ratio, low, high = interval["ratio"], interval["low"], interval["high"]
    if low is None or high is None:
        return f"{1 / ratio:.2f}× of"
    return f"{1 / ratio:.2f}× [{1 / high:.2f}–{1 / low:.2f}] of"


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
        "",
    ]
    table = [
        "[calibration]",
        f"cpus = [{', '.join(map(str, c.cpus))}]",
        f"threads = {c.threads}",
        f"model_path = {_toml_string(r.model_path)}",
        f"model_bytes = {r.model_bytes}",
        f"model_mtime_ns = {r.model_mtime_ns}",
        f"topology = {_toml_string(r.topology)}",
        f"date = {_toml_string(r.date)}",
        f"reason = {_toml_string(r.reason())}",
    ]
    return "\n".join([*map(_comment, lines), *table]) + "\n"


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
