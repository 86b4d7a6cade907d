"""The CLI against the real root helper on a private bus without polkitd (uid 0 is allowed, any other uid is
not): only what the CLI itself decides — exit codes, interrupts, hints. The helper's parts are tests/helper's."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from autoglm_helper.contract.catalogue import SCALAR_KNOBS

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "helper"))

from helper_parts import Bus, Helper, live


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("the helper runs as root (CI runs these tests as root)")
    path = Path(tempfile.mkdtemp(prefix="autoglm-cli-test-"))
    path.chmod(0o755)  # the unprivileged caller reaches the bus socket and the plan files through it
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def helper(workdir: Path) -> Iterator[Helper]:
    bus = Bus(workdir / "bus", with_polkit=False)
    h = Helper(bus, workdir / "state").start("--idle-timeout", "0")
    yield h
    h.stop()
    bus.stop()


KNOB = "vm.vfs_cache_pressure"  # the one knob these tests change, and undo


@pytest.fixture(autouse=True)
def knob_restored() -> Iterator[None]:
    """Each test leaves KNOB as it found it; one that fails half-way gets it written back, and fails."""
    before = live(KNOB)
    yield
    after = live(KNOB)
    if after != before:
        (Path("/") / SCALAR_KNOBS[KNOB].path).write_text(str(before))
    assert after == before, f"the test left {KNOB} changed"
