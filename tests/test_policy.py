"""Policy schema, resolution order and bad input: every mistake is one line naming file, key and allowed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from autoglm_helper.contract.catalogue import MODEL_NICE_RANGE, MODEL_OOM_SCORE_ADJ_RANGE
from autoglm_tune.errors import BadInput
from autoglm_tune.policy import SCHEMA, load_policy

POLICIES = Path(__file__).resolve().parent.parent / "policies"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    """An empty system policy directory, so the machine's /etc/autoglm-tune never leaks in."""
    d = tmp_path / "etc"
    d.mkdir()
    return d


def test_default_policy_sets_every_key(etc: Path) -> None:
    policy = load_policy(None, etc)
    assert policy.sources == ("built-in default",)
    for section, keys in SCHEMA.items():
        assert set(policy[section]) == set(keys), section


@pytest.mark.parametrize("name", ["laptop-4g", "desktop", "server"])
def test_example_profiles_are_valid_and_change_something(etc: Path, name: str) -> None:
    default = load_policy(None, etc)
    profile = load_policy(POLICIES / f"{name}.toml", etc)
    assert profile.sources[-1].endswith(f"{name}.toml")
    assert profile.values != default.values


def test_resolution_order_later_files_win_key_by_key(etc: Path, tmp_path: Path) -> None:
    write(etc, "policy.toml", "[vm]\nswappiness = 100\nvfs_cache_pressure = 80\n")
    write(etc, "policy.d/20-second.toml", "[vm]\nvfs_cache_pressure = 70\n")
    write(etc, "policy.d/10-first.toml", "[vm]\nvfs_cache_pressure = 60\npage-cluster = 1\n")
    write(etc, "policy.d/ignored.conf", "[vm]\nswappiness = 1\n")
    explicit = write(tmp_path, "mine.toml", "[vm]\nswappiness = 120\n")
    policy = load_policy(explicit, etc)
    assert policy["vm"]["swappiness"] == 120  # --policy last
    assert policy["vm"]["vfs_cache_pressure"] == 70  # drop-ins in name order, after policy.toml
    assert policy["vm"]["page-cluster"] == 1
    assert policy["zswap"]["enabled"] == "auto"  # untouched keys keep the default
    assert policy.sources == (
        "built-in default",
        str(etc / "policy.toml"),
        str(etc / "policy.d/10-first.toml"),
        str(etc / "policy.d/20-second.toml"),
        str(explicit),
    )


def test_environment_names_the_system_directory(monkeypatch: pytest.MonkeyPatch, etc: Path) -> None:
    write(etc, "policy.toml", "[zswap]\nenabled = false\n")
    monkeypatch.setenv("AUTOGLM_TUNE_ETC", str(etc))
    assert load_policy()["zswap"]["enabled"] is False


def test_compressor_accepts_a_name_or_a_list(etc: Path, tmp_path: Path) -> None:
    assert load_policy(write(tmp_path, "a.toml", '[zswap]\ncompressor = "zstd"\n'), etc)["zswap"]["compressor"] == (
        "zstd",
    )
    p = write(tmp_path, "b.toml", '[zswap]\ncompressor = ["zstd", "lz4"]\n')
    assert load_policy(p, etc)["zswap"]["compressor"] == ("zstd", "lz4")


NICE = f"an integer {MODEL_NICE_RANGE[0]}–{MODEL_NICE_RANGE[1]}"  # the root helper's bounds, not the kernel's
OOM = f"an integer {MODEL_OOM_SCORE_ADJ_RANGE[0]}–{MODEL_OOM_SCORE_ADJ_RANGE[1]}"

