# Loads 4-bit checkpoints written by `qlora quantize` with transformers + bitsandbytes on a GPU
# and compares their logits with the golden ones (which transformers computed from its own
# 4-bit checkpoints of the same models). Also compares the tensors file by file.
#   PYTHONPATH=.anchor-site python3 scripts/gpu/check_hf_interop.py OUT_JSON QLORA_DIR:GOLDEN_DIR:INPUT_IDS_FILE ...
# INPUT_IDS_FILE is a safetensors file holding `input_ids` (the golden reference file).
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

results = []
for spec in sys.argv[2:]:
    ours, golden, ids_file = spec.split(":")
    ref = load_file(f"{golden}/reference_logits.safetensors")["logits"]
    ids_data = load_file(ids_file)
    ids = ids_data["input_ids"].long().cuda()
    mask = ids_data.get("attention_mask")
    a, b = load_file(f"{ours}/model.safetensors"), load_file(f"{golden}/model.safetensors")
    differing = sorted(k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k]))
    model = AutoModelForCausalLM.from_pretrained(ours, device_map={"": 0})
    with torch.no_grad():
        kw = {"attention_mask": mask.cuda()} if mask is not None else {}
        logits = model(input_ids=ids, **kw).logits.float().cpu()
    diff = (logits - ref).abs().max().item()
    results.append({"checkpoint": ours, "golden": golden, "tensors_differing": differing,
                    "max_abs_logit_diff": diff, "max_abs_ref": ref.abs().max().item(),
                    "loaded_as": type(model).__name__,
                    "linear4bit_modules": sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")})
    print(results[-1], flush=True)
json.dump(results, open(sys.argv[1], "w"), indent=1)
