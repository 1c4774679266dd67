"""Publishing an EBT on the Hugging Face Hub: `ebt push MODEL_DIR REPO_ID [--private] [--revision REV]`.

`push` checks everything it can before the first request (the repo id, that MODEL_DIR holds an EBT whose weights
are whole safetensors files and match its config, that a token is configured), assembles the upload in a temporary
folder (MODEL_DIR is only read) and sends it in one commit with `huggingface_hub.HfApi`:

- the weights (safetensors), `config.json` with `auto_map` entries for AutoConfig, AutoModel and
  AutoModelForCausalLM, `generation_config.json` with the thinking defaults, and the modeling code
  (`modeling_ebt.py`, `configuration_ebt.py`: torch and transformers only), so that the model loads with
  `trust_remote_code=True` where this package is not installed;
- the tokenizer (with `tokenization_ebt.py`), or the byte-level `EBTTokenizer` for a 257-id model saved without one;
- `README.md`, the model card rendered from `model_card_template.md` with the figures of the run:
  `training_summary.json` (written by `ebt train`; without it, what `config.json` says) and `eval_results.json` with
  `eval_plot.png` (written by `ebt eval`), which are uploaded as well.

MODEL_DIR may also be a Lightning checkpoint (`.ckpt`) of the reference code, converted first with
`modeling_ebt.convert_reference_checkpoint` (a `.safetensors` state dict of the reference needs sizes that only that
converter's options give: convert it, then push the folder). The token is the one huggingface_hub finds (`HF_TOKEN`,
or `hf auth login`); it is never printed, written or put in an error message.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..constants import DEFAULT_CORPUS_LABEL, EVAL_FILENAME, EVAL_PLOT_FILENAME, SUMMARY_FILENAME

TEMPLATE = Path(__file__).with_name("model_card_template.md")
SUMMARY_FILE, EVAL_FILE, EVAL_PLOT = SUMMARY_FILENAME, EVAL_FILENAME, EVAL_PLOT_FILENAME  # written by ebt train/eval
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# the weights of an earlier push, replaced by each push: top-level names only (in these patterns `*` would also
# match "/", reaching the owner's files in subfolders such as onnx/model.safetensors)
STALE_WEIGHTS = ["model.safetensors", "model-?????-of-?????.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model-?????-of-?????.bin", "pytorch_model.bin.index.json"]
REFERENCE_SUFFIX = ".ckpt"
BYTE_VOCAB_SIZE = 257
DEFAULT_LICENSE = "apache-2.0"
TAGS = ["ebt", "energy-based-model"]
DEFAULT_CORPUS_PREFIX = "default:"  # how training_summary.json names the package's default corpus
FILE_ROLES = {
    "model.safetensors": "the weights",
    "model.safetensors.index.json": "the index of the weight shards",
    "config.json": "the architecture and the descent settings (`EBTConfig`), with `auto_map` for remote code",
    "generation_config.json": "the thinking defaults of `generate`",
    "configuration_ebt.py": "remote code: `EBTConfig`",
    "modeling_ebt.py": "remote code: `EBTModel`, `EBTForCausalLM` (energy descent, cached `generate`)",
    "tokenization_ebt.py": "remote code: `EBTTokenizer` (bytes)",
    "tokenizer_config.json": "the tokenizer's settings",
    "tokenizer.json": "the tokenizer",
    "added_tokens.json": "the tokenizer's special tokens",
    "special_tokens_map.json": "the tokenizer's special tokens",
    SUMMARY_FILE: "the training run, as `ebt train` recorded it",
    EVAL_FILE: "validation loss by descent steps and by candidates, as `ebt eval` measured it",
    EVAL_PLOT: "the plot of those figures",
    "README.md": "this card",
}


class PushError(RuntimeError):
    """`ebt push` cannot go on: the message says what is wrong and what to do."""


def rerun_command(source: str | Path, repo_id: str, private: bool = False, revision: str | None = None) -> str:
    words = ["ebt", "push", str(source), repo_id] + (["--private"] if private else [])
    words += ["--revision", revision] if revision else []
    return shlex.join(words)


# --- checks before anything is sent -------------------------------------------------------------------------------


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise PushError(f"invalid repo id {repo_id!r}: {error} Expected NAME or NAMESPACE/NAME, e.g. "
                        f"alice/ebt-shakespeare.") from None


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """config.json of an EBT folder with weights; a clear error for anything else."""
    path = model_dir / "config.json"
    if not path.is_file():
        raise PushError(f"{model_dir} holds no config.json, so it is no model folder: expected a folder written by "
                        f"`ebt train` or `save_pretrained`, or a reference checkpoint ({REFERENCE_SUFFIX})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PushError(f"{path} is not readable JSON ({error})") from None
    if not isinstance(config, dict) or config.get("model_type") != "ebt":
        found = config.get("model_type") if isinstance(config, dict) else None
        raise PushError(f"{path} describes a model of type {found!r}, not an EBT (model_type 'ebt'): `ebt push` "
                        f"publishes Energy-Based Transformers only")
    if not any((model_dir / name).is_file() for name in WEIGHT_FILES):
        raise PushError(f"{model_dir} holds no weights (none of {', '.join(WEIGHT_FILES)}): was the training run "
                        f"finished? `ebt train` saves them at the end")
    check_safetensors(model_dir)
    return config


def check_safetensors(model_dir: Path) -> None:
    """Each safetensors file of the folder opens (its header is whole and covers the file): else a clear error."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt"):
                pass
        except (SafetensorError, OSError) as error:
            raise PushError(f"{path} is damaged ({error}): it is truncated, empty or not a safetensors file. Save "
                            f"the model again (`ebt train` writes it at the end of a run, `save_pretrained` from "
                            f"Python) or copy it again from where it came, then rerun `ebt push`") from None


