"""The planner's "auto" rules, each with the basis it rests on. One place, so the benchmark can
change them: every function is pure and returns (value, basis); value None means "leave it".

Sources: Documentation/admin-guide/sysctl/vm.rst, Documentation/admin-guide/mm/zswap.rst and the
measurements in shared/research/kernel-and-platform.md (§2.1 suggested values, §4.1 threads, §9
memory knobs vs inference under a memory cap on the 2-vCPU CI machine).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB_KIB = 1024 * 1024

# Order of preference when the policy says compressor = "auto": lz4 decompresses fastest (the
# inference box is CPU-bound on few cores), zstd compresses best, lzo-rle/lzo exist everywhere.
AUTO_COMPRESSORS = ("lz4", "zstd", "lzo-rle", "lzo")

@dataclass(frozen=True)
class SwapSituation:
    """What the swap rules need to know, derived from facts and the swap plan."""

    zram_active: bool
    backing_class: str | None  # fastest non-zram swap device class, existing or planned; None if none
    zswap_on: bool  # zswap will be enabled after the plan


def zswap_enabled(zram_active: bool, model_protected: bool) -> tuple[bool, str]:
    """Off by auto, for want of a measured gain anywhere it was measured; the policy's `enabled = true` turns it
    on (with a swap file to stand on where there is no disk swap)."""
    if zram_active:
        return False, "an active zram swap is present: zswap in front of zram compresses every page twice (Arch wiki)"
    if not model_protected:
        return False, (
            "the model's memory cannot be kept out of swap here (MemoryLow= needs systemd with cgroup v2; mlock "
            "misses the repacked Q4_0 weights): with zswap its incompressible weights cycled through the pool, "
            "heavy pressure ran 0.2 tok/s with 8.3 M major faults; with zswap off and the model in a memory cgroup "
            "of its own, 15.6 tok/s (untuned 7.7) and no OOM kill in 5 runs (docs/BENCHMARKS.md, 2026-11-27)"
        )
    return False, (
        "auto leaves zswap off: it earned the model nothing where measured ([zswap] enabled = true turns it on). "
        "Seed's case, 2 CPUs: 0.90× [0.81–0.995] of the plan without it (docs/bench/2026-12-02-9b-heavy-part2.json); "
        "model on 1 of 2 CPUs: 0.96× [0.91–1.02], desktop 0.986× [0.978–0.995], frame p99 9 → 25 ms "
        "(docs/bench/2026-12-03-9b-part5-zswap-one-cpu.json); more CPUs unmeasured"
    )


def compressor(preference: tuple[str, ...], available: list[str]) -> tuple[str | None, str]:
    for name in preference:
        if name in available:
            return name, f"first of the policy's list ({', '.join(preference)}) that this kernel has"
    return None, f"none of {', '.join(preference)} is in /proc/crypto (kernel has {', '.join(available) or 'none'})"


def max_pool_percent(total_kib: int | None) -> tuple[int, str]:
    if total_kib is not None and total_kib <= 8 * GIB_KIB:
        return 25, "RAM ≤ 8 GiB: a larger share pays off on small boxes (research §2.1; Talos example 25)"
    return 20, "kernel default 20 % of RAM (research §2.1)"


def shrinker_enabled(parameter_present: bool) -> tuple[bool | None, str]:
    if not parameter_present:
        return None, "this kernel has no zswap shrinker (added in 6.8)"
    return True, "lets cold compressed pages move on to disk swap under pressure (research §2.1)"


def swappiness(s: SwapSituation) -> tuple[int | None, str]:
    if s.zswap_on or s.zram_active:
        return 133, (
            "compressed swap is about twice as fast as file IO: x + 2x = 200 → 133 (vm.rst); "
            "20 with zswap OOM-killed the desktop in 8 of 8 runs (research §9) and, with a desktop in 4 KiB pages, "
            "ran the model at 0.4 tok/s under heavy pressure (untuned 7.7; docs/BENCHMARKS.md, 2026-11-27)"
        )
    if s.backing_class in ("nvme", "ssd"):
        return 100, "swap on SSD/NVMe costs about what file IO costs: equal weight 100 (vm.rst)"
    return None, "no cheap swap target: swappiness changes nothing useful here (research §9)"


# vm.swappiness at or below this with zswap on is reported as a conflict: measured to OOM-kill the desktop at 20
# (the popular recipe) and at 60 (research §9), never at 133. Between 60 and 133 nothing was measured.
LOW_SWAPPINESS_WITH_ZSWAP = 60


def low_swappiness_risk(swappiness: int | None, zswap_on: bool) -> str | None:
    """Why a low vm.swappiness with zswap on is a risk, or None. Measured, not modelled: the figures are the
    project's own runs of the blog recipe."""
    if not zswap_on or swappiness is None or swappiness > LOW_SWAPPINESS_WITH_ZSWAP:
        return None
    return (
        f"vm.swappiness {swappiness} with zswap on: measured to OOM-kill the desktop (at or below "
        f"{LOW_SWAPPINESS_WITH_ZSWAP}). The popular recipe, swappiness 20 + zswap, killed it in 5 of 5 heavy runs "
        "(docs/bench/2026-11-26-heavy-mild.json) and ran the model at 0.4 tok/s against 7.7 untuned "
        "(docs/bench/2026-11-27-heavy-mild.json; docs/BENCHMARKS.md); zswap at swappiness 60 killed it in 3 of 3 "
        'runs, at 133 in 0 of 10 (research §9). swappiness = "auto" plans 133'
    )


