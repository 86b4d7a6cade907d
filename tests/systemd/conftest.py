"""One real systemd for the whole session: booted in systemd-nspawn over a tmpfs overlay of the host
root, with autoglm-tune's system files installed inside by `autoglm-tune system install` and test units in
the container's /usr/lib/systemd/system (the overlay's upper directory: the host disk is untouched).

The helper runs inside the container as the real D-Bus-activated service; the tests reach the container's
bus from the host. The host's kernel knobs and swap areas (global: the container writes the real ones) are
snapshotted and must be unchanged after every test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from autoglm_helper.contract import catalogue
from container import CLI, Client, Container, prepare, start_units

KNOB_FILES = [f"/{k.path}" for k in catalogue.SCALAR_KNOBS.values()]


def host_kernel() -> dict[str, Any]:
    """The host's catalogue knobs and swap areas: global, so reachable from inside the container."""
    values = {}
    for path in KNOB_FILES:
        if os.path.exists(path):
            values[path] = Path(path).read_text()
    values["/proc/swaps"] = Path("/proc/swaps").read_text()
    return values


@pytest.fixture(scope="session")
def container() -> Iterator[Container]:
    if os.geteuid() != 0 or shutil.which("systemd-nspawn") is None:
        pytest.skip("the systemd tests need root and systemd-nspawn (tests/run installs systemd-container)")
    workdir = Path(tempfile.mkdtemp(prefix="autoglm-nspawn-"))
    c = Container(workdir)
    try:
        c.mount()
        prepare(c)
        c.boot()
        c.run(CLI, "system", "install")
        start_units(c)
        yield c
    finally:
        c.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def client(container: Container) -> Iterator[Client]:
    """A connection to the container's system bus (per test: a test may reboot the container)."""
    cl = Client(container.address)
    yield cl
    cl.close()


@pytest.fixture(autouse=True)
def host_kernel_unchanged() -> Iterator[None]:
    before = host_kernel()
    yield
    assert host_kernel() == before, "a test changed the host's kernel knobs or swap areas"
