# Loads a base model (optionally in 4 bits through bitsandbytes) and an adapter written by
# `qlora train` with peft on a GPU, and compares the logits with the ones qlora's CPU path
# computed for the same inputs (native-trainer/examples/dump_logits.rs).
#   PYTHONPATH=.anchor-site python3 scripts/gpu/check_peft_adapter.py OUT_JSON \
#       BASE_DIR ADAPTER_DIR nf4|fp4|none INPUTS.safetensors QLORA_LOGITS.safetensors
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
from peft import PeftModel

out, base, adapter, quant, inputs, ours = sys.argv[1:7]
kw = {}
if quant != "none":
    kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, device_map={"": 0}, **kw)
model = PeftModel.from_pretrained(model, adapter).eval()
x = load_file(inputs)
with torch.no_grad():
    kw = {"attention_mask": x["attention_mask"].cuda()} if "attention_mask" in x else {}
    logits = model(input_ids=x["input_ids"].cuda(), **kw).logits.float().cpu()
theirs = load_file(ours)["logits"]
res = {"base": base, "adapter": adapter, "quant": quant,
       "max_abs_diff": (logits - theirs).abs().max().item(),
       "max_abs_logit": logits.abs().max().item(),
       "lora_modules": sum(1 for n, _ in model.named_modules() if n.endswith("lora_A")),
       "top1_agree": (logits.argmax(-1) == theirs.argmax(-1)).float().mean().item()}
res["rel"] = res["max_abs_diff"] / res["max_abs_logit"]
print(res, flush=True)
json.dump(res, open(out, "w"), indent=1)
