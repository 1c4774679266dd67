"""The `ebt` command: `ebt train`, `ebt generate`, `ebt eval`, `ebt push` (argparse subcommands).

`ebt train`'s flags come from dataclasses (`modeling_ebt.arguments`: `TrainOptions` and transformers'
`TrainingArguments`, through `HfArgumentParser`). Runtime errors (a bad corpus, a bad option) print
`ebt <command>: error: <message>` and exit with status 1; usage errors exit with status 2 (argparse).

Also runs as `python -m modeling_ebt.cli`, which is how `accelerate launch -m modeling_ebt.cli train ...` starts it
on several processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from .arguments import StudyArguments, add_train_parser, unknown_flags_message
from .arguments import options_from_namespace as train_options
from .checkpointing import write_text_atomic
from .constants import EVAL_FILENAME, EVAL_PLOT_FILENAME, OPTIONS_FILENAME, SUMMARY_FILENAME


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def _float_list(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()] or _float_list("x")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


# --- ebt train (flags: modeling_ebt.arguments) --------------------------------------------------------------


def _run_train(args: argparse.Namespace) -> int:
    import torch.distributed as dist

    from .training import run_training

    run_training(train_options(args))
    # Under `accelerate launch` the process group is torn down before the interpreter exits: left to finalization,
    # gloo's worker threads can abort the process after the model was saved ("terminate called without an active
    # exception", pytorch/pytorch#190489). Only on success: after an error another rank may still be in a collective.
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


# --- ebt generate -----------------------------------------------------------------------------------------------


def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a folder written by `ebt train` (or any EBT saved with save_pretrained)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--mcmc-num-steps", "--mcmc_num_steps", "--steps", dest="mcmc_num_steps", type=int,
                        help="descent steps per token, as generate(mcmc_num_steps=...) (default: as trained)")
    parser.add_argument("--candidates", type=int, default=1, help="self-verification: descend from N starting "
                        "points and keep the lowest final energy")
    parser.add_argument("--sample", action="store_true", help="sample from the predicted distribution (else greedy)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int, default=0)


def _load_model_and_tokenizer(model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_ebt  # noqa: F401  (registers the EBT classes with the Auto classes)

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} holds no model (no config.json); train one with `ebt train`")
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _check_tokenizer_fits(folder, tokenizer, model.config)
    return model, tokenizer


def _check_tokenizer_fits(folder: Path, tokenizer, config) -> None:
    """Any tokenizer with ids the model does not have is refused (`data.check_tokenizer_fits`), and so is the
    byte-level EBTTokenizer (257 ids) that AutoTokenizer gives a folder without tokenizer files, for a model of
    another vocabulary."""
    from .data import check_tokenizer_fits

    check_tokenizer_fits(tokenizer, config)
    saved = any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json"))
    if not saved and len(tokenizer) != config.vocab_size:
        raise ValueError(f"the model in {folder} has vocab_size={config.vocab_size} but no tokenizer is saved with it, "
                         f"and the default one has {len(tokenizer)} ids: save the tokenizer the model was trained with "
                         "into that folder (tokenizer.save_pretrained(folder))")


def _run_generate(args: argparse.Namespace) -> int:
    import torch
    from transformers import TextStreamer

    model, tokenizer = _load_model_and_tokenizer(args.model_dir)
    ids = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids.to(model.device)
    if ids.shape[1] == 0:
        raise ValueError("--prompt is empty")
    room = model.config.max_position_embeddings - ids.shape[1]
    if room < 1:
        raise ValueError(f"the prompt has {ids.shape[1]} tokens; the model reads at most "
                         f"{model.config.max_position_embeddings}")
    max_new = min(args.max_new_tokens, room)
    if max_new < args.max_new_tokens:
        print(f"[ebt generate] generating {max_new} tokens: the model reads at most "
              f"{model.config.max_position_embeddings} positions", file=sys.stderr)
    torch.manual_seed(args.seed)
    sampling = {"do_sample": args.sample}
    if args.sample:
        sampling.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    streamer = TextStreamer(tokenizer)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, mcmc_num_steps=args.mcmc_num_steps,
                   num_candidates=args.candidates, streamer=streamer, pad_token_id=tokenizer.pad_token_id,
                   **sampling)
    return 0


# --- ebt eval ---------------------------------------------------------------------------------------------------


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir")
    parser.add_argument("--corpus", help="as for `ebt train` (default: the corpus the model was trained on)")
    parser.add_argument("--text-column", help="default: the training run's, else text")
    parser.add_argument("--mcmc-num-steps", "--mcmc_num_steps", "--steps", dest="steps", type=_int_list,
                        default="1,2,4,8", help="descent step counts to compare (default: 1,2,4,8)")
    parser.add_argument("--candidates", type=_int_list, default="1,2,4", help="numbers of candidates to compare, "
                        "at the trained step count (default: 1,2,4)")
    parser.add_argument("--block-size", type=int, help="default: the training block size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=64, help="validation sequences (default: 64)")
    parser.add_argument("--validation-fraction", type=float, help="default: the training run's (so that no "
                        "training text is scored), else 0.1")
    parser.add_argument("--cache-dir")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial conditions, the same for every "
                        "setting")
    parser.add_argument("--output", help="folder for eval_results.json and eval_plot.png (default: MODEL_DIR)")
    parser.add_argument("--noise-levels", "--noise_levels", dest="noise_levels", type=_float_list,
                        default="0.1,0.2,0.3",
                        help="an image denoiser (model_type ebt_vision): PSNR/MSE at these noise levels, written to "
                        "denoise_eval.json (default: 0.1,0.2,0.3)")


def validation_loss(model, batches, steps: int | None, candidates: int, seed: int) -> float:
    """Token-weighted cross-entropy of the last descent step over `batches`."""
    from .modeling_ebt import ThinkingConfig
    from .study import prediction_loss

    return prediction_loss(model, batches, ThinkingConfig(steps=steps, num_candidates=candidates), seed)


def _recorded(model_dir: str, name: str) -> dict[str, Any]:
    """What `ebt train` recorded next to the model in `name` (empty when it is not there)."""
    path = Path(model_dir) / name
    return json.loads(path.read_text()) if path.is_file() else {}


def _given_or_recorded(given, recorded, default):
    """A flag's value if given (0 included), else what the training run recorded, else `default`."""
    if given is not None:
        return given
    return recorded if recorded not in (None, False) else default


