"""A real systemd booted in systemd-nspawn over a tmpfs overlay of the host root (research:
test-environment.md §6/§7), and a synchronous D-Bus client for its system bus.

Writes inside the container land in the overlay's upper directory (tmpfs), so the host disk is untouched.
`SYSTEMD_NSPAWN_API_VFS_WRITABLE=1` makes /proc/sys and /sys writable inside — those are the host's
kernel knobs; the tests snapshot them and assert they are unchanged.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from autoglm_helper.contract.bus import BUS_NAME, INTERFACE, OBJECT_PATH
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

MACHINE = "autoglm-ci"
SYSTEMD = ("org.freedesktop.systemd1", "/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")
PAYLOAD_CGROUPS = [Path(c) / d for c in ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")
                   for d in ("payload", "supervisor")]


TEST_UNITS = {
    # name: (unit file text, how to prepare it inside the container)
    "agt-enabled.service": "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n",
    "agt-handmade.service": "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n",
    "agt-disabled.service": "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n",
    "agt-static.service": "[Service]\nExecStart=/bin/sleep infinity\n",
    "agt-masked.service": "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n",
    "agt-runmasked.service": "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n",
    "agt-runtime.service": "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n",
    "agt-aliased.service": "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n",
    "agt-boot.service": "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n",
    "agt-timer.timer": "[Timer]\nOnCalendar=daily\n[Install]\nWantedBy=timers.target\n",
    "agt-timer.service": "[Service]\nType=oneshot\nExecStart=/bin/true\n",
    "tuned.service": "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n",
    # Never-touch units with ordinary units under them (only for this container: the host has none of these).
    # As Debian's networking.service Requires=ifupdown-pre.service; agt-ifpre in turn Requires agt-ifdeep.
    "networking.service": "[Unit]\nRequires=agt-ifpre.service\nAfter=agt-ifpre.service\n"
                          "[Service]\nExecStart=/bin/sleep infinity\n",
    "agt-ifpre.service": "[Unit]\nRequires=agt-ifdeep.service\nAfter=agt-ifdeep.service\n"
                         "[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/bin/true\n",
    "agt-ifdeep.service": "[Service]\nExecStart=/bin/sleep infinity\n",
    "auditd.service": "[Unit]\nBindsTo=agt-bound.service\nAfter=agt-bound.service\n"
                      "[Service]\nExecStart=/bin/sleep infinity\n",
    "agt-bound.service": "[Service]\nExecStart=/bin/sleep infinity\n",
    "apparmor.service": "[Unit]\nPartOf=agt-group.service\n[Service]\nExecStart=/bin/sleep infinity\n",
    "agt-group.service": "[Service]\nExecStart=/bin/sleep infinity\n",
    # a firewall with a vendor alias (Alias=, made by `systemctl enable`), as dbus-org.freedesktop.*.service
    "nftables.service": "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n"
                        "Alias=agt-firewall.service\n",
}
NEVER_TOUCH_TEST_UNITS = ("networking.service", "auditd.service", "apparmor.service", "nftables.service")
FAKE_TUNER = "/usr/sbin/tuned"  # what facts take as evidence that tuned is installed (its unit is above)
ALIAS = "agt-alias.service"  # a vendor alias symlink to agt-aliased.service
ETC_UNIT = "agt-etc.service"  # a unit file in /etc/systemd/system: cannot be masked
# Aliases made by hand in /etc/systemd/system for Debian's own units and aliases (names not on the never-touch list)
ETC_ALIASES = {"agt-kmod.service": "systemd-modules-load.service", "agt-procps.service": "procps.service"}

class Client:
    """A synchronous D-Bus client with its own event loop."""

    def __init__(self, address: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.bus: MessageBus = self.loop.run_until_complete(self._connect(address))

    @staticmethod
    async def _connect(address: str) -> MessageBus:
        return await MessageBus(bus_address=address, negotiate_unix_fd=True).connect()

    def call(self, dest: str, path: str, iface: str, member: str, sig: str = "", body: list[Any] | None = None,
             timeout: float = 60) -> Message:
        msg = Message(destination=dest, path=path, interface=iface, member=member, signature=sig, body=body or [])
        return self.loop.run_until_complete(asyncio.wait_for(self.bus.call(msg), timeout))

    def ok(self, dest: str, path: str, iface: str, member: str, sig: str = "", body: list[Any] | None = None) -> Any:
        reply = self.call(dest, path, iface, member, sig, body)
        assert reply.message_type == MessageType.METHOD_RETURN, (member, reply.error_name, reply.body)
        return reply.body

    def manager(self, member: str, sig: str = "", *args: Any) -> Any:
        return self.ok(*SYSTEMD, member, sig, list(args))

    def job(self, member: str, unit: str) -> None:
        """StartUnit/StopUnit and wait until the job is done (the job object is gone)."""
        job = self.manager(member, "ss", unit, "replace")[0]
        while self.call(SYSTEMD[0], job, "org.freedesktop.DBus.Properties", "Get", "ss",
                        ["org.freedesktop.systemd1.Job", "State"]).error_name is None:
            time.sleep(0.02)

    def unit_property(self, unit: str, prop: str) -> Any:
        path = self.manager("LoadUnit", "s", unit)[0]
        value = self.ok(SYSTEMD[0], path, "org.freedesktop.DBus.Properties", "Get", "ss",
                        ["org.freedesktop.systemd1.Unit", prop])[0]
        return value.value if isinstance(value, Variant) else value

    def close(self) -> None:
        self.bus.disconnect()
        self.loop.close()


class Container:
    """Boot with `start()`, stop with `stop()`; `run()` executes a command inside (nsenter)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.root = workdir / "root"
        self.ovl = workdir / "ovl"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.mounted: list[Path] = []
        self.preexisting_cgroups: set[Path] = set()

    def mount(self) -> None:
        self.preexisting_cgroups = {cg for cg in PAYLOAD_CGROUPS if cg.exists()}
        self.ovl.mkdir(parents=True)
        self.root.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2G", "tmpfs", str(self.ovl)], check=True)
        self.mounted.append(self.ovl)
        (self.ovl / "upper").mkdir()
        (self.ovl / "work").mkdir()
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                        f"lowerdir=/,upperdir={self.ovl}/upper,workdir={self.ovl}/work", str(self.root)], check=True)
        self.mounted.append(self.root)

    def boot(self, timeout: float = 60) -> None:
        env = {**os.environ, "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "1"}
        with open(self.dir / "nspawn.log", "ab") as log:
            self.nspawn = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "-M", MACHINE, "--register=no", "--keep-unit",
                 "--system-call-filter=@swap", "-b", "--console=pipe"],
                env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        state = ""
        while state not in ("running", "degraded"):
            if time.monotonic() > deadline or self.nspawn.poll() is not None:
                raise RuntimeError(f"the container did not boot (state {state!r}); see {self.dir / 'nspawn.log'}")
            time.sleep(0.1)
            if not self.leader:
                found = subprocess.run(["pgrep", "-P", str(self.nspawn.pid), "-x", "systemd"], capture_output=True,
                                       text=True).stdout.split()
                self.leader = int(found[0]) if found else 0
                continue
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()

    @property
    def address(self) -> str:
        return f"unix:path=/proc/{self.leader}/root/run/dbus/system_bus_socket"

    def run(self, *argv: str, check: bool = True, uid: int | None = None) -> subprocess.CompletedProcess[str]:
        """A command inside the container (all its namespaces), optionally as another user (uid = gid)."""
        prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"] if uid is not None else []
        return subprocess.run(["nsenter", "-t", str(self.leader), "-a", *prefix, *argv], capture_output=True,
                              text=True, check=check, timeout=120)

    def poweroff(self) -> None:
        if self.nspawn is None:
            return
        if self.nspawn.poll() is None and self.leader:
            self.run("systemctl", "poweroff", check=False)
            try:
                self.nspawn.wait(20)
            except subprocess.TimeoutExpired:
                self.nspawn.send_signal(signal.SIGKILL)
                self.nspawn.wait(10)
        self.nspawn = None
        self.leader = 0

    def stop(self) -> None:
        self.poweroff()
        for path in reversed(self.mounted):
            subprocess.run(["umount", str(path)], check=False)
        self.mounted.clear()
        for cg in PAYLOAD_CGROUPS:  # what nspawn leaves behind without a host systemd
            if cg.is_dir() and cg not in self.preexisting_cgroups:
                for sub in sorted(cg.rglob("*"), key=lambda p: len(p.parts), reverse=True):
                    if sub.is_dir():
                        sub.rmdir()
                cg.rmdir()
        shutil.rmtree(f"/run/systemd/nspawn/propagate/{MACHINE}", ignore_errors=True)

    def path(self, inside: str) -> Path:
        """A path of the container's file system, seen from the host (the overlay's merged view)."""
        return self.root / inside.lstrip("/")