def vfs_cache_pressure() -> tuple[int, str]:
    return 100, "kernel neutral value: dentries and inodes reclaimed at the same rate as page cache (vm.rst)"


def page_cluster(s: SwapSituation) -> tuple[int | None, str]:
    if not (s.zswap_on or s.zram_active):
        return None, "readahead of swap is only costly for compressed swap; kernel default kept"
    if s.backing_class == "hdd":
        return 1, "compressed swap backed by an HDD: small readahead still helps the disk (research §2.1)"
    return 0, "each read-ahead page of compressed swap costs a decompression (research §2.1, Arch/Pop guidance)"


def swap_file_size_mib(total_kib: int | None, free_mib: int | None) -> tuple[int | None, str]:
    if total_kib is None:
        return None, "RAM size unknown"
    ram_mib = total_kib // 1024
    size = max(1024, min(16384, ram_mib)) // 256 * 256
    basis = ("as large as RAM (1–16 GiB): room to swap out the rest of the system while the model runs (with "
             "zswap on, every compressed page also keeps a slot on it, zswap.rst)")
    if free_mib is not None and size > free_mib // 2:
        size = free_mib // 2 // 256 * 256
        basis += f"; cut to half the {free_mib} MiB free"
    if size < 256:
        return None, "not enough free space for a useful swap file"
    return size, basis


THREADS_APART = "docs/bench/2026-12-07-threads-contention-9b.json"  # each burst in a session of its own
THREADS_TOGETHER = "docs/bench/2026-12-07-threads-contention-9b-same-session.json"  # in the busy loop's session


def reserve_cores(physical_cores: int, efficiency_cpus: int) -> tuple[int, str]:
    """Reserving a core trades speed alone for safety beside a busy process where nice does not weigh
    (bench/threads_contention.py, the 9B model on the 2-CPU VM, 5 interleaved rounds per file)."""
    if efficiency_cpus:
        return 0, "the efficiency cores are left to the system"
    if physical_cores >= 3:
        return 1, (
            "one core left to the system: where the model's nice does not weigh against a busy process (another "
            "session on an autogroup kernel, another cgroup), threads on every CPU collapsed and the free CPU "
            "alone ran 5.17× [4.49–5.95] their speed, nice -10 or not (0.197× [0.166–0.235] of it; "
            f"{THREADS_APART}); where it weighs, every CPU at nice -10 ran 1.72× [1.62–1.83] the speed of the free one "
            f"({THREADS_TOGETHER}). Measured on 2 CPUs: with 3 or more cores which wins is unmeasured, and the "
            "reserved core is the hedge for the first case"
        )
    return 0, (
        "2 cores or fewer: none reserved: alone, one of 2 CPUs ran 0.579× [0.49–0.684] the speed of both "
        f"({THREADS_APART}), and beside a busy loop in the model's session both at nice -10 ran 1.72× [1.62–1.83] the "
        f"speed of one ({THREADS_TOGETHER}); beside a busy process the model's nice cannot reach (another "
        "session or cgroup), one of 2 would run 5.17× [4.49–5.95] faster: set reserve_cores = 1 there"
    )


def model_nice() -> tuple[int, str]:
    return -10, (
        "under CPU contention (a busy loop at nice 0 on one of 2 CPUs) the 9B model under the plan ran 3.04× "
        "[2.44–3.79] untuned's speed, `nice -n -10` alone 2.85× [2.34–3.48], while the busy loop kept 0.16× "
        "[0.15–0.17] of its own progress (3 paired rounds, docs/bench/2026-12-02-9b-mild-fits-cpu.json); under "
        "heavy memory pressure it earned nothing measurable (0.93× [0.78–1.11] of the same plan at nice 0, "
        "docs/bench/2026-12-01-9b-heavy.json), and under mild pressure the plan ran at 0.90× [0.82–0.98] of "
        "untuned, nice alone at 0.85× [0.76–0.94] (docs/bench/2026-12-02-9b-mild-fits-cpu.json). -10 is the "
        "helper's floor (catalogue.MODEL_NICE_RANGE)"
    )
