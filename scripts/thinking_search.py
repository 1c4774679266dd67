"""Search the System 2 CPU recipe (`s2-cpu`): which training settings make an EBT think?

Each setting is a recipe (`--base`, default s2-cpu) with some model and training fields changed. It trains a fresh
model on the blocks `ebt study thinking` uses (same order, same step count), then scores its thinking the way the
study does (modeling_ebt.study.score_ebt): the loss by descent steps (1, the trained count, 2× and 4× it) and by
candidates (4, 8), with and without Langevin noise, on the training corpus's validation blocks and on each
`--ood-corpus`. One JSON line per (setting, seed) is appended to --results, so the search can be resumed and read
while it runs; the trained models are saved beside it, under models/<setting>-seed<seed>.

    OMP_NUM_THREADS=1 python scripts/thinking_search.py --settings settings.json --max-steps 300 \\
        --ood-corpus A.txt --results runs/thinking_search.jsonl

settings.json: {"name": {"model": {EBTConfig fields}, "training": {TrainingArguments fields}}, ...}. The figures
in configuration/README.md ("How s2-cpu was chosen") came from this script.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from modeling_ebt.arguments import StudyArguments
from modeling_ebt.study import blocks, score_ebt, summarize, train_ebt
from modeling_ebt.tokenization_ebt import EBTTokenizer
from modeling_ebt.training import load_model_config, load_recipe, step_size_of


def recipe_of(base: str, change: dict) -> dict:
    """The recipe `change["base"]` (default: `base`) with the model and training fields of `change`."""
    recipe = load_recipe(change.get("base", base))
    for part in ("model", "training"):
        recipe[part].update(change.get(part, {}))
    return recipe


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", required=True, help="JSON file: name -> {model: {...}, training: {...}}")
    parser.add_argument("--only", nargs="*", default=None, help="run only these settings, in this order")
    parser.add_argument("--base", default="s2-cpu", help="the recipe each setting changes")
    parser.add_argument("--max-steps", type=int, default=300)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--ood-corpus", nargs="*", default=[])
    parser.add_argument("--eval-samples", type=int, default=32)
    parser.add_argument("--corpus", default=None, help="training corpus (default: the default corpus)")
    parser.add_argument("--block-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--cache-dir", default=None, help="where tokenized corpora are cached")
    parser.add_argument("--results", default="runs/thinking_search.jsonl")
    args = parser.parse_args()

    settings = json.loads(Path(args.settings).read_text())
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["setting"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())} \
        if results.is_file() else set()
    tokenizer = EBTTokenizer()
    scratch = tempfile.TemporaryDirectory(prefix="ebt-think-")  # the Trainer's output folders
    for seed in [int(s) for s in args.seeds.split(",")]:
        study = StudyArguments(output_dir=scratch.name, max_steps=args.max_steps,
                               seed=seed, eval_samples=args.eval_samples, candidates=[1, 4, 8], corpus=args.corpus,
                               block_size=args.block_size, batch_size=args.batch_size, cache_dir=args.cache_dir)
        config = load_model_config(study.size, args.base, max_position_embeddings=study.block_size)
        train_data, validation = blocks(tokenizer, args.corpus, study, config)
        corpora = {"validation": validation, **{p: blocks(tokenizer, p, study, config)[1] for p in args.ood_corpus}}
        for name in args.only or settings:  # in the order given
            change = settings[name]
            if (name, seed) in done:
                continue
            started = time.time()
            record = {"setting": name, "seed": seed, "change": change, "max_steps": args.max_steps}
            try:
                model = train_ebt(recipe_of(args.base, change), study, train_data, tokenizer,
                                  Path(study.output_dir) / f"{name}-seed{seed}").eval()
                model.save_pretrained(Path(args.results).parent / "models" / f"{name}-seed{seed}")  # for later looks
                trained, fewest = model.config.evaluation_steps, model.config.fewest_training_steps
                study.steps = sorted({1, fewest, trained, 2 * trained, 4 * trained})
                record["train_seconds"] = round(time.time() - started, 1)
                rows = [row for corpus, batches in corpora.items()
                        for row in score_ebt(name, model, corpus, batches, study)]
                record.update(trained_steps=trained, fewest_trained_steps=fewest, alpha=float(step_size_of(model)),
                              summary={corpus: summarize([r for r in rows if r["corpus"] == corpus], trained, fewest)
                                       for corpus in corpora}, rows=rows)
            except Exception as error:  # a setting that collapses or diverges is a result too
                record["error"] = f"{type(error).__name__}: {error}"
            record["seconds"] = round(time.time() - started, 1)
            with results.open("a") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps({k: v for k, v in record.items() if k != "rows"}), flush=True)
    scratch.cleanup()


if __name__ == "__main__":
    main()