def read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PushError(f"{path} is not readable JSON ({error}); rerun the command that wrote it, or move it "
                        f"away to publish without it") from None
    if not isinstance(data, dict):
        raise PushError(f"{path} holds {type(data).__name__}, expected a JSON object")
    return data


def check_token() -> None:
    from huggingface_hub import get_token

    if get_token() is None:
        raise PushError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token needs write access)")


# --- what the card says -------------------------------------------------------------------------------------------


def number(value: Any, digits: int = 4) -> str:
    """Figures as the card prints them: integers with thousands separators, losses with `digits` decimals."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}f}" if abs(value) >= 10 ** -digits or value == 0 else f"{value:.3g}"
    return str(value)


def short(value: Any) -> str:
    """Settings as the card prints them: numbers in their shortest form (0.0012, 1500, 4.98765)."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f"{value:.6g}" if is_number else str(value)


def is_default_corpus(corpus: Any) -> bool:
    """`ebt train` records the default corpus as "default: ..." and `ebt eval` as "default"."""
    return isinstance(corpus, str) and (corpus == "default" or corpus.startswith(DEFAULT_CORPUS_PREFIX))


def corpus_label(corpus: Any) -> str:
    """How the card names a corpus: a local file or folder by its name only."""
    if corpus is None:
        return "an unrecorded corpus"
    if is_default_corpus(corpus):
        return DEFAULT_CORPUS_LABEL
    if looks_local(str(corpus)):
        return f"`{Path(str(corpus)).name}` (a local file)"
    return str(corpus)


def looks_local(corpus: str) -> bool:
    return bool(Path(corpus).suffix) or corpus.startswith((".", "/", "~")) or Path(corpus).expanduser().exists()


def hub_dataset(corpus: Any) -> str | None:
    """The corpus as a Hub dataset id, when it looks like one (not a local path, not the default corpus)."""
    if not isinstance(corpus, str) or is_default_corpus(corpus) or looks_local(corpus):
        return None
    return corpus if re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", corpus) else None


def thinking_defaults(config) -> dict[str, Any]:
    """The `generate` knobs, set to what the model does when they are not given."""
    return {"mcmc_num_steps": config.evaluation_steps, "mcmc_step_size": None,
            "langevin_dynamics_noise": config.langevin_dynamics_noise, "num_candidates": 1, "energy_tolerance": None,
            "recompute": False}


THINKING_MEANINGS = {
    "mcmc_num_steps": "descent steps per token (more than in training is allowed)",
    "mcmc_step_size": "step size α of the descent (null: the learned α)",
    "langevin_dynamics_noise": "std of the noise added to the logits before each step",
    "num_candidates": "descend from this many starting points, keep the lowest final energy (self-verification)",
    "energy_tolerance": "stop a token's descent once its energy changes less than this (null: never)",
    "recompute": "recompute the whole prefix at every step, as the reference code does (baseline; slow)",
}


