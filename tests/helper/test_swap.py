"""Real swap files and swap priorities through the helper (swapon/swapoff on the host's swap list)."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from autoglm_helper import knobs
from autoglm_helper.contract import catalogue
from autoglm_helper.contract.bus import ERROR_PREFIX
from helper_parts import SWAP_DIR_ROOT, Helper, plan_json


@pytest.fixture
def swap_area(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A 64 MiB swap file made by the test (fallocate + mkswap), active with the priority asked for."""
    path = tmp_path / "area.swap"
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 64 * 1024 * 1024)
    path.chmod(0o600)
    subprocess.run(["mkswap", str(path)], check=True, capture_output=True)
    priority = request.param
    subprocess.run(["swapon", *(["-p", str(priority)] if priority >= 0 else []), str(path)], check=True)
    yield str(path)
    if str(path) in knobs.swap_areas():
        subprocess.run(["swapoff", str(path)], check=True)


def priority_change(area: str, current: int, target: int) -> dict[str, object]:
    return {"knob": "swap.priority", "current": current, "target": target, "persistence": "runtime",
            "reason": "test", "area": area}


@pytest.mark.parametrize("swap_area", [5], indirect=True)
def test_swap_priority_is_changed_and_restored(helper: Helper, swap_area: str) -> None:
    report = helper.c.ok("Apply", plan_json(priority_change(swap_area, 5, 20)), False, False)
    assert report["result"] == "committed" and knobs.swap_areas()[swap_area][2] == 20
    helper.c.ok("Rollback", report["txid"], False, False)
    assert knobs.swap_areas()[swap_area][2] == 5


@pytest.mark.parametrize("swap_area", [-1], indirect=True)
def test_a_default_negative_priority_is_restored_without_a_preference(helper: Helper, swap_area: str) -> None:
    old = knobs.swap_areas()[swap_area][2]
    assert old < 0
    report = helper.c.ok("Apply", plan_json(priority_change(swap_area, old, 7)), False, False)
    assert knobs.swap_areas()[swap_area][2] == 7
    helper.c.ok("Rollback", report["txid"], False, False)
    assert knobs.swap_areas()[swap_area][2] < 0


@pytest.mark.parametrize("swap_area", [5], indirect=True)
def test_swap_priority_drift_and_unknown_areas_are_refused(helper: Helper, swap_area: str) -> None:
    name, text = helper.c.error("Apply", plan_json(priority_change(swap_area, 4, 20)), False, False)
    assert name == ERROR_PREFIX + "Drift" and swap_area in text
    name, text = helper.c.error("Apply", plan_json(priority_change(swap_area + "x", 5, 20)), False, False)
    assert name == ERROR_PREFIX + "InvalidArgs" and text.startswith("changes[0].area") and swap_area in text
    assert knobs.swap_areas()[swap_area][2] == 5


def swap_file_change(size: int = 64, priority: int = 9) -> dict[str, object]:
    return {"knob": "swap.file", "current": None, "target": size, "persistence": "persistent", "reason": "test",
            "path": f"{catalogue.SWAP_FILE_DIRS[0]}/{catalogue.SWAP_FILE_NAME}", "priority": priority}


