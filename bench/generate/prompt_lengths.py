# The prompt lengths of the evaluation-shaped benchmark: one per ADGEN dev example, its content's
# length in characters (about one BLOOM token per Chinese character or less), capped at the seed
# project's --max_source_length 64. No BLOOM tokenizer exists to count real tokens (NOTES.md).
# python3 bench/generate/prompt_lengths.py ../shared/adgen/dev.jsonl > bench/generate/adgen_dev_prompt_lengths.json
import json, sys
lengths = [min(len(json.loads(line)["content"]), 64) for line in open(sys.argv[1], encoding="utf-8") if line.strip()]
print(json.dumps(lengths))
