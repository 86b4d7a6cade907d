#!/usr/bin/env python3
"""Whole-process wall time of `autoglm-tune plan --facts DIR --json` on a generated fleet of N hosts.

Writes N facts files of varied shapes (bench/fleet_facts.py), runs the plan R times after one warm-up run,
and prints one JSON object: the median and a distribution-free 95 % interval of the median (order
statistics of the binomial(R, 1/2)), and the per-host median. Run it where nothing else competes for the CPUs.

Usage: python3 bench/plan_fleet.py [--hosts 1000] [--runs 11] [--cli PATH] [--machine TEXT]
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
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_facts import write_fleet


def median_interval(values: list[float]) -> tuple[float, float]:
    """The 95 % interval of the median: the order statistics k and n-1-k with P(Binomial(n, 1/2) < k) ≤ 2.5 %."""
    n, ordered = len(values), sorted(values)
    k, below = 0, 0.0
    while below + math.comb(n, k) / 2**n <= 0.025:
        below += math.comb(n, k) / 2**n
        k += 1
    k = max(k - 1, 0)
    return ordered[k], ordered[n - 1 - k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hosts", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=11)
    default_cli = shutil.which("autoglm-tune", path=str(Path(sys.executable).parent)) or "autoglm-tune"
    parser.add_argument("--cli", default=default_cli)
    parser.add_argument("--machine", default="", help="What else ran on the machine meanwhile.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder, etc = Path(tmp) / "fleet", Path(tmp) / "etc"
        etc.mkdir()
        shapes = write_fleet(args.hosts, folder)
        env = {**os.environ, "AUTOGLM_TUNE_ETC": str(etc)}  # the built-in default policy only
        argv = [args.cli, "plan", "--facts", str(folder), "--json"]
        subprocess.run(argv, capture_output=True, env=env, check=True)  # warm the page cache once
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run(argv, capture_output=True, env=env, check=True)
            times.append(time.perf_counter() - start)
    low, high = median_interval(times)
    median = statistics.median(times)
    result = {
        "what": "autoglm-tune plan --facts DIR --json, whole process, built-in default policy",
        "machine": f"{platform.node()} {platform.machine()} {platform.release()}, {os.cpu_count()} CPUs"
        + (f"; {args.machine}" if args.machine else ""),
        "python": platform.python_version(),
        "hosts": args.hosts,
        "shapes": shapes,
        "runs": args.runs,
        "median_s": round(median, 3),
        "ci95_s": [round(low, 3), round(high, 3)],
        "per_host_ms": round(median / args.hosts * 1000, 2),
        "runs_s": [round(t, 3) for t in times],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