# Boot services that would write the host's global kernel state from inside the container (/proc/sys and
# /sys are the host's here): masked in the overlay, so booting the container changes nothing on the host.
HOST_WRITERS = ("systemd-sysctl.service", "systemd-binfmt.service", "proc-sys-fs-binfmt_misc.automount")


REPO = Path(__file__).resolve().parents[2]
VENV = os.environ.get("AUTOGLM_TEST_VENV", "/opt/autoglm-venv")  # the test venv (tests/run), seen through the overlay
CLI = f"{VENV}/bin/autoglm-tune"
# The checkout's packages as pyproject.toml maps them, outermost first.
PACKAGES = {"autoglm_helper": "helpers", "autoglm_tune": "tuner", "autoglm_tune/policies": "policies",
            "autoglm_tune/systemd": "systemd"}


def install_checkout(c: Container) -> None:
    """Put the checkout's code into the container's copy of the test venv (the overlay: the host's venv is left
    alone), so that the helper and the CLI inside run the code under test even when the venv was installed from
    another checkout. An editable install already points at a checkout and is left as it is."""
    sites = sorted(c.path(VENV).glob("lib/python3*/site-packages"))
    if not sites or not (sites[0] / "autoglm_helper").is_dir():
        return
    for package, source in PACKAGES.items():
        target = sites[0] / package
        if "/" not in package:
            shutil.rmtree(target)
        shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)