def architecture_rows(config, model) -> list[tuple[str, str]]:
    kinds = {"default": "one energy landscape for every step",
             "time_embed": "one learned landscape token per descent step"}
    alpha = float(model.alpha.detach())
    rows = [("EBT type", f"`{config.ebt_type}` ({kinds.get(config.ebt_type, '')})"),
            ("parameters", number(model.num_parameters())),
            ("layers × hidden size", f"{config.num_hidden_layers} × {config.hidden_size}"),
            ("attention heads (key/value heads)", f"{config.num_attention_heads} ({config.num_key_value_heads})"),
            ("MLP size", number(config.intermediate_size)),
            ("vocabulary", number(config.vocab_size)),
            ("longest input", f"{number(config.max_position_embeddings)} tokens")]
    if config.sliding_window is not None:
        rows.append(("sliding window", f"{number(config.sliding_window)} tokens"))
    rows += [("descent steps per token (trained)", str(config.evaluation_steps)),
             ("step size α (learned)", short(alpha) + (" (the descent uses 1e-4: α is clamped there)"
                                                       if alpha < 1e-4 else "")),
             ("initial condition", f"`{config.denoising_initial_condition}`"
              + (f" (std {short(config.gaussian_random_noise_scaling)})"
                 if config.denoising_initial_condition == "random_noise" else ""))]
    return rows


def training_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """The figures of `training_summary.json` (keys of modeling_ebt.training._summary), skipping absent ones."""
    trained = summary.get("config") or {}
    evaluation = summary.get("eval") or {}
    rows = [("corpus", corpus_label(summary.get("corpus"))), ("tokenizer", summary.get("tokenizer")),
            ("model size", summary.get("model_size")), ("recipe", summary.get("recipe"))]
    if summary.get("steps") is not None:
        planned = summary.get("planned_steps")
        note = " (stopped by the time limit)" if summary.get("stopped_by_time_limit") else ""
        rows.append(("optimizer steps", number(summary["steps"]) + (f" of {number(planned)} planned" if planned
                                                                    and planned != summary["steps"] else "") + note))
    rows.append(("tokens seen", number(summary.get("tokens_seen")) if summary.get("tokens_seen") is not None else None))
    if summary.get("global_batch_size") is not None:
        processes = summary.get("num_processes") or 1
        rows.append(("batch", f"{number(summary['global_batch_size'])} sequences of "
                              f"{number(summary.get('block_size'))} tokens ({processes} process"
                              f"{'es' if processes != 1 else ''})"))
    rows += [("peak learning rate", short(summary["learning_rate"]) if summary.get("learning_rate") else None),
             ("descent steps in training", trained.get("mcmc_num_steps")),
             ("step size α", f"{short(trained.get('mcmc_step_size', '?'))} at the start, {short(summary['alpha'])} "
                             f"learned" if summary.get("alpha") is not None else None),
             ("final training loss", number(summary.get("final_train_loss"))
              if summary.get("final_train_loss") is not None else None),
             ("final validation loss (last step)", number(evaluation.get("eval_last_step_loss"))
              if evaluation.get("eval_last_step_loss") is not None else None),
             ("final validation perplexity", number(evaluation.get("eval_perplexity"), 2)
              if evaluation.get("eval_perplexity") is not None else None),
             ("training time", f"{short(summary['train_seconds_this_session'])} s"
              if summary.get("train_seconds_this_session") is not None else None),
             ("seed", summary.get("seed")),
             ("versions", ", ".join(f"{k} {v}" for k, v in (summary.get("versions") or {}).items()) or None)]
    return [(name, str(value)) for name, value in rows if value is not None]


def config_training_rows(config) -> list[tuple[str, str]]:
    """The training setup as far as config.json tells it (no training_summary.json)."""
    rows = [("descent steps in training", str(config.mcmc_num_steps)),
            ("initial step size α", short(config.mcmc_step_size)),
            ("α learnable", str(config.mcmc_step_size_learnable)),
            ("α learning-rate multiplier", short(config.mcmc_step_size_lr_multiplier)),
            ("random extra steps (System 2)", str(config.randomize_mcmc_num_steps)),
            ("Langevin noise", short(config.langevin_dynamics_noise)),
            ("truncated descent", str(config.truncate_mcmc))]
    return rows


def evaluation_facts(results: dict[str, Any], plot: str | None) -> dict[str, Any]:
    def table(key):
        entries = {k: v for k, v in (results.get(key) or {}).items() if isinstance(v, dict)}
        return [(k, number(entries[k].get("loss")), number(entries[k].get("perplexity"), 2))
                for k in sorted(entries, key=lambda k: (0, int(k), "") if str(k).isdigit() else (1, 0, str(k)))]

    return {"by_steps": table("by_steps"), "by_candidates": table("by_candidates"), "plot": plot}


