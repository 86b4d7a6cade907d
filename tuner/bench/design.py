"""What `autoglm-tune bench` runs (functional core, no I/O): the scenarios and configurations, the options and
their checks, the interleaved schedule of runs, the desktop size per scenario and the policy of each
configuration of the autoglm-tune family."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import BadInput

MIB = 1 << 20
EMULATIONS = ("hugetlb", "cgroup")


@dataclass(frozen=True)
class Scenario:
    name: str
    capped: bool  # RAM taken away to --ram-mib
    demand: float | None  # (model + desktop) / available RAM; None: sized by `desktop_mib`
    accesses: int  # desktop page accesses per 16 ms frame (0: no desktop)
    hog: bool  # a busy loop on one core
    measure: str  # "decode" (tok/s), "cold" (1 / time from start to first token), "prompt" (1 / TTFT)
    text: str
    idle_first: bool = False  # the model loaded and warmed, the desktop active for --idle-s, then the request


ACTIVE, IDLE = 64, 8  # desktop page accesses per frame: a user at work; a desktop left alone
SCENARIOS = {
    "heavy": Scenario("heavy", True, 1.25, ACTIVE, False, "decode",
                      "demand ≈ 125 % of available RAM, active desktop"),
    "mild": Scenario("mild", True, 1.10, ACTIVE, False, "decode", "demand ≈ 110 % of available RAM, active desktop"),
    "fits": Scenario("fits", True, None, IDLE, False, "decode",
                     "model + desktop/2 (lzo-rle ≈ 2:1) = 90 % of available RAM, idle desktop"),
    "cpu": Scenario("cpu", False, None, 0, True, "decode", "no memory pressure, a busy loop on one core"),
    "idle": Scenario("idle", True, 1.10, ACTIVE, False, "decode",
                     "mild's demand; the model loaded and warmed, the desktop active for --idle-s, then the request",
                     idle_first=True),
    "cold": Scenario("cold", True, 1.10, ACTIVE, False, "cold",
                     "mild's demand; page cache dropped, then the server started: time to the first token"),
    "prompt": Scenario("prompt", True, 1.10, ACTIVE, False, "prompt",
                       "mild's demand; a prompt of --prompt-tokens tokens: prompt processing (1 / TTFT)"),
}


@dataclass(frozen=True)
class Config:
    """One configuration: which kernel settings, how the server is started, and for the autoglm-tune family
    the policy overrides (merged over --policy) that make it an ablation."""

    name: str
    text: str
    settings: str = "none"  # "none", "recipe-literal", "recipe-512mb", "tuned", "plan"
    start: str = "plain"  # "plain" (the server's own defaults), "hand" (--prio 2, threads = cores), "nice" (nice -n
    # -10, threads = cores), "launch" (autoglm-tune launch)
    overrides: tuple[tuple[str, str, Any], ...] = ()  # (section, key, value) over the policy


CONFIG_LIST = (
    Config("limit", "no RAM cap, no desktop, no CPU hog, settings as found: the best this hardware does"),
    Config("untuned", "settings as found (kernel defaults on a fresh box), the server's own defaults"),
    Config("hand-tune", "untuned plus the one flag a llama-server user would try, --prio 2, and threads = physical "
           "cores; as root --prio 2 is nice -10 for the process and SCHED_FIFO 80 for the compute threads "
           "(ggml-cpu.c), for a user both are refused", start="hand"),
    Config("hand-nice", "untuned under `nice -n -10`, threads = physical cores: the hand-tune without real-time "
           "threads", start="nice"),
    Config("recipe-literal", "the blog's recipe as written: swappiness 20, vfs_cache_pressure 50, zswap on, "
           "max_pool_percent 536870912 (the kernel takes it as no limit)", settings="recipe-literal"),
    Config("recipe-512mb", "the blog's recipe as meant: its pool 512 MB (scaled to MemTotal)",
           settings="recipe-512mb"),
    Config("tuned", "TuneD's throughput-performance profile", settings="tuned"),
    Config("autoglm-tune", "the plan applied through the root helper, the model started by `autoglm-tune launch`",
           settings="plan", start="launch"),
    Config("no-nice", "autoglm-tune with [process] nice = 0", settings="plan", start="launch",
           overrides=(("process", "nice", 0),)),
    Config("no-resident", "autoglm-tune with [model] keep_resident = \"none\"", settings="plan", start="launch",
           overrides=(("model", "keep_resident", "none"),)),
    Config("kernel-only", "the plan's kernel settings only; the server started as untuned", settings="plan"),
    Config("zswap-on", "autoglm-tune with [zswap] enabled = true", settings="plan", start="launch",
           overrides=(("zswap", "enabled", True),)),
)
CONFIGS_BY_NAME = {c.name: c for c in CONFIG_LIST}
CONFIGS = tuple(CONFIGS_BY_NAME)
CONFIG_TEXT = {c.name: c.text for c in CONFIG_LIST}
RECIPE = {"vm.swappiness": "20", "vm.vfs_cache_pressure": "50", "zswap.enabled": "Y"}
RECIPE_LITERAL_POOL = "536870912"  # what the blog wrote into max_pool_percent
RECIPE_POOL_MIB = 512  # what it meant: 512 MB, 12.5 % of its 4 GiB box
SERVERS = ("llama-server", "llama-cpp-python")
HAND_NICE = -10
# The comparisons each scenario is judged by: (scenario, config, versus, lower bound the ratio must clear).
TARGETS = (
    ("heavy", "autoglm-tune", "untuned", 2.0),
    ("heavy", "autoglm-tune", "hand-tune", 1.3),
    ("mild", "autoglm-tune", "untuned", 0.95),
    ("fits", "autoglm-tune", "limit", 0.90),
    ("cold", "autoglm-tune", "untuned", 0.95),
    ("prompt", "autoglm-tune", "untuned", 0.95),
    ("idle", "autoglm-tune", "untuned", 0.95),
)
DESKTOP_TARGET = ("heavy", "autoglm-tune", "untuned", 0.5)  # the desktop keeps half its untuned progress


@dataclass(frozen=True)
class Options:
    scenarios: tuple[str, ...]
    configs: tuple[str, ...]
    rounds: int
    ram_mib: int
    emulate: str  # "hugetlb" (RAM taken from the whole kernel) or "cgroup" (a memory limit on the workload)
    desktop_mib: int | None
    tokens: int
    context: int
    threads: int | None
    server: str = "llama-server"
    mmap: bool = True  # the servers' default; --no-mmap is the named variant
    idle_s: int = 120
    prompt_tokens: int = 1536
    file_mib: int = 256  # the desktop's file cache
    run_timeout_s: int = 600  # a request that takes longer counts what arrived by then


@dataclass(frozen=True)
class RunKey:
    scenario: str
    round: int
    config: str


def parse_list(flag: str, value: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
    """"a,b" → ("a", "b"), each one of `allowed`; else BadInput naming the flag and the allowed values."""
    items = tuple(v.strip() for v in value.split(",") if v.strip())
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        what = f"unknown {', '.join(bad)}" if bad else "empty"
        raise BadInput(f"{flag} {value!r}: {what}; allowed: a comma-separated list of {', '.join(allowed)}")
    return tuple(dict.fromkeys(items))


def schedule(opts: Options) -> list[RunKey]:
    """Scenario by scenario; within a scenario round by round, every configuration once per round, the order
    rotated each round so that no configuration always runs first after the set-up (research test-env §11)."""
    runs = []
    for scenario in opts.scenarios:
        for r in range(opts.rounds):
            k = r % len(opts.configs)
            runs += [RunKey(scenario, r, c) for c in opts.configs[k:] + opts.configs[:k]]
    return runs


def desktop_mib(scenario: Scenario, available_mib: int, model_mib: int, override: int | None) -> int:
    """The desktop's size: demand × available − model; for `fits` the size at which model + desktop/2 fills
    90 % of what is available (it fits only once the desktop is compressed); none under CPU contention."""
    if override is not None:
        return override
    if scenario.demand is not None:
        return max(0, round(scenario.demand * available_mib) - model_mib)
    if scenario.capped:
        return max(0, 2 * (round(0.9 * available_mib) - model_mib))
    return 0


def scaled_pool_percent(percent: int, ram_mib: int, total_mib: int) -> int:
    """zswap's max_pool_percent is a share of MemTotal, which includes the hugetlb reservation: scale it so
    that the pool may take `percent` of the emulated RAM (research §9)."""
    return max(1, min(100, round(percent * ram_mib / total_mib)))


def policy_variant(base: dict[str, Any], config: Config) -> dict[str, Any]:
    """The policy a configuration of the autoglm-tune family plans and launches with: --policy's document with
    the configuration's overrides on top (a new document; `base` is not changed)."""
    doc = {section: dict(values) for section, values in base.items()}
    for section, key, value in config.overrides:
        doc.setdefault(section, {})[key] = value
    return doc


