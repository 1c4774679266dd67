"""Search the main job's recipe: α init, α learning-rate multiplier and learning rate, at a fixed step budget.

Each setting trains a fresh model with `modeling_ebt.training.run_training` (the code behind `ebt train`) for the same
number of steps on the same data, then reports the validation loss of the last descent step. One JSON line per
setting is appended to --results (default: runs/recipe_search.jsonl), so the search can be resumed and read while it
runs.

    OMP_NUM_THREADS=1 python scripts/recipe_search.py --steps 100 --alphas 500,50,5,1 --multiplier-rule both
    OMP_NUM_THREADS=1 python scripts/recipe_search.py --steps 100 --alphas 1,0.3 --multiplier-rule scaled \
        --lrs 1.2e-3,3e-3,6e-3

The figures of the run recorded in configuration/README.md came from these commands.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import tempfile
import time
from pathlib import Path

from modeling_ebt.training import TrainOptions, run_training

REPO = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = REPO.parent / "shared" / "data" / "tiny_shakespeare.txt"


def settings(args) -> list[dict]:
    """Every (α init, multiplier, learning rate). Multiplier rule "paper": 1500; "scaled": 1500 · α / 500, so that
    Adam moves α by the same fraction of itself per step as in the paper (α 500, multiplier 1500)."""
    rules = {"paper": [1500.0], "scaled": [None], "both": [1500.0, None]}[args.multiplier_rule]
    out = []
    for alpha, multiplier, lr in itertools.product(args.alphas, rules, args.lrs):
        multiplier = 1500.0 * alpha / 500.0 if multiplier is None else multiplier
        out.append({"mcmc_step_size": alpha, "mcmc_step_size_lr_multiplier": multiplier, "learning_rate": lr})
    return out


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", type=_floats, default=[500.0, 50.0, 5.0, 1.0], help="α inits")
    parser.add_argument("--multiplier-rule", choices=["paper", "scaled", "both"], default="both")
    parser.add_argument("--lrs", type=_floats, default=[1.2e-3], help="learning rates")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--size", default="4xs")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--eval-samples", type=int, default=64)
    parser.add_argument("--corpus", default=None, help="default: the default corpus (Shakespeare's complete works)")
    parser.add_argument("--results", default=str(REPO / "runs" / "recipe_search.jsonl"))
    args = parser.parse_args()

    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if results.is_file():
        done = {json.dumps(json.loads(line)["setting"], sort_keys=True) for line in results.read_text().splitlines()}
    for setting in settings(args):
        key = json.dumps(setting, sort_keys=True)
        if key in done:
            continue
        out = Path(tempfile.mkdtemp(prefix="ebt-search-"))
        started = time.time()
        try:
            options = TrainOptions(
                output_dir=str(out / "run"), corpus=args.corpus, size=args.size, recipe="s1",
                model_args={k: v for k, v in setting.items() if k != "learning_rate"},
                training_args={"warmup_steps": 0.05, "save_strategy": "no", "learning_rate": setting["learning_rate"],
                               "logging_steps": max(1, args.steps // 10)},
                max_steps=args.steps, block_size=args.block_size, batch_size=args.batch_size,
                eval_samples=args.eval_samples, progress=False)
            summary = run_training(options)
            record = {"setting": setting, "steps": summary["steps"], "tokens_seen": summary["tokens_seen"],
                      "eval_last_step_loss": summary["eval"].get("eval_last_step_loss"),
                      "eval_loss_per_step": [summary["eval"][k] for k in sorted(summary["eval"])
                                             if k.startswith("eval_loss_step_")],
                      "final_alpha": summary["alpha"], "final_train_loss": summary["final_train_loss"]}
        except Exception as error:  # a diverged setting is a result too
            record = {"setting": setting, "error": f"{type(error).__name__}: {error}"}
        record.update(seconds=round(time.time() - started, 1), size=args.size, block_size=args.block_size,
                      batch_size=args.batch_size)
        with results.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