def evaluation_intro(results: dict[str, Any]) -> str:
    parts = [f"Validation loss, the {results.get('loss', 'cross-entropy of the last descent step')}, measured by "
             f"`ebt eval`"]
    if results.get("num_sequences") is not None and results.get("block_size") is not None:
        parts.append(f" on {number(results['num_sequences'])} sequences of {number(results['block_size'])} tokens")
    parts.append(f" of the validation split of {corpus_label(results.get('corpus'))}")
    if results.get("trained_steps") is not None:
        parts.append(f"; candidates are compared at {results['trained_steps']} descent steps")
    return "".join(parts) + ". The same seed draws the initial conditions of every setting."


def eval_results_metadata(results: dict[str, Any]) -> list:
    from huggingface_hub import EvalResult

    corpus = results.get("corpus")
    out = []
    for key, label in (("by_steps", "descent_steps"), ("by_candidates", "num_candidates")):
        for value, entry in (results.get(key) or {}).items():
            if isinstance(entry, dict) and isinstance(entry.get("loss"), (int, float)):
                out.append(EvalResult(task_type="text-generation", dataset_type=hub_dataset(corpus) or "text",
                                      dataset_name=corpus_label(corpus).replace("`", ""), dataset_split="validation",
                                      metric_type="loss", metric_name=f"validation loss, {label}={value}",
                                      metric_value=round(float(entry["loss"]), 4)))
    return out


# --- the folder that is uploaded ----------------------------------------------------------------------------------


@dataclass
class Reference:
    """A checkpoint of the reference code that `push` converted."""

    path: Path
    hyper_parameters: dict[str, Any]


@dataclass
class Staged:
    folder: Path
    files: list[str]
    notes: list[str] = field(default_factory=list)


def load_checked_model(model_dir: Path):
    from modeling_ebt import EBTForCausalLM

    check_safetensors(model_dir)
    try:
        model, info = EBTForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise PushError(f"cannot load the model in {model_dir}: {error}") from None
    problems = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys")
                and v}
    if problems:
        raise PushError(f"the weights in {model_dir} do not match its config.json: {problems}")
    return model.eval()