def test_swap_file_is_created_without_holes_activated_and_removed(helper: Helper) -> None:
    assert not os.path.exists(SWAP_DIR_ROOT)
    change = swap_file_change()
    path = str(change["path"])
    dry = helper.c.ok("Apply", plan_json(change), True, False)
    assert dry["result"] == "dry-run" and not os.path.exists(SWAP_DIR_ROOT)

    report = helper.c.ok("Apply", plan_json(change), False, False)
    assert report["result"] == "committed" and report["changes"][0]["new"] == 64
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    assert st.st_size == 64 * 1024 * 1024 and st.st_blocks * 512 >= st.st_size
    assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
    assert knobs.swap_areas()[path][2] == 9
    blkid = subprocess.run(["blkid", "-o", "value", "-s", "TYPE", path], capture_output=True, text=True)
    assert blkid.stdout.strip() == "swap"
    assert helper.journal()[-1]["steps"][0]["dirs"] == [SWAP_DIR_ROOT, os.path.dirname(path)]

    assert helper.c.ok("Apply", plan_json(change), False, False)["result"] == "unchanged"  # already in place
    for force in (False, True):  # a file of another size is never resized, adopted or deleted
        name, text = helper.c.error("Apply", plan_json({**change, "target": 128}), False, force)
        assert name == ERROR_PREFIX + "InvalidArgs" and text.startswith("changes[0].path: exists already (64 MiB)")

    helper.c.ok("Rollback", report["txid"], False, False)
    assert path not in knobs.swap_areas() and not os.path.exists(SWAP_DIR_ROOT)


def test_the_swap_file_of_an_earlier_apply_is_swapped_on_again_after_a_reboot(helper: Helper) -> None:
    """After a reboot the file is there and inactive: the boot unit's apply swaps it on (not recreated, not
    adopted if it is not ours), that transaction's undo only swaps it off, the first one's removes it."""
    change = swap_file_change()
    path = str(change["path"])
    first = helper.c.ok("Apply", plan_json(change), False, False)
    inode = os.stat(path).st_ino
    subprocess.run(["swapoff", path], check=True)  # what a reboot leaves
    try:
        again = helper.c.ok("Apply", plan_json(change), False, False)
        assert again["result"] == "committed" and knobs.swap_areas()[path][2] == 9
        assert os.stat(path).st_ino == inode
        helper.c.ok("Rollback", again["txid"], False, False)
        assert path not in knobs.swap_areas() and os.stat(path).st_ino == inode

        os.chmod(path, 0o644)  # not what the helper makes: never swapped on
        name, text = helper.c.error("Apply", plan_json(change), False, False)
        assert name == ERROR_PREFIX + "InvalidArgs" and "is not an autoglm-tune swap file" in text
        assert path not in knobs.swap_areas()
        os.chmod(path, 0o600)

        directory = os.path.dirname(path)  # a directory someone else could swap the file in: never swapped on
        for unsafe, problem in ((lambda: os.chmod(directory, 0o770), "is writable by group or others (mode 0770)"),
                                (lambda: os.chown(directory, 65534, 0), "is owned by uid 65534, not root (mode 0700)")):
            unsafe()
            name, text = helper.c.error("Apply", plan_json(change), False, False)
            assert name == ERROR_PREFIX + "InvalidArgs"
            assert text.split(";")[0] == f"changes[0].path: {directory} {problem}"
            assert path not in knobs.swap_areas()
            os.chown(directory, 0, 0)
            os.chmod(directory, 0o700)
    finally:
        os.chown(os.path.dirname(path), 0, 0)
        os.chmod(os.path.dirname(path), 0o700)
        helper.c.ok("Rollback", first["txid"], False, False)
    assert not os.path.exists(path) and not os.path.exists(SWAP_DIR_ROOT)


UNSAFE_DIRS = {  # a directory on the way to a swap file that someone but root could change, and what is refused
    "world-writable": ("/var/swap", 0o777, 0, "/var/swap is writable by group or others (mode 0777)"),
    "group-writable above": (SWAP_DIR_ROOT, 0o770, 0, f"{SWAP_DIR_ROOT} is writable by group or others (mode 0770)"),
    "another user's": ("/swap", 0o755, 65534, "/swap is owned by uid 65534, not root (mode 0755)"),
    "a symbolic link": ("/swap", 0o700, 0, "/swap is a symbolic link or not a directory"),
}


