"""`autoglm-tune calibrate` for real on this machine: the tiny model measured with llama.cpp's own llama-bench (the
host build beside llama-server) over this machine's candidate CPU sets. It decides within its budget, the drop-in
parses with the policy schema, `plan` reasons from it and calls it stale once the model file changes; Ctrl-C
leaves nothing running and nothing written; each bad input is one line, exit 2, nothing written. Speeds are
never asserted, only that they were measured."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from autoglm_tune.calibrate import LOAD_MARK
from autoglm_tune.policy import load_policy
from support import CLI, processes_mentioning

BUDGET_S = 60
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def env_with(etc: Path) -> dict[str, str]:
    return {**os.environ, "AUTOGLM_TUNE_ETC": str(etc)}


@pytest.fixture
def place(tiny_model: Path) -> Iterator[Path]:
    """A folder anyone may read (the unprivileged case runs as nobody): a copy of the tiny model, an empty
    etc/policy.d owned by root."""
    base = Path(tempfile.mkdtemp(prefix="calibrate-", dir="/var/tmp"))
    try:
        base.chmod(0o755)
        shutil.copy(tiny_model, base / "model.gguf")
        (base / "model.gguf").chmod(0o644)
        (base / "etc" / "policy.d").mkdir(parents=True)
        (base / "etc").chmod(0o755)
        (base / "etc" / "policy.d").chmod(0o755)
        yield base
    finally:
        for pid in processes_mentioning(str(base)):  # a failed test's leftovers, after it has failed for them
            with contextlib.suppress(ProcessLookupError):
                group = os.getpgid(pid)
                if group == os.getpgrp():  # the CLI, in the tests' own group
                    os.kill(pid, signal.SIGKILL)
                else:  # a burst: its whole process group
                    os.killpg(group, signal.SIGKILL)
        shutil.rmtree(base)


def calibrate(place: Path, bench: Path, *extra: str, user: list[str] | None = None,
              timeout: float = BUDGET_S + 60) -> subprocess.CompletedProcess[str]:
    argv = [*(user or []), CLI, "calibrate", "--llama-bench", str(bench), *extra]
    return subprocess.run(argv, capture_output=True, text=True, env=env_with(place / "etc"), timeout=timeout)


def plan_process(place: Path) -> dict:
    done = subprocess.run([CLI, "plan", "--json"], capture_output=True, text=True, env=env_with(place / "etc"),
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["process"]


def test_a_real_calibration_decides_and_plan_reasons_from_it_until_the_model_changes(
    place: Path, llama_server: Path
) -> None:
    model, drop_in = place / "model.gguf", place / "etc" / "policy.d" / "50-calibrated.toml"
    default = plan_process(place)
    started = time.monotonic()
    done = calibrate(place, llama_server.with_name("llama-bench"), "--model", str(model), "--budget",
                     f"{BUDGET_S}s", "--json", "-o", str(drop_in))
    took = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["decided"], doc
    assert doc["elapsed_s"] <= BUDGET_S and took < BUDGET_S + 20, (doc["elapsed_s"], took)
    assert doc["rounds"] >= 3 and doc["memcpy_gbs"] > 0 and doc["limit_tok_s"] > 0
    assert doc["drop_in"] == drop_in.read_text() and oct(drop_in.stat().st_mode & 0o777) == "0o644"
    assert [c["default"] for c in doc["candidates"]].count(True) == 1
    for c in doc["candidates"]:
        assert len(c["tok_s"]) == doc["rounds"] and all(v > 0 for v in c["tok_s"]) and c["threads"] == len(c["cpus"])
    assert "s left" in done.stderr and "calibrate: wrote" in done.stderr
    [chosen] = [c for c in doc["candidates"] if c["name"] == doc["choice"]]
    nice = doc["nice"]  # as root: the chosen set at the plan's nice and at nice 0, under the background load
    assert [c["nice"] for c in nice["candidates"]] == [default["nice"], 0] and nice["rounds"] >= 3
    assert all(c["cpus"] == chosen["cpus"] and len(c["tok_s"]) == nice["rounds"] for c in nice["candidates"])
    assert nice["load"]["cpu_s"] > 0 and processes_mentioning(LOAD_MARK) == []  # it ran, and it is gone
    assert f"\nnice = {nice['nice']}\n" in drop_in.read_text()

    cal = load_policy(None, place / "etc").calibration  # the policy schema reads it like any drop-in
    assert cal is not None and list(cal.values["cpus"]) == chosen["cpus"] and cal.values["threads"] == chosen["threads"]

    process = plan_process(place)
    assert process["reasons"][0].startswith(f"CPU set and threads from {drop_in}: calibrated ")
    assert "of this box's" in process["reasons"][0] and "interleaved rounds" in process["reasons"][0]
    assert (process["cpus"], process["threads"]) == (chosen["cpus"], chosen["threads"])
    assert process["nice"] == nice["nice"] and f"nice {nice['nice']}: calibrated " in "\n".join(process["reasons"])

    with model.open("ab") as fh:  # the model file changes: the calibration no longer describes it
        fh.write(b"\0")
    process = plan_process(place)
    assert process["reasons"][0].startswith(f"calibration {drop_in} is stale: the model file {model} changed")
    assert (process["cpus"], process["threads"], process["nice"]) == (default["cpus"], default["threads"],
                                                                      default["nice"])


def test_as_a_normal_user_the_nice_comparison_is_skipped_and_says_why(place: Path, llama_server: Path) -> None:
    done = calibrate(place, llama_server.with_name("llama-bench"), "--model", str(place / "model.gguf"), "--budget",
                     f"{BUDGET_S}s", "--json", user=NOBODY)
    assert done.returncode == 0, done.stderr
    why = ("nice -10 needs root (CAP_SYS_NICE) and this runs as uid 65534; run calibrate with sudo to compare it")
    assert json.loads(done.stdout)["nice"] == {"skipped": why}
    assert f"calibrate: the nice comparison is skipped: {why}\n" in done.stderr
    assert f"# nice      comparison skipped: {why}" in json.loads(done.stdout)["drop_in"]


def test_ctrl_c_leaves_nothing_running_and_writes_nothing(place: Path, llama_server: Path) -> None:
    """Ctrl-C in the middle of a burst. The tiny model's bursts take a fraction of a second, so each burst here is
    llama-bench followed by a wait, as long as a large model's burst: a burst left running would still be there."""
    model, drop_in = place / "model.gguf", place / "etc" / "policy.d" / "50-calibrated.toml"
    slow = place / "slow-llama-bench"
    slow.write_text(f'#!/bin/sh\n"{llama_server.with_name("llama-bench")}" "$@"\nsleep 300\n')
    slow.chmod(0o755)
    argv = [CLI, "calibrate", "--llama-bench", str(slow), "--model", str(model), "--budget", "300s", "-o", str(drop_in)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_with(place / "etc"))
    try:
        deadline = time.monotonic() + 120
        while not [p for p in processes_mentioning(str(model)) if p != proc.pid]:  # a burst is starting
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "calibrate never started a burst"
            time.sleep(0.05)
        time.sleep(1)  # and running
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("autoglm-tune: error: calibrate interrupted: the measurement stopped, "
                                            "nothing was written")
    assert out == "" and "Traceback" not in err
    assert processes_mentioning(str(model)) == []
    assert list((place / "etc" / "policy.d").iterdir()) == []


