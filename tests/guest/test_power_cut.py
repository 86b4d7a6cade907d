"""Power cuts during a real apply (issue 14): QEMU's `system_reset` at a random instant of
`sudo autoglm-tune apply`, then a real boot; the helper's start-up recovery must leave the machine exactly as
before the apply, or exactly as committed, and a rollback afterwards exactly as before.

A reset drops the guest's page cache like a power cut does (what the guest did not write back is gone); QEMU
keeps what the guest flushed to its virtual disks. The plan touches what survives a reboot: a swap file on the
NVMe (created, fallocated, its header fsynced), a unit disabled (symlinks), the undo journal; and kernel knobs
that a boot resets (zswap, swappiness), which recovery must recognise as already back.

`AUTOGLM_POWER_CUTS` sets the number of cuts per run (3 by default: about 2 minutes); every cut is appended to
/var/tmp/autoglm-power-cuts.jsonl with the instant and what recovery left, and docs/HELPER.md keeps the count."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path

from guest import Guest, Installed, figure

CUTS = int(os.environ.get("AUTOGLM_POWER_CUTS", "3"))
RECORD = Path("/var/tmp/autoglm-power-cuts.jsonl")
POLICY = """\
[zswap]
enabled = true
compressor = ["lzo-rle", "lzo"]
max_pool_percent = 25
[vm]
swappiness = 150
[services]
disable = ["agt-cut.service"]
[swap]
file = "auto"
file_size_mib = 512
"""
UNIT = "[Service]\nExecStart=/bin/sleep infinity\n[Install]\nWantedBy=multi-user.target\n"
APPLY = "sudo autoglm-tune apply --yes --policy /var/tmp/cut.toml"


def prepare(g: Guest) -> None:
    """The NVMe as ext4 at /var/swap (a swap-file folder of the policy), and an enabled, running unit."""
    g.ssh("mkfs.ext4 -q /dev/nvme0n1 && mkdir -p /var/swap && "
          "echo '/dev/nvme0n1 /var/swap ext4 defaults 0 2' >> /etc/fstab && systemctl daemon-reload && "
          "mount /var/swap")
    g.put(UNIT.encode(), "/usr/lib/systemd/system/agt-cut.service")
    g.ssh("systemctl daemon-reload && systemctl enable -q --now agt-cut.service")
    g.put(POLICY.encode(), "/var/tmp/cut.toml", mode="0644")
    g.ssh("sync")


def machine_state(g: Guest) -> dict[str, object]:
    """What an apply may change, as the guest reports it: unit state and every unit symlink in /etc, swap files
    and areas, zswap and the vm knobs."""
    out = g.ssh(
        "systemctl is-enabled agt-cut.service; systemctl is-active agt-cut.service; echo ---; "
        "find /etc/systemd/system -type l -printf '%p -> %l\\n' | sort; echo ---; "
        "find /var/swap /var/lib/autoglm-tune/swap -type f -printf '%p %s %m\\n' 2>/dev/null | sort; echo ---; "
        "tail -n +2 /proc/swaps | awk '{print $1, $3, $5}' | sort; echo ---; "
        "grep -r . /sys/module/zswap/parameters | sort; cat /proc/sys/vm/swappiness",
        check=False).stdout
    unit, links, files, swaps, kernel = (part.strip().splitlines() for part in out.split("---\n"))
    return {"unit": unit, "links": links, "swap_files": files, "swaps": swaps, "kernel": kernel}


def recover(g: Guest) -> dict[str, object]:
    """Start the helper (D-Bus activation runs its recovery before it takes its name) and read what it says."""
    shown = g.ssh("autoglm-tune status --json", user="alice", check=False, timeout=120)
    assert shown.returncode == 0, (shown.stdout, shown.stderr, g.journal("autoglm-tune-helper.service"))
    return json.loads(shown.stdout)


def cut_power(g: Guest, delay: float) -> None:
    """Start the apply in the background, wait `delay` seconds, reset the machine, wait for the new boot."""
    old = g.boot_id()
    g.ssh(f"nohup setsid {APPLY} >/var/tmp/apply.log 2>&1 </dev/null &", user="alice")
    time.sleep(delay)
    g.power_cut(old)
    g.ssh("mountpoint -q /var/swap || mount /var/swap")


def test_recovery_after_power_cuts_during_apply(installed: Installed, guest_from: Callable[..., Guest]) -> None:
    g = guest_from(installed.snapshot)
    prepare(g)
    g.reboot()  # "before" is a booted machine's state, as after every cut
    before = machine_state(g)
    assert before["unit"] == ["enabled", "active"] and before["swap_files"] == [] and before["swaps"] == []

    # one apply without a cut: how long it takes, and what a committed apply leaves after a boot
    t0 = time.monotonic()
    applied = g.ssh(APPLY, user="alice", check=False, timeout=300)
    duration = time.monotonic() - t0
    assert applied.returncode == 0, (applied.stdout, applied.stderr, g.journal("autoglm-tune-helper.service"))
    committed_live = machine_state(g)
    assert committed_live["unit"][0] == "disabled" and len(committed_live["swap_files"]) == 1
    g.reboot()
    committed = machine_state(g)  # runtime knobs back at their boot values, the swap file kept, inactive
    assert committed["unit"] == ["disabled", "inactive"] and committed["swap_files"] == committed_live["swap_files"]
    back = g.ssh("sudo autoglm-tune rollback --yes", user="alice", check=False, timeout=300)
    assert back.returncode == 0, (back.stdout, back.stderr)
    g.ssh("systemctl is-active -q agt-cut.service")
    assert machine_state(g) == before
    figure(f"power cut: apply takes {duration:.1f} s over ssh; {CUTS} cuts in [0, {1.2 * duration:.1f}] s")

    rng = random.Random(os.environ.get("AUTOGLM_POWER_CUT_SEED", str(time.time_ns())))
    for n in range(CUTS):
        delay = rng.uniform(0, 1.2 * duration)
        cut_power(g, delay)
        status = recover(g)
        after = machine_state(g)
        outcome = "before" if after == before else "committed" if after == committed else "other"
        quarantined = status.get("quarantined", [])
        with RECORD.open("a") as out:
            out.write(json.dumps({"time": time.strftime("%FT%T"), "cut": n, "delay_s": round(delay, 3),
                                  "apply_s": round(duration, 2), "outcome": outcome,
                                  "quarantined": quarantined}) + "\n")
        differs = {k: {"now": after[k], "before": before[k], "committed": committed[k]}
                   for k in after if after[k] not in (before[k], committed[k])}
        assert outcome != "other", f"cut at {delay:.2f} s: {json.dumps(differs)}\n" + \
            g.journal("autoglm-tune-helper.service")[-4000:] + g.ssh("cat /var/tmp/apply.log", check=False).stdout
        assert not quarantined, quarantined  # a cut journal is never damaged: it is written atomically
        if outcome == "committed":
            back = g.ssh("sudo autoglm-tune rollback --yes", user="alice", check=False, timeout=300)
            assert back.returncode == 0, (back.stdout, back.stderr)
            g.ssh("systemctl is-active -q agt-cut.service")
            assert machine_state(g) == before, (delay, machine_state(g), before)
        else:  # nothing of it stays applied: rollback has nothing to do
            nothing = g.ssh("sudo autoglm-tune rollback --yes", user="alice", check=False, timeout=120)
            assert nothing.returncode == 0 and "nothing to roll back" in nothing.stdout, (nothing.stdout,
                                                                                            nothing.stderr)
        figure(f"power cut {n + 1}/{CUTS} at {delay:.2f} s: {outcome}")
