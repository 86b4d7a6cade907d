"""The example fleet playbook (ansible/examples/fleet.yml with its group_vars and templates) run as an admin runs
it, over SSH with become (alice, a sudo user), against three guests of different shapes, each a separate SSH host
on its own 127.0.0.1 port:

- laptop (group laptops): 4 GiB, 4 CPUs, an NVMe disk with an ext4 at /var/swap and no swap; a print and a modem
  service enabled;
- desktop (desktops): 8 GiB, 4 CPUs, a swap partition on the HDD preferred over one on the NVMe; a modem service;
- box (servers): 2 GiB, 2 CPUs, no swap, and none of the services the servers' policy trims.

The steps are the playbook header's: install and facts collection; the `plan --facts` review on the controller;
`--check --diff` (the box's helper masked: it fails alone with the CLI's message, the others go on); a real run,
after which each host is exactly as its reviewed plan says; a second run of the whole playbook with changed=0 on
every host; `state: rolled_back`, after which each host is exactly as before. The check and the first real run
take `--tags tune` (the install play ran already; each task costs seconds under TCG). The hosts' state is read
over SSH: /proc/sys, the zswap parameters, /proc/swaps and the units' states."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import guest as guest_host
import pytest
from autoglm_helper.contract import catalogue
from guest import REPO, Guest, figure

EXAMPLES = REPO / "ansible" / "examples"
BIN = Path(sys.executable).parent
MODEL = "/srv/models/tiny.gguf"
STUB_UNIT = """\
[Unit]
Description=stand-in for {name}, as a desktop install has it
[Service]
ExecStart=/bin/sleep infinity
[Install]
WantedBy=multi-user.target
"""
GROUP_UNITS = sorted({u for group in ("laptops", "desktops", "servers") for u in
                      re.findall(r"[\w@.-]+\.(?:service|socket|timer|path)",
                                 (EXAMPLES / "group_vars" / f"{group}.yml").read_text())})
UNITS = [*GROUP_UNITS, "autoglm-tune.service"]  # the trimmed ones and the boot unit the play enables


def stub_units(g: Guest, *units: str) -> None:
    """Services a desktop install has and the image leaves out, enabled and running."""
    for unit in units:
        g.put(STUB_UNIT.format(name=unit).encode(), f"/etc/systemd/system/{unit}")
    g.ssh(f"systemctl daemon-reload && systemctl enable -q --now {' '.join(units)}")


def partition(g: Guest, disk: str, gib: int) -> None:
    """One MBR partition of type 82 (Linux swap) from sector 2048 (the image has no sfdisk)."""
    script = ("import struct; mbr = bytearray(512); "
              f"mbr[446:462] = struct.pack('<B3sB3sII', 0, bytes(3), 0x82, bytes(3), 2048, {gib} << 21); "
              f"mbr[510:512] = bytes([0x55, 0xAA]); open('{disk}', 'r+b').write(mbr)")
    g.ssh(f"python3 -c {shlex.quote(script)} && blockdev --rereadpt {disk} && udevadm settle")


def laptop(g: Guest) -> None:
    g.ssh("mkfs.ext4 -q /dev/nvme0n1 && mkdir -p /var/swap && "
          "echo '/dev/nvme0n1 /var/swap ext4 defaults 0 2' >> /etc/fstab && systemctl daemon-reload && "
          "mount /var/swap")
    stub_units(g, "cups.service", "ModemManager.service")


def desktop(g: Guest) -> None:
    partition(g, "/dev/sda", 2)
    partition(g, "/dev/nvme0n1", 1)
    g.ssh("mkswap -q /dev/sda1 && mkswap -q /dev/nvme0n1p1 && swapon -p 5 /dev/sda1 && swapon -p 2 /dev/nvme0n1p1")
    stub_units(g, "ModemManager.service")


@dataclass(frozen=True)
class Shape:
    group: str
    memory: str
    cpus: int
    prepare: Callable[[Guest], None]


SHAPES = {
    "laptop": Shape("laptops", "4G", 4, laptop),
    "desktop": Shape("desktops", "8G", 4, desktop),
    "box": Shape("servers", "2G", 2, lambda g: None),
}


def live(g: Guest) -> dict[str, dict]:
    """What a plan may change, read on the host: the catalogue's /proc/sys and zswap files, /proc/swaps
    ({area: priority}) and the units' (UnitFileState, ActiveState)."""
    paths = " ".join("/" + k.path for k in catalogue.SCALAR_KNOBS.values())
    knobs = dict(line.split(":", 1) for line in g.ssh(f"grep -H . {paths}").stdout.splitlines())
    swaps = {line.split()[0]: int(line.split()[4]) for line in g.ssh("cat /proc/swaps").stdout.splitlines()[1:]}
    shown = g.ssh(f"systemctl show -p Id -p UnitFileState -p ActiveState {' '.join(UNITS)}").stdout
    units = {}
    for block in shown.strip().split("\n\n"):
        props = dict(line.split("=", 1) for line in block.splitlines())
        units[props["Id"]] = [props["UnitFileState"], props["ActiveState"]]
    return {"knobs": knobs, "swaps": swaps, "units": units}


