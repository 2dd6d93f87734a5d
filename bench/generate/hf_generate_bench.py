# The reference stack's 4-bit generation on the BLOOM-7b1-shaped random model that
# shared/anchors/hf_qlora_bench.py makes (transformers + bitsandbytes, nf4 + double quant, bf16
# compute): batch-1 greedy decoding exactly as that script measures it (32-token prompt, 64 new
# tokens, prefill included), prefill tokens/s, and the evaluation-shaped run on the first
# --eval_limit prompt lengths (left-padded batches, a fixed number of new tokens).
# OUT=<dir> python3 bench/generate/hf_generate_bench.py --lengths bench/generate/adgen_dev_prompt_lengths.json
import argparse, json, os, time, torch
ap = argparse.ArgumentParser()
ap.add_argument("--layers", type=int, default=30)
ap.add_argument("--lengths", required=True)
ap.add_argument("--eval_limit", type=int, default=32)
ap.add_argument("--eval_batch", type=int, default=16)
ap.add_argument("--eval_new_tokens", type=int, default=128)
ap.add_argument("--prefill_tokens", type=int, default=512)
ap.add_argument("--dir", default=os.path.join(__import__("tempfile").gettempdir(), "bloom7b-random"))
a = ap.parse_args()
from transformers import BloomConfig, BloomForCausalLM, BitsAndBytesConfig

cfg = BloomConfig(vocab_size=250880, hidden_size=4096, n_layer=a.layers, n_head=32,
                  layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=3)
if not os.path.exists(a.dir + "/config.json"):
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = BloomForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(a.dir)
    del m; torch.cuda.empty_cache()
bnbc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                          bnb_4bit_compute_dtype=torch.bfloat16)
model = BloomForCausalLM.from_pretrained(a.dir, quantization_config=bnbc, device_map={"": 0}, dtype=torch.bfloat16)
model.eval()
res = {"layers": a.layers, "device": torch.cuda.get_device_name(0)}
torch.cuda.reset_peak_memory_stats()

def timed(f):
    torch.cuda.synchronize(); t0 = time.time(); out = f(); torch.cuda.synchronize()
    return out, time.time() - t0

with torch.no_grad():
    # As hf_qlora_bench.py.
    ids = torch.randint(4, 250000, (1, 32), device="cuda")
    model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    o, dt = timed(lambda: model.generate(ids, max_new_tokens=64, do_sample=False, min_new_tokens=64))
    res["decode_tok_s_bs1"] = (o.shape[1] - 32) / dt
    print("decode tok/s", res["decode_tok_s_bs1"], flush=True)

    long = torch.randint(4, 250000, (1, a.prefill_tokens), device="cuda")
    model(long, use_cache=True)
    _, dt = timed(lambda: model(long, use_cache=True))
    res["prefill_tokens"] = a.prefill_tokens
    res["prefill_tok_s"] = a.prefill_tokens / dt
    print("prefill tok/s", res["prefill_tok_s"], flush=True)

    lengths = json.load(open(a.lengths))[: a.eval_limit]
    def run_eval():
        done = 0
        for i in range(0, len(lengths), a.eval_batch):
            chunk = lengths[i : i + a.eval_batch]
            longest = max(chunk)
            ids = torch.full((len(chunk), longest), 3, dtype=torch.long, device="cuda")
            mask = torch.zeros((len(chunk), longest), dtype=torch.long, device="cuda")
            for r, n in enumerate(chunk):
                ids[r, longest - n :] = torch.randint(4, 250000, (n,), device="cuda")
                mask[r, longest - n :] = 1
            model.generate(ids, attention_mask=mask, max_new_tokens=a.eval_new_tokens,
                           min_new_tokens=a.eval_new_tokens, do_sample=False, pad_token_id=3)
            done += len(chunk)
        return done
    done, dt = timed(run_eval)
    res.update(eval_examples=done, eval_batch=a.eval_batch, eval_new_tokens=a.eval_new_tokens,
               eval_examples_s=done / dt, eval_generated_tok_s=done * a.eval_new_tokens / dt)
    print("eval examples/s", res["eval_examples_s"], flush=True)
res["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
out = os.environ.get("OUT", ".")
json.dump(res, open(os.path.join(out, "hf_generate_bench.json"), "w"), indent=1)
print(json.dumps(res))
