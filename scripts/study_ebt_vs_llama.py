"""Study: a char-level EBT against a Llama of the same size, at equal training tokens, on tiny-shakespeare (CPU).

Both models read the same byte-level tokens (EBTTokenizer, 257 ids) in the same order (the Trainer's seeded
sampler), with the same optimizer (AdamW, 5% warm-up then cosine to a tenth, weight decay 0.01, clipping 1.0) and
the same number of training tokens. The EBT takes the model fields of --recipe (the descent: ebt_type, steps, α and
its learning-rate multiplier...) and trains with EBTTrainer; the Llama (LlamaForCausalLM with the EBT's layers,
heads, width and FFN width) trains with the stock Trainer.

Reported, on the first --eval-samples validation blocks (the last 10% of the characters), in nats per token:
- Llama: cross-entropy;
- EBT: cross-entropy of the last descent step with the trained number of steps ("System 1"), with more steps
  ("thinking longer") and with the best of N candidates by final energy ("self-verification").

    OMP_NUM_THREADS=1 python scripts/study_ebt_vs_llama.py --recipe s1 --ebt-lr 3e-3 --llama-lr 3e-3 \
        --tokens 160000 --output runs/study_ebt_vs_llama.json

The budget is --tokens (training tokens per model); the figures of the recorded run are in configuration/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator, set_seed

from modeling_ebt import EBTForCausalLM, EBTTokenizer
from modeling_ebt.cli import validation_loss
from modeling_ebt.data import build_lm_datasets
from modeling_ebt.training import EBTTrainer, load_model_config, load_recipe

REPO = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = REPO.parent / "shared" / "data" / "tiny_shakespeare.txt"


def training_arguments(out: str, steps: int, args, learning_rate: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=out, max_steps=steps, per_device_train_batch_size=args.batch_size, learning_rate=learning_rate,
        weight_decay=0.01, max_grad_norm=1.0, warmup_steps=0.05, lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1}, logging_steps=max(1, steps // 10), save_strategy="no",
        report_to="none", use_cpu=not torch.cuda.is_available(), seed=args.seed, disable_tqdm=True)


def llama_loss(model, batches) -> float:
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            tokens = int(batch["attention_mask"][:, 1:].sum())
            total += float(model(**batch).loss) * tokens
            count += tokens
    return total / count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", default=str(TINY_SHAKESPEARE))
    parser.add_argument("--size", default="xxs")
    parser.add_argument("--recipe", default="cpu-small")
    parser.add_argument("--tokens", type=int, default=200_000, help="training tokens per model")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ebt-lr", type=float, help="default: the recipe's")
    parser.add_argument("--llama-lr", type=float, default=3e-3)
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--steps", default="2,4,8", help="EBT descent steps to evaluate")
    parser.add_argument("--candidates", default="1,2,4", help="EBT candidates to evaluate (at the trained steps)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "runs" / "study_ebt_vs_llama.json"))
    args = parser.parse_args()

    tokenizer = EBTTokenizer()
    recipe = load_recipe(args.recipe)
    config = load_model_config(args.size, recipe, max_position_embeddings=args.block_size + 1,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                               bos_token_id=tokenizer.bos_token_id)
    data = build_lm_datasets(tokenizer, args.corpus, block_size=args.block_size, config=config)
    validation = data["validation"].select(range(min(args.eval_samples, len(data["validation"]))))
    batches = [validation[i:i + args.batch_size] for i in range(0, len(validation), args.batch_size)]
    steps = max(1, args.tokens // (args.batch_size * args.block_size))
    report = {"corpus": args.corpus, "size": args.size, "recipe": args.recipe, "block_size": args.block_size,
              "batch_size": args.batch_size, "train_steps": steps, "train_tokens": steps * args.batch_size *
              args.block_size, "eval_sequences": len(validation), "threads": torch.get_num_threads(),
              "loss": "validation cross-entropy, nats per token (byte)"}
    ebt_lr = args.ebt_lr or recipe["training"].get("learning_rate", 1.2e-3)

    with tempfile.TemporaryDirectory() as out:
        set_seed(args.seed)
        ebt = EBTForCausalLM(config)
        report["ebt_parameters"] = sum(p.numel() for p in ebt.parameters())
        started = time.time()
        EBTTrainer(model=ebt, args=training_arguments(out, steps, args, ebt_lr), train_dataset=data["train"],
                   data_collator=default_data_collator).train()
        report["ebt_train_seconds"] = round(time.time() - started, 1)
        ebt.eval()
        trained_steps = config.mcmc_num_steps
        report["ebt"] = {"learning_rate": ebt_lr, "alpha": float(ebt.alpha.detach()), "by_steps": {},
                         "by_candidates": {}}
        for s in [int(v) for v in args.steps.split(",")]:
            report["ebt"]["by_steps"][str(s)] = validation_loss(ebt, batches, s, 1, args.seed)
            print(f"EBT, {s} steps: {report['ebt']['by_steps'][str(s)]:.4f}", flush=True)
        for n in [int(v) for v in args.candidates.split(",")]:
            report["ebt"]["by_candidates"][str(n)] = validation_loss(ebt, batches, trained_steps, n, args.seed)
            print(f"EBT, {n} candidates: {report['ebt']['by_candidates'][str(n)]:.4f}", flush=True)

        set_seed(args.seed)
        llama_config = LlamaConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
            max_position_embeddings=args.block_size, rms_norm_eps=config.rms_norm_eps, tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id)
        llama = LlamaForCausalLM(llama_config)
        report["llama_parameters"] = sum(p.numel() for p in llama.parameters())
        started = time.time()
        Trainer(model=llama, args=training_arguments(out, steps, args, args.llama_lr), train_dataset=data["train"],
                data_collator=default_data_collator).train()
        report["llama_train_seconds"] = round(time.time() - started, 1)
        llama.eval()
        report["llama"] = {"learning_rate": args.llama_lr, "loss": llama_loss(llama, batches)}
        print(f"Llama: {report['llama']['loss']:.4f}", flush=True)

    for key in ("by_steps", "by_candidates"):
        report["ebt"][key] = {k: {"loss": v, "perplexity": math.exp(v)} for k, v in report["ebt"][key].items()}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
