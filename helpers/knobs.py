"""One small unit per kind of knob: read the live value, check a change, write it, undo it.

A step is a JSON-able dict (it lives in the undo journal): knob, subject, persistence, old, target,
new (the value read back), state, plus area / path / priority / dirs for swap steps. Every undo is
idempotent: restoring a value that is already the old one does nothing.
"""

from __future__ import annotations

import ctypes
import os
import stat
import uuid
from typing import Any

from . import catalogue
from .catalogue import CatalogueError, Value

SWAP_FLAG_PREFER = 0x8000
SWAPOFF_MARGIN_KIB = 64 * 1024  # what must stay free after the swapped pages came back
SWAP_FILE_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs")  # no CoW, fallocate gives no holes
_libc = ctypes.CDLL(None, use_errno=True)

Step = dict[str, Any]


def _unescape(field: str) -> str:
    """/proc/swaps and mountinfo write space, tab, newline and backslash as octal escapes."""
    for code in ("\\040", "\\011", "\\012", "\\134"):
        field = field.replace(code, chr(int(code[1:], 8)))
    return field


def swap_areas() -> dict[str, tuple[int, int, int]]:
    """Active swap areas: path → (size KiB, used KiB, priority)."""
    with open("/proc/swaps") as f:
        rows = [line.split() for line in f.read().splitlines()[1:]]
    return {_unescape(r[0]): (int(r[2]), int(r[3]), int(r[4])) for r in rows if len(r) == 5}