def check_options(opts: Options, total_mib: int, used_mib: int) -> None:
    if opts.rounds < 1:
        raise BadInput(f"--rounds {opts.rounds}: allowed: an integer ≥ 1")
    if opts.tokens < 2:
        raise BadInput(f"--tokens {opts.tokens}: allowed: an integer ≥ 2")
    if not 256 <= opts.context <= 1048576:
        raise BadInput(f"--context {opts.context}: allowed: an integer 256–1048576")
    if opts.threads is not None and opts.threads < 1:
        raise BadInput(f"--threads {opts.threads}: allowed: an integer ≥ 1")
    if opts.server not in SERVERS:
        raise BadInput(f"--server {opts.server!r}: allowed: {', '.join(SERVERS)}")
    for flag, value, low in (("--idle-s", opts.idle_s, 0), ("--prompt-tokens", opts.prompt_tokens, 16),
                             ("--file-mib", opts.file_mib, 0), ("--run-timeout-s", opts.run_timeout_s, 10)):
        if value < low:
            raise BadInput(f"{flag} {value}: allowed: an integer ≥ {low}")
    if opts.desktop_mib is not None and opts.desktop_mib < 0:
        raise BadInput(f"--desktop-mib {opts.desktop_mib}: allowed: an integer ≥ 0")
    if any(SCENARIOS[s].capped for s in opts.scenarios) and not used_mib + 256 <= opts.ram_mib <= total_mib:
        raise BadInput(
            f"--ram-mib {opts.ram_mib}: allowed: an integer {used_mib + 256}–{total_mib} (this machine's RAM; "
            f"{used_mib} MiB are in use now)"
        )
