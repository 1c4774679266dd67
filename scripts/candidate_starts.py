"""Where should self-verification's candidates start? Independent random starts against the model's own first step.

For a trained EBT it scores, on the blocks `ebt study thinking` evaluates (the first `--eval-samples` validation
blocks of each corpus), N candidates per position descended for the trained number of steps and judged by their final
energy (the lowest wins), started in three ways:

- `independent`: N random starts (the model's evaluation starts, `initial_logits`), every step with Langevin noise
  σ (σ = 0: without noise);
- `first_step`: one noiseless first step from candidate 1's start, then the N candidates descend the remaining steps
  from that prediction, every step with noise σ;
- `first_step_perturbed`: the same first step, perturbed once by σ·N(0, 1) (candidate 1 unperturbed), then the
  remaining steps without noise.

Each candidate is a copy of its block in the batch, so the candidates are independent descents over the same
context. Per corpus and way it records the loss (nats/token) of candidate 1, of the lowest-energy candidate
(`energy_pick`) and of the best candidate per position (`oracle`), and how often the energies of candidates 1 and
2 order them as their losses do (`agreement`).

    OMP_NUM_THREADS=1 python scripts/candidate_starts.py --model runs/models/s2cpu-seed0 --candidates 8 \\
        --corpus validation A.txt B.txt --json runs/candidate_starts.json

"validation" is the training corpus's validation split (`--training-corpus`, default: the default corpus).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from modeling_ebt import EBTForCausalLM, ThinkingConfig
from modeling_ebt.arguments import StudyArguments
from modeling_ebt.study import blocks
from modeling_ebt.tokenization_ebt import EBTTokenizer


def descend(model, batch, starts, steps, noise):
    """N independent descents over the same blocks: starts N × batch × positions × vocab → the final logits and
    the final energies, N × batch × positions (× vocab)."""
    n, rows = starts.shape[0], batch["input_ids"].shape[0]
    out = model(input_ids=batch["input_ids"].repeat(n, 1), attention_mask=batch["attention_mask"].repeat(n, 1),
                initial_logits=starts.flatten(0, 1), thinking=ThinkingConfig(steps=steps, langevin_noise=noise),
                output_final_energies=True)
    return out.logits.unflatten(0, (n, rows)), out.final_energies.unflatten(0, (n, rows))


def token_losses(logits, batch):
    """Cross-entropy of each candidate's prediction at each position, N × batch × positions, and the mask of the
    positions that have a next token."""
    ids = batch["input_ids"]
    targets = EBTForCausalLM._targets(ids, batch["attention_mask"], torch.arange(ids.shape[1]))
    losses = F.cross_entropy(logits.flatten(0, 2).float(), targets.repeat(logits.shape[0], 1).flatten(),
                             ignore_index=-100, reduction="none")
    return losses.view(logits.shape[:3]), targets != -100


def tally(logits, energies, batch) -> dict[str, float]:
    """Sums over the batch's positions: losses of candidate 1, of the lowest final energy, of the best candidate;
    pairs of candidates 1 and 2 with different losses, and how many of them the energy orders right."""
    losses, valid = token_losses(logits, batch)
    picked = losses.gather(0, energies.argmin(0, keepdim=True))[0]
    differ = valid & ((losses[0] - losses[1]).abs() > 1e-4)
    agree = (energies[0] < energies[1]) == (losses[0] < losses[1])
    return {"first": float(losses[0][valid].sum()), "energy_pick": float(picked[valid].sum()),
            "oracle": float(losses.min(0).values[valid].sum()), "tokens": float(valid.sum()),
            "pairs": float(differ.sum()), "agreeing": float((agree & differ).sum())}


def ways(model, batch, num_candidates, noises):
    """(name, σ, final logits, final energies) of each way of starting the candidates."""
    rows, length = batch["input_ids"].shape
    positions = torch.arange(length).expand(rows, length)
    starts = model.initial_logits(positions, num_candidates).unflatten(1, (num_candidates, length)).transpose(0, 1)
    trained = model.config.evaluation_steps
    for sigma in sorted({0.0, *noises}):
        yield ("independent", sigma, *descend(model, batch, starts, trained, sigma))
    first_step, _ = descend(model, batch, starts[:1], 1, 0.0)
    for sigma in noises:
        yield ("first_step", sigma, *descend(model, batch, first_step.expand_as(starts), trained - 1, sigma))
        perturbed = first_step + sigma * torch.randn_like(starts)
        perturbed[0] = first_step[0]
        yield ("first_step_perturbed", sigma, *descend(model, batch, perturbed, trained - 1, 0.0))


def score(model, batches, num_candidates, noises) -> list[dict]:
    sums: dict[tuple, dict[str, float]] = {}
    with torch.no_grad():
        for batch in batches:
            for name, sigma, logits, energies in ways(model, batch, num_candidates, noises):
                total = sums.setdefault((name, sigma), {})
                for key, value in tally(logits, energies, batch).items():
                    total[key] = total.get(key, 0.0) + value
    return [{"start": name, "noise": sigma, "first": s["first"] / s["tokens"],
             "energy_pick": s["energy_pick"] / s["tokens"], "oracle": s["oracle"] / s["tokens"],
             "agreement": s["agreeing"] / max(s["pairs"], 1.0)} for (name, sigma), s in sums.items()]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved EBTForCausalLM")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--noise", type=float, nargs="+", default=None,
                        help="σ values (default: the trained Langevin noise, 2× and 4× it)")
    parser.add_argument("--corpus", nargs="+", default=["validation"])
    parser.add_argument("--training-corpus", default=None)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--json", required=True)
    args = parser.parse_args(argv)
    if args.candidates < 2:
        parser.error("--candidates must be at least 2: the agreement compares candidates 1 and 2")
    model = EBTForCausalLM.from_pretrained(args.model).eval()
    if model.config.evaluation_steps < 2:
        parser.error(f"{args.model} descends {model.config.evaluation_steps} step: a first step leaves none to "
                     "start candidates from")
    sigma = model.config.langevin_dynamics_noise or 1.0
    noises = args.noise or [sigma, 2 * sigma, 4 * sigma]
    study = StudyArguments(output_dir=str(Path(args.json).parent), eval_samples=args.eval_samples,
                           block_size=args.block_size, batch_size=args.batch_size, cache_dir=args.cache_dir)
    torch.manual_seed(args.seed)
    report = {"model": args.model, "candidates": args.candidates, "trained_steps": model.config.evaluation_steps,
              "results": {}}
    for corpus in args.corpus:
        source = args.training_corpus if corpus == "validation" else corpus
        _, batches = blocks(EBTTokenizer(), source, study, model.config)
        report["results"][corpus] = score(model, batches, args.candidates, noises)
        for row in report["results"][corpus]:
            print(f"{corpus} {row['start']:21s} σ={row['noise']:<4g} candidate 1 {row['first']:.4f}  lowest energy "
                  f"{row['energy_pick']:.4f}  oracle {row['oracle']:.4f}  agreement {row['agreement']:.3f}",
                  flush=True)
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
