#!/usr/bin/env python3
"""Builds the seed corpus fuzz/corpus/<target>/ from the small golden fixtures in tests/fixtures
(standard library only). The seeds are committed; re-run this only to change them:
    python3 fuzz/make_corpus.py
Fuzzing adds its finds to a scratch directory (scripts/fuzz.sh), never to these files;
the crash inputs of fixed bugs are kept here as regression_* files."""

import json
import os
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIX = os.path.join(ROOT, "tests", "fixtures")
GOLDEN = os.path.join(FIX, "golden")
CORPUS = os.path.join(ROOT, "fuzz", "corpus")


def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        tensors[name] = (entry["dtype"], entry["shape"], data[start:end])
    return tensors


def write_safetensors(tensors, metadata=None):
    """The safetensors bytes of `tensors` (name -> (dtype, shape, bytes)), laid out in name order."""
    header = {"__metadata__": metadata} if metadata else {}
    data = b""
    for name in sorted(tensors):
        dtype, shape, raw = tensors[name]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def subset(path, keep):
    return {k: v for k, v in read_safetensors(path).items() if keep(k)}


def gguf_string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def build_gguf():
    """A GGUF v3 with metadata of several value types and one tensor of each of four ggml types."""
    kv = [
        ("general.architecture", 8, gguf_string("llama")),
        ("llama.context_length", 4, struct.pack("<I", 128)),
        ("llama.rope.freq_base", 6, struct.pack("<f", 10000.0)),
        ("general.flag", 7, b"\x01"),
        ("general.count", 10, struct.pack("<Q", 7)),
        ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + b"".join(gguf_string(t) for t in ["a", "b", "ab"])),
        ("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 5, 3) + struct.pack("<3i", 1, 1, 3)),
    ]
    f16_one = struct.pack("<e", 0.5)
    tensors = [
        ("a", [2, 4], 0, struct.pack("<8f", *[i * 0.25 for i in range(8)])),
        ("b", [8], 1, struct.pack("<8e", *[i - 4.0 for i in range(8)])),
        ("c", [32], 8, f16_one + bytes((i * 7) % 256 for i in range(32))),  # Q8_0
        ("d", [32], 2, f16_one + bytes(range(16))),  # Q4_0
    ]
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, vtype, value in kv:
        out += gguf_string(key) + struct.pack("<I", vtype) + value
    data = b""
    for name, dims, type_id, raw in tensors:
        data += b"\0" * (-len(data) % 32)
        out += gguf_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", type_id, len(data))
        data += raw
    out += b"\0" * (-len(out) % 32)
    return out + data


