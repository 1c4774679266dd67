"""`ebt study thinking`: does System 2 thinking pay, and more so out of distribution?

Trains, on the same token blocks in the same order and for the same number of optimizer steps, a System 1 EBT
(recipe `cpu-small`), a System 2 EBT (recipe `s2-cpu`) and a same-size `LlamaForCausalLM` (the paper's
Transformer++ shape: RMSNorm, SwiGLU, RoPE, no biases), saves each under `DIR/<model>/`, then scores every model on
the same validation blocks of the training corpus and of each out-of-distribution corpus (its last 10%):

- the EBTs by descent steps (1, 2, 3, 4, 6, 8, 12, 16, one candidate; with and without Langevin noise, and without
  noise keeping only the steps that lower the energy), by candidates (1, 2, 4, 8 at the trained steps, the lowest
  final energy per position wins; with and without noise), and the best steps × candidates combination;
- the Llama once (it has no knob).

Losses are cross-entropies in nats per token of the final prediction (an EBT's last descent step). The results go to
`DIR/thinking_study.json` (with a summary per EBT and corpus: the gains of thinking against the trained and the
fewest trained steps, see `summarize`), a table on stdout and `DIR/thinking_study.png` (loss against forward passes
per token).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, default_data_collator, set_seed

from .arguments import StudyArguments
from .modeling_ebt import EBTForCausalLM, ThinkingConfig
from .tokenization_ebt import EBTTokenizer
from .training import EBTTrainer, load_model_config, load_recipe

STUDY_FILENAME = "thinking_study.json"
PLOT_FILENAME = "thinking_study.png"
EBT_RECIPES = {"s1": "cpu-small", "s2": "s2-cpu"}  # the System 1 and System 2 recipes compared


# --- training ---------------------------------------------------------------------------------------------------


def training_arguments(args: StudyArguments, out: Path, optimization: dict[str, Any]) -> TrainingArguments:
    # the recipe's optimization, with the study's budget and batch (the same for every model)
    return TrainingArguments(**{
        **optimization, "output_dir": str(out), "max_steps": args.max_steps,
        "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1, "seed": args.seed,
        "data_seed": args.seed, "logging_steps": max(1, args.max_steps // 10), "save_strategy": "no",
        "report_to": "none", "disable_tqdm": True, "use_cpu": not torch.cuda.is_available()})


def llama_like(config) -> LlamaForCausalLM:
    """A Llama with the EBT's vocabulary, layers, heads, widths and norm epsilon."""
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=False,
        pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id, bos_token_id=config.bos_token_id))


def train_ebt(recipe, args: StudyArguments, train_data, tokenizer, out: Path) -> EBTForCausalLM:
    """A fresh EBT of `args.size` with a recipe (a name, file or dict), trained on `train_data` in the study's
    order, for the study's steps."""
    recipe = load_recipe(recipe)
    ids = {name: getattr(tokenizer, name) for name in ("pad_token_id", "eos_token_id", "bos_token_id")}
    config = load_model_config(args.size, recipe, max_position_embeddings=args.block_size, **ids)
    set_seed(args.seed)
    model = EBTForCausalLM(config)
    EBTTrainer(model=model, args=training_arguments(args, out, recipe["training"]), train_dataset=train_data,
               data_collator=default_data_collator).train()
    return model


def train_models(args: StudyArguments, train_data, tokenizer) -> dict[str, Any]:
    """The three models, trained on `train_data` in the same order, each saved under output_dir/<name>."""
    models = {name: train_ebt(recipe, args, train_data, tokenizer, Path(args.output_dir) / name)
              for name, recipe in EBT_RECIPES.items()}
    set_seed(args.seed)
    models["llama"] = llama_like(models["s1"].config)
    optimization = {**load_recipe(EBT_RECIPES["s1"])["training"], "learning_rate": args.llama_learning_rate}
    Trainer(model=models["llama"], args=training_arguments(args, Path(args.output_dir) / "llama", optimization),
            train_dataset=train_data, data_collator=default_data_collator).train()
    for name, model in models.items():
        model.eval().save_pretrained(Path(args.output_dir) / name)
        tokenizer.save_pretrained(Path(args.output_dir) / name)
    return models


# --- evaluation -------------------------------------------------------------------------------------------------


def prediction_loss(model, batches, thinking: ThinkingConfig | None = None, seed: int = 0) -> float:
    """Token-weighted cross-entropy (nats/token) of the model's final prediction over `batches`."""
    torch.manual_seed(seed)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(model.device) for k, v in batch.items()}
            if thinking is None:
                loss = model(**batch).loss
            else:
                loss = model(**batch, thinking=thinking).step_losses[-1]
            tokens = int(batch["attention_mask"][:, 1:].sum())
            total, count = total + float(loss) * tokens, count + tokens
    return total / count


