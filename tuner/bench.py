"""`autoglm-tune bench`: what tuning buys on this machine, measured with a real llama.cpp server.

Functional core (no I/O): the scenarios and configurations, the interleaved schedule of runs, the
desktop size per scenario, the per-token statistics of one run, the summary (medians, spread, ratios to
`limit` from the same round) and the markdown table.
Imperative shell: `Guard` records every setting before anything is touched and puts all of it back at
the end — also on Ctrl-C, SIGTERM or SIGHUP — and checks that it did; `Bench` reserves RAM, starts the
desktop, the CPU hog and the server, sets each configuration, measures and tears down.

Low-spec emulation (research kernel-and-platform.md §9): RAM is taken away from the whole kernel by a
hugetlb reservation (`vm.nr_hugepages`), so zswap's pool, the page cache and every process compete for
the same RAM as on a small box. On a cgroup v1 host each run's processes go into a fresh memory cgroup
(no limit) made after the configuration is set: v1 copies `vm.swappiness` into a cgroup when it is made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from autoglm_helper.contract import procfs

from . import bench_stats as stats
from .bench_stats import percentile
from .errors import BadInput, TuneError

MIB = 1 << 20
EMULATIONS = ("hugetlb", "cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")
HUGEPAGE_MIB = 2
WORKER = Path(__file__).with_name("bench_worker.py")
LLAMA_VENV = Path(os.environ.get("AUTOGLM_LLAMA_VENV", "/opt/autoglm-llama-venv"))
VOCAB = Path(os.environ.get("AUTOGLM_LLAMA_CACHE", "/opt/llama-build")) / "vocab" / "ggml-vocab-llama-spm.gguf"
CGROUP_V1_MEMORY = Path("/sys/fs/cgroup/memory")
PROMPT_WORDS = 96  # about 128 tokens with the Llama SPM vocabulary
EOS_TOKEN = 2
SERVER_READY_S = 600.0


class BenchError(TuneError):
    """A run could not be set up, or a setting could not be restored: exit 1."""


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# ---------------------------------------------------------------------------------------------------
# functional core


@dataclass(frozen=True)
class Scenario:
    name: str
    capped: bool  # RAM taken away to --ram-mib
    demand: float | None  # (model + desktop) / available RAM; None: sized by `desktop_mib`
    accesses: int  # desktop page accesses per 16 ms frame (0: no desktop)
    hog: bool  # a busy loop on one core
    measure: str  # "decode" (tok/s), "cold" (1 / time from start to first token), "prompt" (1 / TTFT)
    text: str
    idle_first: bool = False  # the model loaded and warmed, the desktop active for --idle-s, then the request


ACTIVE, IDLE = 64, 8  # desktop page accesses per frame: a user at work; a desktop left alone
SCENARIOS = {
    "heavy": Scenario("heavy", True, 1.25, ACTIVE, False, "decode",
                      "demand ≈ 125 % of available RAM, active desktop"),
    "mild": Scenario("mild", True, 1.10, ACTIVE, False, "decode", "demand ≈ 110 % of available RAM, active desktop"),
    "fits": Scenario("fits", True, None, IDLE, False, "decode",
                     "model + desktop/2 (lzo-rle ≈ 2:1) = 90 % of available RAM, idle desktop"),
    "cpu": Scenario("cpu", False, None, 0, True, "decode", "no memory pressure, a busy loop on one core"),
    "idle": Scenario("idle", True, 1.10, ACTIVE, False, "decode",
                     "mild's demand; the model loaded and warmed, the desktop active for --idle-s, then the request",
                     idle_first=True),
    "cold": Scenario("cold", True, 1.10, ACTIVE, False, "cold",
                     "mild's demand; page cache dropped, then the server started: time to the first token"),
    "prompt": Scenario("prompt", True, 1.10, ACTIVE, False, "prompt",
                       "mild's demand; a prompt of --prompt-tokens tokens: prompt processing (1 / TTFT)"),
}


@dataclass(frozen=True)
class Config:
    """One configuration: which kernel settings, how the server is started, and for the autoglm-tune family
    the policy overrides (merged over --policy) that make it an ablation."""

    name: str
    text: str
    settings: str = "none"  # "none", "recipe-literal", "recipe-512mb", "tuned", "plan"
    start: str = "plain"  # "plain" (the server's own defaults), "hand" (--prio 2, threads = cores), "nice" (nice -n
    # -10, threads = cores), "launch" (autoglm-tune launch)
    overrides: tuple[tuple[str, str, Any], ...] = ()  # (section, key, value) over the policy


CONFIG_LIST = (
    Config("limit", "no RAM cap, no desktop, no CPU hog, settings as found: the best this hardware does"),
    Config("untuned", "settings as found (kernel defaults on a fresh box), the server's own defaults"),
    Config("hand-tune", "untuned plus the one flag a llama-server user would try, --prio 2, and threads = physical "
           "cores; as root --prio 2 is nice -10 for the process and SCHED_FIFO 80 for the compute threads "
           "(ggml-cpu.c), for a user both are refused", start="hand"),
    Config("hand-nice", "untuned under `nice -n -10`, threads = physical cores: the hand-tune without real-time "
           "threads", start="nice"),
    Config("recipe-literal", "the blog's recipe as written: swappiness 20, vfs_cache_pressure 50, zswap on, "
           "max_pool_percent 536870912 (the kernel takes it as no limit)", settings="recipe-literal"),
    Config("recipe-512mb", "the blog's recipe as meant: its pool 512 MB (scaled to MemTotal)",
           settings="recipe-512mb"),
    Config("tuned", "TuneD's throughput-performance profile", settings="tuned"),
    Config("autoglm-tune", "the plan applied through the root helper, the model started by `autoglm-tune launch`",
           settings="plan", start="launch"),
    Config("no-nice", "autoglm-tune with [process] nice = 0", settings="plan", start="launch",
           overrides=(("process", "nice", 0),)),
    Config("no-resident", "autoglm-tune with [model] keep_resident = \"none\"", settings="plan", start="launch",
           overrides=(("model", "keep_resident", "none"),)),
    Config("kernel-only", "the plan's kernel settings only; the server started as untuned", settings="plan"),
    Config("zswap-on", "autoglm-tune with [zswap] enabled = true", settings="plan", start="launch",
           overrides=(("zswap", "enabled", True),)),
)
CONFIGS_BY_NAME = {c.name: c for c in CONFIG_LIST}
CONFIGS = tuple(CONFIGS_BY_NAME)
CONFIG_TEXT = {c.name: c.text for c in CONFIG_LIST}
RECIPE = {"vm.swappiness": "20", "vm.vfs_cache_pressure": "50", "zswap.enabled": "Y"}
RECIPE_LITERAL_POOL = "536870912"  # what the blog wrote into max_pool_percent
RECIPE_POOL_MIB = 512  # what it meant: 512 MB, 12.5 % of its 4 GiB box
SERVERS = ("llama-server", "llama-cpp-python")
HAND_NICE = -10
# The comparisons each scenario is judged by: (scenario, config, versus, lower bound the ratio must clear).
TARGETS = (
    ("heavy", "autoglm-tune", "untuned", 2.0),
    ("heavy", "autoglm-tune", "hand-tune", 1.3),
    ("mild", "autoglm-tune", "untuned", 0.95),
    ("fits", "autoglm-tune", "limit", 0.90),
    ("cold", "autoglm-tune", "untuned", 0.95),
    ("prompt", "autoglm-tune", "untuned", 0.95),
    ("idle", "autoglm-tune", "untuned", 0.95),
)
DESKTOP_TARGET = ("heavy", "autoglm-tune", "untuned", 0.5)  # the desktop keeps half its untuned progress


@dataclass(frozen=True)
class Options:
    scenarios: tuple[str, ...]
    configs: tuple[str, ...]
    rounds: int
    ram_mib: int
    emulate: str  # "hugetlb" (RAM taken from the whole kernel) or "cgroup" (a memory limit on the workload)
    desktop_mib: int | None
    tokens: int
    context: int
    threads: int | None
    server: str = "llama-server"
    mmap: bool = True  # the servers' default; --no-mmap is the named variant
    idle_s: int = 120
    prompt_tokens: int = 1536
    file_mib: int = 256  # the desktop's file cache
    run_timeout_s: int = 600  # a request that takes longer counts what arrived by then


@dataclass(frozen=True)
class RunKey:
    scenario: str
    round: int
    config: str


def parse_list(flag: str, value: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """"a,b" → ("a", "b"), each one of `allowed`; else BadInput naming the flag and the allowed values."""
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        what = f"unknown {', '.join(bad)}" if bad else "empty"
        raise BadInput(f"{flag} {value!r}: {what}; allowed: a comma-separated list of {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


def schedule(opts: Options) -> list[RunKey]:
    """Scenario by scenario; within a scenario round by round, every configuration once per round, the order
    rotated each round so that no configuration always runs first after the set-up (research test-env §11)."""
    runs = []
    for scenario in opts.scenarios:
        for r in range(opts.rounds):
            k = r % len(opts.configs)
            runs += [RunKey(scenario, r, c) for c in opts.configs[k:] + opts.configs[:k]]
    return runs


def desktop_mib(scenario: Scenario, available_mib: int, model_mib: int, override: int | None) -> int:
    """The desktop's size: demand × available − model; for `fits` the size at which model + desktop/2 fills
    90 % of what is available (it fits only once the desktop is compressed); none under CPU contention."""
    if override is not None:
        return override
    if scenario.demand is not None:
        return max(0, round(scenario.demand * available_mib) - model_mib)
    if scenario.capped:
        return max(0, 2 * (round(0.9 * available_mib) - model_mib))
    return 0


def scaled_pool_percent(percent: int, ram_mib: int, total_mib: int) -> int:
    """zswap's max_pool_percent is a share of MemTotal, which includes the hugetlb reservation: scale it so
    that the pool may take `percent` of the emulated RAM (research §9)."""
    return max(1, min(100, round(percent * ram_mib / total_mib)))


def policy_variant(base: dict[str, Any], config: Config) -> dict[str, Any]:
    """The policy a configuration of the autoglm-tune family plans and launches with: --policy's document with
    the configuration's overrides on top (a new document; `base` is not changed)."""
    doc = {section: dict(values) for section, values in base.items()}
    for section, key, value in config.overrides:
        doc.setdefault(section, {})[key] = value
    return doc


