"""Training Energy-Based Transformers with the `transformers` Trainer.

- Model sizes and recipes (`MODEL_SIZES`, `RECIPES`, `load_model_config`, `load_recipe`): the reference's sizes and
  the paper's System 1 / System 2 recipes, plus the small CPU recipe of the README's main job, read from the JSON
  files of `configuration/` that ship with the package (`modeling_ebt.presets`).
- `ebt_optimizer_groups`: the paper's parameter groups (the step size α alone, with its own learning rate).
- `EBTTrainerBase`: the `Trainer` with those groups, the collapse guard, no token on disk and checkpoints renamed
  into place once complete (the base of the image denoiser's trainer too); `EBTTrainer` adds logs of what the
  descent does (loss per step, energy gap between the first and last step, α) and System 2's replay buffer;
  evaluation adds the last step's loss and the perplexity.
- `run_training` / `TrainOptions` (in `modeling_ebt.arguments`): the job behind `ebt train` (validation before anything
  is written, a time budget re-planned as training goes, exact resumption from the last complete checkpoint,
  `training_summary.json`). It runs unchanged under
  `accelerate launch` with several processes, on GPUs or (gloo) on CPUs.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import (
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainerState,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import TrainOutput

from . import presets
from .arguments import TrainOptions, check_training_names
from .checkpointing import (
    FINAL_STAGING,
    STAGING_PREFIX,
    RunLock,
    checkpoint_step,
    clear_leftovers,
    commit_checkpoint,
    commit_files,
    fault_point,
    last_complete_checkpoint,
    rotate_checkpoints,
    write_text_atomic,
)
from .configuration_ebt import EBTConfig
from .constants import (
    DEFAULT_CORPUS_ID,
    DEFAULT_RECIPE,
    DENOISE_EVAL_FILENAME,
    EVAL_FILENAME,
    EVAL_PLOT_FILENAME,
    OPTIONS_FILENAME,
    SUMMARY_FILENAME,
)
from .modeling_ebt import EBTForCausalLM
from .presets import read_json_object

# --- sizes and recipes ------------------------------------------------------------------------------------------

# read from the package's configuration/ JSON files (modeling_ebt.presets): the one place they are written
MODEL_SIZES: dict[str, dict[str, int]] = {name: presets.size_fields(name) for name in presets.size_names()}
RECIPES: dict[str, dict[str, Any]] = {name: presets.recipe(name) for name in presets.recipe_names()}
_RECIPE_KEYS = {"description", "size", "model", "training"}


def _config_fields() -> set[str]:
    return set(EBTConfig.__annotations__) | set(EBTConfig().to_dict())


def load_recipe(recipe: str | os.PathLike | dict | None) -> dict[str, Any]:
    """A recipe by name (a key of `RECIPES`), from a JSON file, or as a dict; checked and copied.

    A recipe has `model` (EBTConfig fields), `training` (TrainingArguments fields), and optionally `size` (the
    default model size) and `description`."""
    if recipe is None:
        return {"model": {}, "training": {}}
    if isinstance(recipe, dict):
        loaded, where = copy.deepcopy(recipe), "the recipe"
    elif str(recipe) in RECIPES:
        loaded, where = copy.deepcopy(RECIPES[str(recipe)]), f"recipe {recipe!r}"
    else:
        path = Path(recipe).expanduser()
        if not path.is_file():
            raise ValueError(f"unknown recipe {str(recipe)!r}: expected one of {sorted(RECIPES)} or a JSON file")
        where = f"recipe file {path}"
        loaded = read_json_object(path, where)
    if not isinstance(loaded, dict) or set(loaded) - _RECIPE_KEYS:
        raise ValueError(f"{where} must be a JSON object with keys among {sorted(_RECIPE_KEYS)}")
    loaded.setdefault("model", {})
    loaded.setdefault("training", {})
    for part in ("model", "training"):
        if not isinstance(loaded[part], dict):
            raise ValueError(f"{where}: {part!r} must be a JSON object of field names and values")
    unknown = set(loaded["model"]) - _config_fields()
    if unknown:
        raise ValueError(f"{where}: {sorted(unknown)} are not EBTConfig fields")
    check_training_names(loaded["training"], f"{where}, training")
    if "size" in loaded and loaded["size"] not in MODEL_SIZES:
        raise ValueError(f"{where}: unknown size {loaded['size']!r}; expected one of {list(MODEL_SIZES)}")
    return loaded


def load_size(size: str | os.PathLike | None) -> dict[str, Any]:
    """The EBTConfig fields of a size: a name of `MODEL_SIZES` or a JSON file of EBTConfig fields."""
    if size is None:
        return {}
    if str(size) in MODEL_SIZES:
        return dict(MODEL_SIZES[str(size)])
    path = Path(size).expanduser()
    if not path.is_file():
        raise ValueError(f"unknown model size {str(size)!r}: expected one of {list(MODEL_SIZES)} or a JSON file")
    fields = read_json_object(path, f"size file {path}")
    unknown = set(fields) - _config_fields()
    if unknown:
        raise ValueError(f"size file {path}: {sorted(unknown)} are not EBTConfig fields")
    return fields


def load_model_config(size: str | os.PathLike | None = None, recipe: str | os.PathLike | dict | None = None,
                      **overrides) -> EBTConfig:
    """EBTConfig for a size and a recipe: EBTConfig's defaults, then the recipe's model fields, then the size (the
    recipe's own `size` if none is given), then `overrides`. E.g. `load_model_config("xxs", "s1")`."""
    loaded = load_recipe(recipe)
    fields = {**loaded["model"], **load_size(size if size is not None else loaded.get("size")), **overrides}
    unknown = set(overrides) - _config_fields()
    if unknown:
        raise ValueError(f"{sorted(unknown)} are not EBTConfig fields")
    return EBTConfig(**fields)


# --- optimizer groups -------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def step_size_of(model: nn.Module) -> torch.Tensor:
    """The learned step size α as a 0-d tensor. Under FSDP it is a sharded DTensor between steps: gathered, a
    collective, so every process calls this alike (as the Trainer's loss and callbacks do)."""
    alpha = _unwrap(model).alpha.detach()
    return (alpha.full_tensor() if hasattr(alpha, "full_tensor") else alpha).reshape(())


def ebt_optimizer_groups(model: nn.Module, weight_decay: float, learning_rate: float) -> list[dict[str, Any]]:
    """The paper's parameter groups, for any torch optimizer:

    - "decay": the weight matrices of linear layers, with `weight_decay`;
    - "no_decay": norms, embedding tables (token and landscape embeddings) and biases, without weight decay;
    - "alpha": the learnable step size α alone, without weight decay, at lr × `config.mcmc_step_size_lr_multiplier`.

    Only trainable parameters are included; empty groups are left out."""
    model = _unwrap(model)
    alpha = getattr(model, "alpha", None)
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for _, param in model.named_parameters():
        if not param.requires_grad or param is alpha:
            continue
        if param.dim() < 2 or id(param) in embedding_weights:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay, "lr": learning_rate},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0, "lr": learning_rate},
    ]
    if isinstance(alpha, nn.Parameter) and alpha.requires_grad:
        multiplier = getattr(model.config, "mcmc_step_size_lr_multiplier", 1.0)
        groups.append({"name": "alpha", "params": [alpha], "weight_decay": 0.0, "lr": learning_rate * multiplier})
    return [group for group in groups if group["params"]]