def thinking_settings(model, args: StudyArguments) -> list[tuple[int, int, bool, bool, bool]]:
    """(steps, candidates, langevin, accept_lower_energies, damp_extra_steps) rows of one EBT: steps alone, with and
    without noise, without noise keeping only the steps that lower the energy, and (beyond the trained steps) without
    noise with damped extra steps; candidates alone, with and without noise."""
    trained = model.config.evaluation_steps
    rows = [(s, 1, noisy, accept, False) for s in args.steps for noisy, accept in ((False, False), (True, False),
                                                                                    (False, True))]
    rows += [(s, 1, False, False, True) for s in args.steps if s > trained]
    rows += [(trained, n, noisy, False, False) for n in args.candidates for noisy in (False, True)
             if (trained, n, noisy, False, False) not in rows]
    return rows


def noise_of(model, args: StudyArguments, langevin: bool) -> float:
    trained = model.config.langevin_dynamics_noise
    return (trained or args.langevin_noise) if langevin else 0.0


def score_ebt(name, model, corpus, batches, args: StudyArguments) -> list[dict[str, Any]]:
    def row(steps, candidates, langevin, accept, damped, **extra):
        thinking = ThinkingConfig(steps=steps, num_candidates=candidates, accept_lower_energies=accept,
                                  damp_extra_steps=damped, langevin_noise=noise_of(model, args, langevin))
        return {"model": name, "corpus": corpus, "steps": steps, "candidates": candidates, "langevin": langevin,
                "accept_lower_energies": accept, "damp_extra_steps": damped,
                "loss": prediction_loss(model, batches, thinking, args.seed), **extra}

    rows = [row(*setting) for setting in thinking_settings(model, args)]
    best = min(rows, key=lambda r: r["loss"])
    scored = {setting_of(r) for r in rows}
    for steps in sorted({best["steps"], 2 * best["steps"]}):  # the best single knobs, combined
        for candidates in sorted({best["candidates"], max(args.candidates)} - {1}):
            setting = (steps, candidates, *setting_of(best)[2:])
            if setting not in scored:
                rows.append(row(*setting, combined=True))
    return rows


def setting_of(row) -> tuple:
    return (row["steps"], row["candidates"], row["langevin"], row.get("accept_lower_energies", False),
            row.get("damp_extra_steps", False))


def score(models, corpora: dict[str, list], args: StudyArguments) -> list[dict[str, Any]]:
    results = []
    for corpus, batches in corpora.items():
        for name, model in models.items():
            if name == "llama":
                results.append({"model": name, "corpus": corpus, "steps": None, "candidates": None,
                                "langevin": None, "accept_lower_energies": None, "damp_extra_steps": None,
                                "loss": prediction_loss(model, batches)})
            else:
                results += score_ebt(name, model, corpus, batches, args)
    return results


# --- the study --------------------------------------------------------------------------------------------------


def blocks(tokenizer, corpus, args: StudyArguments, config) -> tuple[Any, list]:
    """The training blocks and the first `eval_samples` validation blocks (the last 10%) of a corpus, as batches."""
    from .data import build_lm_datasets

    data = build_lm_datasets(tokenizer, corpus, block_size=args.block_size, validation_fraction=0.1,
                             cache_dir=args.cache_dir, config=config)
    validation = data["validation"].select(range(min(args.eval_samples, len(data["validation"]))))
    if len(validation) == 0:
        raise ValueError(f"corpus {corpus or 'default'}: its last 10% holds no block of {args.block_size} tokens")
    batches = [validation[i:i + args.batch_size] for i in range(0, len(validation), args.batch_size)]
    return data["train"], [{k: torch.as_tensor(v) for k, v in b.items()} for b in batches]


def run_thinking_study(args: StudyArguments) -> dict[str, Any]:
    tokenizer = EBTTokenizer()
    config = load_model_config(args.size, EBT_RECIPES["s1"], max_position_embeddings=args.block_size)
    train_data, validation = blocks(tokenizer, args.corpus, args, config)
    corpora = {"validation": validation}
    for path in args.ood_corpus:
        corpora[path] = blocks(tokenizer, path, args, config)[1]
    models = train_models(args, train_data, tokenizer)
    tokens = args.max_steps * args.batch_size * args.block_size
    report = {
        "results": score(models, corpora, args),
        "trained_steps": {name: models[name].config.evaluation_steps for name in EBT_RECIPES},
        "fewest_trained_steps": {name: models[name].config.fewest_training_steps for name in EBT_RECIPES},
        "tokens": {name: tokens for name in models},
        "loss": "cross-entropy of the final prediction, nats per token, on the same blocks for every model",
        "settings": {"size": args.size, "block_size": args.block_size, "batch_size": args.batch_size,
                     "max_steps": args.max_steps, "seed": args.seed, "eval_blocks": args.eval_samples,
                     "recipes": EBT_RECIPES},
    }
    report["summary"] = summaries(report)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / STUDY_FILENAME).write_text(json.dumps(report, indent=2) + "\n")
    plot(report, out / PLOT_FILENAME)
    print(table(report))
    return report


def forward_passes(row) -> int:
    """Candidate forward passes per token: one per descent step and candidate (the Llama: one)."""
    return 1 if row["steps"] is None else row["steps"] * row["candidates"]


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))