def test_ctrl_c_in_the_nice_comparison_stops_the_background_load(place: Path, llama_server: Path) -> None:
    """Ctrl-C while a burst at the plan's nice runs (this llama-bench waits after such a burst), with the background
    load running beside it: neither is left, nothing is written."""
    model, drop_in = place / "model.gguf", place / "etc" / "policy.d" / "50-calibrated.toml"
    slow = place / "slow-at-nice-llama-bench"
    slow.write_text(f'#!/bin/sh\n"{llama_server.with_name("llama-bench")}" "$@"\n'
                    '[ "$(nice)" -lt 0 ] && sleep 300\nexit 0\n')
    slow.chmod(0o755)
    argv = [CLI, "calibrate", "--llama-bench", str(slow), "--model", str(model), "--budget", "300s", "-o", str(drop_in)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_with(place / "etc"))
    try:
        deadline = time.monotonic() + 120
        while not processes_mentioning(LOAD_MARK):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "calibrate never reached the nice comparison"
            time.sleep(0.05)
        time.sleep(1)  # the first burst of the comparison, at the plan's nice, is waiting
        bursts = [pid for pid in processes_mentioning(str(slow)) if pid != proc.pid]  # not the CLI: its argv names it
        loads = processes_mentioning(LOAD_MARK)
        assert bursts and loads
        # Nice weighs only inside one autogroup (one session, kernel.sched_autogroup_enabled): the burst and the load
        # it is compared under share calibrate's session, each in a process group of its own to be killed whole.
        for pid in bursts + loads:
            assert os.getsid(pid) == os.getsid(proc.pid), pid
        assert len({os.getpgid(pid) for pid in (proc.pid, bursts[0], loads[0])}) == 3
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == ("autoglm-tune: error: calibrate interrupted: the measurement stopped, "
                                            "nothing was written")
    assert out == "" and processes_mentioning(LOAD_MARK) == [] and processes_mentioning(str(slow)) == []
    assert list((place / "etc" / "policy.d").iterdir()) == []


