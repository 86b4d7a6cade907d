"""The parts of `autoglm-tune bench` that run outside the tuner: a file run by a Python interpreter
(the llama venv's for `model` and `plot`, which need gguf, numpy and matplotlib). Imports no autoglm_tune.

    bench_worker.py model PRESET VOCAB.gguf OUT.gguf   random-weight llama GGUF, Q4_0, the vocab's tokenizer
    bench_worker.py desktop MIB REWRITE_PERCENT        a compressible "desktop" working set (numpy); prints "ready"
    bench_worker.py hog                                a busy loop on one core
    bench_worker.py plot RESULTS.json OUT.png          tok/s ratio to limit per scenario and configuration

Models (research test-environment.md §9): Q4_0 blocks are written directly (an fp16 scale and 16 bytes of
random nibbles per 32 weights), norms are F32 ones; the same preset and seed give the same bytes. Random
quantised weights compress like real ones (~1.04:1), so zswap sees what it would see with a real model.
The desktop (research kernel-and-platform.md §9): JSON-like text, ≈3:1 by zlib, ≈2:1 by lzo-rle, never
same-filled; REWRITE_PERCENT of its pages are rewritten every second, the rest goes cold.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from typing import Any

# name → (n_embd, layers, n_ff, heads, kv heads, context length)
PRESETS = {
    "tiny": (256, 4, 768, 4, 2, 2048),
    "1.1b": (2048, 22, 5632, 32, 4, 2048),  # TinyLlama-1.1B shapes
    "3b": (3072, 28, 8192, 24, 8, 4096),  # Llama-3.2-3B shapes with a 32k vocabulary
}
N_VOCAB = 32000
SEED = 1234
PAGE = 4096
MIB = 1 << 20


def copy_tokenizer(w: Any, vocab_path: str) -> None:
    import gguf
    from gguf import GGUFValueType

    reader = gguf.GGUFReader(vocab_path)
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == GGUFValueType.STRING:
                value: Any = [bytes(f.parts[i]) for i in f.data]
            else:
                value = [f.parts[i].tolist()[0] for i in f.data]
            w.add_key_value(name, value, vtype, sub_type=sub)
        elif vtype == GGUFValueType.STRING:
            w.add_key_value(name, bytes(f.parts[f.data[0]]).decode(), vtype)
        else:
            w.add_key_value(name, f.parts[f.data[0]].tolist()[0], vtype)


def tensor_specs(n_embd: int, n_layer: int, n_ff: int, n_head: int, n_head_kv: int) -> list[tuple[str, tuple, bool]]:
    """(name, shape as (rows, columns) or (n,), is_norm)."""
    out: list[tuple[str, tuple, bool]] = [("token_embd.weight", (N_VOCAB, n_embd), False)]
    kv = n_embd // n_head * n_head_kv
    for i in range(n_layer):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (n_embd,), True),
            (b + "attn_q.weight", (n_embd, n_embd), False),
            (b + "attn_k.weight", (kv, n_embd), False),
            (b + "attn_v.weight", (kv, n_embd), False),
            (b + "attn_output.weight", (n_embd, n_embd), False),
            (b + "ffn_norm.weight", (n_embd,), True),
            (b + "ffn_gate.weight", (n_ff, n_embd), False),
            (b + "ffn_up.weight", (n_ff, n_embd), False),
            (b + "ffn_down.weight", (n_embd, n_ff), False),
        ]
    return [*out, ("output_norm.weight", (n_embd,), True), ("output.weight", (N_VOCAB, n_embd), False)]


def make_model(preset: str, vocab_path: str, out: str) -> None:
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType

    n_embd, n_layer, n_ff, n_head, n_head_kv, n_ctx = PRESETS[preset]
    w = gguf.GGUFWriter(out, "llama")
    copy_tokenizer(w, vocab_path)
    w.add_vocab_size(N_VOCAB)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    specs = tensor_specs(n_embd, n_layer, n_ff, n_head, n_head_kv)
    for name, shape, norm in specs:
        if norm:
            w.add_tensor_info(name, shape, np.float32, shape[0] * 4, raw_dtype=GGMLQuantizationType.F32)
        else:
            rows, cols = shape
            w.add_tensor_info(
                name, (rows, cols // 32 * 18), np.uint8, rows * cols // 32 * 18, raw_dtype=GGMLQuantizationType.Q4_0
            )
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for idx, (_, shape, norm) in enumerate(specs):
        if norm:
            w.write_tensor_data(np.ones(shape, dtype=np.float32))
            continue
        rng = np.random.default_rng([SEED, idx])
        rows, cols = shape
        blocks = rows * cols // 32
        data = np.empty((blocks, 18), dtype=np.uint8)
        data[:, :2] = np.full(blocks, 0.02 / 4.6, dtype=np.float16).view(np.uint8).reshape(blocks, 2)
        data[:, 2:] = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
        w.write_tensor_data(data.reshape(rows, cols // 32 * 18))
    w.close()


def desktop_template(rng: random.Random) -> bytes:
    """One MiB of JSON-like records: a browser's or editor's heap, compressible but not trivially."""
    words = ["alpha", "window", "tab", "session", "cache", "render", "layout", "font", "image", "event"]
    lines = []
    size = 0
    while size < MIB:
        record = {
            "id": rng.randrange(10**9),
            "kind": rng.choice(words),
            "title": " ".join(rng.choice(words) for _ in range(rng.randrange(2, 6))),
            "hash": f"{rng.getrandbits(64):016x}",
            "score": round(rng.random(), 4),
            "tags": [rng.choice(words) for _ in range(rng.randrange(1, 4))],
        }
        line = json.dumps(record).encode() + b"\n"
        lines.append(line)
        size += len(line)
    return b"".join(lines)[:MIB]


def no_huge_pages() -> None:
    """Keep this process's memory in 4 KiB pages, as a browser's or editor's heap is on a `madvise` THP system.
    numpy madvises large arrays for huge pages; with 10 % of the pages rewritten at random every second, every
    2 MiB page is then referenced every second, none of the desktop ever ages, and reclaim finds nothing to take
    but the model's memory (docs/BENCHMARKS.md, "The desktop's page size")."""
    import ctypes

    pr_set_thp_disable = 41  # <linux/prctl.h>
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_thp_disable, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")