def token_stats(started: float, arrivals: list[float]) -> dict[str, Any]:
    """TTFT, generation rate and per-token gaps from the request start and each token's arrival time."""
    if not arrivals:
        return {"tokens": 0, "ttft_s": None, "tok_s": None, "p50_ms": None, "p99_ms": None, "gaps_ms": []}
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    span = arrivals[-1] - arrivals[0]
    return {
        "tokens": len(arrivals),
        "ttft_s": round(arrivals[0] - started, 4),
        "tok_s": round(len(gaps) / span, 3) if gaps and span > 0 else None,
        "p50_ms": round(percentile(gaps, 50), 2) if gaps else None,
        "p99_ms": round(percentile(gaps, 99), 2) if gaps else None,
        "gaps_ms": [round(g, 1) for g in gaps],
    }


def primary(scenario: Scenario, run: dict[str, Any]) -> float | None:
    """The one figure a scenario is judged by, higher is better: decode tok/s; for a cold start 1 / (time from
    the server's start to the first token); for prompt processing 1 / TTFT."""
    if scenario.measure == "decode":
        return run.get("tok_s")
    if run.get("ttft_s") is None:
        return None
    seconds = run["ttft_s"] + ((run.get("load_s") or 0.0) if scenario.measure == "cold" else 0.0)
    return round(1.0 / seconds, 6) if seconds > 0 else None


def failed(run: dict[str, Any]) -> str | None:
    """Why a run counts as failed (None: it did not): another process disturbed it, no figure, the model or the
    desktop OOM-killed."""
    if run.get("interfered"):
        return run["interfered"]
    if run.get("oom_kills"):
        return f"{run['oom_kills']} OOM kill(s)"
    if run.get("desktop_alive") is False:
        return "the desktop died"
    if run.get("value") is None:
        return run.get("error") or "no result"
    return None