def as_planned(before: dict[str, dict], plan: dict) -> dict[str, dict]:
    """`before` with every change of the plan made: what the host must read after the real run."""
    after = json.loads(json.dumps(before))
    for c in plan["changes"]:
        if c["knob"] in catalogue.SCALAR_KNOBS:
            knob = catalogue.SCALAR_KNOBS[c["knob"]]
            after["knobs"]["/" + knob.path] = knob.render(c["target"])
        elif c["knob"] == "swap.priority":
            after["swaps"][c["area"]] = c["target"]
        elif c["knob"] == "swap.file":
            after["swaps"][c["path"]] = c["priority"]
        elif c["knob"] == "unit":
            after["units"][c["unit"]] = [c["target"], "inactive"]  # stopped, then disabled or masked
        else:
            raise AssertionError(f"a knob this test does not read: {c}")
    after["units"]["autoglm-tune.service"] = ["enabled", before["units"]["autoglm-tune.service"][1]]
    return after


def recap(out: str) -> dict[str, dict[str, int]]:
    """PLAY RECAP: {host: {ok, changed, failed, …}}."""
    tail = out[out.rindex("PLAY RECAP"):].splitlines()[1:]
    return {line.split()[0]: {k: int(v) for k, v in (f.split("=") for f in line.split(":", 1)[1].split())}
            for line in tail if "changed=" in line}


