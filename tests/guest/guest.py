"""The guest test host: a real Debian 13 machine under QEMU (research: guest-test-host.md).

systemd as PID 1, cgroup v2, kernel 6.12 with the zswap shrinker, polkitd, a sudo user, 2 vCPUs, 4 GiB, an
emulated NVMe disk beside a rotational SATA disk. The image is built once (image/build.sh) and booted once;
the booted machine is saved (QEMU migration to a file), and every test resumes a copy of it on fresh qcow2
overlays in seconds. Commands go over SSH on a loopback port; the guest has no other network.

Under TCG (the KVM here is PVM, which runs no stock kernel) the guest is about 11x slower than the host:
functional tests only, never timings.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import tarfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CACHE = Path(os.environ.get("AUTOGLM_GUEST_CACHE", "/var/cache/autoglm-tune-test"))
WHEELHOUSE_IN_GUEST = "/var/cache/autoglm-wheelhouse"  # image/in-chroot.sh points /etc/pip.conf here
NVME_SERIAL = "NVME0001"
DISK_GIB = {"hdd": 8, "nvme": 8}


FIGURES = Path(os.environ.get("AUTOGLM_GUEST_FIGURES", "/var/tmp/autoglm-guest-figures.txt"))


def figure(line: str) -> None:
    """Timings of the suite's steps, printed and kept for docs (under TCG: functional, never a benchmark)."""
    print(f"[guest figure] {line}")
    with FIGURES.open("a") as out:
        out.write(f"{time.strftime('%FT%T')} {line}\n")


class GuestError(RuntimeError):
    """The guest did not start, answer or come back in time."""


def _log(message: str) -> None:
    print(f"[guest {time.strftime('%H:%M:%S')}] {message}", flush=True)


def accel() -> list[str]:
    """KVM only where a real kvm_intel/kvm_amd runs stock kernels; the PVM flavour here does not."""
    if Path("/sys/module/kvm_intel").exists() or Path("/sys/module/kvm_amd").exists():
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg,thread=multi,tb-size=512", "-cpu", "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt,+cx16"]


