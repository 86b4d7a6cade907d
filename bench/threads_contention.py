#!/usr/bin/env python3
"""The evidence for rules.reserve_cores, measured: decode speed with threads = all CPUs against threads = all but
one (pinned to the rest), with and without one busy loop at nice 0 beside it, in interleaved rounds.

- Without the busy loop the ratio says what reserving a core costs when nothing else runs (the ≤ 2-core rule).
- With it, what running the threads on the free CPUs only buys under contention (the ≥ 3-core rule, measured
  here on as many CPUs as the machine has). The busy loop's own progress (loops per second) is recorded too.
- A fifth condition runs all CPUs beside the busy loop at the plan's nice -10 (needs root): whether the plan's
  nice already does what the reserved core would. Nice weighs only inside one autogroup (one session, with
  kernel.sched_autogroup_enabled): the bursts run in this script's session, as the busy loop does.

Each burst is calibrate's own (`tuner/calibrate.py` burst: llama-bench, -p 0, pinned, at its condition's nice);
the five conditions run in a rotated order per round. As root (the fifth lowers nice), on a quiet machine.

Usage: /opt/autoglm-venv/bin/python bench/threads_contention.py --model GGUF [--rounds 6] [--tokens 32]
Prints one JSON object: per-condition tok/s, the busy loop's loops/s, and paired ratios with 95 % t-intervals.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

from autoglm_tune import calibrate
from autoglm_tune.bench.stats import paired_ratio
from autoglm_tune.calibrate_core import Candidate

HOG = """
import signal, sys, time
n = 0
start = time.monotonic()
def stop(*_):
    print(n / (time.monotonic() - start), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    n += 1
"""


def burst_beside_hog(bench_bin: Path, model: Path, cand: Candidate, tokens: int, hog: bool) -> dict[str, float]:
    """One burst; with `hog`, a busy loop at nice 0, unpinned, runs from 1 s before it until it ends."""
    if not hog:
        return {"tok_s": calibrate.burst(bench_bin, model, cand, tokens, timeout_s=900)}
    loop = subprocess.Popen([sys.executable, "-S", "-c", HOG], stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: os.setpriority(os.PRIO_PROCESS, 0, 0))
    try:
        time.sleep(1)
        tok_s = calibrate.burst(bench_bin, model, cand, tokens, timeout_s=900)
    finally:
        loop.send_signal(signal.SIGTERM)
        out, _ = loop.communicate(timeout=30)
    return {"tok_s": tok_s, "hog_loops_s": float(out.strip())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--llama-bench", type=Path, default=None)
    args = ap.parse_args()
    bench_bin = calibrate.find_llama_bench(args.llama_bench, "llama-server")
    cpus = tuple(sorted(os.sched_getaffinity(0)))
    if len(cpus) < 2:
        sys.exit("needs at least 2 CPUs")
    every, rest = Candidate("all CPUs", cpus, nice=0), Candidate("all but the first", cpus[1:], nice=0)
    every_nice = Candidate("all CPUs at nice -10", cpus, nice=-10)
    conditions = [("alone, all CPUs", every, False), ("alone, all but one", rest, False),
                  ("busy loop, all CPUs", every, True), ("busy loop, all but one", rest, True),
                  ("busy loop, all CPUs, nice -10", every_nice, True)]
    runs: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in conditions}
    for r in range(args.rounds):
        for name, cand, hog in conditions[r % len(conditions):] + conditions[:r % len(conditions)]:
            runs[name].append(burst_beside_hog(bench_bin, args.model, cand, args.tokens, hog))
            print(f"round {r + 1}: {name} {runs[name][-1]}", file=sys.stderr, flush=True)

    def ratio(a: str, b: str, key: str = "tok_s") -> dict[str, object]:
        return paired_ratio([(x[key], y[key]) for x, y in zip(runs[a], runs[b], strict=True)])

    autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled")
    print(json.dumps({
        "sessions": ("each burst in a process group of its own in this script's session (calibrate._started), the "
                     "busy loop in this script's session too: one autogroup"),
        "sched_autogroup_enabled": autogroup.read_text().strip() if autogroup.exists() else None,
        "command": " ".join(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": list(cpus), "kernel": platform.release(), "cpu": platform.processor() or None},
        "llama_bench": str(bench_bin), "model": str(args.model), "model_bytes": args.model.stat().st_size,
        "tokens": args.tokens,
        "runs": runs,
        "median_tok_s": {name: round(statistics.median(x["tok_s"] for x in v), 3) for name, v in runs.items()},
        "ratios": {
            "alone: all but one ÷ all CPUs": ratio("alone, all but one", "alone, all CPUs"),
            "busy loop: all but one ÷ all CPUs": ratio("busy loop, all but one", "busy loop, all CPUs"),
            "busy loop's loops/s: beside all but one ÷ beside all CPUs":
                ratio("busy loop, all but one", "busy loop, all CPUs", "hog_loops_s"),
            "busy loop, all CPUs: nice -10 ÷ nice 0": ratio("busy loop, all CPUs, nice -10", "busy loop, all CPUs"),
            "busy loop: all CPUs at nice -10 ÷ all but one": ratio("busy loop, all CPUs, nice -10",
                                                                    "busy loop, all but one"),
            "busy loop's loops/s: beside all CPUs at nice -10 ÷ beside all but one":
                ratio("busy loop, all CPUs, nice -10", "busy loop, all but one", "hog_loops_s"),
        },
    }, indent=1))


if __name__ == "__main__":
    main()