def _meminfo(key: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def compressors() -> list[str]:
    """Compression algorithms zswap can use: /proc/crypto entries of a compression type."""
    names, name = set(), ""
    with open("/proc/crypto") as f:
        for line in f:
            key, _, value = (part.strip() for part in line.partition(":"))
            if key == "name":
                name = value
            elif key == "type" and value in catalogue.COMPRESSION_CRYPTO_TYPES:
                names.add(name)
    return sorted(names)


def filesystem_of(path: str) -> str:
    """The type of the filesystem the (possibly not yet existing) path would live on."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    path, best, fstype = os.path.realpath(path), "", "unknown"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mount = _unescape(fields[4])
            inside = path == mount or path.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, fstype = mount, fields[fields.index("-") + 1]
    return fstype


def _swapon(path: str, priority: int) -> None:
    flags = SWAP_FLAG_PREFER | priority if priority >= 0 else 0
    if _libc.swapon(path.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"swapon {path}: {os.strerror(err)}")


def _swapoff(path: str) -> None:
    if _libc.swapoff(path.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"swapoff {path}: {os.strerror(err)}")


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _scalar_path(step: Step) -> str:
    return "/" + catalogue.SCALAR_KNOBS[step["knob"]].path


def read(step: Step) -> Value | None:
    """The live value of what the step acts on (None: swap area not active / swap file absent)."""
    knob = step["knob"]
    if knob in catalogue.SCALAR_KNOBS:
        with open(_scalar_path(step)) as f:
            return catalogue.SCALAR_KNOBS[knob].parse(f.read())
    if knob == "swap.priority":
        area = swap_areas().get(step["area"])
        return None if area is None else area[2]
    try:
        return os.lstat(step["path"]).st_size // (1024 * 1024)
    except (FileNotFoundError, NotADirectoryError):
        return None


def check(step: Step, where: str) -> None:
    """Live preconditions beyond the catalogue; raises CatalogueError naming the field."""
    knob = step["knob"]
    if knob in catalogue.SCALAR_KNOBS and not os.path.exists(_scalar_path(step)):
        raise CatalogueError(f"{where}.knob", f"{knob} does not exist on this kernel", "the knobs this kernel has")
    if knob == "zswap.compressor" and step["target"] not in compressors():
        raise CatalogueError(f"{where}.target", f"{step['target']!r} is not available", ", ".join(compressors()))
    if knob == "swap.priority":
        areas = swap_areas()
        if step["area"] not in areas:
            raise CatalogueError(f"{where}.area", f"{step['area']!r} is not an active swap area", ", ".join(areas))
        used, available = areas[step["area"]][1], _meminfo("MemAvailable")
        if not swapoff_fits(used, available):
            raise CatalogueError(
                f"{where}.area",
                f"{used} KiB in use would not fit back into memory ({available} KiB available)",
                "an area whose used pages × 1.2 + 64 MiB fit into MemAvailable",
            )
    if knob == "swap.file":
        existing = read(step)
        if existing == step["target"]:
            # in place already (the step is left out), or made by an earlier apply and inactive since a reboot:
            # then the step is its swapon, and its undo a swapoff (the file is the earlier transaction's)
            if step["path"] not in swap_areas():
                _check_own_swap_file(step["path"], step["target"], where)
                step["activate"] = True
            return
        if existing is not None:  # never adopted, resized or deleted by a failed apply
            raise CatalogueError(f"{where}.path", f"exists already ({existing} MiB)", "a path where no file exists")
        fstype = filesystem_of(step["path"])
        if fstype not in SWAP_FILE_FILESYSTEMS:
            allowed = "a directory on " + ", ".join(SWAP_FILE_FILESYSTEMS)
            raise CatalogueError(f"{where}.path", f"lies on {fstype}", allowed)
        parent = step["path"]
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        st = os.statvfs(parent)
        if st.f_bavail * st.f_frsize < (step["target"] + 256) * 1024 * 1024:
            raise CatalogueError(f"{where}.target", f"{step['target']} MiB do not fit", "less than the free space")
        step["dirs"] = []  # directories this step will create, deepest last
        directory = os.path.dirname(step["path"])
        while not os.path.exists(directory):
            step["dirs"].insert(0, directory)
            directory = os.path.dirname(directory)


def _check_own_swap_file(path: str, size_mib: int, where: str) -> None:
    """An inactive file at our path is swapped on only if it is what write() makes: a regular file of root's,
    mode 0600, of the planned size, with a swap signature (swapon checks the header again)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        st, page = os.fstat(fd), os.sysconf("SC_PAGE_SIZE")
        ours = (stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
                and st.st_size == size_mib * 1024 * 1024 and os.pread(fd, 10, page - 10) == b"SWAPSPACE2")
    finally:
        os.close(fd)
    if not ours:
        raise CatalogueError(f"{where}.path", "exists and is not an autoglm-tune swap file",
                             "a path where no file exists, or the swap file an earlier apply made")


def swapoff_fits(used_kib: int, available_kib: int) -> bool:
    """swapoff faults every page of the area back into RAM: only when they fit, with 20 % and 64 MiB to spare."""
    return used_kib * 1.2 + SWAPOFF_MARGIN_KIB <= available_kib


def swap_header(size: int, page: int) -> bytes:
    """A version 1 swap header (what mkswap writes): no bad pages, a random UUID, no label."""
    info = (1).to_bytes(4, "little") + (size // page - 1).to_bytes(4, "little") + bytes(4) + uuid.uuid4().bytes
    return bytes(1024) + info + bytes(page - 1024 - len(info) - 10) + b"SWAPSPACE2"


def write(step: Step) -> None:
    knob = step["knob"]
    if knob in catalogue.SCALAR_KNOBS:
        _write_text(_scalar_path(step), catalogue.SCALAR_KNOBS[knob].render(step["target"]))
    elif knob == "swap.priority":
        _swapoff(step["area"])
        try:
            _swapon(step["area"], step["target"])
        except OSError:
            _swapon(step["area"], step["old"])
            raise
    elif step.get("activate"):
        _swapon(step["path"], step["priority"])
    else:
        for directory in step["dirs"]:
            os.mkdir(directory, 0o700)
        size, page = step["target"] * 1024 * 1024, os.sysconf("SC_PAGE_SIZE")
        fd = os.open(step["path"], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
            os.pwrite(fd, swap_header(size, page), 0)
            os.fsync(fd)
            if os.fstat(fd).st_blocks * 512 < size:
                raise OSError(f"{step['path']}: the file has holes; the filesystem cannot hold swap files")
        finally:
            os.close(fd)
        _swapon(step["path"], step["priority"])


def restore(step: Step) -> None:
    """Put the old state back; does nothing where it is already back."""
    knob, live = step["knob"], read(step)
    if knob in catalogue.SCALAR_KNOBS:
        if live != step["old"]:
            _write_text(_scalar_path(step), catalogue.SCALAR_KNOBS[knob].render(step["old"]))
    elif knob == "swap.priority":
        if live is not None and (live == step["old"] or (live < 0 and step["old"] < 0)):
            return
        if live is not None:
            _swapoff(step["area"])
        _swapon(step["area"], step["old"])
    else:
        if step["path"] in swap_areas():
            _swapoff(step["path"])
        if live is not None and not step.get("activate"):
            os.unlink(step["path"])
        for directory in reversed(step.get("dirs", [])):
            if os.path.isdir(directory) and not os.listdir(directory):
                os.rmdir(directory)