def desktop_window(before: dict[str, Any], after: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The desktop's progress and frame times over a measurement: the difference of two counter snapshots."""
    hist = [a - b for a, b in zip(after["hist"], before["hist"], strict=True)]
    return {
        "ops_s": round((after["ops"] - before["ops"]) / seconds, 1) if seconds > 0 else None,
        "frames": after["frames"] - before["frames"],
        "frame_p99_ms": stats.histogram_percentile(hist, 99, 1.0),
        "hist": {str(i): c for i, c in enumerate(hist) if c},
        "alive": all(after["alive"]),
    }


def _spread(values: list[float]) -> dict[str, float | None]:
    import statistics

    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def _median(values: list[Any]) -> float | None:
    import statistics

    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def _paired(runs: list[dict[str, Any]], scenario: str, config: str, versus: str, key: str) -> dict[str, Any]:
    by_round: dict[tuple[int, str], float] = {}
    for r in runs:
        value = r.get(key) if key != "desktop_ops_s" else (r.get("desktop") or {}).get("ops_s")
        if r["scenario"] == scenario and value and not failed(r):
            by_round[(r["round"], r["config"])] = value
    pairs = [(v, by_round[(rnd, versus)]) for (rnd, c), v in by_round.items()
             if c == config and (rnd, versus) in by_round]
    return stats.paired_ratio(pairs)


COUNTERS = ("majflt", "model_swap_mib", "swap_used_mib", "zswap_stored_mib", "pswpin", "pswpout", "zswpin", "zswpout",
            "pgscan", "pgsteal", "allocstall", "psi_memory_full_ms", "psi_memory_some_ms", "psi_io_full_ms",
            "psi_cpu_some_ms", "desktop_thp_mib")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per scenario and configuration: the figure's median [min–max], paired per-round ratios with 95 %
    intervals to untuned, hand-tune and limit, failure, OOM and collapse rates with Wilson intervals, the
    pooled p99 token gap, the desktop's progress and frame p99, the counters' medians; then the targets."""
    rows = []
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        limit = {r["round"]: r["value"] for r in runs
                 if r["scenario"] == scenario and r["config"] == "limit" and r.get("value") and not failed(r)}
        for config in dict.fromkeys(r["config"] for r in runs if r["scenario"] == scenario):
            group = [r for r in runs if r["scenario"] == scenario and r["config"] == config]
            ok = [r for r in group if not failed(r)]
            gaps = [g for r in ok for g in r.get("gaps_ms", [])]
            hist: dict[int, int] = {}
            for r in ok:
                for b, c in ((r.get("desktop") or {}).get("hist") or {}).items():
                    hist[int(b)] = hist.get(int(b), 0) + c
            dense = [hist.get(i, 0) for i in range(max(hist, default=-1) + 1)]
            collapsed = sum(1 for r in ok if r["round"] in limit and r["value"] < 0.5 * limit[r["round"]])
            rows.append({
                "scenario": scenario,
                "config": config,
                "runs": len(group),
                "failed": {"count": len(group) - len(ok), "why": [failed(r) for r in group if failed(r)]},
                "failure_rate": stats.wilson(len(group) - len(ok), len(group)),
                "oom_rate": stats.wilson(sum(1 for r in group if r.get("oom_kills")), len(group)),
                "collapse_rate": stats.wilson(collapsed, len([r for r in ok if r["round"] in limit])),
                "value": _spread([r["value"] for r in ok]),
                "tok_s": _spread([r["tok_s"] for r in ok if r.get("tok_s")]),
                "vs": {v: _paired(runs, scenario, config, v, "value") for v in ("untuned", "hand-tune", "limit")
                       if v != config},
                "ttft_s": _median([r.get("ttft_s") for r in ok]),
                "load_s": _median([r.get("load_s") for r in ok]),
                "p99_gap_ms": round(stats.percentile(gaps, 99), 1) if gaps else None,
                "gaps": len(gaps),
                "desktop_ops_s": _median([(r.get("desktop") or {}).get("ops_s") for r in ok]),
                "desktop_vs_untuned": _paired(runs, scenario, config, "untuned", "desktop_ops_s")
                if config != "untuned" else None,
                "desktop_frame_p99_ms": stats.histogram_percentile(dense, 99, 1.0) if dense else None,
                "counters": {k: _median([(r.get("counters") or {}).get(k) for r in group]) for k in COUNTERS},
                "drifted": sum(1 for r in group if r.get("drifted")),
            })
    targets = []
    for scenario, config, versus, target in (*TARGETS, DESKTOP_TARGET):
        key = "desktop_ops_s" if (scenario, config, versus, target) == DESKTOP_TARGET else "value"
        if not any(r["scenario"] == scenario and r["config"] == config for r in runs):
            continue
        interval = _paired(runs, scenario, config, versus, key)
        targets.append({"scenario": scenario, "config": config, "versus": versus, "what": key, "target": target,
                        "interval": interval, "holds": stats.holds(interval, target)})
    return {"rows": rows, "targets": targets}


def cell(spread: dict[str, float | None], digits: int = 2) -> str:
    if spread["median"] is None:
        return "–"
    return f"{spread['median']:.{digits}f} [{spread['min']:.{digits}f}–{spread['max']:.{digits}f}]"


def interval_cell(interval: dict[str, Any] | None) -> str:
    if not interval or interval.get("ratio") is None:
        return "–"
    if interval.get("low") is None:
        return f"{interval['ratio']:.2f} (n={interval['n']})"
    return f"{interval['ratio']:.2f} [{interval['low']:.2f}–{interval['high']:.2f}]"


def rate_cell(rate: dict[str, Any]) -> str:
    if not rate["n"]:
        return "–"
    return f"{rate['k']}/{rate['n']} (≤ {rate['high']:.0%})" if rate["k"] == 0 else \
        f"{rate['k']}/{rate['n']} [{rate['low']:.0%}–{rate['high']:.0%}]"


def _num(value: float | None, digits: int = 0) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


UNITS = {"decode": "gen tok/s", "cold": "1 / s to first token", "prompt": "1 / TTFT s"}


def markdown(doc: dict[str, Any]) -> str:
    """The results section of docs/BENCHMARKS.md: machine and command, per scenario the configurations with
    their intervals, the desktop, the counters; then the targets, met or not."""
    m = doc["machine"]
    o = doc["options"]
    lines = ["## Results", ""]
    if doc["preliminary"]:
        lines += [f"**Preliminary, noisy:** {doc['preliminary']}. Do not draw conclusions from these figures.", ""]
    lines += [
        f"Produced {doc['time']} by `{doc['command']}`.",
        "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, {m['mem_total_mib']} MiB RAM, kernel {m['kernel']}, "
        f"cgroup memory controller {m['cgroup_memory']}. Model {doc['model']['name']} ({doc['model']['size_mib']} "
        f"MiB); server {o['server']} ({'mmap' if o['mmap'] else '--no-mmap'}), context {o['context']}, "
        f"{o['tokens']} tokens generated per request.",
        "",
        *[f"Beside the bench, DAMON ({d['operations']}) runs `{d['action']}` on regions not accessed for "
          f"{d['min_age_intervals']} intervals, up to {d['quota_bytes_per_s'] // MIB} MiB/s, filters: "
          f"{', '.join(d['filters']) or 'none'} (set up by the machine, not by the bench).\n"
          for d in m.get("damon", [])],
        "Emulated RAM: "
        + (EMULATION_TEXT[doc["emulation"]["how"]].format(**doc["emulation"]) if doc["emulation"] else "none"),
        "",
    ]
    for scenario in dict.fromkeys(r["scenario"] for r in doc["summary"]["rows"]):
        sc = SCENARIOS[scenario]
        lines += [
            f"### {scenario}: {sc.text}", "",
            f"| config | runs (failed) | {UNITS[sc.measure]} | ÷ untuned [95 %] | ÷ hand-tune [95 %] | ÷ limit [95 %] "
            "| p99 gap ms | desktop ops/s (÷ untuned) | frame p99 ms | OOM | collapse < 0.5× limit |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        digits = 2 if sc.measure == "decode" else 3
        for s in (r for r in doc["summary"]["rows"] if r["scenario"] == scenario):
            desk = "–" if s["desktop_ops_s"] is None else \
                f"{s['desktop_ops_s']:.0f} ({interval_cell(s['desktop_vs_untuned'])})"
            lines.append(
                f"| {s['config']} | {s['runs']} ({s['failed']['count']}) | {cell(s['value'], digits)} "
                f"| {interval_cell(s['vs'].get('untuned'))} | {interval_cell(s['vs'].get('hand-tune'))} "
                f"| {interval_cell(s['vs'].get('limit'))} | {_num(s['p99_gap_ms'])} | {desk} "
                f"| {_num(s['desktop_frame_p99_ms'])} | {rate_cell(s['oom_rate'])} | {rate_cell(s['collapse_rate'])} |"
            )
        lines += ["", "Counters (medians per run): " + "; ".join(
            f"**{s['config']}** " + ", ".join(f"{k} {_num(v)}" for k, v in s["counters"].items() if v)
            for s in doc["summary"]["rows"] if s["scenario"] == scenario), ""]
    lines += ["### Targets", "", "| scenario | comparison | target (lower bound) | ratio [95 %] | met |",
              "|---|---|---|---|---|"]
    for t in doc["summary"]["targets"]:
        met = {True: "yes", False: "**no**", None: "undecided (too few rounds)"}[t["holds"]]
        what = "desktop ops/s " if t["what"] == "desktop_ops_s" else ""
        lines.append(f"| {t['scenario']} | {what}{t['config']} ÷ {t['versus']} | ≥ {t['target']} "
                     f"| {interval_cell(t['interval'])} | {met} |")
    lines += ["", "Configurations:", ""]
    lines += [f"- **{c}**: {CONFIG_TEXT[c]}" for c in o["configs"]]
    lines += [f"- not run: {n}" for n in doc["notes"]]
    lines += [
        "",
        "Ratios are geometric means of per-round ratios (configurations run interleaved in rotating order within "
        "each round) with 95 % t-intervals on the log scale; a target is met only when the lower bound clears it. "
        "Rates carry Wilson 95 % intervals. A run with an OOM kill or a dead desktop is a failure and is not in the "
        "ratios. p99 gap pools every token gap of the configuration's runs.",
        "",
    ]
    return "\n".join(lines)


EMULATION_TEXT = {
    "hugetlb": "{ram_mib} MiB, the rest of RAM reserved as hugetlb pages ({available_mib} MiB available at the start)",
    "cgroup": "a {ram_mib} MiB memory cgroup limit on the workload (fallback: on cgroup v1 the zswap pool is not "
    "charged to the limit, which flatters zswap; the rest of the machine is not under pressure)",
}
BEGIN, END = "<!-- bench results: begin (written by autoglm-tune bench --docs) -->", "<!-- bench results: end -->"


def splice(existing: str | None, results: str) -> str:
    """The docs file with `results` between the markers; the hand-written text around them is kept. A file
    without the markers (or none) becomes the results alone, between markers."""
    block = f"{BEGIN}\n{results.rstrip()}\n{END}\n"
    if existing is None or BEGIN not in existing or END not in existing:
        return block
    head, rest = existing.split(BEGIN, 1)
    return head + block + rest.split(END, 1)[1].lstrip("\n")


# ---------------------------------------------------------------------------------------------------
# imperative shell: the machine


def _read(path: str | Path) -> str:
    return Path(path).read_text().strip()


def _write(path: str | Path, value: str) -> None:
    Path(path).write_text(value)


def meminfo() -> dict[str, int]:
    """/proc/meminfo in KiB (HugePages_* are counts)."""
    return procfs.parse_meminfo(Path("/proc/meminfo").read_text())


def vmstat(key: str) -> int:
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name == key:
            return int(value)
    return 0


def setting_paths() -> dict[str, str]:
    """Every setting a bench configuration may change (the helper's catalogue, hugetlb, and what TuneD's
    throughput-performance profile writes) → its file, for those this kernel has."""
    from autoglm_helper.contract import catalogue

    paths = {name: f"/{knob.path}" for name, knob in catalogue.SCALAR_KNOBS.items()}
    paths |= {
        "vm.nr_hugepages": "/proc/sys/vm/nr_hugepages",
        "vm.min_free_kbytes": "/proc/sys/vm/min_free_kbytes",  # the emulated box's watermarks
        "vm.watermark_scale_factor": "/proc/sys/vm/watermark_scale_factor",
        "vm.dirty_ratio": "/proc/sys/vm/dirty_ratio",
        "vm.dirty_background_ratio": "/proc/sys/vm/dirty_background_ratio",
        "thp.enabled": "/sys/kernel/mm/transparent_hugepage/enabled",
        "thp.defrag": "/sys/kernel/mm/transparent_hugepage/defrag",
    }
    return {name: p for name, p in paths.items() if os.path.exists(p)}


def _selected(text: str) -> str:
    """ "always [madvise] never" → "madvise"; other values unchanged."""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return text


def read_settings(paths: dict[str, str]) -> dict[str, str]:
    return {name: _selected(_read(p)) for name, p in paths.items()}


def read_swaps() -> dict[str, int]:
    """Active swap areas (as /proc/swaps shows them) → priority."""
    return {a.shown: a.priority for a in procfs.parse_swaps(Path("/proc/swaps").read_text())}


class Guard:
    """Records every setting first; `restore` stops what the bench started, rolls back its helper transactions,
    removes its swap file and cgroups and writes back every setting it touched — compare-and-set: a value
    another process wrote since is left alone and noted — and returns what is still not back (empty: all
    restored). Signals raise Interrupted, so that the code unwinds through its finally blocks; from the first
    signal on, further ones are ignored."""

    def __init__(self) -> None:
        self.paths = setting_paths()
        self.settings = read_settings(self.paths)
        self.swaps = read_swaps()
        self.procs: list[subprocess.Popen[Any]] = []
        self.cgroups: list[Path] = []
        self.files: list[Path] = []
        self.txids: list[str] = []
        self.touched: set[str] = set()  # settings the bench (or what it ran) may have changed
        self.expected: dict[str, str] = {}  # what the bench (or the helper for it) wrote there
        self.foreign: dict[str, str] = {}  # touched settings another process changed since: left alone
        self.notes: list[str] = []
        self.previous: dict[int, Any] = {}  # read by _raise, which may run while the next line runs
        self.previous = {s: signal.signal(s, self._raise) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def _raise(self, signum: int, _frame: object) -> None:
        for s in self.previous:  # one signal is enough: the rest of the way is clean-up
            signal.signal(s, signal.SIG_IGN)
        raise Interrupted(signum)

    def set(self, name: str, value: str) -> None:
        self.touched.add(name)
        self.expected[name] = value
        _write(self.paths[name], value)

    def applied(self, changes: list[dict[str, Any]]) -> None:
        """Settings the helper wrote for the bench (its report's subject and read-back value)."""
        for c in changes:
            if c["subject"] in self.paths:
                self.touched.add(c["subject"])
                new = c["new"]
                self.expected[c["subject"]] = ("Y" if new else "N") if isinstance(new, bool) else str(new)

    def start(self, argv: list[str], cgroup: Path | None, **kwargs: Any) -> subprocess.Popen[Any]:
        """A child in its own process group (killed as a group), in `cgroup` before it allocates anything."""
        procs_file = str(cgroup / "cgroup.procs") if cgroup else None

        def enter() -> None:
            if procs_file:
                with open(procs_file, "w") as fh:
                    fh.write("0")

        proc = subprocess.Popen(argv, process_group=0, preexec_fn=enter, **kwargs)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace: float = 15.0) -> None:
        from .launch import stop_group

        stop_group(proc, grace)
        if proc in self.procs:
            self.procs.remove(proc)

    def adopt_live(self) -> None:
        """The live values are what the bench wrote: after a tuner the bench started (TuneD) has stopped, its
        writes are the bench's to undo, not another process's to leave alone."""
        self.expected.update(read_settings(self.paths))

    def rollback(self, txid: str) -> None:
        """Through the helper; when it refuses (another process changed a value since: drift), the settings are
        put back knob by knob by `reset_settings`, which leaves the other process's values alone."""
        from . import helper_client

        self.txids.remove(txid)
        try:
            helper_client.rollback(txid, False, False)
        except TuneError as exc:
            self.notes.append(f"helper rollback of {txid} refused ({exc}); restored knob by knob instead")

    def reset_settings(self) -> None:
        """Every touched setting back where it differs: hugetlb pages first (they free RAM for the rest), zswap
        off last. Settings the bench did not touch are left alone: others may change them on a shared machine."""
        for name in sorted(self.touched, key=lambda n: (n != "vm.nr_hugepages", n == "zswap.enabled")):
            with contextlib.suppress(OSError):
                live = _selected(_read(self.paths[name]))
                if live == self.settings[name]:
                    continue
                if name in self.expected and live != self.expected[name]:
                    self.foreign[name] = live
                    continue
                _write(self.paths[name], self.settings[name])

    def remove_cgroup(self, cg: Path) -> None:
        """rmdir (children first: launch gives the model a memory cgroup of its own inside the run's), retried
        while the last task is still on its way out (EBUSY)."""
        for _ in range(50):
            try:
                for child in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                    child.rmdir()
                cg.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)
        if not cg.exists() and cg in self.cgroups:
            self.cgroups.remove(cg)

    def restore(self) -> list[str]:
        for s in self.previous:
            signal.signal(s, signal.SIG_IGN)
        problems = []
        for proc in list(self.procs):
            self.stop(proc, grace=10.0)
        for txid in list(self.txids):
            self.rollback(txid)
        for path in self.files:
            if str(path) in read_swaps():
                subprocess.run(["swapoff", str(path)], check=False, capture_output=True)
        # priorities the helper changed and could not roll back; areas others added or removed meanwhile are theirs
        for area, priority in self.swaps.items():
            if read_swaps().get(area, priority) != priority:
                subprocess.run(["swapoff", area], check=False, capture_output=True)
                prio = ["-p", str(priority)] if priority >= 0 else []
                subprocess.run(["swapon", *prio, area], check=False, capture_output=True)
        self.reset_settings()
        for path in self.files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for cg in list(self.cgroups):
            self.remove_cgroup(cg)
        now = read_settings(self.paths)
        was = self.settings
        problems += [
            f"{n} is {now[n]}, was {was[n]}" for n in sorted(self.touched) if now[n] != was[n] and n not in self.foreign
        ]
        self.notes += [
            f"{n} was changed by another process during the bench (to {v}); left alone" for n, v in self.foreign.items()
        ]
        swaps = read_swaps()
        problems += [f"swap area {a} has priority {swaps[a]}, had {p}" for a, p in self.swaps.items()
                     if swaps.get(a, p) != p]
        problems += [f"swap file {p} is still active" for p in self.files if str(p) in swaps]
        problems += [f"{p} is still there" for p in [*self.files, *self.cgroups] if p.exists()]
        problems += [f"process {p.pid} still runs" for p in self.procs if p.poll() is None]
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return problems


