#!/usr/bin/env python3
"""Whole-process wall time of `autoglm-tune diff` (and `--help`) on this machine: median of N runs.

Then the start-up ratio: `diff` and a bare `python -c pass` run alternately, round by round, and the
geometric mean of the per-round ratios is given with its 95 % t-interval on the log scale.

Usage: python3 bench/diff_walltime.py [--runs 21] [--cli PATH] [--machine TEXT]
Prints one JSON object; the figures in README.md come from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def measure(argv: list[str], runs: int) -> dict[str, float]:
    times = []
    subprocess.run(argv, capture_output=True)  # warm the page cache once
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True)
        times.append(time.perf_counter() - start)
        if proc.returncode not in (0, 1):
            sys.exit(f"{' '.join(argv)} failed: {proc.stderr.decode()}")
    return {
        "median_ms": round(statistics.median(times) * 1000, 1),
        "min_ms": round(min(times) * 1000, 1),
        "max_ms": round(max(times) * 1000, 1),
    }


# Student t, two-sided 95 %, by degrees of freedom (the rounds are at least 10)
T975 = {9: 2.262, 10: 2.228, 14: 2.145, 19: 2.093, 20: 2.086, 24: 2.064, 29: 2.045, 30: 2.042, 40: 2.021}


def paired_ratio(a: list[str], b: list[str], rounds: int) -> dict[str, float | int]:
    """a's wall time over b's, a and b run one after the other in each round."""
    logs = []
    for _ in range(rounds):
        t = []
        for argv in (a, b):
            start = time.perf_counter()
            subprocess.run(argv, capture_output=True)
            t.append(time.perf_counter() - start)
        logs.append(math.log(t[0] / t[1]))
    mean = statistics.fmean(logs)
    df = rounds - 1
    half = T975[max(k for k in T975 if k <= df)] * statistics.stdev(logs) / math.sqrt(rounds)
    return {"rounds": rounds, "ratio": round(math.exp(mean), 2), "ci95": [round(math.exp(mean - half), 2),
            round(math.exp(mean + half), 2)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=21)
    default_cli = shutil.which("autoglm-tune", path=str(Path(sys.executable).parent)) or "autoglm-tune"
    parser.add_argument("--cli", default=default_cli)
    parser.add_argument("--machine", default="", help="What else ran on the machine meanwhile.")
    args = parser.parse_args()
    if args.runs < 10:
        sys.exit("--runs: at least 10")
    result = {
        "machine": f"{platform.node()} {platform.machine()} {platform.release()}, {os.cpu_count()} CPUs"
        + (f"; {args.machine}" if args.machine else ""),
        "python": platform.python_version(),
        "runs": args.runs,
        "diff": measure([args.cli, "diff"], args.runs),
        "diff --json": measure([args.cli, "diff", "--json"], args.runs),
        "python -c pass (floor)": measure([sys.executable, "-c", "pass"], args.runs),
        "diff / python -c pass (paired)": paired_ratio([args.cli, "diff"], [sys.executable, "-c", "pass"], args.runs),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
