#!/usr/bin/env python3
"""What `autoglm-tune launch` itself costs on a cold page cache: the part of bench part 4b's load time that
precedes the server (Python, the CLI's imports, the facts and the plan), which `nice -n -10 llama-server`
does not pay.

Each round runs `autoglm-tune launch --dry-run --policy POLICY` twice, once right after `sync` and
`drop_caches` (cold) and once again at once (warm), the order of the two kinds alternating by round; then
`nice -n -10 /bin/true` cold, the hand-tune's own start. As root, on a quiet machine.

Usage: /opt/autoglm-venv/bin/python bench/cold_launch.py --policy FILE [--rounds 10] [--cli PATH]
Prints one JSON object (seconds per run, medians, the paired cold − warm difference with its 95 % t-interval).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

from autoglm_tune.bench.stats import t_quantile  # the bench's own t quantile, not a copy


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as fh:
        fh.write("3")


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr.decode()[-400:]}")
    return elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--cli", default="/opt/autoglm-venv/bin/autoglm-tune")
    args = ap.parse_args()
    launch = [args.cli, "launch", "--dry-run", "--policy", args.policy]
    cold, warm, nice = [], [], []
    for r in range(args.rounds):
        if r % 2:
            warm.append(timed(launch))
            drop_caches()
            cold.append(timed(launch))
        else:
            drop_caches()
            cold.append(timed(launch))
            warm.append(timed(launch))
        drop_caches()
        nice.append(timed(["nice", "-n", "-10", "/bin/true"]))
    diffs = [c - w for c, w in zip(cold, warm, strict=True)]
    half = t_quantile(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    mean = statistics.fmean(diffs)
    print(json.dumps({
        "command": " ".join(sys.argv),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "launch_argv": launch,
        "cold_s": [round(x, 3) for x in cold],
        "warm_s": [round(x, 3) for x in warm],
        "nice_true_cold_s": [round(x, 4) for x in nice],
        "median_cold_s": round(statistics.median(cold), 3),
        "median_warm_s": round(statistics.median(warm), 3),
        "cold_minus_warm_s": {"mean": round(mean, 3), "ci95": [round(mean - half, 3), round(mean + half, 3)],
                              "rounds": len(diffs)},
    }, indent=1))


if __name__ == "__main__":
    main()