def memory_cgroup_of(pid: int) -> tuple[str | None, int | None]:
    """The process's cgroup v1 memory cgroup and that cgroup's swappiness (None on cgroup v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            knob = Path(f"/sys/fs/cgroup/memory{path.rstrip('/')}/memory.swappiness")
            return path, int(knob.read_text()) if knob.exists() else None
    return None, None


def physical_cores() -> int:
    """What llama.cpp's default -t would be: distinct thread_siblings masks (research §4.1)."""
    cpus = sorted(os.sched_getaffinity(0))
    siblings = set()
    for c in cpus:
        try:
            siblings.add(_read(f"/sys/devices/system/cpu/cpu{c}/topology/thread_siblings"))
        except OSError:
            siblings.add(str(c))
    return max(1, len(siblings))


DAMON_ADMIN = Path("/sys/kernel/mm/damon/admin/kdamonds")


def damon_schemes() -> list[dict[str, Any]]:
    """Proactive reclaim that runs beside the bench: DAMON schemes of kdamonds that are on (a VM host may set one
    up: the CI VM pages out cold unmapped page cache). Each as its action, access pattern and filters."""
    out = []
    for scheme in sorted(DAMON_ADMIN.glob("*/contexts/*/schemes/[0-9]*")):
        with contextlib.suppress(OSError, ValueError):
            if _read(scheme.parents[3] / "state") != "on":
                continue
            filters = [f"{'allow' if _read(f / 'allow') == 'Y' else 'reject'} {_read(f / 'type')}"
                       for f in sorted((scheme / "ops_filters").glob("[0-9]*"))]
            out.append({
                "operations": _read(scheme.parents[1] / "operations"),
                "action": _read(scheme / "action"),
                "min_age_intervals": int(_read(scheme / "access_pattern" / "age" / "min")),
                "max_accesses": int(_read(scheme / "access_pattern" / "nr_accesses" / "max")),
                "quota_bytes_per_s": int(_read(scheme / "quotas" / "bytes")),
                "filters": filters,
            })
    return out