def build_image() -> Path:
    """The cached image folder (image/build.sh builds it the first time, about 2 min)."""
    done = subprocess.run([str(HERE / "image" / "build.sh")], check=True, capture_output=True, text=True)
    return Path(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Qmp:
    """QEMU's machine protocol over its unix socket: one command at a time, events skipped."""

    def __init__(self, path: Path, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"no QMP socket at {path}") from None
                time.sleep(0.1)
        self.sock.settimeout(timeout)
        self.reader = self.sock.makefile("r")
        json.loads(self.reader.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: object) -> object:
        self.sock.sendall(json.dumps({"execute": command, "arguments": arguments}).encode() + b"\n")
        while True:
            line = self.reader.readline()
            if not line:
                raise GuestError(f"QMP closed during {command}")
            reply = json.loads(line)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise GuestError(f"QMP {command}: {reply['error']}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()


@dataclass(frozen=True)
class Snapshot:
    """A saved running machine: disk bases (read-only) and the migration stream of its RAM and devices."""

    folder: Path
    image: Path
    memory: str = "4G"
    cpus: int = 2

    @property
    def state(self) -> Path:
        return self.folder / "state.zst"


@dataclass(frozen=True)
class Installed:
    """The machine after the README's install command, and what that command printed."""

    snapshot: Snapshot
    command: str
    result: subprocess.CompletedProcess


class Guest:
    """One running guest on its own overlays. `ssh()` runs a shell command line as a user of the guest."""

    def __init__(self, workdir: Path, image: Path, memory: str = "4G", cpus: int = 2) -> None:
        self.workdir = workdir
        self.image = image
        # QEMU's -m and -smp; a saved state resumes only with the memory and CPUs it was saved with
        self.memory = memory
        self.cpus = cpus
        self.port = free_port()
        self.key = image / "key"
        self.qmp: Qmp | None = None
        self.proc: subprocess.Popen | None = None

    # --- the machine -------------------------------------------------------------------------------

    def _qemu_argv(self, incoming: Path | None) -> list[str]:
        w = self.workdir
        argv = [
            "qemu-system-x86_64", "-machine", "q35", *accel(), "-smp", str(self.cpus), "-m", self.memory,
            "-nodefaults", "-no-user-config", "-display", "none",
            "-kernel", str(self.image / "vmlinuz"), "-initrd", str(self.image / "initrd.img"),
            # panic=5: a guest kernel that panics while booting reboots itself. Under TCG (no KVM here) the
            # Debian kernel sometimes oopses on an int3 in code being patched at boot, before init runs
            # (CI 2026-12-03, after a power cut); that is QEMU's, not the helper's, and costs a reboot, not the test.
            "-append", "root=/dev/vda rw console=ttyS0 quiet mitigations=off panic=5",
            "-drive", f"file={w / 'root.qcow2'},if=none,id=root,format=qcow2",
            "-device", "virtio-blk-pci,drive=root",
            "-device", "pcie-root-port,id=rp1,chassis=1,slot=1",
            "-drive", f"file={w / 'nvme.qcow2'},if=none,id=nv,format=qcow2",
            "-drive", f"file={w / 'hdd.qcow2'},if=none,id=hd,format=qcow2",
            "-device", "ide-hd,drive=hd,bus=ide.0,rotation_rate=7200",
            "-netdev", f"user,id=n0,hostfwd=tcp:127.0.0.1:{self.port}-:22",
            "-device", "virtio-net-pci,netdev=n0",
            "-qmp", f"unix:{w / 'qmp.sock'},server=on,wait=off",
            "-serial", f"file:{w / 'console.log'}",
        ]
        if incoming is not None:
            argv += ["-incoming", f"exec:zstd -dc {shlex.quote(str(incoming))}"]
        return argv

    def _overlays(self, root_base: Path, root_fmt: str, hdd_base: Path | None) -> None:
        w = self.workdir
        w.mkdir(parents=True, exist_ok=True)
        img = ["qemu-img", "create", "-q", "-f", "qcow2"]
        subprocess.run([*img, "-F", root_fmt, "-b", str(root_base), str(w / "root.qcow2")], check=True)
        if hdd_base is None:
            subprocess.run([*img, str(w / "hdd.qcow2"), f"{DISK_GIB['hdd']}G"], check=True)
        else:
            subprocess.run([*img, "-F", "qcow2", "-b", str(hdd_base), str(w / "hdd.qcow2")], check=True)
        subprocess.run([*img, str(w / "nvme.qcow2"), f"{DISK_GIB['nvme']}G"], check=True)

    def _spawn(self, incoming: Path | None) -> None:
        with open(self.workdir / "qemu.log", "w") as log:
            self.proc = subprocess.Popen(self._qemu_argv(incoming), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT)
        self.qmp = Qmp(self.workdir / "qmp.sock")

    def boot(self) -> None:
        """A cold boot from the image's root file system (used once, to make the saved state)."""
        self._overlays(self.image / "base.ext4", "raw", None)
        self._spawn(None)
        self.wait_ssh(timeout=420)

    def resume(self, snap: Snapshot, nvme: bool = True) -> None:
        """Resume a copy of a saved machine, hot-plug the NVMe disk (not migratable), set the clock."""
        self._overlays(snap.folder / "root.qcow2", "qcow2", snap.folder / "hdd.qcow2")
        self._spawn(snap.state)
        assert self.qmp is not None
        deadline = time.monotonic() + 120
        while self.qmp.execute("query-status")["status"] == "inmigrate":
            if time.monotonic() > deadline:
                raise GuestError("the saved state did not load in 120 s")
            time.sleep(0.2)
        self.qmp.execute("cont")
        self.wait_ssh(timeout=120)
        self.ssh(f"date -s @{time.time():.3f} >/dev/null")
        if nvme:
            self.plug_nvme()

    def plug_nvme(self) -> None:
        assert self.qmp is not None
        self.qmp.execute("device_add", driver="nvme", drive="nv", serial=NVME_SERIAL, bus="rp1", id="nvme0")
        self.ssh("for i in $(seq 100); do [ -b /dev/nvme0n1 ] && exit 0; sleep 0.2; done; exit 1")
        self.ssh("udevadm settle")

    def save(self, folder: Path) -> Snapshot:
        """Stop the machine and keep it: its disks become the read-only bases of later copies."""
        assert self.qmp is not None
        self.ssh("sync")
        self.close_ssh()
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "state.zst.tmp"
        self.qmp.execute("stop")
        self.qmp.execute("migrate", uri=f"exec:zstd -1 -T2 -q -o {shlex.quote(str(tmp))}")
        deadline = time.monotonic() + 300
        while (status := self.qmp.execute("query-migrate").get("status")) != "completed":
            if status == "failed" or time.monotonic() > deadline:
                raise GuestError(f"saving the machine: migration {status}")
            time.sleep(0.2)
        self.stop()
        for disk in ("root", "hdd"):
            dest = folder / f"{disk}.qcow2"
            shutil.move(self.workdir / f"{disk}.qcow2", dest)
            dest.chmod(0o444)
        tmp.rename(folder / "state.zst")
        return Snapshot(folder, self.image, self.memory, self.cpus)

    def stop(self) -> None:
        self.close_ssh()
        if self.qmp is not None:
            with contextlib.suppress(GuestError, OSError):
                self.qmp.execute("quit")
            self.qmp.close()
            self.qmp = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    # --- power -------------------------------------------------------------------------------------

    def boot_id(self) -> str:
        return self.ssh("cat /proc/sys/kernel/random/boot_id").stdout.strip()

    def _wait_new_boot(self, old: str, timeout: float) -> None:
        self.close_ssh()
        console = self.workdir / "console.log"
        seen = console.stat().st_size if console.exists() else 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(3)
            with contextlib.suppress(GuestError, subprocess.TimeoutExpired):
                done = self.ssh("cat /proc/sys/kernel/random/boot_id", check=False, timeout=15, connect_timeout=5)
                if done.returncode == 0 and done.stdout.strip() not in ("", old):
                    self.ssh(f"date -s @{time.time():.3f} >/dev/null")
                    self.ssh("systemctl is-system-running --wait >/dev/null || true", timeout=300)
                    with open(console, "rb") as log:
                        log.seek(seen)
                        panics = log.read().count(b"Kernel panic - not syncing")
                    if panics:
                        _log(f"the guest kernel panicked {panics} time(s) while booting and rebooted itself (panic=5)")
                    return
            self.close_ssh()
        raise GuestError(f"the guest did not come back within {timeout:.0f} s")

    def power_cut(self, old_boot_id: str, timeout: float = 420) -> None:
        """QMP `system_reset`, a power cut to the guest (its page cache is lost; what it flushed stays on the
        virtual disks); wait for the boot after it (`old_boot_id`: the boot that was cut)."""
        assert self.qmp is not None
        self.qmp.execute("system_reset")
        self._wait_new_boot(old_boot_id, timeout)

    def reboot(self, timeout: float = 420) -> None:
        """`systemctl reboot` and wait for a new boot id (about a minute under TCG)."""
        old = self.boot_id()
        self.ssh("systemctl reboot", check=False, timeout=30)
        self._wait_new_boot(old, timeout)

    # --- commands ----------------------------------------------------------------------------------

    def _ssh_base(self, user: str, connect_timeout: int = 10) -> list[str]:
        return ["ssh", "-i", str(self.key), "-p", str(self.port), "-o", "BatchMode=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
                "-o", f"ConnectTimeout={connect_timeout}", "-o", "ServerAliveInterval=10",
                "-o", "ControlMaster=auto", "-o", f"ControlPath={self.workdir}/ssh-%r", "-o", "ControlPersist=600",
                f"{user}@127.0.0.1"]

    def ssh(self, command: str, user: str = "root", check: bool = True, timeout: float = 600,
            input: str | bytes | None = None, connect_timeout: int = 10) -> subprocess.CompletedProcess:
        """Run a shell command line in the guest; stdout/stderr as text."""
        binary = isinstance(input, bytes)
        done = subprocess.run([*self._ssh_base(user, connect_timeout), command], capture_output=True,
                              text=not binary, input=input, timeout=timeout)
        if binary:
            done = subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"),
                                               done.stderr.decode(errors="replace"))
        if done.returncode == 255 and check:
            raise GuestError(f"ssh {user}@guest failed: {done.stderr.strip()}")
        if check and done.returncode != 0:
            raise AssertionError(f"guest command failed (exit {done.returncode}) as {user}: {command}\n"
                                 f"--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}")
        return done

    def put(self, data: bytes, path: str, user: str = "root", mode: str = "0644") -> None:
        """Write bytes to a file in the guest."""
        self.ssh(f"cat > {shlex.quote(path)} && chmod {mode} {shlex.quote(path)}", user=user, input=data)

    def put_file(self, local: Path, path: str, user: str = "root", mode: str = "0644") -> None:
        self.put(local.read_bytes(), path, user=user, mode=mode)

    def wait_ssh(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise GuestError(f"QEMU exited ({self.proc.returncode}): {self.console_tail()}")
            with contextlib.suppress(subprocess.TimeoutExpired):
                if self.ssh("true", check=False, timeout=20, connect_timeout=5).returncode == 0:
                    return
            time.sleep(1)
        raise GuestError(f"no ssh within {timeout:.0f} s: {self.console_tail()}")

    def close_ssh(self) -> None:
        for control in self.workdir.glob("ssh-*"):
            subprocess.run(["ssh", "-o", f"ControlPath={control}", "-O", "exit", "x"], capture_output=True,
                           timeout=10)

    def console_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.workdir / "console.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no console log)"

    def journal(self, unit: str | None = None) -> str:
        what = f"-u {shlex.quote(unit)}" if unit else ""
        return self.ssh(f"journalctl -b --no-pager -q {what} | tail -n 80", check=False).stdout


# --- what goes into a guest --------------------------------------------------------------------------

def booted_snapshot(memory: str = "4G", cpus: int = 2) -> Snapshot:
    """The image booted once with `memory` of RAM and `cpus` vCPUs and saved, cached beside the image (about
    1-2 min the first time)."""
    image = build_image()
    # keyed by the machine's shape: a saved state resumes only into the same devices, memory and CPUs
    shape = Guest(Path("/W"), image, memory, cpus)
    shape.port = 0
    recipe = hashlib.sha256(json.dumps(shape._qemu_argv(None)).encode()).hexdigest()[:12]
    folder = image / f"booted-{recipe}"
    if (folder / "state.zst").exists():
        return Snapshot(folder, image, memory, cpus)
    work = Path(f"{folder}.work")
    shutil.rmtree(work, ignore_errors=True)
    started = time.monotonic()
    guest = Guest(work, image, memory, cpus)
    try:
        guest.boot()
        booted = time.monotonic() - started
        guest.ssh("systemctl is-system-running --wait || true", timeout=600)
        guest.ssh("systemd-machine-id-setup --commit >/dev/null 2>&1 || true; sync")
        snap = guest.save(Path(f"{folder}.tmp"))
    finally:
        guest.stop()
    (Path(f"{folder}.tmp") / "booted").write_text(
        f"cold boot to ssh {booted:.0f} s, booted and saved {time.monotonic() - started:.0f} s\n")
    os.replace(f"{folder}.tmp", folder)
    shutil.rmtree(work, ignore_errors=True)
    return Snapshot(folder, snap.image, memory, cpus)


def wheelhouse() -> Path:
    """The project's dependencies as cp313 wheels, plus setuptools to build the project: the guest has no
    package index, so `pip install .` there finds them through /etc/pip.conf (image/in-chroot.sh)."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    wanted = sorted([*deps, *build, "wheel"])
    key = hashlib.sha256(json.dumps(wanted).encode()).hexdigest()[:12]
    folder = CACHE / f"wheelhouse-cp313-{key}"
    if (folder / "done").exists():
        return folder
    tmp = Path(f"{folder}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pip = Path(os.environ.get("AUTOGLM_TEST_VENV", "/opt/autoglm-venv")) / "bin" / "pip"
    subprocess.run([str(pip), "download", "-q", "--disable-pip-version-check", "--only-binary=:all:",
                    "--python-version", "3.13", "--implementation", "cp", "--abi", "cp313", "--abi", "abi3",
                    "--abi", "none", "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux2014_x86_64", "--platform", "any", "-d", str(tmp), *wanted], check=True)
    (tmp / "done").write_text("\n".join(wanted) + "\n")
    os.replace(tmp, folder)
    return folder


def source_tarball() -> bytes:
    """The project as a checkout has it (tracked and new, not ignored files): what a user clones."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           check=True, capture_output=True).stdout.decode().split("\0")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in names:
            if name and (REPO / name).is_file():
                tar.add(REPO / name, arcname=name, recursive=False)
    return buf.getvalue()


def tar_dir(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for path in sorted(folder.iterdir()):
            tar.add(path, arcname=path.name)
    return buf.getvalue()


def readme_command(section: str = "Install and see what would change") -> str:
    """The README's first shell command, word for word: the first ```sh block after `section`."""
    text = (REPO / "README.md").read_text()
    start = text.index(section)
    block = text.index("```sh\n", start) + len("```sh\n")
    return text[block:text.index("```", block)].strip()