def _run_eval(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .data import build_lm_datasets

    if _recorded(args.model_dir, "config.json").get("model_type") == "ebt_vision":
        from .training_vision import run_denoise_eval

        run_denoise_eval(args.model_dir, args.noise_levels, args.steps, args.candidates, args.eval_samples, args.seed,
                         args.output)
        return 0
    if args.eval_samples < 1 or args.batch_size < 1:
        raise ValueError(f"--eval-samples and --batch-size must be >= 1, got {args.eval_samples} and "
                         f"{args.batch_size}")
    model, tokenizer = _load_model_and_tokenizer(args.model_dir)
    trained, options = (_recorded(args.model_dir, name) for name in (SUMMARY_FILENAME, OPTIONS_FILENAME))
    block_size = _given_or_recorded(args.block_size, trained.get("block_size"),
                                    min(256, model.config.max_position_embeddings))
    corpus = args.corpus
    if corpus is None and isinstance(trained.get("corpus"), str) and not trained["corpus"].startswith("default:"):
        corpus = trained["corpus"]
    same_corpus = args.corpus is None  # the run's split and text column apply to the run's corpus
    fraction = _given_or_recorded(args.validation_fraction, same_corpus and options.get("validation_fraction"), 0.1)
    text_column = _given_or_recorded(args.text_column, same_corpus and options.get("text_column"), "text")
    data = build_lm_datasets(tokenizer, corpus, block_size=block_size, validation_fraction=fraction,
                             cache_dir=args.cache_dir, text_column=text_column, config=model.config)
    validation = data["validation"].select(range(min(args.eval_samples, len(data["validation"]))))
    if len(validation) == 0:
        raise ValueError(f"the validation split holds no block of {block_size} tokens: use a larger corpus, a larger "
                         f"--validation-fraction or a smaller --block-size")
    batches = [validation[i:i + args.batch_size] for i in range(0, len(validation), args.batch_size)]
    trained_steps = model.config.evaluation_steps
    if model.config.denoising_initial_condition == "zeros" and model.config.langevin_dynamics_noise == 0:
        print("[ebt eval] note: the model starts every descent from zeros without noise, so all candidates are the "
              "same", file=sys.stderr)

    settings = [("steps", s, s, 1) for s in args.steps] + [("candidates", n, None, n) for n in args.candidates]
    results: dict[str, Any] = {"steps": {}, "candidates": {}}
    for kind, value, steps, candidates in tqdm(settings, desc="settings", unit="setting"):
        loss = validation_loss(model, batches, steps, candidates, args.seed)
        results[kind][str(value)] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}
        tqdm.write(f"{kind}={value}: validation loss {loss:.4f} (perplexity {math.exp(min(loss, 700.0)):.2f})")
    report = {
        "model_dir": str(args.model_dir), "corpus": corpus or "default", "block_size": block_size,
        "validation_fraction": fraction,
        "num_sequences": len(validation), "num_tokens": len(validation) * (block_size - 1),
        "trained_steps": trained_steps, "seed": args.seed,
        "loss": "cross-entropy (nats/token) of the last descent step's prediction",
        "by_steps": results["steps"], "by_candidates": results["candidates"],
    }
    out = Path(args.output or args.model_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / EVAL_FILENAME, json.dumps(report, indent=2) + "\n")
    _plot(report, out / EVAL_PLOT_FILENAME)
    print(f"wrote {out / EVAL_FILENAME} and {out / EVAL_PLOT_FILENAME}")
    return 0


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for axis, key, label in ((axes[0], "by_steps", "descent steps"), (axes[1], "by_candidates", "candidates")):
        xs = sorted(int(k) for k in report[key])
        axis.plot(xs, [report[key][str(x)]["loss"] for x in xs], marker="o")
        axis.set_xscale("log", base=2)
        axis.set_xticks(xs, [str(x) for x in xs])
        axis.set_xlabel(label)
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[1].set_title(f"at {report['trained_steps']} steps", fontsize=9)
    figure.suptitle(f"{Path(report['model_dir']).name}: {report['num_sequences']} sequences of "
                    f"{report['block_size']} tokens", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- ebt push (the tool lives in hub/, installed as modeling_ebt.hub) ---------------------------------------------


def _add_push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="a model folder (`ebt train`, save_pretrained) or a reference checkpoint "
                        "(.ckpt), converted first")
    parser.add_argument("repo_id", help="the Hub model repository, NAME or NAMESPACE/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to, created from main if missing (default: main)")


