#!/usr/bin/env python3
"""Benchmark of the root helper (not a test): start-up time, resident memory, and the latency of Apply,
dry-run Apply and Rollback of a full kernel-knob plan (every vm sysctl and zswap parameter of the catalogue)
over D-Bus. Run as root on a scratch machine: it changes the live knobs and puts them back.

    sudo /opt/autoglm-venv/bin/python bench/helper_bench.py [--rounds 50] [--starts 10]

It starts its own private system-like dbus-daemon (no polkitd: uid 0 is allowed by the fallback) and
the installed `autoglm-tune-helper`, and prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from autoglm_helper import knobs
from autoglm_helper.contract import catalogue
from autoglm_helper.contract.bus import BUS_NAME, INTERFACE, OBJECT_PATH
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig><type>system</type><auth>EXTERNAL</auth><listen>unix:path={dir}/socket</listen>
  <policy context="default"><allow user="*"/><allow own="*"/><allow send_type="method_call"/>
    <allow send_type="signal"/><allow send_type="method_return"/><allow send_type="error"/>
    <allow receive_type="method_call"/><allow receive_type="method_return"/>
    <allow receive_type="error"/><allow receive_type="signal"/></policy>
</busconfig>
"""


def full_plan() -> str:
    changes = []
    for knob in catalogue.SCALAR_KNOBS.values():
        path = Path("/") / knob.path
        if not path.exists():
            continue
        now = knob.parse(path.read_text())
        if knob.kind == "bool":
            target: Any = not now
        elif knob.kind == "word":
            target = next(c for c in knobs.compressors() if c != now)
        else:
            target = now + 1 if now < (knob.maximum or 0) else now - 1
        changes.append({"knob": knob.name, "current": now, "target": target, "persistence": "runtime",
                        "reason": "benchmark"})
    changes.sort(key=lambda c: c["knob"] == "zswap.enabled")
    return json.dumps({"version": 1, "changes": changes})


def kib(pid: int, field: str) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field + ":"))


async def call(bus: MessageBus, member: str, *body: Any) -> tuple[float, dict[str, Any]]:
    msg = Message(destination=BUS_NAME, path=OBJECT_PATH, interface=INTERFACE, member=member,
                  signature="sbb" if body else "", body=list(body))
    started = time.perf_counter()
    reply = await bus.call(msg)
    elapsed = (time.perf_counter() - started) * 1000
    if reply.message_type != MessageType.METHOD_RETURN:
        raise SystemExit(f"{member}: {reply.error_name}: {reply.body}")
    return elapsed, json.loads(reply.body[0])


async def until_owned(bus: MessageBus) -> None:
    """Poll the bus until the helper owns its name (the private bus has no activation)."""
    while not (await bus.call(Message(destination="org.freedesktop.DBus", path="/org/freedesktop/DBus",
                                      interface="org.freedesktop.DBus", member="NameHasOwner", signature="s",
                                      body=[BUS_NAME]))).body[0]:
        await asyncio.sleep(0.002)


def summary(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {"median_ms": round(statistics.median(ms), 2), "p90_ms": round(ms[int(len(ms) * 0.9) - 1], 2),
            "min_ms": round(ms[0], 2)}


async def run(address: str, state: str, rounds: int, starts: int) -> dict[str, Any]:
    bus = await MessageBus(bus_address=address).connect()
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address}
    helper_bin = str(Path(sys.executable).parent / "autoglm-tune-helper")
    start_ms, rss = [], []
    for _ in range(starts):
        started = time.perf_counter()
        proc = subprocess.Popen([helper_bin, "--state-dir", state, "--idle-timeout", "0"], env=env)
        await until_owned(bus)
        await call(bus, "Status")
        start_ms.append((time.perf_counter() - started) * 1000)
        rss.append(kib(proc.pid, "VmRSS"))
        if len(start_ms) < starts:
            proc.kill()
            proc.wait()
    plan = full_plan()
    apply_ms, dry_ms, rollback_ms = [], [], []
    for _ in range(rounds):
        dry_ms.append((await call(bus, "Apply", plan, True, False))[0])
        elapsed, report = await call(bus, "Apply", plan, False, False)
        apply_ms.append(elapsed)
        rollback_ms.append((await call(bus, "Rollback", report["txid"], False, False))[0])
    result = {
        "knobs_in_plan": len(json.loads(plan)["changes"]),
        "startup_to_first_answer": summary(start_ms),
        "rss_after_start_kib": max(rss),
        "rss_peak_kib": kib(proc.pid, "VmHWM"),
        "apply": summary(apply_ms),
        "dry_run": summary(dry_ms),
        "rollback": summary(rollback_ms),
    }
    proc.terminate()
    proc.wait()
    bus.disconnect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--starts", type=int, default=10)
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="autoglm-helper-bench-")
    (Path(work) / "bus.conf").write_text(BUS_CONF.format(dir=work))
    daemon = subprocess.Popen(["dbus-daemon", f"--config-file={work}/bus.conf", "--nofork"])
    while not os.path.exists(f"{work}/socket"):
        time.sleep(0.01)
    before = {k: (Path("/") / v.path).read_text() for k, v in catalogue.SCALAR_KNOBS.items()
              if (Path("/") / v.path).exists()}
    try:
        result = asyncio.run(run(f"unix:path={work}/socket", f"{work}/state", args.rounds, args.starts))
    finally:
        daemon.terminate()
        daemon.wait()
        shutil.rmtree(work)
    after = {k: (Path("/") / catalogue.SCALAR_KNOBS[k].path).read_text() for k in before}
    result["knobs_restored"] = after == before
    result["machine"] = f"{os.cpu_count()} CPUs, kernel {os.uname().release}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
