"""Real parts for the bench tests: llama-cpp-python (tests/setup-llama.sh, built once), matplotlib in the
same venv for the plot, a tiny model made by the bench's own worker, and the root helper on a private bus
(bench/private_helper.py, the way the full benchmark runs on a machine without a system bus)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from private_helper import private_helper  # noqa: E402

LLAMA_VENV = Path(os.environ.get("AUTOGLM_LLAMA_VENV", "/opt/autoglm-llama-venv"))
LLAMA_CACHE = Path(os.environ.get("AUTOGLM_LLAMA_CACHE", "/opt/llama-build"))
CGROUPS = Path("/sys/fs/cgroup/memory")


@pytest.fixture(scope="session")
def root() -> None:
    if os.geteuid() != 0:
        pytest.skip("the bench changes kernel settings: it needs root (CI runs the tests as root)")


@pytest.fixture(scope="session")
def llama_python(root: None) -> Path:
    subprocess.run([str(ROOT / "tests" / "setup-llama.sh")], check=True, timeout=3600)
    python = LLAMA_VENV / "bin" / "python"
    if subprocess.run([str(python), "-c", "import matplotlib"], capture_output=True).returncode != 0:
        subprocess.run([str(LLAMA_VENV / "bin" / "pip"), "install", "-q", "matplotlib"], check=True, timeout=600)
    return python


@pytest.fixture(scope="session")
def llama_server(llama_python: Path) -> Path:
    """llama.cpp's own llama-server (and llama-bench beside it) for this machine, built once and cached."""
    done = subprocess.run([str(ROOT / "tests" / "guest" / "build-llama-server.sh"), "host"], check=True,
                          capture_output=True, text=True, timeout=3600)
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_model(llama_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench-models") / "tiny.gguf"
    vocab = LLAMA_CACHE / "vocab" / "ggml-vocab-llama-spm.gguf"
    worker = ROOT / "tuner" / "bench" / "worker.py"
    subprocess.run([str(llama_python), str(worker), "model", "tiny", str(vocab), str(out)], check=True, timeout=300)
    return out


@pytest.fixture(scope="session")
def bus_address(root: None) -> Iterator[str]:
    with private_helper() as address:
        yield address


def _bench_processes() -> set[int]:
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if any(m in cmdline for m in (b"bench/worker.py", b"bench-models", b"/policy-")):
                found.add(int(proc.name))
    return found


@pytest.fixture
def machine_put_back(root: None) -> Iterator[None]:
    """A safety net behind the tests' own checks: what a failing bench left changed is put back here, after the
    test has failed for it (settings, swap areas, and only the processes and cgroups that appeared meanwhile)."""
    from autoglm_tune.bench import machine

    paths = machine.setting_paths()
    settings, swaps = machine.read_settings(paths), machine.read_swaps()
    cgroups, procs = set(CGROUPS.glob("autoglm-bench-*")), _bench_processes()
    yield
    for pid in _bench_processes() - procs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    for area in set(machine.read_swaps()) - set(swaps):
        subprocess.run(["swapoff", area], check=False)
    for name in sorted(settings, key=lambda n: (n != "vm.nr_hugepages", n == "zswap.enabled")):
        if machine.read_settings({name: paths[name]})[name] != settings[name]:
            Path(paths[name]).write_text(settings[name])
    for cg in set(CGROUPS.glob("autoglm-bench-*")) - cgroups:
        with contextlib.suppress(OSError):
            cg.rmdir()
