"""Bad input to `autoglm-tune launch`: exit 2, one line naming the key and the allowed values, nothing
started. And the outputs that start nothing: --dry-run for every preset, --unit checked by systemd."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest
from launch_parts import cli_env, launch, write_policy
from support import free_port, processes_mentioning


def assert_refused(proc: subprocess.CompletedProcess[str], marker: str, *needles: str) -> None:
    assert proc.returncode == 2, proc
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autoglm-tune: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert processes_mentioning(marker) == []


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"not a real model")
    return path


def run_with(tmp_path: Path, etc: Path, doc: dict, *extra: str) -> subprocess.CompletedProcess[str]:
    policy = write_policy(tmp_path / "policy.toml", doc)
    return launch("--policy", str(policy), "--log", str(tmp_path / "log"), *extra, env=cli_env(etc))


# a command that would run if the checks let it through, marked with the test's temp dir
def sleeper(marker: Path) -> list[str]:
    return ["--", "python3", "-c", "import time; time.sleep(30)", str(marker)]


def test_missing_model_file(tmp_path: Path, etc: Path) -> None:
    missing = tmp_path / "nope.gguf"
    proc = run_with(tmp_path, etc, {"model": {"model_path": str(missing), "port": free_port()}})
    assert_refused(proc, str(tmp_path), "[model] model_path", str(missing), "no such file", "allowed:")


def test_model_path_not_set(tmp_path: Path, etc: Path) -> None:
    proc = run_with(tmp_path, etc, {"model": {"port": free_port()}})
    assert_refused(proc, str(tmp_path), "[model] model_path is not set", "allowed:")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--alias", "{{ no_such_variable }}"], ["[model] args[1]", "'no_such_variable' is undefined", "threads"]),
        (["{% if %}"], ["[model] args[0]", "template syntax error", "allowed: jinja2"]),
    ],
)
def test_template_errors(tmp_path: Path, etc: Path, model: Path, args: list[str], needles: list[str]) -> None:
    proc = run_with(tmp_path, etc, {"model": {"model_path": str(model), "port": free_port(), "args": args}})
    assert_refused(proc, str(tmp_path), *needles)


def test_template_error_in_the_command_line(tmp_path: Path, etc: Path, model: Path) -> None:
    proc = run_with(
        tmp_path,
        etc,
        {"model": {"model_path": str(model), "port": free_port()}},
        "--",
        "python3",
        "-c",
        "{{ thread }}",
        str(tmp_path),
    )
    assert_refused(proc, str(tmp_path), "launch -- CMD[2]", "'thread' is undefined")


def test_corrupt_model_header_is_one_line_naming_the_file_and_field(tmp_path: Path, etc: Path) -> None:
    """A huge string length in the GGUF header: exit 2 naming the key, not a MemoryError."""
    path = tmp_path / "corrupt.gguf"
    name = b"general.architecture"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(name)) + name
                     + struct.pack("<IQ", 8, 1 << 62))
    proc = run_with(tmp_path, etc, {"model": {"model_path": str(path), "port": free_port()}}, "--dry-run")
    assert_refused(proc, str(tmp_path), str(path), "corrupt GGUF header", "general.architecture")


def test_unknown_preset(tmp_path: Path, etc: Path, model: Path) -> None:
    proc = run_with(tmp_path, etc, {"model": {"model_path": str(model), "preset": "llama-srv"}})
    assert_refused(
        proc, str(tmp_path), "[model] preset", "llama-srv", "llama-server", "llama-cpp-python", "ollama", "vllm-cpu"
    )


def test_port_in_use(tmp_path: Path, etc: Path, model: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_with(tmp_path, etc, {"model": {"model_path": str(model), "port": port}}, *sleeper(tmp_path))
    assert_refused(proc, str(tmp_path), f"[model] port = {port}", "already in use", "allowed: a free port")


def test_cpu_list_outside_the_machine(tmp_path: Path, etc: Path, model: Path) -> None:
    outside = max(os.cpu_count() or 1, *os.sched_getaffinity(0)) + 1
    doc = {"model": {"model_path": str(model), "port": free_port()}, "process": {"cpus": [0, outside]}}
    proc = run_with(tmp_path, etc, doc, *sleeper(tmp_path))
    assert_refused(proc, str(tmp_path), "[process] cpus", str(outside), "allowed: a subset of")


def test_program_not_found(tmp_path: Path, etc: Path, model: Path) -> None:
    doc = {"model": {"model_path": str(model), "port": free_port(), "program": "no-such-llama-server"}}
    assert_refused(run_with(tmp_path, etc, doc), str(tmp_path), "[model] program", "no-such-llama-server", "PATH")


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("keep_resident", "yes", '"auto" or "mlock" or "cgroup" or "none"'),
        ("supervisor", "cron", '"auto" or "launch" or "systemd"'),
        ("memory_high_mib", -1, "an integer 0–1048576"),
        ("port", 0, "an integer 1–65535"),
        ("memory_fit", "maybe", '"warn" or "refuse" or "off"'),
        ("environment", {"1BAD": "x"}, "NAME of letters"),
        ("mmap", "sometimes", 'true, false, "auto"'),
        ("no_such_key", 1, "allowed: preset, program"),
    ],
)
def test_bad_model_policy_values(tmp_path: Path, etc: Path, key: str, value: object, allowed: str) -> None:
    proc = run_with(tmp_path, etc, {"model": {key: value}}, "--dry-run")
    assert_refused(proc, str(tmp_path), f"[model] {key}", allowed)


def test_memory_refusal_with_the_numbers(tmp_path: Path, etc: Path) -> None:
    """A sparse 'model' larger than memory and swap together: refused under memory_fit = "refuse"."""
    big = tmp_path / "huge.gguf"
    with big.open("wb") as fh:
        fh.truncate(1 << 43)  # 8 TiB, sparse
    doc = {"model": {"model_path": str(big), "port": free_port(), "memory_fit": "refuse"}}
    proc = run_with(tmp_path, etc, doc, *sleeper(tmp_path))
    assert proc.returncode == 1
    assert "does not fit" in proc.stderr and "MemAvailable" in proc.stderr and "memory_fit" in proc.stderr
    assert processes_mentioning(str(tmp_path)) == []
    warn = run_with(tmp_path, etc, {"model": {**doc["model"], "memory_fit": "warn"}}, "--dry-run", "--json")
    assert warn.returncode == 0, warn.stderr
    assert any("does not fit" in w for w in json.loads(warn.stdout)["warnings"])


@pytest.mark.parametrize("preset", ["llama-server", "llama-cpp-python", "ollama", "vllm-cpu"])
def test_dry_run_of_every_preset(tmp_path: Path, etc: Path, model: Path, preset: str) -> None:
    program = shutil.which("python3")
    assert program
    doc = {
        "model": {"preset": preset, "model_path": str(model), "program": program, "port": 18555, "context_size": 1024},
        "process": {"cpus": [min(os.sched_getaffinity(0))], "threads": 1, "nice": 3},
    }
    proc = run_with(tmp_path, etc, doc, "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)
    assert spec["argv"][0] == os.path.realpath(program) or spec["argv"][0] == program
    assert spec["health_url"].startswith("http://127.0.0.1:18555/")
    assert spec["process"]["threads"] == 1 and spec["process"]["nice"] == 3
    joined = " ".join(spec["argv"]) + " " + " ".join(spec["environment"].values())
    assert "18555" in joined and "1024" in joined
    if preset != "ollama":
        assert str(model) in spec["argv"]
    assert processes_mentioning(str(tmp_path)) == []


def test_unit_is_accepted_by_systemd(tmp_path: Path, etc: Path, model: Path) -> None:
    cpu = max(os.sched_getaffinity(0))
    doc = {
        "model": {
            "model_path": str(model),
            "program": "python3",
            "keep_resident": "mlock",
            "memory_high_mib": 3072,
            "args": ["--alias", '50% of "tiny" $HOME'],
        },
        "process": {"cpus": [cpu], "nice": 5, "sched_policy": "batch", "io_class": "idle", "oom_score_adj": 200},
    }
    unit = tmp_path / "autoglm-model.service"
    proc = run_with(tmp_path, etc, doc, "--unit", "-o", str(unit))
    assert proc.returncode == 0, proc.stderr
    text = unit.read_text()
    assert text.endswith("WantedBy=multi-user.target\n")
    for line in (
        f"CPUAffinity={cpu}",
        "Nice=5",
        "CPUSchedulingPolicy=batch",
        "IOSchedulingClass=idle",
        "OOMScoreAdjust=200",
        "LimitMEMLOCK=infinity",
        f"MemoryHigh={3072 << 20}",
        "Environment=OMP_NUM_THREADS=1",
    ):
        assert line + "\n" in text, line
    assert "After=network-online.target autoglm-tune.service\n" in text
    assert '"50%% of \\"tiny\\" $$HOME"' in text
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verify.returncode == 0, verify.stderr
    assert str(unit) not in verify.stderr


def test_unit_and_its_dry_run_decide_the_same_on_this_host(tmp_path: Path, etc: Path, model: Path) -> None:
    """`launch --unit --dry-run --json` is the spec the unit is rendered from: the same keep_resident, argv and
    memory lines, and the unit's comment says what keep_resident does here (this CI host is cgroup v1)."""
    doc = {"model": {"model_path": str(model), "program": "python3", "preset": "llama-cpp-python",
                     "port": free_port(), "memory_fit": "warn"}}
    unit = run_with(tmp_path, etc, doc, "--unit")
    spec_proc = run_with(tmp_path, etc, doc, "--unit", "--dry-run", "--json")
    assert unit.returncode == 0 and spec_proc.returncode == 0, (unit.stderr, spec_proc.stderr)
    spec = json.loads(spec_proc.stdout)
    assert spec["supervisor"] == "systemd"
    text = unit.stdout
    assert f"# keep_resident {spec['keep_resident']}: {spec['keep_resident_how']}\n" in text
    mlock = spec["argv"][spec["argv"].index("--use_mlock") + 1]
    assert f"--use_mlock {mlock}" in text and (mlock == "true") == ("LimitMEMLOCK=infinity\n" in text)
    assert ("MemoryLow=" in text) == bool(spec["memory_low"])
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):  # cgroup v1: MemoryLow= would not act
        assert "MemoryLow=" not in text and "cgroup v2" not in text.split("keep_resident", 1)[1].split("\n")[0]