def prepare(c: Container) -> None:
    install_checkout(c)
    for name in HOST_WRITERS:
        c.path(f"/etc/systemd/system/{name}").symlink_to("/dev/null")
    units = c.path("/usr/lib/systemd/system")
    for name, text in TEST_UNITS.items():
        (units / name).write_text(text)
    (units / ALIAS).symlink_to("agt-aliased.service")
    for alias, unit in ETC_ALIASES.items():
        c.path(f"/etc/systemd/system/{alias}").symlink_to(f"/usr/lib/systemd/system/{unit}")
    c.path(f"/etc/systemd/system/{ETC_UNIT}").write_text(TEST_UNITS["agt-static.service"])
    c.path(FAKE_TUNER).write_text("#!/bin/sh\n")


def start_units(c: Container) -> None:
    """States: enabled (+ a hand-made extra link), disabled, static, masked, runtime-masked, enabled-runtime."""
    c.run("systemctl", "daemon-reload")
    c.run("systemctl", "enable", "agt-enabled.service", "agt-handmade.service", "agt-aliased.service",
          "agt-boot.service", "agt-timer.timer", "tuned.service", "nftables.service")
    c.run("ln", "-sf", "/usr/lib/systemd/system/agt-handmade.service",
          "/etc/systemd/system/timers.target.wants/agt-handmade.service")
    c.run("systemctl", "enable", "--runtime", "agt-runtime.service")
    c.run("systemctl", "mask", "agt-masked.service")
    c.run("systemctl", "mask", "--runtime", "agt-runmasked.service")
    c.run("systemctl", "start", "agt-enabled.service", "agt-handmade.service", "agt-disabled.service",
          "agt-static.service", "agt-runtime.service", "agt-aliased.service", "agt-boot.service",
          "agt-timer.timer", "tuned.service", ETC_UNIT, "agt-group.service", *NEVER_TOUCH_TEST_UNITS)


# ---- calling the helper inside the container, and what a unit looks like ----------------------------

LINK_ROOTS = ("/etc/systemd/system", "/run/systemd/system")


def plan(*changes: dict[str, Any]) -> str:
    return json.dumps({"version": 1, "changes": list(changes)})


def unit_change(unit: str, current: str, target: str) -> dict[str, Any]:
    return {"knob": "unit", "unit": unit, "current": current, "target": target, "persistence": "persistent",
            "reason": "test"}


def helper(client: Client, member: str, *args: Any) -> Any:
    return client.call(BUS_NAME, OBJECT_PATH, INTERFACE, member, "sbb" if args else "", list(args), timeout=120)


def ok(client: Client, member: str, *args: Any) -> dict[str, Any]:
    reply = helper(client, member, *args)
    assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    return json.loads(reply.body[0])


def error(client: Client, member: str, *args: Any) -> tuple[str, str]:
    reply = helper(client, member, *args)
    assert reply.message_type == MessageType.ERROR, reply.body
    return reply.error_name or "", reply.body[0]


def symlinks(c: Container) -> dict[str, str]:
    """Every symlink in the container's /etc/systemd/system and /run/systemd/system, with the file it leads to
    (a restore by systemd may spell /usr/lib as /lib: the same file on a merged /usr)."""
    out = {}
    for top in LINK_ROOTS:
        base = c.path(top)
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    out[path.removeprefix(str(c.root))] = os.path.realpath(path).removeprefix(str(c.root))
    return out


def snapshot(c: Container, client: Client, unit: str) -> dict[str, Any]:
    return {
        "state": client.manager("GetUnitFileState", "s", unit)[0],
        "links": client.manager("GetUnitFileLinks", "sb", unit, False)[0],
        "runtime_links": client.manager("GetUnitFileLinks", "sb", unit, True)[0],
        "active": client.unit_property(unit, "ActiveState"),
        "all_links": symlinks(c),
    }
