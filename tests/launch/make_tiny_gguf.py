"""Write a tiny random-weight llama GGUF (research test-environment.md §9, preset `tiny`).

Run with the llama venv's python (it has gguf and numpy): make_tiny_gguf.py VOCAB.gguf OUT.gguf
The tokenizer is copied from VOCAB (the sdist's ggml-vocab-llama-spm.gguf). Q4_0 blocks are written
directly: an fp16 scale and 16 bytes of random nibbles per 32 weights. Same seed, same bytes.
"""

from __future__ import annotations

import sys

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

N_EMBD, N_LAYER, N_FF, N_HEAD, N_HEAD_KV, N_VOCAB, N_CTX = 256, 4, 768, 4, 2, 32000, 2048
SEED = 1234


def copy_tokenizer(w: gguf.GGUFWriter, vocab_path: str) -> None:
    reader = gguf.GGUFReader(vocab_path)
    for name, f in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        vtype = f.types[0]
        if vtype == GGUFValueType.ARRAY:
            sub = f.types[-1]
            if sub == GGUFValueType.STRING:
                value = [bytes(f.parts[i]) for i in f.data]
            else:
                value = [f.parts[i].tolist()[0] for i in f.data]
            w.add_key_value(name, value, vtype, sub_type=sub)
        elif vtype == GGUFValueType.STRING:
            w.add_key_value(name, bytes(f.parts[f.data[0]]).decode(), vtype)
        else:
            w.add_key_value(name, f.parts[f.data[0]].tolist()[0], vtype)


def tensors() -> list[tuple[str, tuple[int, ...], bool]]:
    """(name, shape as (ne1, ne0) rows x columns, is_norm)."""
    out = [("token_embd.weight", (N_VOCAB, N_EMBD), False)]
    kv = N_EMBD // N_HEAD * N_HEAD_KV
    for i in range(N_LAYER):
        b = f"blk.{i}."
        out += [
            (b + "attn_norm.weight", (N_EMBD,), True),
            (b + "attn_q.weight", (N_EMBD, N_EMBD), False),
            (b + "attn_k.weight", (kv, N_EMBD), False),
            (b + "attn_v.weight", (kv, N_EMBD), False),
            (b + "attn_output.weight", (N_EMBD, N_EMBD), False),
            (b + "ffn_norm.weight", (N_EMBD,), True),
            (b + "ffn_gate.weight", (N_FF, N_EMBD), False),
            (b + "ffn_up.weight", (N_FF, N_EMBD), False),
            (b + "ffn_down.weight", (N_EMBD, N_FF), False),
        ]
    out += [("output_norm.weight", (N_EMBD,), True), ("output.weight", (N_VOCAB, N_EMBD), False)]
    return out


def q4_0(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    blocks = rows * cols // 32
    data = np.empty((blocks, 18), dtype=np.uint8)
    data[:, :2] = np.full(blocks, 0.02 / 4.6, dtype=np.float16).view(np.uint8).reshape(blocks, 2)
    data[:, 2:] = rng.integers(0, 256, size=(blocks, 16), dtype=np.uint8)
    return data.reshape(rows, cols // 32 * 18)


def main(vocab_path: str, out: str) -> None:
    w = gguf.GGUFWriter(out, "llama")
    copy_tokenizer(w, vocab_path)
    w.add_vocab_size(N_VOCAB)
    w.add_context_length(N_CTX)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(N_EMBD // N_HEAD)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    specs = tensors()
    for name, shape, norm in specs:
        if norm:
            w.add_tensor_info(name, shape, np.float32, shape[0] * 4, raw_dtype=GGMLQuantizationType.F32)
        else:
            rows, cols = shape
            byte_shape = (rows, cols // 32 * 18)
            w.add_tensor_info(name, byte_shape, np.uint8, rows * cols // 32 * 18, raw_dtype=GGMLQuantizationType.Q4_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for idx, (_, shape, norm) in enumerate(specs):
        rng = np.random.default_rng([SEED, idx])
        w.write_tensor_data(np.ones(shape, dtype=np.float32) if norm else q4_0(*shape, rng))
    w.close()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
