"""`autoglm-tune system install|uninstall`: put the boot unit, the helper unit, the D-Bus policy and
activation files and the polkit actions where systemd, dbus-daemon and polkitd read them, link the commands
into /usr/local/bin (on sudo's PATH); reload what must be reloaded; and remove exactly that again.
An installation the helper unit's sandbox could not execute (under /home, /root, /tmp…) is refused.

Idempotent: a file already installed with the same content is left alone. What was installed is listed
in a manifest (path and SHA-256) so that `uninstall` removes those files and nothing else; a file
changed since it was installed is left in place and reported. A file at a destination that autoglm-tune
did not install is never overwritten (exit 2).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from .errors import BadInput, TuneError, fail

UNIT_DIR = "usr/local/lib/systemd/system"
MANIFEST = "var/lib/autoglm-tune/system-install.json"
HELPER_ALIAS = "dbus-io.github.autoglm_tune.Helper1.service"
HELPER_UNIT = "autoglm-tune-helper.service"
COMMANDS = ("autoglm-tune", "autoglm-tune-helper")
# sudo's secure_path on Debian and Ubuntu, and every login PATH, include /usr/local/bin: the commands are
# linked there so `sudo autoglm-tune …` and the units find the installation wherever it lives.
COMMAND_DIR = "usr/local/bin"
# What a unit's sandbox directive hides from the program it starts (systemd.exec(5)).
HIDDEN_BY = {
    "ProtectHome=yes": ("/home", "/root", "/run/user"),
    "PrivateTmp=yes": ("/tmp", "/var/tmp"),
}


@dataclass(frozen=True)
class SystemFile:
    source: str  # inside the package's systemd/ folder
    dest: str  # relative to the root


FILES = (
    SystemFile("autoglm-tune.service", f"{UNIT_DIR}/autoglm-tune.service"),
    SystemFile("autoglm-tune-helper.service", f"{UNIT_DIR}/autoglm-tune-helper.service"),
    SystemFile("dbus/io.github.autoglm_tune.Helper1.conf",
               "usr/share/dbus-1/system.d/io.github.autoglm_tune.Helper1.conf"),
    SystemFile("dbus/io.github.autoglm_tune.Helper1.service",
               "usr/share/dbus-1/system-services/io.github.autoglm_tune.Helper1.service"),
    SystemFile("polkit/io.github.autoglm_tune.policy", "usr/share/polkit-1/actions/io.github.autoglm_tune.policy"),
)


class SystemFailed(TuneError):
    """Writing or removing a system file failed (what was done so far stays listed in the manifest)."""

    exit_code = 4


def _hidden_from_helper() -> dict[str, str]:
    """{path prefix: the helper unit's directive that hides it}, read from the shipped unit itself."""
    from importlib import resources

    unit = resources.files("autoglm_tune.systemd").joinpath(HELPER_UNIT).read_text().splitlines()
    return {prefix: directive for directive, prefixes in HIDDEN_BY.items() if directive in unit
            for prefix in prefixes}


def check_reachable(scripts: Path) -> None:
    """Refuse an installation the helper unit's sandbox cannot execute (systemd would fail it with
    203/EXEC at the first D-Bus activation, long after install said nothing)."""
    real, hidden = scripts.resolve(), _hidden_from_helper()
    outside = ", ".join(list(hidden)[:-1]) + " and " + list(hidden)[-1]
    for prefix, directive in hidden.items():
        if real == Path(prefix) or Path(prefix) in real.parents:
            raise BadInput(f"{real / 'autoglm-tune-helper'}: under {prefix}, which the helper unit's {directive} "
                           f"hides from it; allowed: an installation outside {outside}, e.g. "
                           "`sudo python3 -m venv /opt/autoglm-tune` (README)")


def _content(f: SystemFile, scripts: Path) -> bytes:
    """The shipped file with its Exec paths pointing at this installation's console scripts."""
    from importlib import resources

    text = resources.files("autoglm_tune.systemd").joinpath(f.source).read_text()
    for name in ("autoglm-tune-helper", "autoglm-tune"):
        for prefix in ("/usr/local/bin/", "/usr/bin/"):
            text = text.replace(f"={prefix}{name} ", f"={scripts / name} ").replace(f"={prefix}{name}\n",
                                                                                    f"={scripts / name}\n")
    return text.encode()


def _sha(data: bytes) -> str:
    import hashlib  # here, like the other imports only install and uninstall need: `diff` starts without them

    return hashlib.sha256(data).hexdigest()


def _load_manifest(root: Path) -> dict[str, str]:
    """{path: sha256 of what we wrote, or "symlink:<target>"}."""
    try:
        return json.loads((root / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{root / MANIFEST}: unreadable ({exc}); allowed: the manifest install wrote") from None


def _save_manifest(root: Path, files: dict[str, str]) -> None:
    path = root / MANIFEST
    if not files:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _fingerprint(path: Path) -> str | None:
    if path.is_symlink():
        return "symlink:" + os.readlink(path)
    return _sha(path.read_bytes()) if path.exists() else None


def _reload(root: Path) -> list[str]:
    """daemon-reload (when systemd runs) and dbus-daemon ReloadConfig, over D-Bus; polkitd watches its folder."""
    if root != Path("/"):
        return []
    import asyncio

    from dbus_fast import BusType, Message, MessageType
    from dbus_fast.aio import MessageBus

    async def run() -> list[str]:
        try:
            bus = await MessageBus(bus_type=BusType.SYSTEM).connect()
        except OSError as exc:
            return [f"system bus not reachable ({exc.strerror}): nothing reloaded"]
        calls = [("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus", "ReloadConfig")]
        if Path("/run/systemd/system").is_dir():
            calls.insert(0, ("org.freedesktop.systemd1", "/org/freedesktop/systemd1",
                             "org.freedesktop.systemd1.Manager", "Reload"))
        done = []
        for dest, path, iface, member in calls:
            reply = await bus.call(Message(destination=dest, path=path, interface=iface, member=member))
            if reply.message_type == MessageType.ERROR:
                raise SystemFailed(f"{dest} {member}: {reply.error_name}: {reply.body[0] if reply.body else ''}")
            done.append(f"reloaded {dest}")
        bus.disconnect()
        return done

    return asyncio.run(run())


def install_files(root: Path, dry_run: bool) -> list[str]:
    """Install (or update) every system file; returns one line per file. Idempotent."""
    import sysconfig

    scripts = Path(sysconfig.get_path("scripts"))
    check_reachable(scripts)
    wanted: dict[Path, tuple[str, bytes | None]] = {}
    for f in FILES:
        content = _content(f, scripts)
        wanted[root / f.dest] = (_sha(content), content)
    wanted[root / UNIT_DIR / HELPER_ALIAS] = (f"symlink:{HELPER_UNIT}", None)
    if scripts.resolve() != Path("/", COMMAND_DIR):
        for name in COMMANDS:
            wanted[root / COMMAND_DIR / name] = (f"symlink:{scripts / name}", None)
    manifest = _load_manifest(root)
    for path, (fingerprint, _) in wanted.items():
        found = _fingerprint(path)
        if found is not None and found != fingerprint and str(path) not in manifest:
            raise BadInput(f"{path}: exists and was not installed by autoglm-tune; allowed: remove it first, "
                           "then run install again")
    lines, changed = [], False
    for path, (fingerprint, data) in wanted.items():
        if _fingerprint(path) == fingerprint:
            lines.append(f"unchanged  {path}")
            manifest[str(path)] = fingerprint
            continue
        lines.append(f"{'would install' if dry_run else 'installed'}  {path}")
        if dry_run:
            continue
        changed = True
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if data is None:
                path.unlink(missing_ok=True)
                path.symlink_to(fingerprint.removeprefix("symlink:"))
            else:
                tmp = path.with_name(path.name + ".autoglm-tmp")
                tmp.write_bytes(data)
                tmp.chmod(0o644)
                os.replace(tmp, path)
        except OSError as exc:
            _save_manifest(root, manifest)
            raise SystemFailed(f"{path}: {exc.strerror}; files installed so far are in {root / MANIFEST}") from None
        manifest[str(path)] = fingerprint
        _save_manifest(root, manifest)
    if not dry_run:
        _save_manifest(root, manifest)
        if changed:
            lines += _reload(root)
    return lines


def uninstall_files(root: Path, dry_run: bool) -> list[str]:
    """Remove what the manifest lists (unless changed since); returns one line per file."""
    manifest = _load_manifest(root)
    lines, kept, changed = [], {}, False
    for name, fingerprint in sorted(manifest.items()):
        path = Path(name)
        found = _fingerprint(path)
        if found is None:
            lines.append(f"absent     {path}")
        elif found != fingerprint:
            lines.append(f"kept (changed since it was installed)  {path}")
        else:
            lines.append(f"{'would remove' if dry_run else 'removed'}  {path}")
            if not dry_run:
                path.unlink()
                changed = True
            continue
        kept[name] = fingerprint
    if not dry_run:
        _save_manifest(root, {k: v for k, v in kept.items() if _fingerprint(Path(k)) is not None})
        if changed:
            lines += _reload(root)
    return lines


RootOpt = Annotated[Path, typer.Option("--root", help="Install below this directory instead of / (no reloads).")]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Show what would be done; change nothing.")]
system_app = typer.Typer(no_args_is_help=True, help="Install or remove the system files (units, D-Bus, polkit).")


def _run(action: str, root: Path, dry_run: bool) -> None:
    try:
        if not root.is_dir():
            raise BadInput(f"--root {root}: not a directory; allowed: an existing directory")
        lines = install_files(root, dry_run) if action == "install" else uninstall_files(root, dry_run)
    except TuneError as exc:
        raise fail(exc) from None
    typer.echo("\n".join(lines) if lines else "nothing installed")


@system_app.command()
def install(root: RootOpt = Path("/"), dry_run: DryRunOpt = False) -> None:
    """Install the boot unit, the helper unit, D-Bus policy and activation file, polkit actions, and the
    commands in /usr/local/bin; reload."""
    _run("install", root, dry_run)


@system_app.command()
def uninstall(root: RootOpt = Path("/"), dry_run: DryRunOpt = False) -> None:
    """Remove exactly the files `install` put there (per its manifest); reload."""
    _run("uninstall", root, dry_run)


def register(app: typer.Typer) -> None:
    app.add_typer(system_app, name="system")
