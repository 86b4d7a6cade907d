"""zswap, swap priorities and a swap file through the sandboxed helper on the guest's 6.12 kernel, the boot unit
across a real reboot, and rollback afterwards: runtime steps recognised as gone, persistent ones undone exactly.

The guest has an NVMe disk (rotational 0) and a SATA disk (rotational 1); the NVMe carries an ext4 mounted at
/var/swap, one of the policy's swap file folders."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from guest import Guest, Installed, figure

ZSWAP_POLICY = """\
[zswap]
enabled = true
compressor = ["zstd"]
max_pool_percent = 25
shrinker_enabled = true
"""
POLICY_FILE = "/etc/autoglm-tune/policy.d/50-guest-test.toml"


def nvme_at_var_swap(g: Guest) -> None:
    """The NVMe disk as an ext4 in /etc/fstab at /var/swap; zstd loaded now and at every boot, as the facts'
    note says (Debian builds it as a module, absent from /proc/crypto until loaded)."""
    g.ssh("mkfs.ext4 -q /dev/nvme0n1 && mkdir -p /var/swap && "
          "echo '/dev/nvme0n1 /var/swap ext4 defaults 0 2' >> /etc/fstab && systemctl daemon-reload && "
          "mount /var/swap")
    note = g.ssh("autoglm-tune facts", user="alice").stdout
    assert "'sudo modprobe zstd' loads one now" in note, note
    g.ssh("modprobe zstd && echo zstd > /etc/modules-load.d/zstd.conf")


def zswap(g: Guest) -> dict[str, str]:
    out = g.ssh("cd /sys/module/zswap/parameters && grep -r . .").stdout
    return dict(line.removeprefix("./").split(":", 1) for line in out.splitlines())


def swaps(g: Guest) -> dict[str, int]:
    """/proc/swaps: {area: priority}."""
    lines = g.ssh("cat /proc/swaps").stdout.splitlines()[1:]
    return {line.split()[0]: int(line.split()[4]) for line in lines}


def test_zswap_and_swap_priorities_put_nvme_above_the_hdd(installed: Installed,
                                                         guest_from: Callable[..., Guest]) -> None:
    g = guest_from(installed.snapshot)
    nvme_at_var_swap(g)
    # what an admin already has: swap on the HDD, and a swap file on the NVMe, both at the default priorities
    g.ssh("mkswap -q /dev/sda && swapon /dev/sda && fallocate -l 256M /var/swap/admin.swap && "
          "chmod 600 /var/swap/admin.swap && mkswap -q /var/swap/admin.swap && swapon /var/swap/admin.swap")
    before_zswap, before_swaps = zswap(g), swaps(g)
    assert before_zswap["enabled"] == "N" and before_swaps == {"/dev/sda": -2, "/var/swap/admin.swap": -3}
    g.put(ZSWAP_POLICY.encode(), "/tmp/zswap.toml")

    plan = json.loads(g.ssh("autoglm-tune plan --json --policy /tmp/zswap.toml", user="alice").stdout)
    knobs = {(c["knob"], c.get("area")): c for c in plan["changes"]}
    assert knobs[("swap.priority", "/var/swap/admin.swap")]["target"] == 100
    assert knobs[("swap.priority", "/dev/sda")]["target"] == 10
    assert ("swap.file", None) not in knobs  # disk swap exists

    applied = g.ssh("sudo autoglm-tune apply --yes --policy /tmp/zswap.toml", user="alice", check=False,
                    timeout=300)
    assert applied.returncode == 0, (applied.stdout, applied.stderr, g.journal("autoglm-tune-helper.service"))
    now = zswap(g)
    assert (now["enabled"], now["compressor"], now["max_pool_percent"], now["shrinker_enabled"]) == \
        ("Y", "zstd", "25", "Y")
    assert swaps(g) == {"/var/swap/admin.swap": 100, "/dev/sda": 10}
    # the helper exits on idle, and its mount namespace goes with it: the areas it swapped on keep their names
    # (a swapon inside that namespace left "/sda" and "/admin.swap", and rollback refused; test_fleet_ssh.py found it)
    g.ssh("systemctl stop autoglm-tune-helper.service")
    assert swaps(g) == {"/var/swap/admin.swap": 100, "/dev/sda": 10}
    assert g.ssh("autoglm-tune verify --policy /tmp/zswap.toml", user="alice", check=False).returncode == 0

    back = g.ssh("sudo autoglm-tune rollback --yes", user="alice", check=False, timeout=300)
    assert back.returncode == 0, (back.stdout, back.stderr)
    assert zswap(g) == before_zswap and swaps(g) == before_swaps


def test_the_boot_unit_reapplies_after_a_real_reboot_and_rollback_is_exact(
        installed: Installed, guest_from: Callable[..., Guest]) -> None:
    g = guest_from(installed.snapshot)
    nvme_at_var_swap(g)
    g.ssh(f"mkdir -p /etc/autoglm-tune/policy.d && cat > {POLICY_FILE}", input=ZSWAP_POLICY)
    before_zswap = zswap(g)
    plan = json.loads(g.ssh("autoglm-tune plan --json", user="alice").stdout)
    [swap_file] = [c for c in plan["changes"] if c["knob"] == "swap.file"]
    assert swap_file["path"].startswith("/var/swap/") and "nvme" in swap_file["reason"], swap_file

    applied = g.ssh("sudo autoglm-tune apply --yes", user="alice", check=False, timeout=600)
    assert applied.returncode == 0, (applied.stdout, applied.stderr, g.journal("autoglm-tune-helper.service"))
    assert swaps(g) == {swap_file["path"]: swap_file["priority"]}
    assert zswap(g)["enabled"] == "Y"
    g.ssh("sudo systemctl enable autoglm-tune", user="alice")

    t0 = time.monotonic()
    g.reboot()
    figure(f"real reboot (systemctl reboot to ssh and boot finished): {time.monotonic() - t0:.0f} s")
    assert g.ssh("systemctl is-active autoglm-tune.service", check=False).stdout.strip() == "active", \
        g.journal("autoglm-tune.service")
    now = zswap(g)
    assert (now["enabled"], now["compressor"], now["shrinker_enabled"]) == ("Y", "zstd", "Y"), \
        g.journal("autoglm-tune.service")
    assert swaps(g) == {swap_file["path"]: swap_file["priority"]}, g.journal("autoglm-tune.service")
    assert g.ssh("autoglm-tune verify", user="alice", check=False).returncode == 0

    g.ssh("sudo systemctl disable autoglm-tune", user="alice")
    g.ssh(f"rm {POLICY_FILE}")
    # the boot's apply first: its runtime steps undone, and the swap file only swapped off (it is the first's)
    boot = g.ssh("sudo autoglm-tune rollback --yes", user="alice", check=False, timeout=600)
    assert boot.returncode == 0, (boot.stdout, boot.stderr)
    assert zswap(g) == before_zswap and swaps(g) == {}
    assert g.ssh(f"test -f {swap_file['path']}", check=False).returncode == 0
    # then the first apply, from the boot before: its runtime steps are gone already, its swap file is removed
    first = g.ssh("sudo autoglm-tune rollback --yes", user="alice", check=False, timeout=600)
    assert first.returncode == 0, (first.stdout, first.stderr)
    assert g.ssh(f"test -e {swap_file['path']}", check=False).returncode == 1
    assert zswap(g) == before_zswap and swaps(g) == {}
    done = g.ssh("sudo autoglm-tune rollback --yes", user="alice", check=False)
    assert done.returncode == 0 and "nothing to roll back" in done.stdout
