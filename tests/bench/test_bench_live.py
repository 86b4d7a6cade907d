"""`autoglm-tune bench` for real: a tiny llama.cpp model served by llama.cpp's own llama-server (and once by
llama-cpp-python), one round, the configurations that touch the machine (hugetlb reservation with the emulated
box's watermarks, the recipe's sysctls and zswap, the one-flag hand-tune, the plan applied and rolled back
through the root helper, the model started by `autoglm-tune launch`, one ablation), the desktop of several
processes with its own progress, and the check that every setting is back afterwards — also after a SIGTERM in
the middle of a run. Performance figures are never asserted, only that they were measured."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from autoglm_tune.bench import machine as bench_machine
from autoglm_tune.bench import report
from support import CLI, processes_mentioning

CGROUPS = Path("/sys/fs/cgroup/memory")
pytestmark = pytest.mark.usefixtures("machine_put_back")


def machine(model: Path) -> dict[str, Any]:
    """Everything the bench may change or leave behind."""
    return {
        "settings": bench_machine.read_settings(bench_machine.setting_paths()),
        "swaps": bench_machine.read_swaps(),
        "hugepages": Path("/proc/sys/vm/nr_hugepages").read_text().strip(),
        "cgroups": sorted(p.name for p in CGROUPS.glob("autoglm-bench-*")) if CGROUPS.is_dir() else [],
        "processes": processes_mentioning(str(model)),
    }




def total_mib() -> int:
    return bench_machine.meminfo()["MemTotal"] // 1024


# enough tokens that the request's window spans frames of a desktop at nice 0 beside a model at nice -10 (with 8,
# about 0.1 s on the tiny model, the starved desktop sometimes finished no frame in it: ops_s 0)
TOKENS = 48


def bench_argv(model: Path, tmp_path: Path, server: Path, *extra: str) -> list[str]:
    return [CLI, "bench", "--model", str(model), "--rounds", "1", "--tokens", str(TOKENS), "--context", "512",
            "--ram-mib", str(total_mib() - 512), "--desktop-mib", "64", "--file-mib", "16",
            "--server-bin", str(server), "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out"), *extra]


def env_with(address: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return env | {"DBUS_SYSTEM_BUS_ADDRESS": address}


SMOKE_CONFIGS = ("limit", "untuned", "hand-tune", "recipe-literal", "autoglm-tune", "no-nice")


def test_smoke_run_measures_applies_and_restores_everything(
    tiny_model: Path, llama_server: Path, bus_address: str, tmp_path: Path
) -> None:
    before = machine(tiny_model)
    docs = tmp_path / "BENCHMARKS.md"
    argv = bench_argv(tiny_model, tmp_path, llama_server, "--scenario", "mild", "--config", ",".join(SMOKE_CONFIGS),
                      "--docs", str(docs), "--preliminary", "CI smoke run")
    done = subprocess.run(argv, capture_output=True, text=True, env=env_with(bus_address), timeout=900)
    after = machine(tiny_model)
    assert done.returncode == 0, done.stderr
    assert after == before, "the bench left the machine changed"
    assert "restored" in done.stdout and "verified" in done.stdout

    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    runs = {r["config"]: r for r in doc["runs"]}
    assert set(runs) == set(SMOKE_CONFIGS) and doc["options"]["server"] == "llama-server"
    for config, r in runs.items():
        assert report.failed(r) is None, (config, r.get("error"))
        assert r["tokens"] == TOKENS and r["tok_s"] > 0 and r["ttft_s"] > 0 and r["p99_ms"] >= r["p50_ms"] > 0
        assert r["value"] == r["tok_s"] and len(r["gaps_ms"]) == TOKENS - 1
        # the server process as psutil reads it (status's reader), once loaded and at the request's end
        for seen_at in (r["process"], r["process_after"]):
            assert seen_at["rss_kib"] >= seen_at["uss_kib"] > 0 and seen_at["swap_kib"] >= 0, seen_at
            assert seen_at["io_class"] in ("none", "best-effort", "idle", "realtime"), seen_at
            assert isinstance(seen_at["oom_score_adj"], int), seen_at
        # llama-server's --prio 2 as root: once it has decoded, its main thread (ggml's compute thread 0) runs
        # under SCHED_FIFO too; every other configuration stays SCHED_OTHER throughout
        assert r["process"]["sched_policy"] == "other", (config, r["process"])
        assert r["process_after"]["sched_policy"] == ("fifo" if config == "hand-tune" else "other"), config
        assert r["counters"]["model_swap_mib"] == r["process_after"]["swap_kib"] // 1024
        assert r["probe"]["memcpy_gbs"] > 0 and r["probe"]["tiny_tok_s"] > 0  # the calibration probe ran
        assert r["counters"]["pgscan"] >= 0 and "psi_memory_some_ms" in r["counters"]
        if config == "limit":
            assert r.get("desktop") is None and r["desktop_alive"] is None  # no desktop: the hardware's best
            continue
        assert r["desktop_alive"] is True and r["desktop"]["ops_s"] > 0 and r["desktop"]["frames"] > 0
        assert r["desktop"]["frame_p99_ms"] >= 1
        assert r["counters"]["desktop_thp_mib"] == 0, "the desktop must age page by page, not in 2 MiB pages"
    # the RAM cap, the emulated box's watermarks and the settings were live while the capped runs measured
    seen = {config: r["settings"] for config, r in runs.items()}
    assert runs["limit"].get("hugepages") is None and seen["limit"]["vm.nr_hugepages"] == "0"
    for config in SMOKE_CONFIGS[1:]:
        assert runs[config]["hugepages"] > 0 and seen[config]["vm.nr_hugepages"] == str(runs[config]["hugepages"])
        want = bench_machine.emulated_watermarks(total_mib() - 512, total_mib(),
                                         int(before["settings"]["vm.watermark_scale_factor"]))
        assert {k: seen[config][k] for k in want} == want
    assert seen["untuned"]["vm.swappiness"] == before["settings"]["vm.swappiness"]
    literal = seen["recipe-literal"]
    assert (literal["vm.swappiness"], literal["vm.vfs_cache_pressure"]) == ("20", "50")
    assert literal["zswap.enabled"] == "Y" and literal["zswap.max_pool_percent"] == "536870912"
    # the one flag: llama-server --prio 2 is nice -10; an ablation without it runs at nice 0
    assert runs["untuned"]["nice"] == 0 and runs["hand-tune"]["nice"] == -10
    assert runs["autoglm-tune"]["nice"] == -10 and runs["no-nice"]["nice"] == 0
    # the preset renders the load mode the way this build spells it (it has --load-mode, no --mlock/--no-mmap)
    assert "--load-mode" in runs["autoglm-tune"]["argv"] and "--mlock" not in runs["autoglm-tune"]["argv"]
    assert runs["untuned"]["argv"][0] == str(llama_server) and "--threads" not in runs["untuned"]["argv"]
    # without systemd on cgroup v2 the model cannot be kept out of zswap, so the planner leaves zswap off
    assert seen["autoglm-tune"]["zswap.enabled"] == before["settings"]["zswap.enabled"] == "N"
    if Path("/sys/fs/cgroup/memory/memory.swappiness").exists():  # cgroup v1: its own memory cgroup, swappiness 0
        tuned_run = runs["autoglm-tune"]
        assert tuned_run["memory_cgroup"].rsplit("/", 1)[1].startswith("autoglm-model-"), tuned_run["memory_cgroup"]
        assert tuned_run["memcg_swappiness"] == 0 and runs["untuned"]["memcg_swappiness"] != 0
    assert doc["restored"]["problems"] == [] and doc["interrupted"] is None
    assert doc["swap_latency"]["read_p50_us"] > 0 and doc["zoneinfo"]

    text = docs.read_text()
    assert text == report.splice(None, (tmp_path / "out" / "BENCHMARKS.md").read_text())
    assert "**Preliminary, noisy:** CI smoke run" in text and "| autoglm-tune | 1 (0) |" in text
    assert "| mild | autoglm-tune ÷ untuned | ≥ 0.95 |" in text
    assert (tmp_path / "out" / "bench-mild.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sigterm_mid_run_restores_everything(
    tiny_model: Path, llama_server: Path, bus_address: str, tmp_path: Path
) -> None:
    before = machine(tiny_model)
    argv = bench_argv(tiny_model, tmp_path, llama_server, "--scenario", "mild", "--config",
                      "recipe-512mb,autoglm-tune", "--tokens", "400")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env_with(bus_address))
    try:
        # wait until a run has the machine changed: the RAM reserved and the server measuring
        deadline = time.monotonic() + 300
        while not (Path("/proc/sys/vm/nr_hugepages").read_text().strip() != "0"
                   and processes_mentioning(str(tiny_model))):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the bench never reached a run"
            time.sleep(0.05)
        changed = bench_machine.read_settings(bench_machine.setting_paths())
        assert changed != before["settings"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted by SIGTERM" in err and "verified" in out
    assert machine(tiny_model) == before, "the bench left the machine changed after SIGTERM"
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    assert doc["interrupted"] == signal.SIGTERM and doc["restored"]["problems"] == []
    assert not list((tmp_path / "work").glob("*.swap"))


def test_cgroup_fallback_caps_the_workload_instead(
    tiny_model: Path, llama_server: Path, bus_address: str, tmp_path: Path
) -> None:
    """Also the other server: llama-cpp-python's, with --no-mmap as the named variant."""
    before = machine(tiny_model)
    ram = total_mib() - 512
    argv = bench_argv(tiny_model, tmp_path, llama_server, "--scenario", "mild", "--config", "untuned",
                      "--emulate", "cgroup", "--server", "llama-cpp-python", "--no-mmap")
    done = subprocess.run(argv, capture_output=True, text=True, env=env_with(bus_address), timeout=600)
    assert done.returncode == 0, done.stderr
    assert machine(tiny_model) == before
    doc = json.loads((tmp_path / "out" / "results.json").read_text())
    (run,) = doc["runs"]
    assert report.failed(run) is None and run["settings"]["vm.nr_hugepages"] == "0" and "hugepages" not in run
    assert doc["options"]["server"] == "llama-cpp-python" and doc["options"]["mmap"] is False
    assert run["cgroup_limit_mib"] == ram and doc["emulation"]["how"] == "cgroup"


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--scenario", "huge"], "--scenario"),
        (["--config", "limit,fast"], "--config"),
        (["--model", "/nonexistent/model.gguf"], "--model"),
        (["--model-size", "7b"], "--model-size"),
        (["--rounds", "0"], "--rounds"),
        (["--ram-mib", "64"], "--ram-mib"),
        (["--emulate", "zram"], "--emulate"),
        (["--server", "vllm"], "--server"),
        (["--server-bin", "/nonexistent/llama-server"], "--server-bin"),
        (["--prompt-tokens", "3"], "--prompt-tokens"),
    ],
)
def test_bad_input_is_one_line_naming_the_flag(args: list[str], flag: str, root: None) -> None:
    before = bench_machine.read_settings(bench_machine.setting_paths())
    done = subprocess.run([CLI, "bench", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0] and "allowed" in lines[0], done.stderr
    assert bench_machine.read_settings(bench_machine.setting_paths()) == before


def test_a_build_without_a_flag_the_bench_passes_is_refused_before_anything_runs(
    tiny_model: Path, llama_server: Path, tmp_path: Path
) -> None:
    """The bench probes the server the way `launch` does (the preset's probe) and checks its own command lines:
    an older llama-server without --prio (the one-flag hand-tune's flag) is refused naming it, exit 2, and nothing
    changed. The older build is a stand-in that prints this build's real help with --prio taken out."""
    real = subprocess.run([str(llama_server), "--help"], capture_output=True, text=True, timeout=60)
    older = tmp_path / "llama-server"
    help_text = tmp_path / "help.txt"
    help_text.write_text("".join(line for line in (real.stdout + real.stderr).splitlines(keepends=True)
                                 if "--prio " not in line and "--prio," not in line))
    older.write_text(f"#!/bin/sh\ncat {help_text}\n")
    older.chmod(0o755)
    before = machine(tiny_model)
    argv = bench_argv(tiny_model, tmp_path, older, "--scenario", "mild", "--config", "untuned,hand-tune")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not take --prio" in lines[0] and "allowed" in lines[0], done.stderr
    assert f"`{older} --help` does not list it" in lines[0]
    assert machine(tiny_model) == before and not (tmp_path / "out" / "results.json").exists()