def _run_push(args: argparse.Namespace) -> int:
    from .hub import run_push

    return run_push(args)


# --- entry point ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ebt", description="Energy-Based Transformers: train, generate, evaluate.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=HfArgumentParser)
    train_help = "train an EBT with the transformers Trainer"
    add_train_parser(commands, help=train_help, description=train_help).set_defaults(run=_run_train)
    for name, help, add_arguments, run in (
        ("generate", "print text generated by energy descent (streamed)", _add_generate_arguments, _run_generate),
        ("eval", "validation loss (a denoiser: PSNR at several noise levels) by descent steps and by candidates",
         _add_eval_arguments, _run_eval),
        ("push", "publish a model on the Hugging Face Hub with its remote code and model card", _add_push_arguments,
         _run_push),
    ):
        command = commands.add_parser(name, help=help, description=help, formatter_class=argparse.HelpFormatter)
        add_arguments(command)
        command.set_defaults(run=run)
    studies = commands.add_parser("study", help="studies that train and compare models").add_subparsers(
        dest="study", required=True, metavar="STUDY", parser_class=HfArgumentParser)
    thinking_help = "S1 and S2 EBTs and a Llama on the same blocks: loss by steps, candidates and noise, OOD too"
    studies.add_parser("thinking", dataclass_types=[StudyArguments], help=thinking_help,
                       description=thinking_help).set_defaults(run=_run_study_thinking)
    return parser


def _run_study_thinking(args: argparse.Namespace) -> int:
    from .study import run_thinking_study

    run_thinking_study(StudyArguments(**{f.name: getattr(args, f.name) for f in dataclasses.fields(StudyArguments)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        print(f"ebt {args.command}: error: {unknown_flags_message(unknown)}", file=sys.stderr)
        return 2
    try:
        status = args.run(args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as error:
        print(f"ebt {args.command}: error: {error}", file=sys.stderr)
        return 1
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
