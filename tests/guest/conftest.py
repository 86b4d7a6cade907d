"""Fixtures of the guest suite: the saved booted Debian 13 machine, the same machine after the README's install
command (run once per session by a sudo user, then saved), a fresh copy of either for each test, and the guest's
llama-server and tiny model.

Needs root, QEMU and mmdebstrap (tests/run installs them). Without them this is a skip on a developer machine
and a failure under CI=true (conftest at the top)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import guest as guest_host
import pytest
from guest import HERE, Guest, Installed, Snapshot, figure


def _needs() -> str | None:
    if os.geteuid() != 0:
        return "the guest suite needs root (mmdebstrap --mode=root)"
    for tool in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "zstd", "ssh"):
        if shutil.which(tool) is None:
            return f"{tool} is missing (tests/run installs it)"
    return None


@pytest.fixture(scope="session")
def booted() -> Snapshot:
    missing = _needs()
    if missing:
        pytest.skip(missing)
    started = time.monotonic()
    snap = guest_host.booted_snapshot()
    figure(f"image and booted state ready in {time.monotonic() - started:.0f} s "
           f"({(snap.image / 'built').read_text().strip()}; {(snap.folder / 'booted').read_text().strip()})")
    return snap


@pytest.fixture(scope="session")
def installed(booted: Snapshot, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    """The README's install command, word for word, by alice (a sudo user) in her checkout; then saved."""
    work = tmp_path_factory.mktemp("installed")
    g = Guest(work / "run", booted.image, booted.memory, booted.cpus)
    started = time.monotonic()
    try:
        g.resume(booted, nvme=False)  # the NVMe disk is hot-plugged per test: QEMU cannot save it
        g.ssh(f"mkdir -p {guest_host.WHEELHOUSE_IN_GUEST} && tar x -C {guest_host.WHEELHOUSE_IN_GUEST}",
              input=guest_host.tar_dir(guest_host.wheelhouse()))
        g.ssh("mkdir -p ~/autoglm-tune && tar xz -C ~/autoglm-tune", user="alice", input=guest_host.source_tarball())
        command = guest_host.readme_command()
        t0 = time.monotonic()
        result = g.ssh(f"cd ~/autoglm-tune && {command}", user="alice", check=False, timeout=1200)
        figure(f"README install command as alice: {time.monotonic() - t0:.0f} s, exit {result.returncode}")
        snap = g.save(work / "saved")
    finally:
        g.stop()
    figure(f"installed state saved {time.monotonic() - started:.0f} s after resuming")
    yield Installed(snap, command, result)


@pytest.fixture(scope="session")
def llama_server() -> Path:
    """llama-server without AVX for the guest's CPU model, cached (about 4 min to build once)."""
    done = subprocess.run([str(HERE / "build-llama-server.sh")], check=True, capture_output=True, text=True)
    return Path(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The launch suite's tiny random-weight model (tests/launch/conftest.py makes it the same way)."""
    llama_python = Path("/opt/autoglm-llama-venv/bin/python")
    vocab = Path("/opt/llama-build/vocab/ggml-vocab-llama-spm.gguf")
    out = tmp_path_factory.mktemp("guest-model") / "tiny.gguf"
    worker = HERE.parent.parent / "tuner" / "bench" / "worker.py"
    subprocess.run([str(llama_python), str(worker), "model", "tiny", str(vocab), str(out)], check=True, timeout=300)
    return out


@pytest.fixture
def guest_from(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Guest]]:
    """Start a fresh copy of a saved machine (NVMe hot-plugged); stopped after the test, its console and
    journal shown when the test failed."""
    running: list[Guest] = []

    def start(snap: Snapshot, nvme: bool = True) -> Guest:
        g = Guest(tmp_path / f"guest{len(running)}", snap.image, snap.memory, snap.cpus)
        running.append(g)
        t0 = time.monotonic()
        g.resume(snap, nvme=nvme)
        figure(f"{request.node.name}: resumed a copy to ssh in {time.monotonic() - t0:.1f} s")
        return g

    yield start
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    for g in running:
        if failed and g.proc is not None and g.proc.poll() is None:
            print(f"--- guest journal\n{g.journal()}\n--- console\n{g.console_tail()}")
        g.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