def machine_info() -> dict[str, Any]:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        "unknown CPU",
    )
    cgroup = "v1" if (CGROUP_V1_MEMORY / "cgroup.procs").exists() else "v2"
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "mem_total_mib": meminfo()["MemTotal"] // 1024,
        "kernel": os.uname().release,
        "cgroup_memory": cgroup,
        "hostname": os.uname().nodename,
        "damon": damon_schemes(),
    }


# ---------------------------------------------------------------------------------------------------
# imperative shell: one run


def _post_stream(url: str, prompt: str, tokens: int, deadline_s: float) -> tuple[float, list[float], dict[str, Any]]:
    """Stream a greedy completion (EOS banned: always `tokens` tokens) through the OpenAI-style endpoint both
    servers have; the start, each token's arrival and the server's own timings when it sends them. Reading stops
    at `deadline_s`: a request that slow counts what had arrived by then."""
    import urllib.request

    body = {
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "logit_bias": {str(EOS_TOKEN): -100},
    }
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    arrivals = []
    extra: dict[str, Any] = {}
    started = time.monotonic()
    with opener.open(request, timeout=deadline_s) as response:
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            if "timings" in chunk:
                extra["server_timings"] = chunk["timings"]
            choices = chunk.get("choices") or [{}]
            if choices[0].get("finish_reason") is None and choices[0].get("text", "") != "":
                arrivals.append(time.monotonic())
            if time.monotonic() - started > deadline_s:
                extra["truncated"] = True
                break
    return started, arrivals, extra