class Admin:
    """ansible-playbook from the test venv on a copy of ansible/examples with an inventory of the guests."""

    def __init__(self, work: Path, guests: dict[str, Guest], wheels: str) -> None:
        self.dir = work / "examples"
        shutil.copytree(EXAMPLES, self.dir)
        self.inventory = self.dir / "inventory.ini"
        key = next(iter(guests.values())).key
        self.inventory.write_text(
            "".join(f"[{SHAPES[n].group}]\n{n} ansible_port={g.port}\n" for n, g in guests.items())
            + "[fleet:children]\n" + "".join(f"{s.group}\n" for s in SHAPES.values())
            + "[fleet:vars]\nansible_host=127.0.0.1\nansible_user=alice\n"
            f"ansible_ssh_private_key_file={key}\nansible_python_interpreter=/usr/bin/python3\n"
            "ansible_ssh_common_args='-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null'\n")
        # --no-compile: byte-compiling rich and pygments costs a minute under TCG; Python compiles what it imports
        pip = f"--no-index --find-links {wheels} --trusted-host 10.0.2.2 --no-compile"
        self.extra = ["-e", f"autoglm_pip_extra_args='{pip}'", "-e", f"autoglm_model_path={MODEL}"]
        home = work / "home"
        home.mkdir()
        self.env = {
            "PATH": f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
            "ANSIBLE_HOME": str(home / "ansible"), "ANSIBLE_LOCAL_TEMP": str(home / "tmp"),
            "ANSIBLE_COLLECTIONS_PATH": str(REPO / "ansible"), "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_RETRY_FILES_ENABLED": "0", "ANSIBLE_PIPELINING": "1", "ANSIBLE_TIMEOUT": "60",
            # one SSH connection per host for the whole test, not one per playbook run
            "ANSIBLE_SSH_ARGS": "-C -o ControlMaster=auto -o ControlPersist=900s",
            # a unix socket path has 108 bytes; pytest's folders are long
            "ANSIBLE_SSH_CONTROL_PATH_DIR": tempfile.mkdtemp(prefix="fleet-cp-"),
        }

    def play(self, *flags: str) -> subprocess.CompletedProcess[str]:
        t0 = time.monotonic()
        done = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(self.inventory), *self.extra, *flags,
                               str(self.dir / "fleet.yml")], env=self.env, capture_output=True, text=True,
                              timeout=900)
        figure(f"fleet: ansible-playbook {' '.join(flags)}: {time.monotonic() - t0:.0f} s, exit {done.returncode}")
        print(f"--- ansible-playbook {' '.join(flags)}\n{done.stdout}{done.stderr}")
        return done

    def review(self, group: str) -> dict:
        """`autoglm-tune plan --facts facts/GROUP --policy facts/GROUP.toml --json` on the controller."""
        facts = self.dir / "facts"
        etc = self.dir / "no-etc"
        etc.mkdir(exist_ok=True)
        done = subprocess.run([str(BIN / "autoglm-tune"), "plan", "--json", "--facts", str(facts / group),
                               "--policy", str(facts / f"{group}.toml")], capture_output=True, text=True,
                              env={"PATH": "/usr/bin:/bin", "AUTOGLM_TUNE_ETC": str(etc)})
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture
def fleet(tmp_path: Path, llama_server: Path, tiny_gguf: Path,
          request: pytest.FixtureRequest) -> Iterator[dict[str, Guest]]:
    """The three guests, booted in parallel from their saved states and shaped; llama-server and the model on
    each, as the example's model service needs."""
    missing = [t for t in ("qemu-system-x86_64", "qemu-img", "mmdebstrap", "zstd", "ssh") if not shutil.which(t)]
    if os.geteuid() != 0 or missing:
        pytest.skip(f"the guest suite needs root, {', '.join(missing) or 'and its tools'}")
    guests = {n: Guest(tmp_path / n, guest_host.build_image(), s.memory, s.cpus) for n, s in SHAPES.items()}

    def start(name: str) -> None:
        shape, g = SHAPES[name], guests[name]
        g.resume(guest_host.booted_snapshot(shape.memory, shape.cpus))
        shape.prepare(g)
        g.put_file(llama_server, "/usr/local/bin/llama-server", mode="0755")
        g.ssh(f"mkdir -p {os.path.dirname(MODEL)}")
        g.put_file(tiny_gguf, MODEL)

    t0 = time.monotonic()
    try:
        with ThreadPoolExecutor(len(guests)) as pool:
            list(pool.map(start, guests))
        figure(f"fleet: three guests resumed and shaped in {time.monotonic() - t0:.0f} s")
        yield guests
    finally:
        failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
        for name, g in guests.items():
            if failed and g.proc is not None and g.proc.poll() is None:
                print(f"--- {name}: journal\n{g.journal()}")
            g.stop()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """The wheel folder's server, without a line per request in the test's output."""

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def wheels(tmp_path: Path) -> Iterator[str]:
    """What an admin without a package index serves the hosts: autoglm-tune's wheel beside its dependencies',
    a folder on a file server (here the controller, which QEMU's user network shows the guests as 10.0.2.2)."""
    folder = tmp_path / "wheels"
    house = guest_host.wheelhouse()
    subprocess.run([str(BIN / "pip"), "wheel", "-q", "--disable-pip-version-check", "--no-deps", "--no-index",
                    "--find-links", str(house), "-w", str(folder), str(REPO)], check=True, capture_output=True)
    for wheel in house.glob("*.whl"):
        shutil.copy(wheel, folder)
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://10.0.2.2:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_the_example_fleet_playbook_over_ssh_on_three_shapes(fleet: dict[str, Guest], wheels: str,
                                                             tmp_path: Path) -> None:
    started = time.monotonic()
    admin = Admin(tmp_path, fleet, wheels)
    pristine = {n: live(g) for n, g in fleet.items()}

    # install, system install, facts collection
    first = admin.play("--tags", "install,facts")
    assert first.returncode == 0, first.stdout + first.stderr
    assert all(r["failed"] == 0 and r["changed"] > 0 for r in recap(first.stdout).values()), first.stdout
    before = {n: live(g) for n, g in fleet.items()}
    for n, g in fleet.items():
        assert g.ssh("sudo sh -c 'command -v autoglm-tune'", user="alice").stdout.strip() == \
            "/usr/local/bin/autoglm-tune"
        # installing changes no setting; it adds the boot unit, not enabled
        assert before[n]["units"].pop("autoglm-tune.service") == ["disabled", "inactive"], n
        assert pristine[n]["units"].pop("autoglm-tune.service")[0] == "", n
        assert before[n] == pristine[n], n
        before[n]["units"]["autoglm-tune.service"] = ["disabled", "inactive"]

    # the review: each group's plan from its collected facts, offline, before any host is touched
    plans = {n: admin.review(s.group)[f"{n}.json"] for n, s in SHAPES.items()}
    changes = {n: {(c["knob"], c.get("unit") or c.get("area") or c.get("path")): c for c in p["changes"]}
               for n, p in plans.items()}
    laptop, desktop, box = changes["laptop"], changes["desktop"], changes["box"]
    # the laptop: zswap (the group turns it on) with the group's pool, backed by a swap file on the NVMe;
    # its print and modem services off
    assert laptop[("zswap.enabled", None)]["target"] is True and \
        laptop[("zswap.max_pool_percent", None)]["target"] == 25, laptop
    [swap_file] = [c for c in plans["laptop"]["changes"] if c["knob"] == "swap.file"]
    assert swap_file["path"].startswith("/var/swap/") and "nvme" in swap_file["reason"], swap_file
    assert {u for k, u in laptop if k == "unit"} == {"cups.service", "ModemManager.service"}
    # the desktop: its NVMe swap put before the HDD's, no swap file, the modem service off
    assert (desktop[("swap.priority", "/dev/nvme0n1p1")]["target"], desktop[("swap.priority", "/dev/sda1")]["target"]) \
        == (100, 10), desktop
    assert not any(k == "swap.file" for k, _ in desktop), desktop
    # zswap: the group says auto, and auto leaves it off, with the measurements that say why
    [desktop_zswap] = [c for c in plans["desktop"]["unchanged"] if c["knob"] == "zswap.enabled"]
    assert desktop_zswap["target"] is False and "docs/bench/" in desktop_zswap["reason"], desktop_zswap
    assert {u for k, u in desktop if k == "unit"} == {"ModemManager.service"}
    # the box: the servers' swappiness and page-cluster, nothing to trim, no swap to put zswap before
    assert box[("vm.swappiness", None)]["target"] == 133 and box[("vm.page-cluster", None)]["target"] == 0, box
    assert not any(k in ("unit", "swap.file") for k, _ in box) and ("zswap.enabled", None) not in box, box
    process = {n: (p["process"]["sched_policy"], p["process"]["nice"], len(p["process"]["cpus"]))
               for n, p in plans.items()}
    assert process == {"laptop": ("batch", 5, 3), "desktop": ("other", 0, 3), "box": ("batch", -5, 2)}, process

    # --check --diff with the box's helper unreachable: the box fails alone with the CLI's own message
    fleet["box"].ssh("systemctl mask -q autoglm-tune-helper.service")
    check = admin.play("--tags", "tune", "--check", "--diff")
    assert check.returncode != 0
    counts = recap(check.stdout)
    assert counts["box"]["failed"] == 1 and counts["laptop"]["failed"] == counts["desktop"]["failed"] == 0, counts
    fleet["box"].put_file(admin.dir / "facts" / "servers.toml", "/tmp/servers.toml")
    cli = fleet["box"].ssh("sudo autoglm-tune apply --dry-run --yes --policy /tmp/servers.toml", user="alice",
                           check=False)
    message = cli.stderr.strip().splitlines()[-1].removeprefix("autoglm-tune: error: ")
    assert cli.returncode != 0 and "helper" in message, cli
    [fatal] = [line for line in check.stdout.splitlines() if line.startswith("fatal: [box]")]
    assert json.loads(fatal.split("=> ", 1)[1])["msg"] == message, fatal
    assert check.stdout.count("+++ after: planned knobs") == 2, check.stdout  # the laptop's and the desktop's
    for n in ("laptop", "desktop"):  # the model service would be started after the module's dry-run
        assert re.search(rf"^(ok|changed|skipping): \[{n}\]", check.stdout[check.stdout.rindex("model service"):],
                         re.M), check.stdout
    assert {n: live(g) for n, g in fleet.items()} == before  # check mode wrote nothing
    fleet["box"].ssh("systemctl unmask -q autoglm-tune-helper.service")

    # the real run: each host exactly as its reviewed plan says, the model service running
    applied = admin.play("--tags", "tune")
    assert applied.returncode == 0, applied.stdout + applied.stderr
    now = {n: live(g) for n, g in fleet.items()}
    planned = {n: as_planned(before[n], plans[n]) for n in fleet}
    assert now == planned, {n: {k: {"live": now[n][k], "planned": planned[n][k]} for k in now[n]
                                if now[n][k] != planned[n][k]} for n in fleet if now[n] != planned[n]}
    for g in fleet.values():
        assert g.ssh("systemctl is-active autoglm-model.service", check=False).stdout.strip() == "active", \
            g.journal("autoglm-model.service")

    again = admin.play()  # the whole playbook: the install play is idempotent too
    assert again.returncode == 0, again.stdout + again.stderr
    assert {n: (r["changed"], r["failed"]) for n, r in recap(again.stdout).items()} == \
        {n: (0, 0) for n in SHAPES}, again.stdout

    undone = admin.play("--tags", "rollback", "-e", "autoglm_state=rolled_back")
    assert undone.returncode == 0, undone.stdout + undone.stderr
    assert {n: live(g) for n, g in fleet.items()} == before
    for g in fleet.values():
        assert g.ssh("test -e /etc/autoglm-tune/policy.d/50-fleet.toml", check=False).returncode == 1
    figure(f"fleet: the example playbook's steps on three guests in {time.monotonic() - started:.0f} s")