def main():
    seeds = {}

    def seed(target, name, content):
        if isinstance(content, str):
            content = content.encode()
        seeds.setdefault(target, []).append((name, content))

    bloom = os.path.join(GOLDEN, "tiny-bloom", "model.safetensors")
    seed("safetensors", "bloom_layernorms", write_safetensors(
        subset(bloom, lambda n: n.startswith("transformer.h.0.") and "layernorm" in n), {"format": "pt"}))
    seed("safetensors", "bloom_bias", write_safetensors(
        subset(bloom, lambda n: n.endswith("query_key_value.bias") or n.startswith("transformer.word_embeddings_layernorm"))))
    seed("safetensors", "bloom_header_truncated", open(bloom, "rb").read()[:1024])
    f16_shard = os.path.join(FIX, "torch", "st-sharded-f16", "model-00001-of-00003.safetensors")
    f16 = subset(f16_shard, lambda n: n.endswith("layernorm.weight") and ".h.0." in n)
    seed("safetensors", "f16_layernorm", write_safetensors(f16))

    nf4 = os.path.join(GOLDEN, "tiny-bloom-nf4", "model.safetensors")
    fp4 = os.path.join(ROOT, "..", "shared", "golden", "tiny-bloom-fp4", "model.safetensors")
    layer = "transformer.h.0.self_attention.dense.weight"
    for label, path in [("nf4", nf4), ("fp4", fp4)]:
        if not os.path.exists(path):
            continue
        tensors = subset(path, lambda n: n.startswith(layer) or n == "transformer.h.0.input_layernorm.bias")
        seed("bnb4bit", f"{label}_double_quant_layer", write_safetensors(tensors, {"format": "pt"}))
        for name, (_, _, raw) in tensors.items():
            if ".quant_state." in name:
                seed("bnb_quant_state", f"{label}_double_quant", raw)
    seed("bnb_quant_state", "nf4_plain", '{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 40]}')
    seed("bnb_quant_state", "fp4_bf16", '{"quant_type": "fp4", "blocksize": 64, "dtype": "bfloat16", "shape": [320]}')

    for name in ["views.bin", "legacy.bin"]:
        seed("torch", name.split(".")[0], open(os.path.join(FIX, "torch", name), "rb").read())

    shard_name = "model-00001-of-00003.safetensors"
    index = {"metadata": {"total_size": sum(len(t[2]) for t in f16.values())},
             "weight_map": {n: shard_name for n in f16}}
    seed("sharded_index", "f16_index_and_shard", json.dumps(index, indent=2).encode() + b"\0" + write_safetensors(f16))
    seed("sharded_index", "bin_index_only", open(os.path.join(FIX, "torch", "bin-sharded-bf16", "pytorch_model.bin.index.json"), "rb").read()[:1200])

    seed("gguf", "four_types", build_gguf())

    for model in ["tiny-bloom-lora", os.path.join("llama", "tiny-llama-lora")]:
        seed("lora_config", model.split("/")[-1], open(os.path.join(GOLDEN, model, "adapter_config.json"), "rb").read())
    bloom_lora = os.path.join(GOLDEN, "tiny-bloom-lora")
    seed("lora_adapter", "tiny_bloom_lora",
         open(os.path.join(bloom_lora, "adapter_config.json"), "rb").read() + b"\0"
         + open(os.path.join(bloom_lora, "adapter_model.safetensors"), "rb").read())

    words = ["</s>", "<pad>", "<unk>", "hello", "world", "."]
    added = [{"id": 0, "content": "</s>", "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True}]
    seed("tokenizer", "word_level", json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": None, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
        "model": {"type": "WordLevel", "vocab": {w: i for i, w in enumerate(words)}, "unk_token": "<unk>"}}))
    bpe_vocab = {t: i for i, t in enumerate(["</s>", "h", "e", "l", "o", "he", "ll", "hell", "hello", "Ġ", "w", "r", "d"])}
    seed("tokenizer", "byte_level_bpe", json.dumps({
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "vocab": bpe_vocab, "merges": ["h e", "l l", "he ll", "hell o"]}}))

    for model in ["tiny-bloom", "tiny-bloom-nf4", "llama/tiny-llama", "llama/tiny-llama-nf4", "llama/tiny-qwen2"]:
        seed("model_config", model.split("/")[-1], open(os.path.join(GOLDEN, model, "config.json"), "rb").read())

    seed("jsonl", "adgen", "\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"content": "类型#上衣*颜色#白色", "summary": "一件白色的上衣。"},
        {"content": "hello", "summary": "world", "history": [["q", "a"], ["q2", "a2"]]},
    ]) + "\n\n")
    seed("jsonl", "bom_history", "\ufeff" + json.dumps({"content": "x", "summary": "y", "history": []}))

    for target, files in seeds.items():
        directory = os.path.join(CORPUS, target)
        os.makedirs(directory, exist_ok=True)
        # Crash inputs of fixed bugs (regression_*) are kept; the seeds are rewritten.
        for old in os.listdir(directory):
            if not old.startswith("regression_"):
                os.remove(os.path.join(directory, old))
        for name, content in files:
            with open(os.path.join(CORPUS, target, name), "wb") as f:
                f.write(content)
        print(f"{target}: {len(files)} seeds, {sum(len(c) for _, c in files)} bytes")


main()