@pytest.mark.parametrize("case", UNSAFE_DIRS)
def test_swap_file_below_a_directory_others_could_change_is_refused_and_nothing_made(
        helper: Helper, tmp_path: Path, case: str) -> None:
    directory, mode, uid, problem = UNSAFE_DIRS[case]
    real = Path(directory) if case != "a symbolic link" else tmp_path / "elsewhere"
    assert not os.path.lexists(directory)
    real.mkdir()
    os.chown(real, uid, 0)
    real.chmod(mode)
    if real != Path(directory):
        os.symlink(real, directory)
    change = {**swap_file_change(), "path": next(f"{d}/{catalogue.SWAP_FILE_NAME}" for d in catalogue.SWAP_FILE_DIRS
                                                 if d == directory or d.startswith(directory + "/"))}
    journal = helper.journal()
    try:
        for dry_run in (True, False):
            name, text = helper.c.error("Apply", plan_json(change), dry_run, False)
            assert (name, text) == (ERROR_PREFIX + "InvalidArgs", f"changes[0].path: {problem}; allowed: "
                                    + knobs.SAFE_DIRS)
        assert os.listdir(real) == [] and helper.journal() == journal and str(change["path"]) not in knobs.swap_areas()
    finally:
        if real != Path(directory):
            os.unlink(directory)
        real.rmdir()


@pytest.mark.parametrize("fstype", ["btrfs", "tmpfs"])
def test_swap_file_on_a_filesystem_that_cannot_hold_one_is_refused(helper: Helper, tmp_path: Path, fstype: str) -> None:
    """btrfs (copy-on-write: swapon needs nocow files) and tmpfs, mounted where the helper may put a swap file."""
    directory = Path("/var/swap")
    assert not directory.exists()
    directory.mkdir()
    if fstype == "btrfs":
        image = tmp_path / "btrfs.img"
        with open(image, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, 256 * 1024 * 1024)
        subprocess.run(["mkfs.btrfs", "-q", str(image)], check=True, capture_output=True)
        mount = ["mount", "-o", "loop", str(image), str(directory)]
    else:
        mount = ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(directory)]  # not 1777
    subprocess.run(mount, check=True)
    try:
        change = {**swap_file_change(), "path": f"{directory}/{catalogue.SWAP_FILE_NAME}"}
        name, text = helper.c.error("Apply", plan_json(change), False, False)
        assert name == ERROR_PREFIX + "InvalidArgs"
        assert text.startswith(f"changes[0].path: lies on {fstype}") and "ext4" in text
        assert not os.path.exists(change["path"])
    finally:
        subprocess.run(["umount", str(directory)], check=True)
        directory.rmdir()


def test_swapoff_guard_arithmetic() -> None:
    """The refusal itself cannot be provoked here (24 GiB free); its rule is checked at the boundary."""
    from autoglm_helper.knobs import SWAPOFF_MARGIN_KIB, swapoff_fits

    assert swapoff_fits(0, SWAPOFF_MARGIN_KIB)
    assert not swapoff_fits(0, SWAPOFF_MARGIN_KIB - 1)
    assert swapoff_fits(1_000_000, 1_200_000 + SWAPOFF_MARGIN_KIB)
    assert not swapoff_fits(1_000_000, 1_200_000 + SWAPOFF_MARGIN_KIB - 1)


def test_areas_back_at_kernel_priorities_are_swapped_on_again_in_their_old_order() -> None:
    """Found on the guest: /dev/sda at -2 and a file at -3 came back as -3 and -2 (undo in reverse apply
    order), which reversed which one the kernel fills first."""
    from autoglm_helper.transaction import undo_order

    steps = [{"knob": "swap.priority", "area": "/dev/sda", "old": -2}, {"knob": "vm.swappiness", "old": 60},
             {"knob": "swap.priority", "area": "/swapfile", "old": -3},
             {"knob": "swap.priority", "area": "/dev/nvme0n1p2", "old": 5}]
    assert [s.get("area", s["knob"]) for s in undo_order(steps)] == \
        ["/dev/nvme0n1p2", "/dev/sda", "vm.swappiness", "/swapfile"]