def summarize(rows: list[dict], trained: int, fewest: int) -> dict[str, Any]:
    """One EBT on one corpus: the loss at the trained (most) and the fewest trained steps; the thinking gain against
    each, in % perplexity: the best setting (steps, candidates, langevin, accept_lower_energies, damp_extra_steps)
    that spends at least that many steps (thinking is more compute, never fewer steps); and the loss at 2× and 4× the
    trained steps minus the trained loss ("thinking longer"; also accepting only lower energies, and damped). `best`
    is the lowest loss of any row, fewer steps included."""
    loss = {setting_of(r): r["loss"] for r in rows}
    best = min(rows, key=lambda r: r["loss"])
    at_trained, at_fewest = loss[(trained, 1, False, False, False)], loss[(fewest, 1, False, False, False)]
    thinking = min((r for r in rows if r["steps"] >= trained), key=lambda r: r["loss"])
    thinking_from_fewest = min((r for r in rows if r["steps"] >= fewest), key=lambda r: r["loss"])
    out = {"trained": at_trained, "fewest": at_fewest, "best": best["loss"], "best_setting": list(setting_of(best)),
           "thinking": thinking["loss"], "thinking_setting": list(setting_of(thinking)),
           "gain_pct": 100 * (1 - perplexity(thinking["loss"] - at_trained)),
           "thinking_from_fewest": thinking_from_fewest["loss"],
           "thinking_from_fewest_setting": list(setting_of(thinking_from_fewest)),
           "gain_vs_fewest_pct": 100 * (1 - perplexity(thinking_from_fewest["loss"] - at_fewest))}
    for times in (2, 4):
        for suffix, accept, damped in (("", False, False), ("_accepting_lower", True, False), ("_damped", False, True)):
            if (times * trained, 1, False, accept, damped) in loss:
                out[f"longer_{times}x{suffix}"] = loss[(times * trained, 1, False, accept, damped)] - at_trained
    return out


def summaries(report) -> list[dict[str, Any]]:
    """`summarize` for every EBT and corpus of a study, with the Llama's loss beside it."""
    out = []
    for corpus in dict.fromkeys(r["corpus"] for r in report["results"]):
        llama = next((r["loss"] for r in report["results"] if r["model"] == "llama" and r["corpus"] == corpus), None)
        for name in report["trained_steps"]:
            rows = [r for r in report["results"] if r["model"] == name and r["corpus"] == corpus]
            out.append({"model": name, "corpus": corpus, "llama": llama, **summarize(
                rows, report["trained_steps"][name], report["fewest_trained_steps"][name])})
    return out


def gain(report, row, steps_key: str) -> float:
    """% of perplexity that `row` saves against its model's `steps_key` step count, one candidate, no noise (0 for
    the Llama)."""
    steps = report.get(steps_key, {}).get(row["model"])
    base = next((r["loss"] for r in report["results"] if r["model"] == row["model"] and r["corpus"] == row["corpus"]
                 and setting_of(r) == (steps, 1, False, False, False)), row["loss"])
    return 100 * (1 - perplexity(row["loss"] - base))


def table(report) -> str:
    lines = ["model  corpus                          steps cand langevin accept damped   loss   ppl  "
             "gain vs trained, fewest"]
    for row in report["results"]:
        lines.append(f"{row['model']:6} {str(row['corpus'])[-31:]:31} {row['steps']!s:>5} {row['candidates']!s:>4} "
                     f"{row['langevin']!s:>8} {row.get('accept_lower_energies')!s:>6} "
                     f"{row.get('damp_extra_steps')!s:>6} {row['loss']:6.4f} "
                     f"{perplexity(row['loss']):5.3g} {gain(report, row, 'trained_steps'):+6.1f}% "
                     f"{gain(report, row, 'fewest_trained_steps'):+6.1f}%")
    return "\n".join(lines)


def plot(report, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(10, 5))
    corpora = list(dict.fromkeys(r["corpus"] for r in report["results"]))
    styles = {"s1": ":", "s2": "-", "llama": "--"}  # one colour per corpus, one line style per model
    for (model, corpus) in dict.fromkeys((r["model"], r["corpus"]) for r in report["results"]):
        rows = [r for r in report["results"] if r["model"] == model and r["corpus"] == corpus]
        label, colour = f"{model}, {Path(str(corpus)).name}", f"C{corpora.index(corpus) % 10}"
        if model == "llama":
            axis.axhline(rows[0]["loss"], linestyle="--", linewidth=1, color=colour, label=label)
            continue
        best = {}
        for row in rows:
            passes = forward_passes(row)
            best[passes] = min(best.get(passes, math.inf), row["loss"])
        xs = sorted(best)
        axis.plot(xs, [best[x] for x in xs], linestyle=styles.get(model, "-"), color=colour, marker="o",
                  markersize=3, label=label)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("candidate forward passes per token (steps × candidates)")
    axis.set_ylabel("loss (nats/token)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