def sparse_model(place: Path) -> Path:
    """The tiny model's header in a 1 TiB sparse file: a model that fits in no machine's memory."""
    big = place / "huge.gguf"
    shutil.copy(place / "model.gguf", big)
    with big.open("r+b") as fh:
        fh.truncate(1 << 40)
    return big


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no model", "autoglm-tune: error: no model: give --model FILE or set [model] model_path; allowed: the "
                     "path of a GGUF file"),
        ("does not fit", "autoglm-tune: error: --model {place}/huge.gguf: memory: model 1048576 MiB"),
        ("budget too short", "autoglm-tune: error: --budget 2s: too short to measure"),
        ("not writable", "autoglm-tune: error: -o {place}/etc/policy.d/50-calibrated.toml: the directory "
                         "{place}/etc/policy.d is not writable (Permission denied)"),
        ("a .json name", "autoglm-tune: error: -o {place}/etc/policy.d/50-calibrated.json: not a .toml file name"),
        ("a directory", "autoglm-tune: error: -o {place}/etc/policy.d.toml: is a directory"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    place: Path, llama_server: Path, case: str, message: str
) -> None:
    model, drop_in = place / "model.gguf", place / "etc" / "policy.d" / "50-calibrated.toml"
    args, user = ["--model", str(model), "-o", str(drop_in)], None
    if case == "no model":
        args = ["-o", str(drop_in)]
    elif case == "does not fit":
        args = ["--model", str(sparse_model(place)), "-o", str(drop_in)]
    elif case == "budget too short":
        args += ["--budget", "2s"]
    elif case == "a .json name":  # policy.d would read TOML text as JSON and fail every later plan
        args = ["--model", str(model), "-o", str(drop_in.with_suffix(".json"))]
    elif case == "a directory":
        (place / "etc" / "policy.d.toml").mkdir()
        args = ["--model", str(model), "-o", str(place / "etc" / "policy.d.toml")]
    else:
        user = NOBODY  # in root's 0755 policy.d
    done = calibrate(place, llama_server.with_name("llama-bench"), *args, user=user, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(message.format(place=place)), done.stderr
    assert len(done.stderr.splitlines()) == 1 and done.stdout == ""
    assert list((place / "etc" / "policy.d").iterdir()) == []
    assert processes_mentioning(str(place)) == []