def stage_tokenizer(model_dir: Path, config, out: Path) -> tuple[bool, str]:
    """Saves the tokenizer into `out`: (whether one is published, a note for the card)."""
    from transformers import AutoTokenizer

    from modeling_ebt import EBTTokenizer

    if (model_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
        return True, ""
    if config.vocab_size == BYTE_VOCAB_SIZE:
        EBTTokenizer().save_pretrained(out)
        return True, ("The model folder had no tokenizer; as the vocabulary has 257 ids, the byte-level "
                      "`EBTTokenizer` (UTF-8 bytes 0-255 and `<|endoftext|>` = 256) is published with it.")
    return False, (f"The model folder has no tokenizer and its vocabulary ({config.vocab_size} ids) is not the "
                   f"byte-level one (257 ids): use the tokenizer the model was trained with.")


def stage_model(model, out: Path) -> None:
    """Weights, config with `auto_map` (AutoModel too), generation config with the thinking defaults, and the code."""
    from modeling_ebt import EBTModel

    config, generation = model.config, model.generation_config
    auto_map = dict(getattr(config, "auto_map", None) or {})
    auto_map["AutoModel"] = f"{EBTModel.__module__.rsplit('.', 1)[-1]}.{EBTModel.__name__}"
    config.auto_map = auto_map  # save_pretrained adds AutoConfig and AutoModelForCausalLM
    for name, value in thinking_defaults(config).items():
        if not hasattr(generation, name):  # a generation config saved with the model keeps its choices
            setattr(generation, name, value)
    generation._from_model_config = False  # else loading it drops the thinking knobs (not GenerationConfig fields)
    model.save_pretrained(out)


def training_section(summary, reference: Reference | None, config) -> tuple[str, str, list[tuple[str, str]]]:
    """Where the model comes from, and the training setup: (one sentence, the table's intro, the table)."""
    if summary is not None:
        return (f"Trained with `ebt train` (package `modeling_ebt`) for {number(summary.get('steps'))} optimizer "
                f"steps on {number(summary.get('tokens_seen'))} tokens of {corpus_label(summary.get('corpus'))}.",
                f"From `{SUMMARY_FILE}`, written by `ebt train`:", training_rows(summary))
    if reference is not None:
        source = (f"Converted from a checkpoint of the reference implementation (github.com/alexiglad/EBT), "
                  f"`{reference.path.name}`, with `modeling_ebt.convert_reference_checkpoint`.")
        rows = [(k, f"`{v}`") for k, v in sorted(reference.hyper_parameters.items())
                if isinstance(v, (str, int, float, bool)) or v is None]
        if not rows:
            return (source, "The state dict records no training run; the settings below come from `config.json`.",
                    config_training_rows(config))
        return source, ("The checkpoint does not record the training run (corpus, steps, tokens seen). Its "
                        "hyper-parameters:"), rows
    return ("Published with `ebt push` (package `modeling_ebt`).",
            f"The model folder has no `{SUMMARY_FILE}` (which `ebt train` writes), so the run (corpus, steps, tokens "
            f"seen) is not recorded; the settings below come from `config.json`.", config_training_rows(config))


def model_card(model, repo_id: str, revision: str | None, license: str, summary, results, reference,
               tokenizer: tuple[bool, str], files: list[str]):
    """The model card (huggingface_hub.ModelCard) rendered from TEMPLATE."""
    from huggingface_hub import ModelCard, ModelCardData

    config, name = model.config, repo_id.split("/")[-1]
    corpus = (summary or {}).get("corpus") or (results or {}).get("corpus")
    card_data = ModelCardData(
        library_name="transformers", pipeline_tag="text-generation", tags=list(TAGS), license=license,
        datasets=[hub_dataset(corpus)] if hub_dataset(corpus) else None,
        language=["en"] if is_default_corpus(corpus) else None,
        model_name=name if results else None, eval_results=eval_results_metadata(results) if results else None)
    thinking = [(knob, f"`{json.dumps(getattr(model.generation_config, knob, value))}`", THINKING_MEANINGS[knob])
                for knob, value in thinking_defaults(config).items()]
    source, training_intro, training = training_section(summary, reference, config)
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE), model_name=name, repo_id=repo_id,
        revision_arg=f', revision="{revision}"' if revision else "", source_sentence=source,
        initial_condition="zeros" if config.denoising_initial_condition == "zeros" else "random logits",
        has_tokenizer=tokenizer[0], tokenizer_note=tokenizer[1],
        code_files=", ".join(f"`{file}`" for file in files if file.endswith(".py")),
        example_prompt="To be, or not to be" if is_default_corpus(corpus) else "Once upon a time",
        example_steps=config.evaluation_steps, thinking_defaults=thinking,
        architecture=architecture_rows(config, model),
        training_intro=training_intro, training=training,
        evaluation=evaluation_facts(results, EVAL_PLOT if EVAL_PLOT in files else None) if results else None,
        evaluation_intro=evaluation_intro(results) if results else "",
        files=[(file, FILE_ROLES.get(file, "")) for file in files])


def without_local_paths(record: dict[str, Any]) -> dict[str, Any]:
    """The record with this machine's paths cut to their last component (the corpus file's name, not the folders
    and the user name above it), as the model card shows them."""
    def public(key, value):
        if isinstance(value, str) and (os.path.isabs(value) or key == "model_dir"):
            return Path(value).name
        return value
    return {key: public(key, value) for key, value in record.items()}


def stage(model_dir: Path, out: Path, repo_id: str, *, revision: str | None = None, license: str = DEFAULT_LICENSE,
          reference: Reference | None = None) -> Staged:
    """Writes into `out` everything `push` uploads; `model_dir` is only read."""
    model = load_checked_model(model_dir)
    summary, results = read_json(model_dir / SUMMARY_FILE), read_json(model_dir / EVAL_FILE)
    out.mkdir(parents=True, exist_ok=True)
    stage_model(model, out)
    tokenizer = stage_tokenizer(model_dir, model.config, out)
    for name, record in ((SUMMARY_FILE, summary), (EVAL_FILE, results)):
        if record is not None:
            (out / name).write_text(json.dumps(without_local_paths(record), indent=2) + "\n")
    if (model_dir / EVAL_PLOT).is_file():
        (out / EVAL_PLOT).write_bytes((model_dir / EVAL_PLOT).read_bytes())
    files = sorted({p.name for p in out.iterdir() if p.is_file()} | {"README.md"})
    model_card(model, repo_id, revision, license, summary, results, reference, tokenizer, files).save(out / "README.md")

    notes = [f"note: {tokenizer[1]}"] if tokenizer[1] else []
    if summary is None and reference is None:
        notes.append(f"note: no {SUMMARY_FILE} in {model_dir}: the card takes the training setup from config.json")
    if results is None:
        notes.append(f"note: no {EVAL_FILE} in {reference.path if reference else model_dir}: the card has no "
                     f"evaluation (`ebt eval MODEL_DIR` writes it)")
    return Staged(out, files, notes)