BAD = [
    ("[vm]\nswappiness = 500\n", "[vm] swappiness = 500", "an integer 0–200"),
    ('[process]\nnice = "high"\n', '[process] nice = "high"', f'{NICE}, "auto"'),
    ('[process]\ndelay_accounting = "yes"\n', "[process] delay_accounting", 'true, false, "keep"'),
    ("[zswap]\nmax_pool_percent = 536870912\n", "[zswap] max_pool_percent = 536870912", "an integer 1–100"),
    ("[zswap]\nmax_pool_percent = 0\n", "max_pool_percent = 0", "an integer 1–100"),
    ("[vm]\nswappiness = true\n", "swappiness = true", "an integer 0–200"),
    ('[vm]\nswappiness = "high"\n', 'swappiness = "high"', '"auto" or "keep"'),
    ("[vm]\nswapiness = 10\n", 'did you mean "swappiness"', "allowed: swappiness"),
    ("[zwsap]\nenabled = true\n", 'did you mean "zswap"', "[zswap]"),
    ("swappiness = 10\n", "did you mean [vm] swappiness", "allowed sections"),
    ('[zswap]\nenabled = "yes"\n', 'enabled = "yes"', 'true, false, "auto", "keep"'),
    ('[zswap]\ncompressor = ["lz4", 7]\n', "compressor", "a compressor name or a list"),
    ('[zswap]\ncompressor = "LZ4!"\n', "compressor", "a compressor name"),
    ('[swap]\nfile_dirs = ["/tmp"]\n', "file_dirs", "/var/lib/autoglm-tune/swap"),
    ("[swap]\npriorities = { nvme = 1, ssd = 80, mmc = 40, hdd = 10, unknown = 5 }\n", "priorities", "faster"),
    ("[swap]\npriorities = { nvme = 100 }\n", "priorities", "a table of nvme"),
    ('[services]\ndisable = ["/etc/systemd/system/cups.service"]\n', "disable", "a unit name"),
    ('[services]\ndisable = ["getty@.service"]\n', "template without an instance", "need an instance"),
    ('[services]\ndisable = "cups.service"\n', "disable", "a list of unit names"),
    ("[process]\nnice = -21\n", "nice = -21", NICE),
    ("[process]\nnice = -20\n", "[process] nice = -20: -20 is out of range", f"{NICE}, \"auto\" (what the root helper"),
    ("[process]\noom_score_adj = -1000\n", "[process] oom_score_adj = -1000", f"{OOM} (what the root helper grants"),
    ('[process]\nsched_policy = "fifo"\n', 'sched_policy = "fifo"', '"other" or "batch" or "idle"'),
    ("[process]\ncpus = [0, -1]\n", "cpus", "a list of CPU numbers"),
    ("[vm\nswappiness = 10\n", "not valid TOML", ""),
    ("[vm]\nswappiness = 10\nswappiness = 20\n", "not valid TOML", ""),
    ("vm = 3\n", "top-level key vm = 3", "allowed sections"),
]


@pytest.mark.parametrize(("text", "says", "allowed"), BAD)
def test_bad_policy_is_one_line_naming_file_key_and_allowed(
    etc: Path, tmp_path: Path, text: str, says: str, allowed: str
) -> None:
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(BadInput) as err:
        load_policy(path, etc)
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    assert says in message
    assert allowed in message


def test_process_bounds_are_the_root_helpers(etc: Path, tmp_path: Path) -> None:
    """The floors the helper grants are accepted as they are; "auto" still picks the nice itself."""
    lowest = f"[process]\nnice = {MODEL_NICE_RANGE[0]}\noom_score_adj = {MODEL_OOM_SCORE_ADJ_RANGE[0]}\n"
    process = load_policy(write(tmp_path, "floor.toml", lowest), etc)["process"]
    assert (process["nice"], process["oom_score_adj"]) == (MODEL_NICE_RANGE[0], MODEL_OOM_SCORE_ADJ_RANGE[0])
    assert load_policy(write(tmp_path, "auto.toml", '[process]\nnice = "auto"\n'), etc)["process"]["nice"] == "auto"


def test_bad_system_drop_in_names_that_file(etc: Path) -> None:
    bad = write(etc, "policy.d/50-bad.toml", "[vm]\nvfs_cache_pressure = 0\n")
    with pytest.raises(BadInput, match=rf"^{bad}: \[vm\] vfs_cache_pressure = 0: 0 is out of range"):
        load_policy(None, etc)


