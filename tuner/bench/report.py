"""The results of `autoglm-tune bench` (functional core, no I/O): the per-token statistics of one run, whether
it failed, the summary (medians, spread, paired ratios with intervals, rates, targets), the calibration drift
flags and the markdown table spliced into docs/BENCHMARKS.md."""

from __future__ import annotations

import itertools
from typing import Any

from . import stats
from .design import CONFIG_TEXT, DESKTOP_TARGET, MIB, SCENARIOS, TARGETS, Scenario
from .stats import percentile


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
