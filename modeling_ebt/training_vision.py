"""Training and evaluating the image denoiser: the jobs behind `ebt train --task denoise` and `ebt eval` of a
denoiser.

- `run_denoise_training`: an `EBTForImageDenoising` trained by the `transformers` Trainer (the model returns its
  loss; `DenoisingTrainer` only adds the paper's optimizer groups) on crops of scikit-image's photos
  (`modeling_ebt.images`), each batch corrupted afresh at the config's noise level; the model, its image processor
  and `training_summary.json` are saved in the output folder.
- `evaluate_denoiser`: PSNR and MSE on held-out crops (a photo never trained on) by descent steps and by candidates,
  at several noise levels, each level's noise drawn once from a seed, so every setting sees the same noisy images.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed

from . import presets
from .arguments import TrainOptions
from .checkpointing import RunLock, write_text_atomic
from .configuration_ebt_vision import EBTVisionConfig
from .constants import DEFAULT_RECIPE, DENOISE_EVAL_FILENAME
from .image_processing_ebt import EBTImageProcessor
from .images import NoisyImageCollator, add_noise, load_denoising_splits, mse, psnr
from .modeling_ebt_vision import EBTForImageDenoising
from .training import (
    EBTTrainerBase,
    _prepare_output_dir,
    _say,
    build_training_arguments,
    check_output_dir,
    save_final_model,
)

NOISE_LEVELS = (0.1, 0.2, 0.3)  # the trained level (0.2 by default) and one below and above it
# TrainingArguments defaults of `ebt train --task denoise` (below the flags given)
DENOISE_TRAINING = {"learning_rate": 1e-3, "weight_decay": 0.01, "max_grad_norm": 1.0, "warmup_steps": 0.05,
                    "lr_scheduler_type": "cosine", "per_device_train_batch_size": 32}


class DenoisingTrainer(EBTTrainerBase):
    """The trainer of `ebt train --task denoise`: `EBTTrainerBase` as it is (the model returns its loss), i.e. the
    stock `Trainer` with the paper's parameter groups (α alone, at the learning rate ×
    `mcmc_step_size_lr_multiplier`, no weight decay), the α-collapse guard, no token in `training_args.bin` and
    checkpoints renamed into place once complete."""


@dataclasses.dataclass
class DenoisingCollator:
    """Training rows (clean crops) get fresh noise at `level` (`NoisyImageCollator`); evaluation rows that already
    hold `labels` (noised once, see `noisy_rows`) are only stacked."""

    level: float
    seed: int = 0

    def __post_init__(self):
        self.noise = NoisyImageCollator(self.level, self.seed)

    def __call__(self, examples):
        if "labels" not in examples[0]:
            return self.noise(examples)
        return {key: torch.stack([torch.as_tensor(e[key]) for e in examples]) for key in ("pixel_values", "labels")}


def noisy_rows(clean: torch.Tensor, level: float, seed: int) -> list[dict[str, torch.Tensor]]:
    noisy = add_noise(clean, level, torch.Generator().manual_seed(seed))
    return [{"pixel_values": n, "labels": c} for n, c in zip(noisy, clean)]


def _vision_fields() -> set[str]:
    return set(EBTVisionConfig.__annotations__) | set(EBTVisionConfig().to_dict())


def load_vision_config(size: str | os.PathLike | None = None, **overrides) -> EBTVisionConfig:
    """EBTVisionConfig of a size (a shipped size's transformer fields, or a JSON file of EBTVisionConfig fields),
    then `overrides`. Unknown field names are refused (a config would keep them silently)."""
    fields: dict[str, Any] = {}
    if size is not None and str(size) in presets.size_names():
        fields = presets.size_fields(str(size))
    elif size is not None:
        path = Path(size).expanduser()
        if not path.is_file():
            raise ValueError(f"unknown model size {str(size)!r}: expected one of {presets.size_names()} or a JSON "
                             "file of EBTVisionConfig fields")
        fields = presets.read_json_object(path, f"size file {path}")
    fields.update(overrides)
    unknown = sorted(set(fields) - _vision_fields())
    if unknown:
        raise ValueError(f"{unknown} are not EBTVisionConfig fields")
    return EBTVisionConfig(**fields)


def check_denoise_options(options: TrainOptions) -> None:
    """The language options have no meaning for a denoiser: refuse them rather than ignore them."""
    given = {"--corpus": options.corpus is not None, "--tokenizer": options.tokenizer is not None,
             "--text-column": options.text_column != "text", "--cache-dir": options.cache_dir is not None,
             "--recipe": options.recipe not in (None, DEFAULT_RECIPE), "--max-minutes": options.max_minutes is not None,
             "--resume": options.resume}
    for flag, present in given.items():
        if present:
            raise ValueError(f"{flag} does not apply to --task denoise (it trains on modeling_ebt.images' crops for "
                             "--max-steps steps; size it with --size and --model-arg)")
    options.check()


def run_denoise_training(options: TrainOptions, callbacks: list[TrainerCallback] | None = None) -> dict[str, Any]:
    """Train an image denoiser as `ebt train --task denoise` does; returns the summary (also written as
    training_summary.json beside the model and its preprocessor_config.json)."""
    check_denoise_options(options)
    with RunLock(options.output_dir, enabled=os.environ.get("RANK", "0") == "0"):
        check_output_dir(options)
        config = load_vision_config(options.size, **options.model_args)
        options.planned_steps = options.max_steps
        args = build_training_arguments(options, {"training": DENOISE_TRAINING}, options.max_steps)
        args.remove_unused_columns = False  # the collator reads the crops' `pixel_values` itself
        data = load_denoising_splits(size=config.image_size)
        validation = data["validation"].select(range(min(options.eval_samples, len(data["validation"]))))
        clean = torch.stack(list(validation["pixel_values"])) if len(validation) else None
        if args.process_index == 0:
            _prepare_output_dir(options)
        set_seed(args.seed)
        model = EBTForImageDenoising(config)
        trainer = DenoisingTrainer(model=model, args=args, train_dataset=data["train"],
                                   eval_dataset=noisy_rows(clean, config.noise_level, args.seed) if clean is not None
                                   else None, data_collator=DenoisingCollator(config.noise_level, args.seed),
                                   callbacks=callbacks)
        started = time.time()
        result = trainer.train()
        train_seconds = time.time() - started
        quality = {}
        if clean is not None:
            quality = {"eval_loss": trainer.evaluate()["eval_loss"]}
            at_level = evaluate_denoiser(model, clean, [config.noise_level], [config.evaluation_steps], [1],
                                         seed=args.seed)["levels"][str(config.noise_level)]
            quality.update(noisy_psnr=at_level["noisy_psnr"], **at_level["by_steps"][str(config.evaluation_steps)])
        summary = {
            "task": "denoise", "model_size": options.size, "num_parameters": sum(p.numel() for p in model.parameters()),
            "config": {k: getattr(config, k) for k in (
                "image_size", "patch_size", "num_channels", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "ebt_type", "mcmc_num_steps", "mcmc_step_size", "noise_level", "loss_type")},
            "train_photos": sorted(set(data["train"]["source"])),
            "validation_photos": sorted(set(validation["source"])),
            "batch_size_per_process": args.per_device_train_batch_size, "learning_rate": args.learning_rate,
            "steps": trainer.state.global_step, "train_seconds_this_session": round(train_seconds, 1),
            "alpha": float(model.alpha.detach()), "mean_train_loss": result.training_loss,
            "eval": quality, "eval_samples": len(validation), "seed": args.seed,
        }
        folder = Path(options.output_dir)
        save_final_model(trainer, EBTImageProcessor.for_config(config), folder, summary)
        evaluated = (f"PSNR {quality['psnr']:.2f} dB (noisy {quality['noisy_psnr']:.2f} dB) at noise level "
                     f"{config.noise_level}" if quality else "not evaluated (--eval-samples 0)")
        _say(f"saved the denoiser to {folder} after {summary['steps']} steps; {evaluated}", args.process_index == 0)
        return summary


# --- evaluation ---------------------------------------------------------------------------------------------------


def _scores(model: EBTForImageDenoising, noisy, clean, batch_size, **thinking) -> dict[str, float]:
    denoised = torch.cat([model.denoise(noisy[i:i + batch_size], **thinking).images
                          for i in range(0, len(noisy), batch_size)])
    return {"psnr": float(psnr(denoised, clean)), "mse": float(mse(denoised, clean))}


def evaluate_denoiser(model: EBTForImageDenoising, clean: torch.Tensor, levels=NOISE_LEVELS, steps=(1, 2, 4, 8),
                      candidates=(1, 2, 4), seed: int = 0, batch_size: int = 64) -> dict[str, Any]:
    """PSNR and MSE (in [0, 1] units, `modeling_ebt.images`) of the denoised `clean` images (batch × C × H × W in
    [-1, 1]) at each noise level: by descent steps (one candidate), and by candidates at the trained step count.
    `forward_passes` counts energy evaluations per image: steps × candidates (each with its input gradient)."""
    model.eval()
    trained = model.config.evaluation_steps
    report: dict[str, Any] = {"trained_noise_level": model.config.noise_level, "trained_steps": trained,
                              "num_images": len(clean), "seed": seed,
                              "metrics": "PSNR (dB) and MSE in [0, 1] units, over all images", "levels": {}}
    for level in levels:
        noisy = add_noise(clean, level, torch.Generator().manual_seed(seed))
        entry = {"noisy_psnr": float(psnr(noisy, clean)), "noisy_mse": float(mse(noisy, clean)),
                 "by_steps": {}, "by_candidates": {}}
        for k in steps:
            entry["by_steps"][str(k)] = {"forward_passes": k, **_scores(model, noisy, clean, batch_size, steps=k)}
        for n in candidates:
            entry["by_candidates"][str(n)] = {"forward_passes": n * trained,
                                              **_scores(model, noisy, clean, batch_size, num_candidates=n)}
        report["levels"][str(level)] = entry
    return report


def run_denoise_eval(model_dir: str, levels, steps, candidates, eval_samples: int, seed: int,
                     output: str | None = None) -> dict[str, Any]:
    """`ebt eval` of a denoiser: `evaluate_denoiser` on the first `eval_samples` validation crops; writes
    denoise_eval.json (in `output`, default the model folder) and prints a table."""
    from transformers import AutoModelForImageToImage

    import modeling_ebt  # noqa: F401  (registers the Auto classes)

    if eval_samples < 1:
        raise ValueError(f"--eval-samples must be >= 1, got {eval_samples}")
    if any(not 0 < level <= 1 for level in levels):
        raise ValueError(f"noise levels must be in (0, 1], got {levels}")
    model = AutoModelForImageToImage.from_pretrained(model_dir)
    if not isinstance(model, EBTForImageDenoising):
        raise ValueError(f"{model_dir} holds a {type(model).__name__}, not an image denoiser")
    validation = load_denoising_splits(size=model.config.image_size)["validation"]
    clean = torch.stack(list(validation.select(range(min(eval_samples, len(validation))))["pixel_values"]))
    report = {"model_dir": str(model_dir), **evaluate_denoiser(model, clean, levels, steps, candidates, seed)}
    folder = Path(output or model_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomic(folder / DENOISE_EVAL_FILENAME, json.dumps(report, indent=2) + "\n")
    for level, entry in report["levels"].items():
        rows = [f"{kind}={k}: {v['psnr']:.2f}" for kind, key in (("steps", "by_steps"), ("candidates", "by_candidates"))
                for k, v in entry[key].items()]
        print(f"noise level {level}: noisy {entry['noisy_psnr']:.2f} dB | " + " | ".join(rows))
    print(f"wrote {folder / DENOISE_EVAL_FILENAME}")
    return report


__all__ = ["DenoisingTrainer", "evaluate_denoiser", "load_vision_config", "run_denoise_eval", "run_denoise_training"]