def convert_reference(path: Path, out: Path) -> Reference:
    from modeling_ebt.convert_reference_checkpoint import convert, read_checkpoint

    try:
        hyper_parameters = read_checkpoint(path)[1]
        convert(path, out)
    except (OSError, ValueError, RuntimeError, KeyError) as error:
        raise PushError(f"cannot convert the reference checkpoint {path}: {error}") from None
    return Reference(path, hyper_parameters)


# --- the upload ---------------------------------------------------------------------------------------------------


def upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, say: Callable[[str], None]):
    """One commit of `folder` to `repo_id` (created if missing; `revision`, a branch, created from main if missing).

    Weights of an earlier push that this one does not hold (other shards) are deleted in the same commit; other
    files already in the repo stay."""
    from huggingface_hub import HfApi

    api = HfApi()
    repo_id = api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True).repo_id
    if private and not api.model_info(repo_id).private:
        say(f"note: {repo_id} already exists and is public: --private only applies to a new repository (change "
            f"the visibility in its settings)")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, delete_patterns=STALE_WEIGHTS,
                             commit_message="Upload an Energy-Based Transformer with `ebt push`")


def _without_secret(text: str) -> str:
    from huggingface_hub import get_token

    token = get_token()
    return text.replace(token, "<token>") if token else text


def push(source: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         license: str = DEFAULT_LICENSE, say: Callable[[str], None] = print) -> str:
    """Publishes a model folder (or a reference checkpoint) as `repo_id`; returns the URL of the commit.

    Raises PushError before any request for a bad repo id, a folder that is not an EBT with weights, or no token;
    and after a failed upload with the command to rerun (the local files are never modified)."""
    source = Path(source)
    rerun = rerun_command(source, repo_id, private, revision)
    check_repo_id(repo_id)
    if revision is not None and not revision.strip():
        raise PushError("--revision is empty: give a branch name, or leave it out to push to main")
    if not source.exists():
        raise PushError(f"{source} does not exist: expected a model folder or a reference checkpoint")
    if source.is_file() and source.suffix.lower() == ".safetensors":
        raise PushError(f"{source} is a state dict, which does not say the number of attention heads or the context "
                        f"length: convert it with `python -m modeling_ebt.convert_reference_checkpoint {source} "
                        f"OUT_DIR --num-attention-heads N --context-length L`, then run `ebt push OUT_DIR {repo_id}`")
    if source.is_file() and source.suffix.lower() != REFERENCE_SUFFIX:
        raise PushError(f"{source} is a file but not a reference checkpoint ({REFERENCE_SUFFIX}): pass the model "
                        f"folder")
    if source.is_dir():
        read_model_config(source)
    check_token()
    with tempfile.TemporaryDirectory(prefix="ebt-push-") as tmp:
        model_dir, reference = source, None
        if source.is_file():
            model_dir = Path(tmp) / "converted"
            reference = convert_reference(source, model_dir)
            say(f"converted the reference checkpoint {source}")
        staged = stage(model_dir, Path(tmp) / "upload", repo_id, revision=revision, license=license,
                       reference=reference)
        for note in staged.notes:
            say(note)
        say(f"uploading {len(staged.files)} files to {repo_id}" + (f" (branch {revision})" if revision else "")
            + f": {', '.join(staged.files)}")
        try:
            commit = upload(staged.folder, repo_id, private=private, revision=revision, say=say)
        except Exception as error:
            raise PushError(f"the upload to {repo_id} failed: {_without_secret(str(error))}\nNothing in {source} was "
                            f"changed. Once the cause is fixed, rerun: {rerun}") from None
    say(f"published {commit.commit_url}")
    return commit.commit_url


def run_push(args) -> int:
    """`ebt push` (see modeling_ebt.cli)."""
    push(args.model_dir, args.repo_id, private=args.private, revision=args.revision,
         say=lambda message: print(f"[ebt push] {message}"))
    return 0
