"""Which systemd call puts back each kind of recorded unit symlink (the helper writes none itself), and which
links no call may recreate. The calls themselves run against a real systemd in tests/systemd/test_units.py."""

from __future__ import annotations

import os

import pytest
from autoglm_helper.units import link_request, same_file

UNIT = "agt-enabled.service"
VENDOR = "/usr/lib/systemd/system/agt-enabled.service"


@pytest.mark.parametrize(
    ("path", "dest", "request_"),
    [
        ("/etc/systemd/system/multi-user.target.wants/agt-enabled.service", VENDOR,
         ("AddDependencyUnitFiles", "asssbb", (UNIT,), "multi-user.target", "Wants", False, False)),
        ("/run/systemd/system/multi-user.target.wants/agt-enabled.service", VENDOR,
         ("AddDependencyUnitFiles", "asssbb", (UNIT,), "multi-user.target", "Wants", True, False)),
        ("/etc/systemd/system/timers.target.requires/agt-enabled.service", VENDOR,
         ("AddDependencyUnitFiles", "asssbb", (UNIT,), "timers.target", "Requires", False, False)),
        ("/etc/systemd/system/agt-enabled.service", "/opt/units/agt-enabled.service",
         ("LinkUnitFiles", "asbb", ("/opt/units/agt-enabled.service",), False, False)),
        ("/etc/systemd/system/dbus-org.example.Agt.service", VENDOR,
         ("EnableUnitFiles", "asbb", (UNIT,), False, False)),
    ],
)
def test_each_recorded_link_has_its_call(path: str, dest: str, request_: tuple[object, ...]) -> None:
    assert link_request(UNIT, path, dest) == request_


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("/etc/passwd", "outside"),
        ("/etc/systemd/system/../../shadow", "outside"),
        ("/etc/systemd/system/x.target.wants/../../evil.service", "outside"),
        ("/usr/lib/systemd/system/multi-user.target.wants/agt-enabled.service", "outside"),
        ("/etc/systemd/system/a/b.target.wants/agt-enabled.service", "no systemd call"),
        ("/etc/systemd/system/multi-user.target.upholds/agt-enabled.service", "no systemd call"),
        ("/etc/systemd/system/.wants/agt-enabled.service", "no systemd call"),
    ],
)
def test_links_no_call_may_make_are_refused(path: str, needle: str) -> None:
    with pytest.raises(OSError, match=needle):
        link_request(UNIT, path, VENDOR)


def test_same_file_follows_the_spelling_of_the_target(tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path)
    os.makedirs(f"{root}/usr/lib/systemd/system")
    os.symlink("usr/lib", f"{root}/lib")  # a merged /usr: /lib and /usr/lib are one directory
    open(f"{root}/usr/lib/systemd/system/a.service", "w").close()
    open(f"{root}/usr/lib/systemd/system/b.service", "w").close()
    link = f"{root}/a.link"
    os.symlink(f"{root}/lib/systemd/system/a.service", link)
    assert same_file(link, f"{root}/usr/lib/systemd/system/a.service")
    assert not same_file(link, f"{root}/usr/lib/systemd/system/b.service")
    assert not same_file(f"{root}/absent.link", f"{root}/usr/lib/systemd/system/a.service")
