"""`autoglm-tune system install|uninstall`: idempotent, exact, refuses foreign files; for real inside the
container (reloads systemd and dbus-daemon, D-Bus activation works or stops working)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from autoglm_helper.contract.bus import BUS_NAME
from container import SYSTEMD, Client, Container, ok

CLI = str(Path(sys.executable).parent / "autoglm-tune")
DESTS = (
    "usr/local/lib/systemd/system/autoglm-tune.service",
    "usr/local/lib/systemd/system/autoglm-tune-helper.service",
    "usr/local/lib/systemd/system/dbus-io.github.autoglm_tune.Helper1.service",
    "usr/share/dbus-1/system.d/io.github.autoglm_tune.Helper1.conf",
    "usr/share/dbus-1/system-services/io.github.autoglm_tune.Helper1.service",
    "usr/share/polkit-1/actions/io.github.autoglm_tune.policy",
    "usr/local/bin/autoglm-tune",
    "usr/local/bin/autoglm-tune-helper",
)
MANIFEST = "var/lib/autoglm-tune/system-install.json"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, "system", *args], capture_output=True, text=True, timeout=60)


def tree(root: Path) -> dict[str, bytes | str]:
    return {str(p.relative_to(root)): (f"-> {p.readlink()}" if p.is_symlink() else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_symlink() or p.is_file()}


def test_install_is_idempotent_and_uninstall_exact(tmp_path: Path) -> None:
    (tmp_path / "usr/share/dbus-1/system.d").mkdir(parents=True)
    other = tmp_path / "usr/share/dbus-1/system.d/other.conf"
    other.write_text("not ours")
    dry = cli("install", "--root", str(tmp_path), "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("would install") == len(DESTS)
    assert tree(tmp_path) == {"usr/share/dbus-1/system.d/other.conf": b"not ours"}

    first = cli("install", "--root", str(tmp_path))
    assert first.returncode == 0 and first.stdout.count("installed") == len(DESTS), first.stderr
    installed = tree(tmp_path)
    assert set(installed) == {*DESTS, MANIFEST, "usr/share/dbus-1/system.d/other.conf"}
    helper_unit = installed["usr/local/lib/systemd/system/autoglm-tune-helper.service"]
    assert f"ExecStart={Path(CLI).parent}/autoglm-tune-helper ".encode() in helper_unit  # type: ignore[operator]
    assert installed["usr/local/lib/systemd/system/dbus-io.github.autoglm_tune.Helper1.service"] == \
        "-> autoglm-tune-helper.service"
    # on sudo's secure_path, pointing at this installation
    assert installed["usr/local/bin/autoglm-tune"] == f"-> {CLI}"
    assert installed["usr/local/bin/autoglm-tune-helper"] == f"-> {Path(CLI).parent}/autoglm-tune-helper"

    again = cli("install", "--root", str(tmp_path))
    assert again.returncode == 0 and again.stdout.count("unchanged") == len(DESTS)
    assert tree(tmp_path) == installed

    changed = tmp_path / DESTS[0]
    changed.write_text(changed.read_text() + "# local edit\n")
    gone = cli("uninstall", "--root", str(tmp_path))
    assert gone.returncode == 0 and gone.stdout.count("removed") == len(DESTS) - 1
    assert "kept (changed since it was installed)" in gone.stdout
    assert set(tree(tmp_path)) == {DESTS[0], MANIFEST, "usr/share/dbus-1/system.d/other.conf"}
    changed.unlink()
    last = cli("uninstall", "--root", str(tmp_path))
    assert last.returncode == 0 and "absent" in last.stdout
    assert tree(tmp_path) == {"usr/share/dbus-1/system.d/other.conf": b"not ours"}


def test_foreign_file_is_never_overwritten(tmp_path: Path) -> None:
    foreign = tmp_path / DESTS[4]
    foreign.parent.mkdir(parents=True)
    foreign.write_text("[D-BUS Service]\nName=io.github.autoglm_tune.Helper1\nExec=/somewhere/else\n")
    before = tree(tmp_path)
    r = cli("install", "--root", str(tmp_path))
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == (f"autoglm-tune: error: {foreign}: exists and was not installed by autoglm-tune; "
                                "allowed: remove it first, then run install again")
    assert tree(tmp_path) == before


def installation_at(prefix: Path) -> Path:
    """A venv at `prefix` that runs this test venv's autoglm-tune: its own sys.prefix and scripts folder."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(prefix)], check=True)
    site = next((prefix / "lib").glob("python3*")) / "site-packages"
    (site / "tested.pth").write_text(next(Path(sys.prefix, "lib").glob("python3*/site-packages")).as_posix() + "\n")
    return prefix / "bin" / "python"


@pytest.mark.parametrize("under", ["/home", "/root", "/tmp"])
def test_an_installation_the_helper_sandbox_cannot_reach_is_refused(tmp_path: Path, under: str) -> None:
    """ProtectHome=yes / PrivateTmp=yes hide these folders from the helper unit: systemd would fail it with
    203/EXEC at its first activation, so install refuses instead of saying nothing."""
    prefix = Path(under) / f"autoglm-test-venv-{tmp_path.name}"
    try:
        python = installation_at(prefix)
        root = tmp_path / "root"
        root.mkdir()
        r = subprocess.run([str(python), "-c", "import sys; from autoglm_tune.cli import main; "
                            "sys.argv = ['autoglm-tune', *sys.argv[1:]]; main()", "system", "install", "--root",
                            str(root)], capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["rm", "-rf", str(prefix)], check=True)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    directive = "PrivateTmp=yes" if under == "/tmp" else "ProtectHome=yes"
    assert r.stderr.strip() == (f"autoglm-tune: error: {prefix}/bin/autoglm-tune-helper: under {under}, which the "
                                f"helper unit's {directive} hides from it; allowed: an installation outside /home, "
                                "/root, /run/user, /tmp and /var/tmp, e.g. `sudo python3 -m venv /opt/autoglm-tune` "
                                "(README)")
    assert list(root.iterdir()) == []


@pytest.mark.parametrize("args", [("install", "--root", "/nonexistent/dir"), ("uninstall", "--root", "/etc/hostname")])
def test_root_must_be_a_directory(args: tuple[str, ...]) -> None:
    r = cli(*args)
    assert r.returncode == 2 and "--root" in r.stderr and "allowed: an existing directory" in r.stderr


def test_uninstall_and_install_in_the_container_reload_for_real(container: Container, client: Client) -> None:
    client.job("StopUnit", "autoglm-tune-helper.service")
    gone = container.run(CLI, "system", "uninstall")
    assert "reloaded org.freedesktop.systemd1" in gone.stdout and "reloaded org.freedesktop.DBus" in gone.stdout
    try:
        for dest in DESTS:
            assert not container.path("/" + dest).exists()
        reply = client.call(BUS_NAME, "/io/github/autoglm_tune/Helper1", BUS_NAME, "Status")
        assert reply.error_name == "org.freedesktop.DBus.Error.ServiceUnknown"
        reply = client.call(*SYSTEMD, "GetUnitFileState", "s", ["autoglm-tune.service"])
        assert reply.error_name == "org.freedesktop.DBus.Error.FileNotFound"
    finally:
        back = container.run(CLI, "system", "install")
    assert back.stdout.count("installed") == len(DESTS)
    assert ok(client, "Status")["transactions"] is not None