def vm_counters() -> dict[str, int]:
    """The reclaim and swap counters that explain a result (/proc/vmstat), PSI totals in ms (/proc/pressure)."""
    wanted = {"pswpin", "pswpout", "zswpin", "zswpout", "oom_kill", "workingset_refault_anon",
              "workingset_refault_file"}
    out = dict.fromkeys(("pgscan", "pgsteal", "allocstall"), 0)
    for line in Path("/proc/vmstat").read_text().splitlines():
        name, value = line.split()
        if name in wanted:
            out[name] = int(value)
        for prefix in ("pgscan", "pgsteal", "allocstall"):
            if name.startswith(prefix + "_") and not name.startswith("pgscan_skip"):
                out[prefix] += int(value)
    for resource in ("memory", "io", "cpu"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/pressure/{resource}").read_text().splitlines():
                kind, *fields = line.split()
                total = dict(f.split("=") for f in fields)["total"]
                out[f"psi_{resource}_{kind}_ms"] = int(total) // 1000
    return out


def swap_latency(work: Path, mib: int = 64, samples: int = 200) -> dict[str, float]:
    """4 KiB random reads and synchronous writes with O_DIRECT on a scratch file in the swap file's directory:
    what a swap-in costs here (a virtio disk the host probably caches is far faster than a laptop's HDD)."""
    import mmap
    import random

    path = work / "latency.probe"
    with path.open("wb") as fh:
        fh.write(os.urandom(mib * MIB))
        fh.flush()
        os.fsync(fh.fileno())
    buf = mmap.mmap(-1, 4096)
    rng = random.Random(1)
    reads, writes = [], []
    fd = os.open(path, os.O_RDWR | os.O_DIRECT | os.O_DSYNC)
    try:
        for _ in range(samples):
            offset = rng.randrange(mib * MIB // 4096) * 4096
            t = time.perf_counter()
            os.preadv(fd, [buf], offset)
            reads.append((time.perf_counter() - t) * 1e6)
            t = time.perf_counter()
            os.pwritev(fd, [buf], offset)
            writes.append((time.perf_counter() - t) * 1e6)
    finally:
        os.close(fd)
        path.unlink()
    return {"read_p50_us": round(percentile(reads, 50), 1), "read_p99_us": round(percentile(reads, 99), 1),
            "write_p50_us": round(percentile(writes, 50), 1), "write_p99_us": round(percentile(writes, 99), 1)}


def zone_watermarks() -> dict[str, dict[str, int]]:
    """/proc/zoneinfo's min/low/high (pages) and managed pages per zone that has memory."""
    zones: dict[str, dict[str, int]] = {}
    name = None
    for line in Path("/proc/zoneinfo").read_text().splitlines():
        words = line.split()
        if line.startswith("Node"):
            name = f"{words[1].rstrip(',')}/{words[3]}"
        elif name and len(words) == 2 and words[0] in ("min", "low", "high", "managed"):
            zones.setdefault(name, {})[words[0]] = int(words[1])
    return {z: v for z, v in zones.items() if v.get("managed")}


def emulated_watermarks(ram_mib: int, total_mib: int, scale_factor: int) -> dict[str, str]:
    """min_free_kbytes and watermark_scale_factor for a box of `ram_mib`: the kernel sizes both from the
    zone's managed pages, which still include the hugetlb reservation (min_free_kbytes = √(16 × KiB of RAM),
    clamped to 128–262144; the low–high gap is scale_factor / 10000 of the zone)."""
    import math

    min_free = max(128, min(262144, math.isqrt(ram_mib * 1024 * 16)))
    return {"vm.min_free_kbytes": str(min_free),
            "vm.watermark_scale_factor": str(max(1, round(scale_factor * ram_mib / total_mib)))}


def memcpy_gbs(mib: int = 256, repeats: int = 3) -> float:
    """The calibration probe's memory bandwidth: the best of a few memcpys of `mib` MiB."""
    src = bytearray(os.urandom(1 << 20)) * mib
    dst = bytearray(len(src))
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        memoryview(dst)[:] = src
        best = min(best, time.perf_counter() - t)
    return round(len(src) / best / 1e9, 2)


def _healthy(url: str) -> bool:
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status == 200
    except (OSError, ValueError):  # URLError is an OSError
        return False


def _majflt(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[9])
    except (OSError, IndexError, ValueError):
        return None


def _proc_mib(pid: int, file: str, field: str) -> int | None:
    """A "Field:  N kB" line of /proc/PID/FILE in MiB; None when the process or the field is gone."""
    try:
        text = Path(f"/proc/{pid}/{file}").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) // 1024 for line in text.splitlines() if line.startswith(f"{field}:")), None)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Model:
    path: Path
    need_mib: int  # file + KV cache at the bench's context


class Bench:
    def __init__(self, guard: Guard, opts: Options, model: Model, work: Path, policy: Path | None,
                 server_bin: Path | None, probe_model: Path | None) -> None:
        self.g = guard
        self.opts = opts
        self.model = model
        self.work = work
        self.policy = policy
        self.server_bin = server_bin
        self.probe_model = probe_model
        from .launch import probe_flags

        self.flags = (probe_flags(str(server_bin)) if server_bin else None) or frozenset()
        self.python = LLAMA_VENV / "bin" / "python"
        self.total_mib = meminfo()["MemTotal"] // 1024
        self.count = 0
        self.base_policy: dict[str, Any] = {}
        if policy is not None:
            import tomllib

            with policy.open("rb") as fh:
                self.base_policy = tomllib.load(fh)
        text = "The quick brown fox jumps over the lazy dog near the river bank."
        self.prompt = " ".join(text.split()[i % 13] for i in range(PROMPT_WORDS))
        # about 4 words per 3 tokens with the Llama SPM vocabulary; the server's own count is recorded
        self.long_prompt = " ".join(text.split()[i % 13] for i in range(opts.prompt_tokens * 3 // 4))
        self.files = work / "desktop-files"
        if opts.file_mib:
            subprocess.run([str(self.python), str(WORKER), "files", str(self.files), str(opts.file_mib)], check=True)

    # -- scenario-wide parts --------------------------------------------------------------------

    def make_swap(self, size_mib: int) -> Path:
        """A swap file at the default (negative) priority, as a distribution installs it."""
        path = self.work / "bench.swap"
        self.g.files.append(path)
        for argv in (["fallocate", "-l", f"{size_mib}M", str(path)], ["mkswap", str(path)], ["swapon", str(path)]):
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"--work {self.work}: {' '.join(argv[:1])} failed ({done.stderr.strip()}); allowed: "
                                 "a directory on ext4 or xfs with room for the swap file")
            path.chmod(0o600)
        return path

    def drop_swap(self, path: Path) -> None:
        """swapoff (unless something else already did: a shared machine's test clean-up may) and delete."""
        if str(path) in read_swaps():
            done = subprocess.run(["swapoff", str(path)], capture_output=True, text=True)
            if done.returncode != 0:
                raise BenchError(f"swapoff {path} failed: {done.stderr.strip()}")
        path.unlink()
        self.g.files.remove(path)

    # -- per-run parts -----------------------------------------------------------------------------

    def reserve(self) -> int:
        """Take RAM away: MemTotal − hugetlb = --ram-mib, with the watermarks the emulated box would have.
        Returns the pages reserved; BenchError when the kernel could not find them all (fragmented or in use):
        the box would not be the one asked for."""
        want = max(0, (self.total_mib - self.opts.ram_mib) // HUGEPAGE_MIB)
        self.g.set("vm.nr_hugepages", str(want))
        got = int(_read("/proc/sys/vm/nr_hugepages"))
        if got < want * 0.98:
            raise BenchError(
                f"could reserve only {got} of {want} hugetlb pages (fragmented or in use): the emulated RAM would be "
                f"{self.total_mib - got * HUGEPAGE_MIB} MiB instead of {self.opts.ram_mib}"
            )
        scale = int(self.g.settings.get("vm.watermark_scale_factor", "10"))
        for name, value in emulated_watermarks(self.opts.ram_mib, self.total_mib, scale).items():
            if name in self.g.paths:
                self.g.set(name, value)
        return got

    def cgroup(self, limit_mib: int | None) -> Path | None:
        """A fresh memory cgroup for the run's processes: on v1 always (it copies the swappiness set just now),
        on v2 only for --emulate cgroup; with `limit_mib`, their memory limit (memory.limit_in_bytes on v1,
        memory.max on v2)."""
        self.count += 1
        name = f"autoglm-bench-{os.getpid()}-{self.count}"
        if (CGROUP_V1_MEMORY / "cgroup.procs").exists():
            path, limit_file = CGROUP_V1_MEMORY / name, "memory.limit_in_bytes"
        elif limit_mib is None:
            return None
        elif "memory" in _read(CGROUP_ROOT / "cgroup.subtree_control").split():
            path, limit_file = CGROUP_ROOT / name, "memory.max"
        else:
            raise BenchError("--emulate cgroup: no cgroup memory controller here; allowed: --emulate hugetlb")
        path.mkdir()
        self.g.cgroups.append(path)
        if limit_mib is not None:
            _write(path / limit_file, str(limit_mib * MIB))
        return path

    def desktop(self, mib: int, accesses: int, cg: Path | None) -> tuple[subprocess.Popen[str], list[int]]:
        files = str(self.files) if self.opts.file_mib else "-"
        proc = self.g.start(
            [str(self.python), str(WORKER), "desktop", str(mib), files, str(accesses)],
            cg, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        assert proc.stdout is not None
        words = proc.stdout.readline().split()
        if not words or words[0] != "ready":
            raise BenchError(f"the desktop ({mib} MiB) did not start (exit {proc.wait()})")
        return proc, [int(w) for w in words[1:]]

    @staticmethod
    def desktop_counters(proc: subprocess.Popen[str]) -> dict[str, Any] | None:
        """The desktop's counters now (SIGUSR1, one JSON line back); None when it has died."""
        if proc.poll() is not None:
            return None
        assert proc.stdout is not None
        proc.send_signal(signal.SIGUSR1)
        line = proc.stdout.readline()
        return json.loads(line) if line else None

    def server_argv(self, port: int, config: Config) -> list[str]:
        """The server as a user starts it: its own defaults (threads too) but for the port and the context, which
        every configuration shares; hand-tune adds the one flag and the thread count a user would try."""
        threads = self.opts.threads or (physical_cores() if config.start in ("hand", "nice") else None)
        wrap = ["nice", "-n", str(HAND_NICE)] if config.start == "nice" else []
        if self.opts.server == "llama-server":
            argv = [*wrap, str(self.server_bin), "--model", str(self.model.path), "--host", "127.0.0.1",
                    "--port", str(port), "--ctx-size", str(self.opts.context)]
            argv += ["--threads", str(threads), "--threads-batch", str(threads)] if threads else []
            argv += ["--prio", "2"] if config.start == "hand" else []  # llama.cpp's "high": nice -10
            if self.opts.mmap:
                return argv
            return argv + (["--load-mode", "none"] if "--load-mode" in self.flags else ["--no-mmap"])
        argv = [str(self.python), "-m", "llama_cpp.server", "--model", str(self.model.path), "--host", "127.0.0.1",
                "--port", str(port), "--n_ctx", str(self.opts.context)]
        argv += ["--n_threads", str(threads), "--n_threads_batch", str(threads)] if threads else []
        argv += [] if self.opts.mmap else ["--use_mmap", "false"]
        return (["nice", "-n", str(HAND_NICE)] if config.start in ("hand", "nice") else []) + argv

    def health_url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/" + ("health" if self.opts.server == "llama-server" else "v1/models")

    def wait_ready(self, proc: subprocess.Popen[Any], port: int, log: Path) -> None:
        deadline = time.monotonic() + SERVER_READY_S
        while not _healthy(self.health_url(port)):
            if proc.poll() is not None:
                raise BenchError(f"the server exited with {proc.returncode} while loading (see {log})")
            if time.monotonic() > deadline:
                raise BenchError(f"the server was not ready after {SERVER_READY_S:.0f} s (see {log})")
            time.sleep(0.1)

    def start_server(self, port: int, cg: Path | None, log: Path, config: Config) -> tuple[subprocess.Popen[Any], int]:
        env = dict(os.environ)
        if self.opts.threads or config.start in ("hand", "nice"):
            env["OMP_NUM_THREADS"] = str(self.opts.threads or physical_cores())
        with log.open("wb") as fh:
            proc = self.g.start(self.server_argv(port, config), cg, stdout=fh, stderr=subprocess.STDOUT, env=env)
        self.wait_ready(proc, port, log)
        return proc, proc.pid

    def policy_file(self, config: Config, port: int) -> Path:
        """--policy with the configuration's overrides and the bench's [model] section: what the plan and
        `autoglm-tune launch` read for this configuration."""
        import tomli_w

        doc = policy_variant(self.base_policy, config)
        server = {"preset": "llama-server", "program": str(self.server_bin)} if self.opts.server == "llama-server" \
            else {"preset": "llama-cpp-python", "program": str(self.python)}
        doc.setdefault("model", {}).update(
            {**server, "model_path": str(self.model.path), "context_size": self.opts.context, "host": "127.0.0.1",
             "port": port, "ready_timeout_s": int(SERVER_READY_S), "mmap": self.opts.mmap}
        )
        if self.opts.threads:
            doc.setdefault("process", {})["threads"] = self.opts.threads
        path = self.work / f"policy-{config.name}.toml"
        path.write_bytes(tomli_w.dumps(doc).encode())
        return path

    def launch(self, port: int, cg: Path | None, log: Path,
               config: Config) -> tuple[subprocess.Popen[Any], dict[str, Any]]:
        """`autoglm-tune launch` with the planned CPU set, threads and memory protection; its JSON "ready" line
        (with the server's pid). What it decided is read back from the process: nice, CPUs, VmLck, memcg."""
        argv = [sys.executable, "-m", "autoglm_tune", "launch", "--policy", str(self.policy_file(config, port)),
                "--json", "--log", str(log)]
        proc = self.g.start(argv, cg, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise BenchError(f"autoglm-tune launch exited {proc.wait()}: {proc.stderr.read() if proc.stderr else ''}")
        return proc, json.loads(line)

    def apply_plan(self, capped: bool, config: Config, port: int) -> str | None:
        """The plan for this machine — with its RAM as emulated — applied through the root helper."""
        from . import helper_client
        from .collect import collect_facts
        from .planner import make_plan
        from .policy import load_policy

        facts = collect_facts(Path("/"))
        if capped:
            memory = dataclasses.replace(facts.memory, total_kib=self.opts.ram_mib * 1024)
            facts = dataclasses.replace(facts, memory=memory)
        plan = make_plan(facts, load_policy(self.policy_file(config, port))).to_dict()
        # units: the helper cannot apply them yet; swap.file: the bench's own swap file stands in for it (a
        # plan wants one only when something else turned that off, and a refused rollback would leave it)
        changes = [c for c in plan["changes"] if c["knob"] not in ("unit", "swap.file")]
        for c in changes:
            if c["knob"] == "zswap.max_pool_percent" and capped:
                c["target"] = scaled_pool_percent(c["target"], self.opts.ram_mib, self.total_mib)
        if not changes:
            return None
        report = helper_client.apply({**plan, "changes": changes}, False, False)
        if report["result"] != "committed":
            return None
        self.g.applied(report["changes"])
        self.g.txids.append(report["txid"])
        return report["txid"]

    def set_recipe(self, capped: bool, literal: bool) -> None:
        # as meant: 512 MB of MemTotal (which on an emulated box includes the reservation)
        pool = RECIPE_LITERAL_POOL if literal else str(max(1, round(100 * RECIPE_POOL_MIB / self.total_mib)))
        self.g.set("zswap.max_pool_percent", pool)
        for name, value in RECIPE.items():
            self.g.set(name, value)

    def start_tuned(self, log: Path) -> subprocess.Popen[Any]:
        self.g.touched.update(self.g.paths)  # TuneD may write any of them; its own rollback is not relied on
        with log.open("wb") as fh:
            proc = self.g.start(["tuned", "--profile", "throughput-performance"], None, stdout=fh,
                                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while _read("/proc/sys/vm/dirty_ratio") != "40":  # throughput-performance's vm.dirty_ratio
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"TuneD did not apply throughput-performance (see {log})")
            time.sleep(0.5)
        return proc

    def probe(self) -> dict[str, Any]:
        """The calibration probe before a run: memory bandwidth, and a fixed tiny decode when llama-bench and the
        tiny model are here. A round whose probe drifts > 10 % from the bench's median is flagged."""
        out: dict[str, Any] = {"memcpy_gbs": memcpy_gbs()}
        bench_bin = self.server_bin.with_name("llama-bench") if self.server_bin else None
        if bench_bin and bench_bin.exists() and self.probe_model:
            done = subprocess.run([str(bench_bin), "-m", str(self.probe_model), "-p", "0", "-n", "32", "-r", "2",
                                   "-t", "1", "-o", "json"], capture_output=True, text=True, timeout=120)
            with contextlib.suppress(ValueError, KeyError, IndexError):
                out["tiny_tok_s"] = round(json.loads(done.stdout)[0]["avg_ts"], 1)
        return out

    def request(self, port: int, prompt: str, tokens: int) -> tuple[float, list[float], dict[str, Any]]:
        return _post_stream(f"http://127.0.0.1:{port}/v1/completions", prompt, tokens, self.opts.run_timeout_s)

    def run(self, key: RunKey, desktop_size: int) -> dict[str, Any]:
        """One measured run; every part it starts or sets is undone before it returns."""
        import http.client

        scenario = SCENARIOS[key.scenario]
        config = CONFIGS_BY_NAME[key.config]
        capped = scenario.capped and key.config != "limit"
        hog = scenario.hog and key.config != "limit"
        desktop_size = desktop_size if key.config != "limit" else 0
        result: dict[str, Any] = {**dataclasses.asdict(key), "value": None, "loadavg": os.getloadavg()[0]}
        started: list[subprocess.Popen[Any]] = []
        txid = None
        cg = None
        oom_before = vmstat("oom_kill")
        logs = self.work / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{key.scenario}-{key.round}-{key.config}.log"
        port = _free_port()
        try:
            result["probe"] = self.probe()
            if config.settings.startswith("recipe"):
                self.set_recipe(capped, config.settings == "recipe-literal")
            elif config.settings == "plan":
                txid = self.apply_plan(capped, config, port)
                result["txid"] = txid
            elif config.settings == "tuned":
                started.append(self.start_tuned(logs / f"tuned-{key.scenario}-{key.round}.log"))
            if capped and self.opts.emulate == "hugetlb":
                result["hugepages"] = self.reserve()
                result["watermarks"] = zone_watermarks()
            limit = self.opts.ram_mib if capped and self.opts.emulate == "cgroup" else None
            cg = self.cgroup(limit)
            if cg is not None and limit is not None:
                v1 = cg / "memory.limit_in_bytes"
                result["cgroup_limit_mib"] = int(_read(v1 if v1.exists() else cg / "memory.max")) // MIB
            desk, desk_pids = self.desktop(desktop_size, scenario.accesses, cg) if desktop_size else (None, [])
            started += [desk] if desk else []
            hog_proc = None
            if hog:
                hog_proc = self.g.start([sys.executable, str(WORKER), "hog"], cg, stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, text=True)
                started.append(hog_proc)
            if scenario.measure == "cold":
                os.sync()
                _write("/proc/sys/vm/drop_caches", "3")
            t0 = time.monotonic()
            if config.start == "launch":
                server, ready = self.launch(port, cg, log, config)  # its line comes once the server is ready
                pid = ready["pid"]
            else:
                server, pid = self.start_server(port, cg, log, config)
            started.append(server)
            result["load_s"] = round(time.monotonic() - t0, 2)
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            result["argv"] = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            result["os_threads"] = int(status["Threads"])  # all of its threads, HTTP ones included
            result["nice"] = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])
            result["cpus"] = status["Cpus_allowed_list"].strip()
            result["vm_locked_kib"] = int(status["VmLck"].split()[0])
            result["memory_cgroup"], result["memcg_swappiness"] = memory_cgroup_of(pid)
            result["settings"] = read_settings(self.g.paths)  # as they were while it ran
            if scenario.idle_first:  # loaded and warmed, then left while the desktop works; another prompt
                self.request(port, "Hello there.", 8)  # afterwards, so that the server's prompt cache cannot help
                time.sleep(self.opts.idle_s)
            prompt = self.long_prompt if scenario.measure == "prompt" else self.prompt
            tokens = 8 if scenario.measure in ("prompt", "cold") else self.opts.tokens
            flt, counters0 = _majflt(pid), vm_counters()
            desk0 = self.desktop_counters(desk) if desk else None
            hog0 = self.hog_loops(hog_proc)
            t_begin = time.monotonic()
            begin, arrivals, extra = self.request(port, prompt, tokens)
            window = time.monotonic() - t_begin
            desk1 = self.desktop_counters(desk) if desk else None
            hog1 = self.hog_loops(hog_proc)
            counters1, after = vm_counters(), _majflt(pid)
            result |= token_stats(begin, arrivals) | extra
            result["window_s"] = round(window, 2)
            counters = {k: counters1[k] - counters0.get(k, 0) for k in counters1 if k != "oom_kill"}
            counters["majflt"] = after - flt if after is not None and flt is not None else None
            counters["model_swap_mib"] = _proc_mib(pid, "status", "VmSwap")  # its own pages in swap
            mem = meminfo()
            counters["swap_used_mib"] = (mem["SwapTotal"] - mem["SwapFree"]) // 1024
            counters["zswap_stored_mib"] = mem.get("Zswapped", 0) // 1024
            counters["zswap_ratio"] = round(mem["Zswapped"] / mem["Zswap"], 2) if mem.get("Zswap") else None
            if desk_pids:
                thp = [_proc_mib(p, "smaps_rollup", "AnonHugePages") for p in desk_pids]
                counters["desktop_thp_mib"] = sum(v for v in thp if v is not None)
            result["counters"] = counters
            if hog0 is not None and hog1 is not None:
                result["hog_loops_s"] = round((hog1 - hog0) / window, 1)
            if desk0 and desk1:
                result["desktop"] = desktop_window(desk0, desk1, window)
            result["desktop_alive"] = (desk1 is not None and result["desktop"]["alive"]) if desk else None
            result["oom_kills"] = vmstat("oom_kill") - oom_before
            result["value"] = primary(scenario, result)
        except (TuneError, OSError, ValueError, KeyError, http.client.HTTPException,
                subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["oom_kills"] = vmstat("oom_kill") - oom_before
        finally:
            for proc in reversed(started):
                self.g.stop(proc)
            if key.config == "tuned":
                self.g.adopt_live()
            if txid is not None:
                self.g.rollback(txid)
            self.g.reset_settings()
            if cg is not None:
                self.g.remove_cgroup(cg)
        return result

    @staticmethod
    def hog_loops(proc: subprocess.Popen[str] | None) -> int | None:
        """The CPU hog's own progress: its loop count (SIGUSR1, one line back)."""
        if proc is None or proc.poll() is not None:
            return None
        assert proc.stdout is not None
        proc.send_signal(signal.SIGUSR1)
        line = proc.stdout.readline()
        return int(line) if line.strip() else None


# ---------------------------------------------------------------------------------------------------
# imperative shell: the whole bench


def progress(err: TextIO, done: int, total: int, label: str) -> None:
    width = 30
    filled = width * done // total
    bar = "#" * filled + "." * (width - filled)
    if err.isatty():
        err.write(f"\r\033[K[{bar}] {done}/{total} {label}")
        if done == total:
            err.write("\n")
    else:
        err.write(f"bench: [{bar}] {done}/{total} {label}\n")
    err.flush()


def prepare_model(model: Path | None, size: str, work: Path, context: int) -> Model:
    from . import gguf

    if model is None:
        model = work / "models" / f"llama-{size}-q4_0.gguf"
        if not model.exists():
            if not VOCAB.exists():
                raise BadInput(f"--model-size {size}: the tokenizer {VOCAB} is missing; allowed: run "
                               "tests/setup-llama.sh first, or --model PATH")
            model.parent.mkdir(parents=True, exist_ok=True)
            tmp = model.with_suffix(".tmp")
            subprocess.run([str(LLAMA_VENV / "bin" / "python"), str(WORKER), "model", size, str(VOCAB), str(tmp)],
                           check=True)
            tmp.rename(model)
    elif not model.is_file():
        raise BadInput(f"--model {model}: no such file; allowed: the path of a GGUF model file")
    shape = gguf.model_shape(gguf.read_metadata(model), f"--model {model}")
    need = model.stat().st_size + shape.kv_cache_bytes(context)
    return Model(model, need // MIB)


GUEST_CACHE = Path(os.environ.get("AUTOGLM_GUEST_CACHE", "/var/cache/autoglm-tune-test"))


def find_llama_server(given: Path | None) -> Path:
    """--server-bin, else `llama-server` on PATH, else the newest host build of tests/guest/build-llama-server.sh."""
    import shutil

    if given is not None:
        if not (given.is_file() and os.access(given, os.X_OK)):
            raise BadInput(f"--server-bin {given}: not an executable file; allowed: the path of llama-server")
        return given
    found = shutil.which("llama-server")
    if found:
        return Path(found)
    builds = sorted(GUEST_CACHE.glob("llama-server-host-*/llama-server"), key=lambda p: p.stat().st_mtime)
    if builds:
        return builds[-1]
    raise BadInput("--server llama-server: no llama-server found; allowed: --server-bin PATH, llama-server on PATH, "
                   "or build it with tests/guest/build-llama-server.sh host")


def check_options(opts: Options, total_mib: int, used_mib: int) -> None:
    if opts.rounds < 1:
        raise BadInput(f"--rounds {opts.rounds}: allowed: an integer ≥ 1")
    if opts.tokens < 2:
        raise BadInput(f"--tokens {opts.tokens}: allowed: an integer ≥ 2")
    if not 256 <= opts.context <= 1048576:
        raise BadInput(f"--context {opts.context}: allowed: an integer 256–1048576")
    if opts.threads is not None and opts.threads < 1:
        raise BadInput(f"--threads {opts.threads}: allowed: an integer ≥ 1")
    if opts.server not in SERVERS:
        raise BadInput(f"--server {opts.server!r}: allowed: {', '.join(SERVERS)}")
    for flag, value, low in (("--idle-s", opts.idle_s, 0), ("--prompt-tokens", opts.prompt_tokens, 16),
                             ("--file-mib", opts.file_mib, 0), ("--run-timeout-s", opts.run_timeout_s, 10)):
        if value < low:
            raise BadInput(f"{flag} {value}: allowed: an integer ≥ {low}")
    if opts.desktop_mib is not None and opts.desktop_mib < 0:
        raise BadInput(f"--desktop-mib {opts.desktop_mib}: allowed: an integer ≥ 0")
    if any(SCENARIOS[s].capped for s in opts.scenarios) and not used_mib + 256 <= opts.ram_mib <= total_mib:
        raise BadInput(
            f"--ram-mib {opts.ram_mib}: allowed: an integer {used_mib + 256}–{total_mib} (this machine's RAM; "
            f"{used_mib} MiB are in use now)"
        )


def mark_drift(runs: list[dict[str, Any]], tolerance: float = 0.10) -> None:
    """Flag each run whose calibration probe is more than `tolerance` from the bench's median probe: the host
    was faster or slower then, and the round's comparisons are less trustworthy (research test-env §11)."""
    import statistics

    for key in ("memcpy_gbs", "tiny_tok_s"):
        values = [r["probe"][key] for r in runs if (r.get("probe") or {}).get(key)]
        if len(values) < 3:
            continue
        median = statistics.median(values)
        for r in runs:
            value = (r.get("probe") or {}).get(key)
            if value and abs(value / median - 1) > tolerance:
                r["drifted"] = True


def bench(
    opts: Options, model: Model, work: Path, policy: Path | None, command: str, preliminary: str | None,
    notes: list[str], err: TextIO, server_bin: Path | None = None, probe_model: Path | None = None,
) -> tuple[dict[str, Any], list[str]]:
    """All runs; returns the results document and what could not be restored (empty when all was)."""
    mem = meminfo()
    in_use = (mem["MemTotal"] - mem["MemAvailable"]) // 1024
    available_mib = opts.ram_mib - (in_use if opts.emulate == "hugetlb" else 0)
    runs: list[dict[str, Any]] = []
    doc: dict[str, Any] = {
        "command": command,
        "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "preliminary": preliminary,
        "machine": machine_info(),
        "model": {"name": model.path.name, "path": str(model.path), "size_mib": model.path.stat().st_size // MIB,
                  "need_mib": model.need_mib},
        "options": dataclasses.asdict(opts),
        "emulation": {"how": opts.emulate, "ram_mib": opts.ram_mib, "available_mib": available_mib}
        if any(SCENARIOS[s].capped for s in opts.scenarios) else None,
        "server": str(server_bin) if server_bin else None,
        "zoneinfo": zone_watermarks(),
        "notes": notes,
        "runs": runs,
        "interrupted": None,
        "error": None,
    }
    guard = Guard()
    problems: list[str] = []
    try:
        b = Bench(guard, opts, model, work, policy, server_bin, probe_model)
        keys = schedule(opts)
        progress(err, 0, len(keys), "starting")
        doc["swap_latency"] = swap_latency(work)
        # one swap file for every scenario and configuration: the plan then finds disk swap and plans none
        swap = b.make_swap(max(1024, 2 * opts.ram_mib))
        for i, key in enumerate(keys):
            scenario = SCENARIOS[key.scenario]
            size = desktop_mib(scenario, available_mib, model.need_mib, opts.desktop_mib)
            if str(swap) not in read_swaps():  # another process's clean-up turned it off: the box lost its swap
                subprocess.run(["swapon", str(swap)], check=True, capture_output=True)
            result = b.run(key, size)
            result["desktop_mib"] = size
            if str(swap) not in read_swaps():
                result["interfered"] = "another process turned the bench's swap file off during the run"
            runs.append(result)
            why = failed(result)
            tok = f"{result['value']:.3g}" + (f" (failed: {why})" if why else "") if result.get("value") else \
                f"failed: {why}"
            progress(err, i + 1, len(keys), f"{key.scenario} round {key.round + 1} {key.config}: {tok}")
        b.drop_swap(swap)
    except Interrupted as exc:
        doc["interrupted"] = exc.signum
        err.write(f"\nbench: interrupted by {exc}; restoring every setting\n")
    except BenchError as exc:  # outside a run (the swap file): the runs so far are still written out
        doc["error"] = str(exc)
    finally:
        problems = guard.restore()
    mark_drift(runs)
    doc["summary"] = summarize(runs)
    doc["restored"] = {"settings": sorted(guard.touched), "swaps": guard.swaps, "problems": problems,
                       "notes": guard.notes}
    for note in guard.notes:
        err.write(f"bench: warning: {note}\n")
    return doc, problems


def write_outputs(doc: dict[str, Any], out: Path, docs: Path | None, err: TextIO) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = markdown(doc)
    (out / "BENCHMARKS.md").write_text(text)
    if docs is not None:
        docs.write_text(splice(docs.read_text() if docs.exists() else None, text))
    if not any(r.get("value") for r in doc["runs"]):
        return
    plot = subprocess.run(
        [str(LLAMA_VENV / "bin" / "python"), str(WORKER), "plot", str(out / "results.json"), str(out)],
        capture_output=True, text=True,
    )
    if plot.returncode != 0:
        tail = plot.stderr.strip().splitlines()[-1:] or ["no output"]
        err.write(f"bench: no plot ({tail[0]}); {LLAMA_VENV}/bin/pip install matplotlib adds it\n")
