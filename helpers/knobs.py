"""One small class per kind of knob, each with read / check / write / restore: a sysctl, a zswap parameter, a
swap area's priority, a swap file (units are units.Systemd). `kinds(root)` gives the engine one of each.

A step is a JSON-able dict (it lives in the undo journal): knob, subject, persistence, old, target,
new (the value read back), state, plus area / path / priority / dirs for swap steps. Every undo is
idempotent: restoring a value that is already the old one does nothing.

`root` is where /proc and /sys are read and written ("/" in the helper; a temporary tree in tests, so that the
engine's journal, read-back and recovery run on files as well as on the real kernel). Swap areas and swap files
are the host's whatever the root: swapon(2) and swapoff(2) take no root.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import uuid
from collections.abc import Callable, Collection
from typing import Any

from .contract import catalogue, procfs
from .contract.catalogue import CatalogueError, Value

SWAP_FLAG_PREFER = 0x8000
SWAPOFF_MARGIN_KIB = 64 * 1024  # what must stay free after the swapped pages came back
SWAP_FILE_FILESYSTEMS = ("ext2", "ext3", "ext4", "xfs")  # no CoW, fallocate gives no holes
_libc = ctypes.CDLL(None, use_errno=True)

Step = dict[str, Any]

def swap_areas(root: str = "/") -> dict[str, tuple[int, int, int]]:
    """Active swap areas: path → (size KiB, used KiB, priority)."""
    with open(os.path.join(root, "proc/swaps")) as f:
        return {a.path: (a.size_kib, a.used_kib, a.priority) for a in procfs.parse_swaps(f.read())}


def _meminfo(key: str, root: str) -> int:
    with open(os.path.join(root, "proc/meminfo")) as f:
        return procfs.parse_meminfo(f.read())[key]


def compressors(root: str = "/") -> list[str]:
    """Compression algorithms zswap can use: /proc/crypto entries of a compression type."""
    names, name = set(), ""
    with open(os.path.join(root, "proc/crypto")) as f:
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
            mount = procfs.unescape(fields[4])
            inside = path == mount or path.startswith(mount.rstrip("/") + "/")
            if inside and len(mount) >= len(best):
                best, fstype = mount, fields[fields.index("-") + 1]
    return fstype


def _swapoff(fd: int, shown: str) -> None:
    if _libc.swapoff(f"/proc/self/fd/{fd}".encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"swapoff {shown}: {os.strerror(err)}")


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_AREA_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
SAFE_DIRS = "directories owned by root, not writable by group or others, none a symbolic link"


def _check_dir(fd: int, path: str, field: str) -> None:
    """The open directory is root's and only root may write to it (checked on the fd, not by name)."""
    st = os.fstat(fd)
    mode = f"mode {stat.S_IMODE(st.st_mode):04o}"
    if st.st_uid != 0:
        raise CatalogueError(field, f"{path} is owned by uid {st.st_uid}, not root ({mode})", SAFE_DIRS)
    if st.st_mode & 0o022:
        raise CatalogueError(field, f"{path} is writable by group or others ({mode})", SAFE_DIRS)


def open_dir(directory: str, field: str, make: Collection[str] = ()) -> tuple[int, list[str]]:
    """Open `directory` one component at a time from /, never following a symbolic link, each one checked by
    _check_dir once open. The missing ones named in `make` are created (mode 0700). Returns the fd of the
    deepest directory that exists (the caller closes it) and the missing ones below it, shallowest first."""
    parts = [part for part in directory.split("/") if part]
    fd, here = os.open("/", _DIR_FLAGS), "/"
    try:
        for i, name in enumerate(parts):
            _check_dir(fd, here, field)
            path = os.path.join(here, name)
            if path in make:
                os.mkdir(name, 0o700, dir_fd=fd)
            try:
                child = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                return fd, ["/" + "/".join(parts[: j + 1]) for j in range(i, len(parts))]
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise CatalogueError(field, f"{path} is a symbolic link or not a directory", SAFE_DIRS) from None
            os.close(fd)
            fd, here = child, path
        _check_dir(fd, here, field)
        return fd, []
    except BaseException:
        os.close(fd)
        raise