def test_unreadable_policy_file(etc: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no such policy file"):
        load_policy(tmp_path / "missing.toml", etc)
    with pytest.raises(BadInput, match="is a directory"):
        load_policy(tmp_path, etc)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe[vm]\n")
    with pytest.raises(BadInput, match="not valid TOML"):
        load_policy(binary, etc)


def test_a_json_policy_is_the_same_schema(etc: Path, tmp_path: Path) -> None:
    """The same keys in JSON and in TOML give the same policy; JSON drop-ins sort with TOML ones by name."""
    toml = write(tmp_path, "p.toml", '[vm]\nswappiness = 100\n[zswap]\ncompressor = ["lz4", "zstd"]\n'
                                     '[services]\ndisable = ["cups.service"]\n')
    json_file = write(tmp_path, "p.json", '{"vm": {"swappiness": 100}, "zswap": {"compressor": ["lz4", "zstd"]}, '
                                          '"services": {"disable": ["cups.service"]}}')
    assert load_policy(json_file, etc).values == load_policy(toml, etc).values
    write(etc, "policy.d/10-first.json", '{"vm": {"swappiness": 30, "vfs_cache_pressure": 80}}')
    write(etc, "policy.d/20-second.toml", "[vm]\nswappiness = 40\n")
    write(etc, "policy.d/30-ignored.yaml", "vm: {swappiness: 1}\n")
    merged = load_policy(None, etc)
    assert merged["vm"]["swappiness"] == 40 and merged["vm"]["vfs_cache_pressure"] == 80
    assert [Path(s).name for s in merged.sources[1:]] == ["10-first.json", "20-second.toml"]


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[1, 2]", "a JSON policy is [1, 2]; allowed: an object of sections"),
        ('{"vm": {"swappiness": 100}', "not valid JSON"),
        ('{"vm": {"swappiness": NaN}}', "NaN is not a policy value"),
        ("[" * 100_000, "not valid JSON"),
        ('{"vm": 5}', "top-level key vm = 5: keys belong in a section"),
        ('{"vm": {"swapiness": 100}}', 'unknown key [vm] swapiness; did you mean "swappiness"?'),
    ],
)
def test_bad_json_policy_is_one_line(etc: Path, tmp_path: Path, text: str, needle: str) -> None:
    path = write(tmp_path, "bad.json", text)
    with pytest.raises(BadInput) as caught:
        load_policy(path, etc)
    assert needle in str(caught.value) and str(path) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("value", [None, {"a": 1}, [None], 1.5, True, "x" * 300, -(2**70)])
def test_every_key_refuses_what_only_json_can_say(etc: Path, tmp_path: Path, value: object) -> None:
    """JSON can say null, nested objects and huge numbers where TOML rarely does: every key refuses what it does
    not allow with one line naming the key, never a traceback (a value a key allows is skipped)."""
    for section, keys in SCHEMA.items():
        for key in keys:
            path = write(tmp_path, f"{section}-{key}.json", json.dumps({section: {key: value}}))
            try:
                load_policy(path, etc)
            except BadInput as exc:
                assert f"[{section}] {key} = " in str(exc) and "allowed" in str(exc), str(exc)


def test_an_oversized_policy_is_refused_before_it_is_parsed(etc: Path, tmp_path: Path) -> None:
    path = write(tmp_path, "huge.toml", "# " + "x" * (1 << 20) + "\n")
    with pytest.raises(BadInput, match=r"more than 1048576 bytes; allowed: a policy file of at most 1048576 bytes"):
        load_policy(path, etc)


def test_a_toml_date_in_a_bad_value_is_one_line(etc: Path, tmp_path: Path) -> None:
    path = write(tmp_path, "dated.toml", "[vm]\nswappiness = { a = 1979-05-27 }\n")
    with pytest.raises(BadInput, match=r'\[vm\] swappiness = \{"a": "1979-05-27"\}'):
        load_policy(path, etc)