# --- the Trainer ------------------------------------------------------------------------------------------------

OUTPUT_KEYS_NOT_GATHERED = ["energies", "step_logits", "step_losses", "final_energies", "descent_steps", "cache"]


class DescentStats:
    """Weighted running sums of the descent's losses per step, its energy gap and α, between two reports."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.step_sums: dict[int, torch.Tensor] = {}
        self.step_weights: dict[int, float] = {}
        self.gap_sum, self.alpha_sum, self.last_sum, self.weight = None, 0.0, 0.0, 0.0

    def add(self, output, alpha: float, weight: float = 1.0):
        step_losses = output.step_losses.detach().float() * weight
        for k, value in enumerate(step_losses):
            self.step_sums[k] = self.step_sums.get(k, 0) + value
            self.step_weights[k] = self.step_weights.get(k, 0.0) + weight
        energies = output.energies.detach().float()
        gap = (energies[0].mean() - energies[-1].mean()) * weight
        self.gap_sum = gap if self.gap_sum is None else self.gap_sum + gap
        self.alpha_sum += alpha * weight
        self.last_sum = self.last_sum + step_losses[-1]  # each batch's own last step (counts vary per batch)
        self.weight += weight

    def as_tensor(self, num_steps: int, device) -> torch.Tensor:
        """[weight, gap, α, last-step loss, (loss sum, weight) per step] for reducing across processes."""
        values = [self.weight, self.gap_sum if self.gap_sum is not None else 0.0, self.alpha_sum, self.last_sum]
        for k in range(num_steps):
            values += [self.step_sums.get(k, 0.0), self.step_weights.get(k, 0.0)]
        return torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])

    @staticmethod
    def summarize(values: torch.Tensor, prefix: str = "") -> dict[str, float]:
        values = values.tolist()
        weight, gap, alpha, last, per_step = *values[:4], values[4:]
        if weight <= 0:
            return {}
        logs = {f"{prefix}energy_gap": gap / weight, f"{prefix}alpha": alpha / weight,
                f"{prefix}last_step_loss": last / weight}
        for k in range(0, len(per_step), 2):
            if per_step[k + 1] > 0:
                logs[f"{prefix}loss_step_{k // 2 + 1}"] = per_step[k] / per_step[k + 1]
        return logs

    @property
    def num_steps(self) -> int:
        return max(self.step_sums) + 1 if self.step_sums else 0


def _builds_its_own_groups(optimizer_cls, optimizer_kwargs: dict) -> bool:
    """Optimizers that `Trainer` builds from the model (Muon/Dion factories) or with their own `params`/`model`
    (GaLore, LOMO) instead of from the parameter groups it is given."""
    from transformers.trainer_optimizer import is_optimizer_factory

    return is_optimizer_factory(optimizer_cls) or "params" in optimizer_kwargs or "model" in optimizer_kwargs


class EBTTrainerBase(Trainer):
    """What every EBT trainer of the package adds to the stock `Trainer` (the language one, `EBTTrainer`, and the
    image denoiser's, `training_vision.DenoisingTrainer`): the paper's optimizer groups (`ebt_optimizer_groups`), the
    collapse guard (`DescentGuard`), no token in any file it writes (`training_args.bin` is a pickle of the
    arguments; pushing during training with `hub_token` is refused) and checkpoints that a kill cannot corrupt
    (written into `tmp-checkpoint-N/`, then renamed)."""

    def __init__(self, model=None, args=None, *more, **kwargs):
        if args is not None and args.push_to_hub and args.hub_token:
            # pushes during training upload a pickle of these arguments (training_args.bin) that `_save` cannot clean
            raise ValueError("push_to_hub with hub_token would upload the token inside training_args.bin: give the "
                             "token through the HF_TOKEN environment variable or `hf auth login` instead")
        super().__init__(model, args, *more, **kwargs)
        self.add_callback(DescentGuard())

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            optimizer_cls, optimizer_kwargs = (self.optimizer_cls_and_kwargs
                                               or self.get_optimizer_cls_and_kwargs(self.args, model))
            if _builds_its_own_groups(optimizer_cls, optimizer_kwargs):
                raise ValueError(f"optim={self.args.optim!r} builds its own parameter groups, which would lose α's "
                                 "(learning rate × mcmc_step_size_lr_multiplier, no weight decay): choose an "
                                 "optimizer that takes parameter groups (e.g. adamw_torch, sgd)")
            groups = ebt_optimizer_groups(model, self.args.weight_decay, self.args.learning_rate)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    # Atomic checkpoints. The Trainer writes a checkpoint file by file into `checkpoint-N` and then rotates by
    # modification time, so a kill leaves a half-written or half-deleted `checkpoint-N` that looks usable. Staging is
    # the least code that changes only where the files go: `_get_output_dir` points the Trainer's own
    # `_save_checkpoint` (model, optimizer, scheduler, RNG states, replay buffers, trainer state: all unchanged) at
    # `tmp-checkpoint-N/` for the duration of the call, and `commit_checkpoint` renames the folder once every process
    # has written its files. The barrier before the rename is what transformers' own attempt (#27820) lacked on
    # several processes; process 0 renames, then the first process of each node, for nodes that do not share its
    # storage. The Trainer's rotation then only sees the staging folder; ours runs on complete checkpoints by step.
    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        if getattr(self, "_staging_checkpoint", False):
            return os.path.join(run_dir, f"{STAGING_PREFIX}checkpoint-{self.state.global_step}")
        return run_dir

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        self._staging_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as error:  # e.g. a full disk: nothing half-written may stay behind
            shutil.rmtree(staging, ignore_errors=True)
            last = last_complete_checkpoint(run_dir)
            raise OSError(f"could not write {name} to {run_dir} ({error}); nothing of it was kept, the last complete "
                          f"checkpoint is {last.name if last else 'none'}: free space and continue with --resume"
                          ) from error
        finally:
            self._staging_checkpoint = False
        self._publish_checkpoint(staging / name, run_dir / name)

    def _publish_checkpoint(self, staged: Path, final: Path) -> None:
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == staged.parent:  # recorded while saving into the staging folder
            self.state.best_model_checkpoint = str(final.parent / Path(best).name)
            if self.args.should_save:
                self.state.save_to_json(str(staged / "trainer_state.json"))
        for first_of in ("process", "node"):
            self.accelerator.wait_for_everyone()
            index = self.args.process_index if first_of == "process" else self.args.local_process_index
            if index == 0 and staged.is_dir():
                commit_checkpoint(staged, final)
                staged.parent.rmdir()
                rotate_checkpoints(final.parent, self.args.save_total_limit, self.state.best_model_checkpoint)
        self.accelerator.wait_for_everyone()

    # `training_args.bin` is a pickle of the TrainingArguments: token fields (hub_token) are left out of it.
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        secrets = {name: getattr(self.args, name) for name in _secret_fields(self.args)}
        try:
            for name in secrets:
                setattr(self.args, name, None)
            super()._save(output_dir, state_dict)
        finally:
            for name, value in secrets.items():
                setattr(self.args, name, value)
        fault_point("weights-written")


class EBTTrainer(EBTTrainerBase):
    """`EBTTrainerBase` for language EBTs, with logs of the descent and System 2's replay buffer.

    Training logs add, averaged over the logging interval (this process's batches): `loss_step_k` (the
    cross-entropy after descent step k), `last_step_loss`, `energy_gap` (mean energy at the first step minus at the
    last) and `alpha`. Evaluation adds `eval_loss_step_k`, `eval_last_step_loss`, `eval_energy_gap` and
    `eval_perplexity` = exp(last step's cross-entropy), token-weighted over all processes. Predictions are never
    gathered unless `compute_metrics` asks for them, and then only the logits."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The model returns a per-batch mean loss and ignores `num_items_in_batch`: the Trainer must divide by the
        # gradient accumulation steps itself and must not rescale by the number of processes.
        self.model_accepts_loss_kwargs = False
        self._train_stats, self._eval_stats = DescentStats(), DescentStats()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        buffer = self.replay_buffer if model.training else None
        if buffer is not None:  # System 2: part of the batch restarts from earlier batches' final logits
            inputs = buffer.extend(inputs, _unwrap(model))
        outputs = model(**inputs)
        alpha = step_size_of(self.model)  # a tensor: no host sync per batch
        if model.training:
            self._train_stats.add(outputs, alpha)
            if buffer is not None:
                buffer.add(inputs["input_ids"], inputs["labels"], outputs.logits)
        else:
            labels = inputs["labels"][:, 1:]
            tokens = labels.ne(-100)
            if inputs.get("attention_mask") is not None:
                tokens &= inputs["attention_mask"][:, 1:].bool()
            self._eval_stats.add(outputs, alpha, weight=tokens.sum())
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    @property
    def replay_buffer(self):
        """The System 2 replay buffer (None unless `config.mcmc_replay_buffer`), held by the trainer."""
        if "_replay_buffer" not in self.__dict__:
            from .replay_buffer import ReplayBuffer

            self._replay_buffer = ReplayBuffer.for_config(_unwrap(self.model).config)
        return self._replay_buffer

    # A checkpoint saves, per process, the RNG states and (System 2) the replay buffer, so that a resumed run
    # continues exactly; both are restored together when training resumes. Why these two private hooks rather than
    # a public `TrainerCallback.on_save`: on_save does not receive the checkpoint folder (it would have to rebuild
    # Trainer's naming, which hyperparameter search changes) and no callback runs with the checkpoint being resumed
    # from; `_save_rng_state(output_dir)` / `_load_rng_state(checkpoint)` get exactly those folders, at exactly the
    # moments the RNG states (which the buffer's sampling depends on) are saved and restored.
    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self.replay_buffer is not None and self.replay_buffer.records:
            save_file(self.replay_buffer.state_dict(), os.path.join(output_dir, self._replay_buffer_file()))

    def _load_rng_state(self, checkpoint: str | None) -> None:
        super()._load_rng_state(checkpoint)
        if self.replay_buffer is not None and checkpoint is not None:
            path = os.path.join(checkpoint, self._replay_buffer_file())
            self.replay_buffer.load_state_dict(load_file(path) if os.path.isfile(path) else {})

    def _replay_buffer_file(self) -> str:
        return f"replay_buffer_{self.args.process_index}.safetensors"

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        if ignore_keys is None:
            ignore_keys = OUTPUT_KEYS_NOT_GATHERED
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def evaluation_loop(self, *args, **kwargs):
        self._eval_stats.reset()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        totals = self._eval_stats.as_tensor(self._eval_stats.num_steps, self.args.device)
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        metrics = DescentStats.summarize(totals, prefix=f"{prefix}_")
        if f"{prefix}_last_step_loss" in metrics:
            # the figure users compare across models is the prediction's cross-entropy: the last step's (the
            # training objective, a mean over the steps, stays in `{prefix}_objective`)
            metrics[f"{prefix}_objective"] = output.metrics.get(f"{prefix}_loss")
            metrics[f"{prefix}_loss"] = metrics[f"{prefix}_last_step_loss"]
            metrics[f"{prefix}_perplexity"] = math.exp(min(metrics[f"{prefix}_last_step_loss"], 700.0))
        output.metrics.update(metrics)
        self._eval_stats.reset()
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._train_stats.weight > 0:
            totals = self._train_stats.as_tensor(self._train_stats.num_steps, "cpu")
            logs.update({k: round(v, 6) for k, v in DescentStats.summarize(totals).items()})
            self._train_stats.reset()
        super().log(logs, start_time)


class DescentCollapseError(RuntimeError):
    """Training stopped because the energy descent stopped doing anything (see `DescentGuard`)."""


class DescentGuard(TrainerCallback):
    """Stops a run whose descent has collapsed, with an error that says what to change, instead of letting it train
    on at a uniform prediction:
    - a learnable step size α driven down to the clamp `ALPHA_FLOOR` (the descent then no longer moves the
      prediction: logits, or a denoiser's image);
    - a language model's loss pinned at ln(vocab_size) (the uniform guess) for `PINNED_STEPS` optimizer steps in a
      row."""

    ALPHA_FLOOR = 1e-4  # the descent clamps α to at least this (`EnergyDescentMixin.step_size`)
    PINNED_STEPS, PINNED_TOLERANCE = 100, 0.01

    def __init__(self):
        self.pinned_since = None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        alpha = getattr(_unwrap(model), "alpha", None) if model is not None else None
        if alpha is not None and alpha.requires_grad and float(step_size_of(model)) <= self.ALPHA_FLOOR:
            config = _unwrap(model).config
            raise DescentCollapseError(
                f"the step size alpha reached its floor {self.ALPHA_FLOOR:g} at step {state.global_step} (it "
                f"started at mcmc_step_size={config.mcmc_step_size:g} and learns at {args.learning_rate:g} x "
                f"mcmc_step_size_lr_multiplier={config.mcmc_step_size_lr_multiplier:g}): the descent no longer "
                f"changes the prediction. Lower mcmc_step_size_lr_multiplier (or the learning rate), raise "
                f"mcmc_step_size, or fix alpha with mcmc_step_size_learnable=false")

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        loss = (logs or {}).get("last_step_loss", (logs or {}).get("loss"))
        vocab_size = getattr(_unwrap(model).config, "vocab_size", None) if model is not None else None
        if loss is None or vocab_size is None:  # a denoiser has no uniform guess to be pinned at
            return
        uniform = math.log(vocab_size)
        if abs(loss - uniform) > self.PINNED_TOLERANCE:
            self.pinned_since = None
            return
        self.pinned_since = state.global_step if self.pinned_since is None else self.pinned_since
        if state.global_step - self.pinned_since >= self.PINNED_STEPS:
            raise DescentCollapseError(
                f"the training loss has stayed at ln(vocab_size) = {uniform:.3f} (a uniform guess) since step "
                f"{self.pinned_since}: the model is not learning. Check mcmc_step_size and "
                f"mcmc_step_size_lr_multiplier (a step size that collapses or explodes stops the descent) and the "
                f"learning rate and warm-up")


# --- time budget ------------------------------------------------------------------------------------------------


def _any_process(flag: bool) -> bool:
    """True if `flag` is true on any process (all processes must call this together)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = torch.tensor([1.0 if flag else 0.0])
        if torch.distributed.get_backend() == "nccl":
            tensor = tensor.cuda()
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return bool(tensor.item() > 0)
    return flag


def _from_main_process(value: float) -> float:
    """Rank 0's `value` on every process (all processes must call this together)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = torch.tensor([float(value)], dtype=torch.float64)
        if torch.distributed.get_backend() == "nccl":
            tensor = tensor.cuda()
        torch.distributed.broadcast(tensor, src=0)
        return float(tensor.item())
    return value


def set_schedule_horizon(scheduler, num_training_steps: int, num_warmup_steps: int) -> bool:
    """Points a transformers learning-rate schedule (a `LambdaLR` over `functools.partial` lambdas that take
    `num_training_steps`: linear, cosine, cosine_with_min_lr, polynomial, ...) at a new last step and warm-up
    length. Returns False for other schedules (constant, custom), which are left as they are."""
    lambdas = getattr(scheduler, "lr_lambdas", None) or []
    moved = False
    for index, schedule in enumerate(lambdas):
        if isinstance(schedule, functools.partial) and "num_training_steps" in schedule.keywords:
            keywords = {**schedule.keywords, "num_training_steps": num_training_steps}
            if "num_warmup_steps" in keywords:
                keywords["num_warmup_steps"] = num_warmup_steps
            lambdas[index] = functools.partial(schedule.func, *schedule.args, **keywords)
            moved = True
    return moved


class TimeLimitCallback(TrainerCallback):
    """Stops training once `seconds` have passed (all processes at the same step).

    Given `planned_steps` (a first estimate), it also re-plans as training goes: every `replan_every` steps it takes
    the pace of the steps since the last re-plan and moves the run's end (`state.max_steps`) and the learning-rate
    schedule's horizon (and a fractional warm-up) to the step count that fits in the time left, so that the schedule
    ends with the budget when the machine gets slower or faster. The Trainer's `max_steps` is only the bound within
    which the end can move (`max_steps_bound`). `clock` is for tests."""

    GROWTH = 8  # the end may move up to this many times the first plan

    def __init__(self, seconds: float, planned_steps: int | None = None, replan_every: int | None = None,
                 clock=time.monotonic):
        self.seconds, self.planned_steps, self.clock = seconds, planned_steps, clock
        self.replan_every = replan_every or max(1, (planned_steps or 0) // 20)
        self.start, self.stopped, self.last = None, False, (0, 0.0)

    @property
    def max_steps_bound(self) -> int:
        return self.GROWTH * self.planned_steps

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        self.start, self.last = self.clock(), (state.global_step, 0.0)
        if self.planned_steps is not None:
            self._move_end(args, state, lr_scheduler, self.planned_steps)

    def on_step_end(self, args, state, control, lr_scheduler=None, **kwargs):
        elapsed = self.clock() - self.start
        if _any_process(elapsed >= self.seconds):
            self.stopped = True
            control.should_training_stop = True
        elif (self.planned_steps is not None and not control.should_training_stop  # (the end is reached)
              and state.global_step - self.last[0] >= self.replan_every):
            pace = _from_main_process((elapsed - self.last[1]) / (state.global_step - self.last[0]))
            fits = state.global_step + int((self.seconds - elapsed) / max(pace, 1e-9))
            self._move_end(args, state, lr_scheduler, min(max(fits, state.global_step + 1), args.max_steps))
            self.last = (state.global_step, elapsed)
        return control

    @staticmethod
    def _move_end(args, state, lr_scheduler, steps: int):
        state.max_steps = steps
        set_schedule_horizon(lr_scheduler, steps, args.get_warmup_steps(steps))


def measure_step_seconds(model: nn.Module, batch: dict[str, torch.Tensor], learning_rate: float,
                         repeats: int = 2) -> float:
    """Seconds per optimizer step (forward, second-order backward, AdamW) of a copy of `model` on `batch`, after
    one warm-up step. The RNG state is left as it was."""
    probe = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=learning_rate)
    timings = []
    device = next(probe.parameters()).device  # the probe's noise must not advance that device's generator either
    with torch.random.fork_rng(devices=[device] if device.type != "cpu" else [], device_type=device.type):
        for _ in range(repeats + 1):
            start = time.perf_counter()
            probe(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            timings.append(time.perf_counter() - start)
    return sorted(timings[1:])[len(timings[1:]) // 2]


# --- the training job -------------------------------------------------------------------------------------------

# written by `ebt eval` next to the model, and the summary that marks a run finished: they must not describe the new one
STALE_ON_OVERWRITE = (EVAL_FILENAME, EVAL_PLOT_FILENAME, DENOISE_EVAL_FILENAME, SUMMARY_FILENAME)
# training arguments never written to disk (`hub_token`; names ending like transformers' own `*_token` rule)
SECRET_KEY = re.compile(r"(^|_)(token|secret|password|api_key)$", re.IGNORECASE)
REDACTED = "<redacted>"  # in their place (a resumed run leaves them out: give the token by the usual means)


def _secret_fields(args: TrainingArguments) -> list[str]:
    return [field.name for field in dataclasses.fields(args)
            if SECRET_KEY.search(field.name) and isinstance(getattr(args, field.name), str)]


_MODEL_FILES = ("config.json", "model.safetensors", "pytorch_model.bin", SUMMARY_FILENAME, OPTIONS_FILENAME)




def check_output_dir(options: TrainOptions) -> Path | None:
    """Refuses to train into a folder that already holds a model or checkpoints unless resuming or overwriting;
    returns the checkpoint to resume from. Writes nothing."""
    folder = Path(options.output_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output dir {folder} exists and is not a folder")
    existing = [name for name in _MODEL_FILES if (folder / name).exists()] if folder.is_dir() else []
    has_checkpoints = folder.is_dir() and any(folder.glob("checkpoint-*"))
    if options.resume:
        checkpoint = last_complete_checkpoint(folder)
        if checkpoint is None or not (folder / OPTIONS_FILENAME).is_file():
            raise ValueError(f"--resume: {folder} holds no complete checkpoint of an `ebt train` run to resume from")
        return checkpoint
    if (existing or has_checkpoints) and not options.overwrite:
        what = ", ".join(existing + (["checkpoint-* folders"] if has_checkpoints else []))
        raise ValueError(f"output dir {folder} already holds a trained model or checkpoints ({what}); pass --resume "
                         f"to continue that run, --overwrite to replace it, or choose another --output-dir")
    return None


def _accelerator_available() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


DEFAULT_BATCH_SIZE = 16  # sequences per process per micro-batch when neither --batch-size nor the recipe says
# ebt train's own defaults for TrainingArguments fields: below the recipe's values and the flags given
TRAINING_DEFAULTS: dict[str, Any] = {
    "seed": 0, "logging_steps": 10, "logging_first_step": True, "save_strategy": "steps", "save_steps": 500,
    "save_total_limit": 2, "prediction_loss_only": True, "report_to": "none", "ddp_find_unused_parameters": False,
    "dataloader_num_workers": 0,
}


def build_training_arguments(options: TrainOptions, recipe: dict[str, Any], max_steps: int) -> TrainingArguments:
    """TrainingArguments from, in increasing precedence: `TRAINING_DEFAULTS`, the recipe's `training`, what the
    options decide (output dir, steps, batch size, evaluation, progress bars, CPU), the flags given
    (`options.training_args`)."""
    fields = {**TRAINING_DEFAULTS, **recipe["training"]}
    batch_size = options.batch_size or fields.get("per_device_train_batch_size", DEFAULT_BATCH_SIZE)
    fields.update(
        output_dir=options.output_dir,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size,
        disable_tqdm=not options.progress,
        # Without an accelerator the processes that `accelerate launch` starts only form a (gloo) process group if
        # the script asks for the CPU; otherwise each would silently train alone.
        use_cpu=not _accelerator_available(),
    )
    fields.update(options.training_args)
    if "eval_strategy" not in options.training_args:  # evaluation every eval_steps if given, else only at the end
        fields["eval_strategy"] = "steps" if options.eval_samples > 0 and fields.get("eval_steps") else "no"
    args = TrainingArguments(**fields)
    if args.fp16 and (args.use_cpu or not _accelerator_available()):
        raise ValueError("fp16=True needs a GPU: on the CPU the Trainer would silently train in float32. Use "
                         "--training-arg bf16=true for mixed precision on the CPU, or leave fp16 out")
    return args


def _say(message: str, main_process: bool = True):
    if main_process:
        print(f"[ebt train] {message}", file=sys.stderr, flush=True)


def _resolve_options(options: TrainOptions, checkpoint: Path | None = None) -> TrainOptions:
    """On --resume, the saved options of the run replace the given ones; the step count is the one the checkpoint's
    run was heading for."""
    if not options.resume:
        return options
    saved = json.loads((Path(options.output_dir) / OPTIONS_FILENAME).read_text(encoding="utf-8"))
    saved.update(output_dir=options.output_dir, resume=True, overwrite=False, progress=options.progress)
    training = {k: v for k, v in saved.get("training_args", {}).items() if v != REDACTED}
    for name in _FORMER_OPTION_FIELDS:  # options files of earlier versions held these TrainingArguments fields
        if saved.get(name) is not None:
            training.setdefault(name, saved[name])
    known = {field.name for field in dataclasses.fields(TrainOptions) if field.init}
    resolved = TrainOptions(**{k: v for k, v in saved.items() if k in known} | {"training_args": training})
    resolved.planned_steps = _checkpoint_horizon(checkpoint) or saved.get("planned_steps")
    return resolved


_FORMER_OPTION_FIELDS = ("learning_rate", "seed", "gradient_accumulation_steps", "eval_steps", "save_steps",
                         "logging_steps")


def _checkpoint_horizon(checkpoint: Path | None) -> int | None:
    """The step count a checkpoint's run was heading for (a --max-minutes run re-plans it as it goes)."""
    if checkpoint is None:
        return None
    state = json.loads((Path(checkpoint) / "trainer_state.json").read_text(encoding="utf-8"))
    return state.get("max_steps") or None


def run_training(options: TrainOptions, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train an EBT as `ebt train` does; returns the training summary (also written to the output dir).

    Everything is validated (options, output dir, config, tokenizer, corpus, block size) before anything is written
    to the output dir, which one run at a time holds (`RunLock`). The output dir receives complete checkpoints only
    (`checkpoint-N`, with optimizer, scheduler and RNG states: a killed run resumes exactly with `resume=True`), and
    at the end the model (safetensors), the tokenizer, `ebt_train_options.json` and, last, `training_summary.json`
    (see `modeling_ebt.checkpointing`). `options.task == "denoise"` trains an image denoiser instead
    (`modeling_ebt.training_vision`)."""
    if options.task == "denoise":
        from .training_vision import run_denoise_training

        return run_denoise_training(options, callbacks)
    with RunLock(options.output_dir, enabled=os.environ.get("RANK", "0") == "0"):
        return _run_training(options, callbacks)


def _run_training(options: TrainOptions, callbacks: list[TrainerCallback] | None) -> dict[str, Any]:
    from .data import build_lm_datasets  # imported here: `datasets` is only needed to train

    finished = _finished_run(options)
    if finished is not None:
        return finished
    checkpoint = check_output_dir(options)
    options = _resolve_options(options, checkpoint)
    options.check()
    recipe = load_recipe(options.recipe)
    size = options.size if options.size is not None else recipe.get("size")
    config = load_model_config(size, recipe, **options.model_args)
    tokenizer = _load_tokenizer(options.tokenizer)
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):  # so that `generate` knows them
        if name not in options.model_args and getattr(tokenizer, name, None) is not None:
            setattr(config, name, getattr(tokenizer, name))
    if options.planned_steps is None and options.max_steps is not None:
        options.planned_steps = options.max_steps
    args = build_training_arguments(options, recipe, options.planned_steps or 1)
    main = args.process_index == 0
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.world_size == 1:
        raise RuntimeError(f"started as one of {os.environ['WORLD_SIZE']} processes but no process group was formed; "
                           "on a machine without GPUs pass use_cpu (see configuration/README.md)")
    with args.main_process_first(desc="tokenizing the corpus"):
        data = build_lm_datasets(tokenizer, options.corpus, block_size=options.block_size,
                                 validation_fraction=options.validation_fraction, cache_dir=options.cache_dir,
                                 text_column=options.text_column, config=config)
    train_data, eval_data = data["train"], data["validation"]
    if options.eval_samples:
        eval_data = eval_data.select(range(min(options.eval_samples, len(eval_data))))

    set_seed(args.seed)
    model = EBTForCausalLM(config)
    if options.planned_steps is None:
        options.planned_steps = args.max_steps = _plan_steps(options, model, train_data, args)
    if main:
        _prepare_output_dir(options)
    warmup = args.warmup_steps if args.warmup_steps >= 1 else args.warmup_steps * args.max_steps
    if warmup >= args.max_steps:
        _say(f"warning: warm-up ({warmup:g} steps) is not shorter than the run ({args.max_steps} steps); the learning "
             f"rate never reaches {args.learning_rate:g}. Pass --warmup-steps 0.05 for a short run.", main)

    time_limit = None
    callbacks = list(callbacks or [])
    if options.max_minutes is not None and not options.resume:
        time_limit = TimeLimitCallback(options.max_minutes * 60, planned_steps=options.planned_steps)
        args.max_steps = time_limit.max_steps_bound  # room for re-planning: the callback sets the run's end
        callbacks.append(time_limit)
    trainer = EBTTrainer(model=model, args=args, train_dataset=train_data,
                         eval_dataset=eval_data if options.eval_samples else None,
                         data_collator=default_data_collator, callbacks=callbacks)
    started = time.time()
    if checkpoint is not None and checkpoint_step(checkpoint) >= args.max_steps:
        result = _restore_last_step(trainer, checkpoint, main)
    else:
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    train_seconds = time.time() - started
    metrics = trainer.evaluate() if options.eval_samples else {}

    summary = _summary(options, size, config, trainer, result, metrics, train_seconds,
                       stopped_by_time=bool(time_limit and time_limit.stopped))
    if time_limit and trainer.is_world_process_zero():  # the plan the re-planning ended with, for --resume
        _record_planned_steps(options.output_dir, trainer.state.max_steps)
    save_final_model(trainer, tokenizer, Path(options.output_dir), summary)
    evaluated = (f"final eval loss {metrics['eval_last_step_loss']:.4f}" if "eval_last_step_loss" in metrics
                 else "not evaluated (--eval-samples 0)")
    _say(f"saved the model to {options.output_dir} after {summary['steps']} steps ({summary['tokens_seen']:,} "
         f"tokens); {evaluated}", main)
    return summary


def _finished_run(options: TrainOptions) -> dict[str, Any] | None:
    """On --resume of a run that saved its model and summary: that summary (nothing is trained)."""
    path = Path(options.output_dir) / SUMMARY_FILENAME
    if not options.resume or not path.is_file():
        return None
    summary = json.loads(path.read_text(encoding="utf-8"))
    _say(f"{options.output_dir} holds a finished run ({summary.get('steps')} steps, model saved): nothing to resume. "
         "Pass --overwrite to train a new model there.", os.environ.get("RANK", "0") == "0")
    return summary


def _restore_last_step(trainer: EBTTrainer, checkpoint: Path, main: bool) -> TrainOutput:
    """A run killed after its last checkpoint: the model is that checkpoint's, no step is trained again (the
    Trainer would start one more epoch's step before it looks at max_steps)."""
    _say(f"{checkpoint.name} already holds all {trainer.args.max_steps} steps: saving its weights as the model", main)
    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    return TrainOutput(trainer.state.global_step, None, {})


def save_final_model(trainer: EBTTrainerBase, processor, folder: Path, summary: dict[str, Any]) -> None:
    """The model and its tokenizer or image processor are written into `tmp-final/` and renamed into `folder` file
    by file; the summary, renamed into place last, marks the run finished (until then `--resume` redoes this from
    the last checkpoint)."""
    staging = folder / FINAL_STAGING
    trainer.save_model(str(staging))
    if trainer.is_world_process_zero():
        processor.save_pretrained(staging)
        commit_files(staging, folder)
        fault_point("final-committed")
        write_text_atomic(folder / SUMMARY_FILENAME, json.dumps(summary, indent=2) + "\n")


def _plan_steps(options: TrainOptions, model: nn.Module, train_data, args: TrainingArguments) -> int:
    """The optimizer steps that fit in `options.max_minutes`, from a timed probe (rank 0's, on every process)."""
    size = min(args.per_device_train_batch_size, len(train_data))
    batch = default_data_collator([train_data[i] for i in range(size)])
    step_seconds = measure_step_seconds(model.to(args.device), {k: v.to(args.device) for k, v in batch.items()},
                                        args.learning_rate)
    step_seconds = _from_main_process(step_seconds * args.gradient_accumulation_steps)
    steps = max(1, int(options.max_minutes * 60 / step_seconds))
    _say(f"one optimizer step takes ~{step_seconds:.2f} s: planning {steps} steps for {options.max_minutes:g} "
         "minutes, re-planned as training goes", args.process_index == 0)
    return steps


def _record_planned_steps(output_dir: str, steps: int) -> None:
    path = Path(output_dir) / OPTIONS_FILENAME
    saved = json.loads(path.read_text(encoding="utf-8"))
    write_text_atomic(path, json.dumps({**saved, "planned_steps": steps}, indent=2) + "\n")


def _prepare_output_dir(options: TrainOptions) -> None:
    """After validation: drop the checkpoints of a run being overwritten, record the options (for --resume)."""
    folder = Path(options.output_dir)
    if options.overwrite:
        for stale in folder.glob("checkpoint-*"):
            shutil.rmtree(stale)
        for stale in STALE_ON_OVERWRITE:  # the evaluation of the old model must not describe the new one
            (folder / stale).unlink(missing_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    clear_leftovers(folder)
    saved = dataclasses.asdict(options)
    saved["training_args"] = {key: REDACTED if SECRET_KEY.search(key) else value
                              for key, value in saved["training_args"].items()}
    # local files as absolute paths, so that --resume works from any directory (names of recipes, sizes, Hub
    # datasets and tokenizers stay as given)
    for key, names in (("corpus", ()), ("size", MODEL_SIZES), ("recipe", RECIPES), ("tokenizer", ()),
                       ("cache_dir", ())):
        value = saved[key]
        if isinstance(value, str) and value not in names and Path(value).expanduser().exists():
            saved[key] = str(Path(value).expanduser().resolve())
    write_text_atomic(folder / OPTIONS_FILENAME, json.dumps(saved, indent=2) + "\n")


def _load_tokenizer(name: str | None):
    if name is None:
        from .tokenization_ebt import EBTTokenizer

        return EBTTokenizer()
    return AutoTokenizer.from_pretrained(name)


def _describe_corpus(corpus: str | None) -> str:
    """A local corpus as an absolute path (so `ebt eval` finds it from anywhere), else as given."""
    if corpus is None:
        return DEFAULT_CORPUS_ID
    path = Path(corpus).expanduser()
    return str(path.resolve()) if path.exists() else corpus


def _summary(options, size, config, trainer, result, metrics, train_seconds, stopped_by_time) -> dict[str, Any]:
    args = trainer.args
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    steps = trainer.state.global_step
    train_logs = [log for log in trainer.state.log_history if "loss" in log and "eval_loss" not in log]
    last = train_logs[-1] if train_logs else {}
    model = _unwrap(trainer.model)
    import transformers

    return {
        "model_size": size,
        "recipe": options.recipe,
        "corpus": _describe_corpus(options.corpus),
        "tokenizer": options.tokenizer or "EBTTokenizer (bytes)",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "config": {k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
            "max_position_embeddings", "ebt_type", "mcmc_num_steps", "mcmc_step_size", "mcmc_step_size_lr_multiplier",
            "denoising_initial_condition", "randomize_mcmc_num_steps", "langevin_dynamics_noise", "truncate_mcmc")},
        "block_size": options.block_size,
        "batch_size_per_process": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "num_processes": args.world_size,
        "distributed_type": str(trainer.accelerator.distributed_type.value),
        "global_batch_size": global_batch,
        "learning_rate": args.learning_rate,
        "steps": steps,
        "planned_steps": trainer.state.max_steps,
        "stopped_by_time_limit": stopped_by_time,
        "tokens_seen": steps * global_batch * options.block_size,
        "train_seconds_this_session": round(train_seconds, 1),
        "alpha": float(step_size_of(model)),
        "final_train_loss": last.get("loss"),
        "final_train_step_losses": [last[k] for k in sorted(last) if k.startswith("loss_step_")],
        "final_energy_gap": last.get("energy_gap"),
        "mean_train_loss": result.training_loss,
        "eval": {k: v for k, v in metrics.items() if k.startswith("eval_") and "runtime" not in k
                 and "per_second" not in k},
        "eval_samples": options.eval_samples,
        "seed": args.seed,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    }


__all__ = [
    "DEFAULT_RECIPE",
    "EBTTrainer",
    "EBTTrainerBase",
    "MODEL_SIZES",
    "RECIPES",
    "TRAINING_DEFAULTS",
    "TimeLimitCallback",
    "TrainOptions",
    "ebt_optimizer_groups",
    "last_complete_checkpoint",
    "load_model_config",
    "load_recipe",
    "run_training",
]