def _open_own_swap_file(dfd: int, step: Step, field: str) -> int:
    """The inactive file at our path, opened (the caller closes it) if it is what write() makes: a regular file
    of root's, mode 0600, of the planned size, with a swap signature (swapon checks the header again)."""
    fd = os.open(os.path.basename(step["path"]), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
    st, page = os.fstat(fd), os.sysconf("SC_PAGE_SIZE")
    if (stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
            and st.st_size == step["target"] * 1024 * 1024 and os.pread(fd, 10, page - 10) == b"SWAPSPACE2"):
        return fd
    os.close(fd)
    raise CatalogueError(field, "exists and is not an autoglm-tune swap file",
                         "a path where no file exists, or the swap file an earlier apply made")


def swapoff_fits(used_kib: int, available_kib: int) -> bool:
    """swapoff faults every page of the area back into RAM: only when they fit, with 20 % and 64 MiB to spare."""
    return used_kib * 1.2 + SWAPOFF_MARGIN_KIB <= available_kib


def swap_header(size: int, page: int) -> bytes:
    """A version 1 swap header (what mkswap writes): no bad pages, a random UUID, no label."""
    info = (1).to_bytes(4, "little") + (size // page - 1).to_bytes(4, "little") + bytes(4) + uuid.uuid4().bytes
    return bytes(1024) + info + bytes(page - 1024 - len(info) - 10) + b"SWAPSPACE2"


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class Sysctl:
    """A /proc/sys value, parsed and rendered by its catalogue entry."""

    def __init__(self, root: str = "/") -> None:
        self.root = root

    def _path(self, step: Step) -> str:
        return os.path.join(self.root, catalogue.SCALAR_KNOBS[step["knob"]].path)

    def check(self, step: Step, where: str) -> None:
        if not os.path.exists(self._path(step)):
            raise CatalogueError(f"{where}.knob", f"{step['knob']} does not exist on this kernel",
                                 "the knobs this kernel has")

    def read(self, step: Step) -> Value:
        with open(self._path(step)) as f:
            return catalogue.SCALAR_KNOBS[step["knob"]].parse(f.read())

    def write(self, step: Step) -> None:
        _write_text(self._path(step), catalogue.SCALAR_KNOBS[step["knob"]].render(step["target"]))

    def restore(self, step: Step) -> None:
        if self.read(step) != step["old"]:
            _write_text(self._path(step), catalogue.SCALAR_KNOBS[step["knob"]].render(step["old"]))


class ZswapParameter(Sysctl):
    """A /sys/module/zswap/parameters value; a compressor must be one that /proc/crypto lists."""

    def check(self, step: Step, where: str) -> None:
        super().check(step, where)
        if step["knob"] == "zswap.compressor" and step["target"] not in (available := compressors(self.root)):
            raise CatalogueError(f"{where}.target", f"{step['target']!r} is not available", ", ".join(available))


class _Swap:
    """What both swap kinds share: /proc/swaps and /proc/meminfo under the root, and how an area is swapped on.

    Where the helper runs in a mount namespace of its own (its unit's ProtectSystem=, PrivateMounts=), a swapon
    from in there ties the area to the namespace's copy of the mount, and once the helper exits and the namespace
    is gone /proc/swaps names it by a path relative to that detached mount ("/autoglm-tune.swap", "/sda1"), which
    no reader can find again (found by tests/guest/test_fleet_ssh.py). So the engine sets `host_swapon` to
    units.Systemd.swapon when PID 1 is systemd: swapon(8) run by systemd, in PID 1's mount namespace. None: the
    syscall here (no systemd on the bus, as in the host tests)."""

    def __init__(self, root: str = "/") -> None:
        self.root = root
        self.host_swapon: Callable[[str, int], None] | None = None

    def _swapon(self, fd: int, priority: int, shown: str) -> None:
        """swapon the file or device open as `fd`, through /proc/self/fd: the name is not looked up again. Under
        systemd, swapon(8) by its path `shown` instead; the path's directories were checked root-owned and not
        writable by others, so it names the file that `fd` is."""
        if self.host_swapon is not None:
            self.host_swapon(shown, priority)
            if shown not in swap_areas(self.root):
                raise OSError(errno.EIO, f"swapon {shown}: swapon(8) did not turn it on (its unit's log is in the "
                              "journal)")
            return
        flags = SWAP_FLAG_PREFER | priority if priority >= 0 else 0
        if _libc.swapon(f"/proc/self/fd/{fd}".encode(), flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"swapon {shown}: {os.strerror(err)}")


class SwapArea(_Swap):
    """An active swap area's priority: changed by swapoff and swapon of the same open file."""

    def check(self, step: Step, where: str) -> None:
        areas = swap_areas(self.root)
        if step["area"] not in areas:
            raise CatalogueError(f"{where}.area", f"{step['area']!r} is not an active swap area", ", ".join(areas))
        used, available = areas[step["area"]][1], _meminfo("MemAvailable", self.root)
        if not swapoff_fits(used, available):
            raise CatalogueError(
                f"{where}.area",
                f"{used} KiB in use would not fit back into memory ({available} KiB available)",
                "an area whose used pages × 1.2 + 64 MiB fit into MemAvailable",
            )

    def read(self, step: Step) -> int | None:
        """The priority, or None when the area is not active."""
        area = swap_areas(self.root).get(step["area"])
        return None if area is None else area[2]

    def write(self, step: Step) -> None:
        fd = os.open(step["area"], _AREA_FLAGS)  # swapoff and swapon act on the same file, looked up once
        try:
            _swapoff(fd, step["area"])
            try:
                self._swapon(fd, step["target"], step["area"])
            except OSError:
                self._swapon(fd, step["old"], step["area"])
                raise
        finally:
            os.close(fd)

    def restore(self, step: Step) -> None:
        live = self.read(step)
        if isinstance(live, int) and (live == step["old"] or (live < 0 and step["old"] < 0)):
            return
        fd = os.open(step["area"], _AREA_FLAGS)
        try:
            if live is not None:
                _swapoff(fd, step["area"])
            self._swapon(fd, step["old"], step["area"])
        finally:
            os.close(fd)


class SwapFile(_Swap):
    """A swap file the helper makes (or swaps on again after a reboot), and removes on undo: every name is
    looked up through fds of directories opened by open_dir, none twice."""

    def read(self, step: Step) -> int | None:
        """Its size in MiB, or None when there is no file."""
        try:
            return os.lstat(step["path"]).st_size // (1024 * 1024)
        except (FileNotFoundError, NotADirectoryError):
            return None

    def check(self, step: Step, where: str) -> None:
        dfd, missing = open_dir(os.path.dirname(step["path"]), f"{where}.path")
        try:
            self._check_in(step, dfd, missing, where)
        finally:
            os.close(dfd)

    def _check_in(self, step: Step, dfd: int, missing: list[str], where: str) -> None:
        """check() of a swap file whose directory (or its deepest existing ancestor) open_dir opened as `dfd`."""
        existing = self.read(step)
        if existing == step["target"]:
            # in place already (the step is left out), or made by an earlier apply and inactive since a reboot:
            # then the step is its swapon, and its undo a swapoff (the file is the earlier transaction's)
            if step["path"] not in swap_areas(self.root):
                os.close(_open_own_swap_file(dfd, step, f"{where}.path"))
                step["activate"] = True
            return
        if existing is not None:  # never adopted, resized or deleted by a failed apply
            raise CatalogueError(f"{where}.path", f"exists already ({existing} MiB)", "a path where no file exists")
        fstype = filesystem_of(step["path"])
        if fstype not in SWAP_FILE_FILESYSTEMS:
            allowed = "a directory on " + ", ".join(SWAP_FILE_FILESYSTEMS)
            raise CatalogueError(f"{where}.path", f"lies on {fstype}", allowed)
        st = os.statvfs(dfd)
        if st.f_bavail * st.f_frsize < (step["target"] + 256) * 1024 * 1024:
            raise CatalogueError(f"{where}.target", f"{step['target']} MiB do not fit", "less than the free space")
        step["dirs"] = missing  # directories this step will create, deepest last

    def write(self, step: Step) -> None:
        """Make the directories and the file through fds from open_dir (no name is looked up twice), swapon it."""
        path, subject = step["path"], step["subject"]
        dfd, missing = open_dir(os.path.dirname(path), subject, () if step.get("activate") else step["dirs"])
        try:
            if missing:
                raise OSError(f"{missing[0]}: gone since the check")
            if step.get("activate"):
                fd = _open_own_swap_file(dfd, step, subject)
            else:
                size, page = step["target"] * 1024 * 1024, os.sysconf("SC_PAGE_SIZE")
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(os.path.basename(path), flags, 0o600, dir_fd=dfd)
            try:
                if not step.get("activate"):
                    os.posix_fallocate(fd, 0, size)
                    os.pwrite(fd, swap_header(size, page), 0)
                    os.fsync(fd)
                    if os.fstat(fd).st_blocks * 512 < size:
                        raise OSError(f"{path}: the file has holes; the filesystem cannot hold swap files")
                self._swapon(fd, step["priority"], path)
            finally:
                os.close(fd)
        finally:
            os.close(dfd)

    def restore(self, step: Step) -> None:
        """swapoff the file and (unless the step only swapped it on) unlink it and the directories the step made,
        each through an fd of its directory from open_dir; does nothing where they are gone already."""
        path, subject, exists = step["path"], step["subject"], self.read(step) is not None
        dfd, missing = open_dir(os.path.dirname(path), subject)
        try:
            if not missing and path in swap_areas(self.root):
                fd = os.open(os.path.basename(path), _AREA_FLAGS, dir_fd=dfd)
                try:
                    _swapoff(fd, path)
                finally:
                    os.close(fd)
            if not missing and exists and not step.get("activate"):
                os.unlink(os.path.basename(path), dir_fd=dfd)
        finally:
            os.close(dfd)
        for directory in reversed(step.get("dirs", [])):
            dfd, missing = open_dir(os.path.dirname(directory), subject)
            try:
                if not missing:
                    os.rmdir(os.path.basename(directory), dir_fd=dfd)
            except OSError as exc:  # gone already, or not empty: not ours to remove
                if exc.errno not in (errno.ENOENT, errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
            finally:
                os.close(dfd)


Kind = Sysctl | SwapArea | SwapFile


def kinds(root: str = "/") -> dict[str, Kind]:
    """What acts on each knob of the catalogue but `unit` (systemd changes units: units.Systemd)."""
    sysctl, zswap = Sysctl(root), ZswapParameter(root)
    scalars: dict[str, Kind] = {name: zswap if spec.path.startswith("sys/module/zswap/") else sysctl
                                for name, spec in catalogue.SCALAR_KNOBS.items()}
    return {**scalars, "swap.priority": SwapArea(root), "swap.file": SwapFile(root)}