def desktop(mib: int, rewrite_percent: int) -> None:
    no_huge_pages()
    import numpy as np

    template = np.frombuffer(desktop_template(random.Random(SEED)), dtype=np.uint8)
    words = np.tile(template, mib).view(np.uint64)
    pages = mib * MIB // PAGE
    step = PAGE // 8
    words[::step] = np.arange(pages, dtype=np.uint64)  # a counter in every page: no two pages alike
    print("ready", flush=True)
    rng = np.random.default_rng(SEED)
    per_second = pages * rewrite_percent // 100
    stamp = 0
    while True:
        started = time.monotonic()
        stamp += 1
        if per_second:
            words[rng.integers(0, pages, per_second) * step + 1] = stamp
        time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


def hog() -> None:
    while True:
        pass


def plot(results_path: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(results_path) as fh:
        summary = json.load(fh)["summary"]
    scenarios = sorted({s["scenario"] for s in summary}, key=[s["scenario"] for s in summary].index)
    configs = sorted({s["config"] for s in summary}, key=[s["config"] for s in summary].index)
    fig, ax = plt.subplots(figsize=(2 + 2.2 * len(scenarios), 4))
    width = 0.8 / len(configs)
    for j, config in enumerate(configs):
        xs, ys, lo, hi = [], [], [], []
        for i, scenario in enumerate(scenarios):
            row = next((s for s in summary if s["scenario"] == scenario and s["config"] == config), None)
            if row is None or row["ratio_to_limit"]["median"] is None:
                continue
            r = row["ratio_to_limit"]
            xs.append(i + (j - (len(configs) - 1) / 2) * width)
            ys.append(r["median"])
            lo.append(r["median"] - r["min"])
            hi.append(r["max"] - r["median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=config)
    ax.set_xticks(range(len(scenarios)), scenarios)
    ax.set_ylabel("generation tok/s ÷ limit (same round)")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.legend(fontsize="small")
    ax.set_title("autoglm-tune bench: median, bars min–max")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main(argv: list[str]) -> None:
    # Stopped by SIGTERM from the bench: exit quietly (no traceback in the logs).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    command, args = argv[0], argv[1:]
    if command == "model":
        make_model(args[0], args[1], args[2])
    elif command == "desktop":
        desktop(int(args[0]), int(args[1]))
    elif command == "hog":
        hog()
    elif command == "plot":
        plot(args[0], args[1])
    else:
        sys.exit(f"bench_worker.py: unknown command {command!r}; allowed: model, desktop, hog, plot")


if __name__ == "__main__":
    # Run as a file, this directory comes first on sys.path, and its gguf.py would hide the gguf package.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    main(sys.argv[1:])
