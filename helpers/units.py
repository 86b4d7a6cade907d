"""systemd units through the Manager D-Bus API: record a unit's exact prior state, stop + disable or mask
it, and restore exactly that state (research: dbus-systemd-polkit.md §1, §2).

A unit step (a dict in the undo journal) carries, besides knob/subject/old/target/new/state:
`unit`, `links` and `runtime_links` ({symlink: its target} — what GetUnitFileLinks lists in /etc and in
/run), and `active` (ActiveState before the change). The step's value is the unit-file state
(GetUnitFileState: enabled, disabled, static, alias, masked, masked-runtime, …).

The engine runs in a worker thread; every call here is sent on the helper's own bus connection through
its event loop and waited for. Unit-file changes are made by systemd itself, restores too: a recorded link in a
`.wants`/`.requires` directory comes back by AddDependencyUnitFiles, a linked unit file by LinkUnitFiles, an
alias by EnableUnitFiles (its [Install] Alias=), and each is then checked to lead to the same file as before.
The helper writes nothing under /etc/systemd or /run/systemd itself (its unit keeps both read-only).

Never-touch is decided on what systemd acts on, not on the name sent (`check`, in a dry-run too): StopUnit,
DisableUnitFiles and MaskUnitFiles resolve aliases, and a stop in mode "replace" also stops every unit that
Requires, Requisite=s or BindsTo the unit, or is PartOf it, and so on down the chain. So before any change the
unit is loaded (LoadUnit) and its Id and Names are read, the alias symlinks of each name in the unit search path
(UnitPath) are followed (a masked target loads as the alias alone, e.g. procps.service while systemd-sysctl is
masked), and the reverse dependencies RequiredBy, RequisiteOf, BoundBy and ConsistsOf are walked to the end
(at most MAX_RELATED units; more is refused). Every name reached must pass `catalogue.never_touch_rule`, which
also allows only plain .service/.socket/.timer/.path units (no template instances): a unit whose stop would take
down networking.service, a mount or a target is refused like networking.service itself. Reverse dependencies are
those of loaded units: a unit file that is not loaded and requires ours is not seen (it is not running either).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from .contract import catalogue
from .contract.catalogue import CatalogueError

Step = dict[str, Any]
SYSTEMD = "org.freedesktop.systemd1"
MANAGER = ("/org/freedesktop/systemd1", "org.freedesktop.systemd1.Manager")
CALL_TIMEOUT = 30.0
JOB_TIMEOUT = 120.0
SWAPON = "/usr/sbin/swapon" if os.path.exists("/usr/sbin/swapon") else "/sbin/swapon"  # util-linux
CAP_SYS_ADMIN = 21  # linux/capability.h
LINK_DIRS = ("/etc/systemd/system/", "/run/systemd/system/")  # where recorded links may be put back
DEPENDENCY_KINDS = {"wants": "Wants", "requires": "Requires"}  # link directories AddDependencyUnitFiles makes
LINK_CALLS = ("LinkUnitFiles", "AddDependencyUnitFiles", "EnableUnitFiles")  # a linked file first, aliases last
# Unit-file states each target accepts (linked, generated, transient, bad: not ours to change).
DISABLE_FROM = ("enabled", "enabled-runtime", "disabled")
MASK_FROM = (*DISABLE_FROM, "static", "indirect", "alias", "masked", "masked-runtime")
RUNNING = ("active", "activating", "reloading")
# What a stop in mode "replace" propagates to (the unit property naming the others → how they depend on this one).
STOPPED_WITH = {"RequiredBy": "Requires", "RequisiteOf": "is Requisite= of", "BoundBy": "BindsTo",
                "ConsistsOf": "is PartOf"}
MAX_RELATED = 256  # names reached from one unit before it is refused
MAX_ALIAS_HOPS = 8


def alias_targets(name: str, unit_path: list[str]) -> list[str]:
    """The unit names the alias symlinks for `name` in the unit search path lead to (each hop), as systemd's
    unit-file operations resolve them; /dev/null (a mask) ends a chain."""
    out: list[str] = []
    for directory in unit_path:
        path = os.path.join(directory, name)
        for _ in range(MAX_ALIAS_HOPS):
            if not os.path.islink(path):
                break
            dest = os.readlink(path)
            if dest == "/dev/null":
                break
            base = os.path.basename(dest)
            if base != name and base not in out:
                out.append(base)
            path = os.path.join(os.path.dirname(path), dest)
    return out


UnitInfo = dict[str, Any]  # what systemd says about one unit: Id, Names and the STOPPED_WITH properties


def related_units(unit: str, lookup: Callable[[str], UnitInfo], aliases: Callable[[str], list[str]],
                  where: str = "changes[?]") -> Iterator[tuple[str, str]]:
    """Every other name systemd acts on when `unit` is stopped, disabled or masked, as (name, why) — breadth
    first: its id and names, alias symlink targets, and (for each of those, transitively) what a stop takes down.
    CatalogueError beyond MAX_RELATED names (refused rather than checked in part)."""
    seen = {unit}
    queue: list[tuple[str, str]] = [(unit, "")]
    while queue:
        name, why = queue.pop(0)
        info = lookup(name)
        chain = f", and {why}" if why else ""
        found = [(str(n), f"a name of {name}{chain}") for n in (info.get("Id", ""), *info.get("Names", ())) if n]
        found += [(n, f"{name} is an alias of it{chain}") for n in aliases(name)]
        for prop, verb in STOPPED_WITH.items():
            found += [(str(n), f"{n} {verb} {name}{chain}") for n in info.get(prop, ())]
        for other, how in found:
            if other in seen:
                continue
            seen.add(other)
            if len(seen) > MAX_RELATED:
                raise CatalogueError(f"{where}.unit", f"{unit} reaches more than {MAX_RELATED} units through its "
                                     "names and dependents", catalogue.NEVER_TOUCH_ALLOWED)
            yield other, how
            queue.append((other, how))


class Systemd:
    """Synchronous calls to PID 1 over the helper's bus connection (for the engine's worker thread)."""

    def __init__(self, bus: MessageBus, loop: asyncio.AbstractEventLoop) -> None:
        self.bus = bus
        self.loop = loop

    def _call(self, path: str, iface: str, member: str, sig: str, body: list[Any], fds: list[int] | None = None
              ) -> Message:
        msg = Message(destination=SYSTEMD, path=path, interface=iface, member=member, signature=sig, body=body,
                      unix_fds=fds or [])
        return asyncio.run_coroutine_threadsafe(self.bus.call(msg), self.loop).result(CALL_TIMEOUT)

    def manager(self, member: str, sig: str = "", *args: Any) -> list[Any]:
        """A Manager method; a systemd error becomes OSError (a failed write undoes the transaction)."""
        reply = self._call(*MANAGER, member, sig, list(args))
        if reply.message_type == MessageType.ERROR:
            raise OSError(f"systemd {member}{tuple(args)!r}: {reply.error_name}: {reply.body[0] if reply.body else ''}")
        return list(reply.body)

    def unit_info(self, unit: str) -> UnitInfo:
        """LoadUnit (follows aliases to the unit they name), then the Unit interface's Id, Names and the
        properties naming what a stop takes down with it."""
        path = self.manager("LoadUnit", "s", unit)[0]
        reply = self._call(path, "org.freedesktop.DBus.Properties", "GetAll", "s", ["org.freedesktop.systemd1.Unit"])
        if reply.message_type == MessageType.ERROR:
            raise OSError(f"systemd {unit} properties: {reply.error_name}")
        return {k: v.value if isinstance(v, Variant) else v for k, v in reply.body[0].items()
                if k in ("Id", "Names", *STOPPED_WITH)}

    def check_never_touch(self, unit: str, where: str) -> None:
        """Refuse `unit` when a name systemd would act on for it is never-touch (CatalogueError, as the schema)."""
        reply = self._call(MANAGER[0], "org.freedesktop.DBus.Properties", "Get", "ss", [MANAGER[1], "UnitPath"])
        if reply.message_type == MessageType.ERROR:
            raise OSError(f"systemd UnitPath: {reply.error_name}")
        unit_path = [str(d) for d in reply.body[0].value]
        related = related_units(unit, self.unit_info, lambda n: alias_targets(n, unit_path), where)
        catalogue.check_unit_closure(unit, related, where)

    def unit_property(self, unit: str, iface: str, prop: str) -> Any:
        path = self.manager("LoadUnit", "s", unit)[0]
        reply = self._call(path, "org.freedesktop.DBus.Properties", "Get", "ss", [iface, prop])
        if reply.message_type == MessageType.ERROR:
            raise OSError(f"systemd {unit} {prop}: {reply.error_name}")
        value = reply.body[0]
        return value.value if isinstance(value, Variant) else value

    def file_state(self, unit: str) -> str | None:
        """GetUnitFileState, or None when no unit file of that name exists."""
        reply = self._call(*MANAGER, "GetUnitFileState", "s", [unit])
        if reply.error_name == "org.freedesktop.DBus.Error.FileNotFound":
            return None
        if reply.message_type == MessageType.ERROR:
            raise OSError(f"systemd GetUnitFileState {unit}: {reply.error_name}")
        return str(reply.body[0])

    def links(self, unit: str, runtime: bool) -> dict[str, str]:
        return {p: os.readlink(p) for p in self.manager("GetUnitFileLinks", "sb", unit, runtime)[0]
                if os.path.islink(p)}

    def run_job(self, member: str, unit: str) -> None:
        """StartUnit/StopUnit in mode replace, and wait until the job is gone."""
        self.wait_job(self.manager(member, "ss", unit, "replace")[0], f"{member} {unit}")

    def start_transient(self, unit: str, properties: list[list[Any]], fds: list[int]) -> None:
        """StartTransientUnit in mode fail, and wait for its job. FileExistsError: a unit of that name is loaded."""
        reply = self._call(*MANAGER, "StartTransientUnit", "ssa(sv)a(sa(sv))", [unit, "fail", properties, []], fds)
        if reply.error_name == "org.freedesktop.systemd1.UnitExists":
            raise FileExistsError(unit)
        if reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply.body else ""
            raise OSError(f"systemd StartTransientUnit {unit}: {reply.error_name}: {detail}")
        self.wait_job(reply.body[0], f"StartTransientUnit {unit}")

    def swapon(self, path: str, priority: int) -> None:
        """swapon(8) on `path` in a transient oneshot unit: systemd runs it in PID 1's mount namespace, so the area
        keeps its name in /proc/swaps after the helper's own namespace is gone (knobs._Swap). Only
        CAP_SYS_ADMIN, no new privileges; the caller reads /proc/swaps back."""
        argv = [SWAPON, *(["--priority", str(priority)] if priority >= 0 else []), "--", path]
        unit = f"autoglm-tune-swapon-{os.getpid()}-{time.monotonic_ns()}.service"
        self.start_transient(unit, [
            ["Description", Variant("s", f"autoglm-tune: swapon {path}")],
            ["Type", Variant("s", "oneshot")],
            ["ExecStart", Variant("a(sasb)", [[SWAPON, argv, False]])],
            ["CollectMode", Variant("s", "inactive-or-failed")],
            ["CapabilityBoundingSet", Variant("t", 1 << CAP_SYS_ADMIN)],
            ["NoNewPrivileges", Variant("b", True)],
        ], [])

    def wait_job(self, job: str, what: str) -> None:
        """Wait until the job object is gone (finished, whatever its result)."""
        deadline = time.monotonic() + JOB_TIMEOUT
        while True:
            reply = self._call(job, "org.freedesktop.DBus.Properties", "Get", "ss",
                               ["org.freedesktop.systemd1.Job", "State"])
            if reply.message_type == MessageType.ERROR:  # the job object is gone: finished
                return
            if time.monotonic() > deadline:
                raise OSError(f"systemd {what}: the job did not finish in {JOB_TIMEOUT:.0f} s")
            time.sleep(0.02)

    # ---- the knob interface the engine uses (like the kinds in knobs.py) ----------------

    def check(self, step: Step, where: str) -> None:
        """Refuse never-touch units by what systemd resolves them to (the plan schema refused the name as sent),
        missing units and states the target cannot come from; record the exact prior state."""
        unit, target = step["unit"], step["target"]
        self.check_never_touch(unit, where)
        state = self.file_state(unit)
        if state is None:
            raise CatalogueError(f"{where}.unit", f"{unit} is not installed", "a unit with a unit file on this machine")
        accepted = DISABLE_FROM if target == "disabled" else MASK_FROM
        if state not in accepted and state != target:
            raise CatalogueError(f"{where}.target", f"{unit} is {state}: it cannot be {target}",
                                 f"{target} only for units that are " + ", ".join(accepted))
        etc_file = LINK_DIRS[0] + unit
        if target == "masked" and os.path.lexists(etc_file) and not os.path.islink(etc_file):
            raise CatalogueError(f"{where}.target", f"{unit} has its unit file in {LINK_DIRS[0]}, "
                                 "where a mask cannot be put", "disabled")
        step["links"] = self.links(unit, runtime=False)
        step["runtime_links"] = self.links(unit, runtime=True)
        for path, dest in {**step["links"], **step["runtime_links"]}.items():
            try:  # a link no systemd call can put back is refused now, not found out at rollback
                link_request(unit, path, dest)
            except OSError as exc:
                raise CatalogueError(f"{where}.unit", str(exc),
                                     "units whose links are [Install] links: .wants/.requires, an alias, a linked "
                                     "unit file") from None
        step["active"] = self.unit_property(unit, "org.freedesktop.systemd1.Unit", "ActiveState")

    def read(self, step: Step) -> str | None:
        return self.file_state(step["unit"])

    def write(self, step: Step) -> None:
        unit = step["unit"]
        self.run_job("StopUnit", unit)
        if step["target"] == "masked":
            self.manager("MaskUnitFiles", "asbb", [unit], False, False)
        else:
            for runtime, links in ((False, step["links"]), (True, step["runtime_links"])):
                if links:
                    self.manager("DisableUnitFiles", "asb", [unit], runtime)
        self.manager("Reload")

    def restore(self, step: Step) -> None:
        """Unmask what we masked, have systemd put back every recorded symlink, start the unit if it was running.
        Idempotent: what is already back is left alone."""
        unit = step["unit"]
        touched = False
        if step["target"] == "masked" and step["old"] != "masked" and os.path.islink(LINK_DIRS[0] + unit):
            self.manager("UnmaskUnitFiles", "asb", [unit], False)
            touched = True
        missing = {path: dest for path, dest in {**step["links"], **step["runtime_links"]}.items()
                   if not os.path.lexists(path)}
        requests = {link_request(unit, path, dest) for path, dest in missing.items()}  # all checked before any
        for member, sig, *args in sorted(requests, key=lambda r: (LINK_CALLS.index(r[0]), repr(r))):
            self.manager(member, sig, *(list(a) if isinstance(a, tuple) else a for a in args))
            touched = True
        if touched:
            self.manager("Reload")
        wrong = [path for path, dest in missing.items() if not same_file(path, dest)]
        recorded = {**step["links"], **step["runtime_links"]}
        extra = [p for p in {**self.links(unit, runtime=False), **self.links(unit, runtime=True)} if p not in recorded]
        if wrong or extra:  # EnableUnitFiles writes every [Install] link, also those that were not there before
            raise OSError(f"{unit}: systemd did not put back its links as recorded: "
                          + ", ".join([*(f"{p} missing" for p in wrong), *(f"{p} added" for p in extra)]))
        live = self.unit_property(unit, "org.freedesktop.systemd1.Unit", "ActiveState")
        if step["active"] in RUNNING and live not in RUNNING:
            self.run_job("StartUnit", unit)


def link_request(unit: str, path: str, dest: str) -> tuple[Any, ...]:
    """The Manager call (member, signature, arguments) with which systemd itself writes the recorded symlink
    `path` → `dest` again; OSError for a link no call can make (then nothing is written)."""
    runtime = path.startswith(LINK_DIRS[1])
    directory, name = os.path.split(path)
    if not path.startswith(LINK_DIRS) or os.path.normpath(path) != path or "\0" in path:
        raise OSError(f"{unit}: will not recreate {path!r} outside {' '.join(LINK_DIRS)}")
    top = directory + "/" in LINK_DIRS
    holder, _, kind = os.path.basename(directory).rpartition(".")
    if not top and os.path.dirname(directory) + "/" in LINK_DIRS and kind in DEPENDENCY_KINDS and holder:
        return ("AddDependencyUnitFiles", "asssbb", (name,), holder, DEPENDENCY_KINDS[kind], runtime, False)
    if top and os.path.isabs(dest) and os.path.basename(dest) == name and not dest.startswith(LINK_DIRS):
        return ("LinkUnitFiles", "asbb", (dest,), runtime, False)
    if top:  # an alias: another name for the unit, made by its [Install] Alias=
        return ("EnableUnitFiles", "asbb", (unit,), runtime, False)
    raise OSError(f"{unit}: no systemd call recreates {path!r}")


def same_file(path: str, dest: str) -> bool:
    """The link at `path` exists and leads where the recorded one did (`dest` relative to the link's directory);
    /lib and /usr/lib spell the same file on a merged /usr."""
    if not os.path.islink(path):
        return False
    return os.path.realpath(path) == os.path.realpath(os.path.join(os.path.dirname(path), dest))

