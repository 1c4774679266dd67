"""`python -m modeling_ebt.bench denoise`: the EBT against a same-size Diffusion Transformer on image denoising.

Both models train for the same number of steps on the same batches of clean crops (modeling_ebt.images; the
training photos), the EBT on those crops corrupted by ``add_noise`` at ``--level`` (0.2), the DiT with its usual
ε-prediction loss at random diffusion steps up to that level's. Training stops at ``--max-steps`` or when either
model has used ``--minutes`` of training time, so the step counts stay equal. Each model has its own AdamW (weight
decay 0.01 for the EBT, 0 for the DiT, as in the reference's scripts; the EBT's α in its own group), linear warm-up
then cosine decay to a tenth, gradients clipped at 1.0.

Evaluation: ``--eval-images`` validation crops (a photo neither model trained on), corrupted once per noise level with
a fixed seed, the same noisy images for both models. PSNR (dB, [0, 1] units, of the mean squared error over the
images, see ``images.psnr``) against forward passes per image: EBT ``steps × candidates`` (descent steps 1–8,
candidates 1, 2, 4), DiT reverse steps from t* (5 … 200; above t* + 1 the chain is repeated on its own output, as
the reference's ``infer_recurse_diffusion_n_times``; at the levels other than the training one, ``--dit-level-steps``,
100 by default). FLOPs per denoised image: ``torch.utils.flop_counter`` over
one image's whole denoising call for the EBT (its input-gradient backward included), and over one network
evaluation times the passes for the DiT (the same count: its sampler's arithmetic is element-wise, not counted).
Wall time: the call on all evaluation images, divided by their number.

Output: the JSON (``--json``) with ``noisy_psnr``, ``ebt`` and ``dit`` (rows at the training level), ``parameters``,
``levels`` (the same rows at every ``--levels`` entry: the thinking table), ``training``, ``targets``; the picture
grid noisy / EBT / DiT / clean (``--output-dir``/denoise_grid.png) and the tables on stdout.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import images
from .bench import Target, _fmt, _json_safe, format_table, log, source_revision
from .training import ebt_optimizer_groups

if TYPE_CHECKING:  # diffusers (the `vision` extra) is imported only when the DiT is built
    from .dit_baseline import DiTDenoiser

MODELS = ("ebt", "dit")
QUICK = dict(size=8, patch_size=2, hidden_size=32, num_layers=2, num_heads=2, batch_size=4, max_steps=3,
             eval_images=4, ebt_steps=[1, 2], candidates=[1, 2], dit_steps=[5, 100, 200], stride=8)


# --- command line -------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _models(text: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    for name in names:
        if name not in MODELS:
            raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(MODELS)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="tiny sizes and a few steps, for a smoke test")
    p.add_argument("--models", type=_models, default=list(MODELS), help="ebt,dit (default both)")
    p.add_argument("--size", type=int, default=16, help="crop size in pixels (default 16)")
    p.add_argument("--scale", type=float, default=None,
                   help="downscaling of the photos before cropping (default size / 64: a crop covers 64×64 pixels of "
                        "the photo)")
    p.add_argument("--stride", type=int, default=None, help="crop grid step (default size // 2)")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=128, help="the EBT's width (the DiT is matched in parameters)")
    p.add_argument("--num-layers", type=int, default=4, help="depth of both models (the DiT's moves if it must)")
    p.add_argument("--num-heads", type=int, default=4, help="attention heads of both models")
    p.add_argument("--ebt-config", type=json.loads, default={},
                   help="extra EBTVisionConfig fields as a JSON object, e.g. '{\"mcmc_step_size\": 100}'")
    p.add_argument("--dit-parameters", type=int, default=None,
                   help="the DiT's parameter target (default: the EBT's count; needed with --models dit)")
    p.add_argument("--level", type=float, default=images.DEFAULT_NOISE_LEVEL, help="training noise level (0.2)")
    p.add_argument("--levels", type=_floats, default=[0.1, 0.2, 0.3], help="evaluation noise levels")
    p.add_argument("--max-steps", type=int, default=1000, help="training steps of each model (default 1000)")
    p.add_argument("--minutes", type=float, default=20.0, help="cap on each model's training time (default 20)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--ebt-lr", type=float, default=1e-3)
    p.add_argument("--dit-lr", type=float, default=1e-3)
    p.add_argument("--warmup-steps", type=int, default=None, help="default: a tenth of --max-steps, at most 200")
    p.add_argument("--eval-images", type=int, default=32, help="validation crops evaluated (evenly spaced)")
    p.add_argument("--ebt-steps", type=_ints, default=list(range(1, 9)), help="EBT descent steps (1..8)")
    p.add_argument("--candidates", type=_ints, default=[1, 2, 4], help="EBT candidates (1,2,4)")
    p.add_argument("--dit-steps", type=_ints, default=[5, 10, 25, 50, 100, 200],
                   help="DiT forward passes at the training level")
    p.add_argument("--dit-level-steps", type=_ints, default=[100],
                   help="DiT forward passes at the other levels (default 100, the reference's chain)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", default="bench_denoise", help="where the picture grid goes (default bench_denoise)")
    p.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")


def finalize_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Checks across options (--quick's values are the subcommand's defaults, set by bench.build_parser)."""
    if args.scale is None:
        args.scale = args.size / 64
    if args.size % args.patch_size:
        parser.error(f"--size {args.size} is not a multiple of --patch-size {args.patch_size}")
    if args.level not in args.levels:
        args.levels = sorted([*args.levels, args.level])
    for name in ("max_steps", "batch_size", "eval_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if "ebt" not in args.models and args.dit_parameters is None:
        parser.error("--models dit needs --dit-parameters (the EBT's count is what the DiT is matched to)")
    return args


# --- models -------------------------------------------------------------------------------------------------------


def ebt_classes():
    """EBTVisionConfig and EBTForImageDenoising from this checkout, or a clear error."""
    import modeling_ebt

    try:
        return modeling_ebt.EBTVisionConfig, modeling_ebt.EBTForImageDenoising
    except AttributeError as error:
        raise RuntimeError(
            "modeling_ebt has no EBTForImageDenoising/EBTVisionConfig in this checkout; run the DiT alone with "
            "--models dit --dit-parameters N"
        ) from error


def build_ebt(args):
    config_class, model_class = ebt_classes()
    config = config_class(image_size=args.size, patch_size=args.patch_size, num_channels=3,
                          hidden_size=args.hidden_size, num_hidden_layers=args.num_layers,
                          num_attention_heads=args.num_heads, **args.ebt_config)
    return model_class(config)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def build_models(args) -> dict[str, torch.nn.Module]:
    models = {}
    if "ebt" in args.models:
        torch.manual_seed(args.seed)
        models["ebt"] = build_ebt(args)
    if "dit" in args.models:
        from .dit_baseline import DiTDenoiser

        target = args.dit_parameters or count_parameters(models["ebt"])
        torch.manual_seed(args.seed)
        models["dit"] = DiTDenoiser.with_parameters(target, args.size, args.patch_size, num_layers=args.num_layers,
                                                    num_heads=args.num_heads, train_level=args.level)
    return models


def optimizer_for(name: str, model: torch.nn.Module, args) -> torch.optim.Optimizer:
    if name == "ebt":
        return torch.optim.AdamW(ebt_optimizer_groups(model, weight_decay=0.01, learning_rate=args.ebt_lr))
    return torch.optim.AdamW(model.parameters(), lr=args.dit_lr, weight_decay=0.0)


def warmup_cosine(optimizer, warmup: int, total: int):
    """Linear warm-up over `warmup` steps, then cosine decay to a tenth of the peak at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- training -----------------------------------------------------------------------------------------------------


def training_loss(name: str, model, clean: torch.Tensor, args, generator: torch.Generator) -> torch.Tensor:
    if name == "ebt":
        noisy = images.add_noise(clean, args.level, generator)
        return model(pixel_values=noisy, labels=clean).loss
    return model(clean, generator=generator)


def train(models: dict, train_images: torch.Tensor, args) -> dict:
    """Both models step by step on the same batch; stop at --max-steps or when either used --minutes."""
    warmup = args.warmup_steps if args.warmup_steps is not None else min(200, max(1, args.max_steps // 10))
    optimizers = {name: optimizer_for(name, model, args) for name, model in models.items()}
    schedules = {name: warmup_cosine(optimizer, warmup, args.max_steps) for name, optimizer in optimizers.items()}
    generators = {name: torch.Generator().manual_seed(args.seed + 1 + index) for index, name in enumerate(models)}
    batches = torch.Generator().manual_seed(args.seed)
    seconds = dict.fromkeys(models, 0.0)
    losses = {name: [] for name in models}
    for model in models.values():
        model.train()
    steps = 0
    while steps < args.max_steps and max(seconds.values()) < args.minutes * 60:
        clean = train_images[torch.randint(0, len(train_images), (args.batch_size,), generator=batches)]
        for name, model in models.items():
            start = time.perf_counter()
            loss = training_loss(name, model, clean, args, generators[name])
            optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizers[name].step()
            schedules[name].step()
            seconds[name] += time.perf_counter() - start
            losses[name].append(loss.item())
        steps += 1
        if steps % max(1, args.max_steps // 10) == 0:
            log(f"step {steps}: " + ", ".join(f"{name} loss {values[-1]:.4g}" for name, values in losses.items()))
    for model in models.values():
        model.eval()
    return dict(steps=steps, warmup_steps=warmup, batch_size=args.batch_size, seconds=seconds,
                first_loss={name: values[0] for name, values in losses.items()},
                last_loss={name: sum(values[-10:]) / len(values[-10:]) for name, values in losses.items()})


# --- evaluation ---------------------------------------------------------------------------------------------------


def evaluation_images(validation, count: int) -> torch.Tensor:
    """`count` crops evenly spaced over the validation photo (all of them when it has fewer)."""
    pixels = validation[:]["pixel_values"]
    if count >= len(pixels):
        return pixels
    return pixels[torch.linspace(0, len(pixels) - 1, count).round().long()]


def noisy_images(clean: torch.Tensor, level: float, seed: int) -> torch.Tensor:
    return images.add_noise(clean, level, torch.Generator().manual_seed(seed + 1000 + round(level * 1000)))


def dit_schedule(passes: int, t_star: int) -> tuple[int, int]:
    """(steps, repeats) with steps × repeats = passes and steps <= t* + 1 (the reference's recursion above that)."""
    repeats = math.ceil(passes / (t_star + 1))
    if passes % repeats:
        raise ValueError(f"{passes} DiT passes cannot be split into {repeats} chains of at most {t_star + 1} steps")
    return passes // repeats, repeats


def ebt_denoise(model, noisy, steps: int, candidates: int, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return model.denoise(noisy, steps=steps, num_candidates=candidates).images.detach()


def dit_denoise(model: DiTDenoiser, noisy, level: float, passes: int) -> torch.Tensor:
    steps, repeats = dit_schedule(passes, model.timestep_for_level(level))
    return model.denoise(noisy, level=level, steps=steps, repeats=repeats).images


def flops_of(call) -> int:
    with FlopCounterMode(display=False) as counter:
        call()
    return counter.get_total_flops()


def measured_row(denoise, clean, noisy, passes: int, flops: float | None, **fields) -> tuple[dict, torch.Tensor]:
    start = time.perf_counter()
    denoised = denoise(noisy)
    wall = time.perf_counter() - start
    return dict(forward_passes=passes, psnr=float(images.psnr(denoised, clean)), mse=float(images.mse(denoised, clean)),
                flops=flops, seconds_per_image=wall / len(noisy), **fields), denoised


def dit_flops_per_pass(model: DiTDenoiser, noisy: torch.Tensor, level: float) -> float:
    """One network evaluation on one image: a DiT denoising call costs exactly passes × this (the sampler's own
    arithmetic is element-wise, which the FLOP counter does not count; tests/test_bench_denoise.py checks it)."""
    return float(flops_of(lambda: model.denoise(noisy[:1], level=level, steps=1)))


def evaluate_ebt(model, clean, noisy, args, count_flops: bool) -> tuple[list[dict], dict]:
    rows, pictures = [], {}
    for candidates in args.candidates:
        for steps in args.ebt_steps:
            call = lambda x, s=steps, c=candidates: ebt_denoise(model, x, s, c, args.seed)  # noqa: E731
            flops = float(flops_of(lambda c=call: c(noisy[:1]))) if count_flops else None
            row, denoised = measured_row(call, clean, noisy, steps * candidates, flops, steps=steps,
                                         candidates=candidates)
            rows.append(row)
            pictures[("ebt", steps, candidates)] = denoised
    return rows, pictures


def evaluate_dit(model: DiTDenoiser, clean, noisy, level: float, args, count_flops: bool) -> tuple[list[dict], dict]:
    rows, pictures = [], {}
    per_pass = dit_flops_per_pass(model, noisy, level)
    t_star = model.timestep_for_level(level)
    for passes in args.dit_steps if level == args.level else args.dit_level_steps:
        call = lambda x, p=passes: dit_denoise(model, x, level, p)  # noqa: E731
        steps, repeats = dit_schedule(passes, t_star)
        flops = per_pass * passes
        row, denoised = measured_row(call, clean, noisy, passes, flops, steps=steps, repeats=repeats, t_star=t_star)
        rows.append(row)
        pictures[("dit", passes)] = denoised
    return rows, pictures


def evaluate_level(models: dict, clean: torch.Tensor, level: float, args, count_flops: bool) -> tuple[dict, dict]:
    noisy = noisy_images(clean, level, args.seed)
    result = dict(level=level, noise_std=images.noise_std(level), noisy_psnr=float(images.psnr(noisy, clean)))
    pictures = {"noisy": noisy}
    if "ebt" in models:
        result["ebt"], found = evaluate_ebt(models["ebt"], clean, noisy, args, count_flops)
        pictures.update(found)
    if "dit" in models:
        result["dit"], found = evaluate_dit(models["dit"], clean, noisy, level, args, count_flops)
        pictures.update(found)
    return result, pictures


def _with_flops_from(rows: list[dict], reference: list[dict]) -> list[dict]:
    """FLOPs do not depend on the noise level (same calls): copy them from the training level's rows."""
    return [dict(row, flops=ref["flops"]) for row, ref in zip(rows, reference)]


def best(rows: list[dict], passes_at_most: int | None = None, passes_at_least: int | None = None) -> dict | None:
    chosen = [row for row in rows if (passes_at_most is None or row["forward_passes"] <= passes_at_most)
              and (passes_at_least is None or row["forward_passes"] >= passes_at_least)]
    return max(chosen, key=lambda row: row["psnr"], default=None)


def targets(result: dict) -> list[Target]:
    ebt, dit = result.get("ebt", []), result.get("dit", [])
    ebt_few, dit_many = best(ebt, passes_at_most=3), best(dit, passes_at_least=100)
    found = []
    if ebt_few and dit_many:
        found.append(Target("EBT best PSNR at <= 3 passes - DiT best at >= 100 (dB)",
                            ebt_few["psnr"] - dit_many["psnr"], ">=", 0.0))
        flops = ebt_few["flops"] / dit_many["flops"] if ebt_few["flops"] and dit_many["flops"] else None
        found.append(Target("EBT FLOPs / DiT FLOPs per image (those two rows)", flops, "<=", 0.05))
    for name, row in (("EBT", best(ebt)), ("DiT", best(dit))):
        if row:
            found.append(Target(f"{name} best PSNR - noisy input PSNR (dB)", row["psnr"] - result["noisy_psnr"],
                                ">=", 3.0))
    return found


# --- reporting ----------------------------------------------------------------------------------------------------


def print_level(result: dict) -> None:
    print(f"\nnoise level {result['level']} (σ = {result['noise_std']:.3f} in [-1, 1]): noisy input PSNR "
          f"{result['noisy_psnr']:.2f} dB")
    rows = []
    for row in result.get("ebt", []):
        rows.append(["EBT", f"{row['steps']} steps × {row['candidates']}", row["forward_passes"], f"{row['psnr']:.2f}",
                     _fmt(row["flops"]), _fmt(row["seconds_per_image"], ".3g", 1e3)])
    for row in result.get("dit", []):
        rows.append(["DiT", f"t*={row['t_star']}, {row['steps']} × {row['repeats']}", row["forward_passes"],
                     f"{row['psnr']:.2f}", _fmt(row["flops"]), _fmt(row["seconds_per_image"], ".3g", 1e3)])
    print(format_table(["model", "schedule", "forward passes", "PSNR dB", "FLOPs/image", "ms/image"], rows))


def thinking_table(levels: dict) -> str:
    """EBT PSNR by (steps, candidates) at each level, and its gain over the first row."""
    keys = [(row["steps"], row["candidates"]) for row in next(iter(levels.values())).get("ebt", [])]
    headers = ["steps × candidates"] + [f"level {level}" for level in levels]
    rows = []
    for index, (steps, candidates) in enumerate(keys):
        cells = []
        for result in levels.values():
            value, first = result["ebt"][index]["psnr"], result["ebt"][0]["psnr"]
            cells.append(f"{value:.2f} ({value - first:+.2f})")
        rows.append([f"{steps} × {candidates}"] + cells)
    return format_table(headers, rows)


def save_grid(pictures: dict, clean: torch.Tensor, result: dict, path: Path, columns: int = 8) -> Path | None:
    rows = {"noisy": pictures["noisy"][:columns]}
    ebt_row, dit_row = best(result.get("ebt", []), passes_at_most=3), best(result.get("dit", []), passes_at_least=100)
    if ebt_row:
        rows[f"EBT {ebt_row['forward_passes']}"] = pictures[("ebt", ebt_row["steps"], ebt_row["candidates"])][:columns]
    if dit_row:
        rows[f"DiT {dit_row['forward_passes']}"] = pictures[("dit", dit_row["forward_passes"])][:columns]
    rows["clean"] = clean[:columns]
    return images.save_image_grid(rows, path, label_width=72)


def run(args) -> dict:
    start = time.time()
    revision = source_revision()
    if args.threads:
        torch.set_num_threads(args.threads)
    splits = images.load_denoising_splits(size=args.size, stride=args.stride, scale=args.scale)
    train_images = splits["train"][:]["pixel_values"]
    clean = evaluation_images(splits["validation"], args.eval_images)
    models = build_models(args)
    parameters = {name: count_parameters(model) for name, model in models.items()}
    log(f"parameters {parameters}; {len(train_images)} training crops, {len(clean)} evaluation crops")
    training = train(models, train_images, args)
    levels = {}
    for level in args.levels:
        log(f"evaluating at noise level {level}")
        levels[level], pictures = evaluate_level(models, clean, level, args, count_flops=level == args.level)
        if level == args.level:
            grid = save_grid(pictures, clean, levels[level], Path(args.output_dir) / "denoise_grid.png")
    for level, result in levels.items():
        if "ebt" in result and level != args.level:
            result["ebt"] = _with_flops_from(result["ebt"], levels[args.level]["ebt"])
    main = levels[args.level]
    found = targets(main)
    payload = dict(
        command="denoise", noisy_psnr=main["noisy_psnr"], ebt=main.get("ebt", []), dit=main.get("dit", []),
        parameters=dict(ebt=parameters.get("ebt"), dit=parameters.get("dit")),
        parameter_ratio=parameters["dit"] / parameters["ebt"] if len(parameters) == 2 else None,
        levels={str(level): result for level, result in levels.items()}, training=training,
        targets=[target.as_dict() for target in found], picture=str(grid), args=vars(args),
        environment=dict(torch=torch.__version__, threads=torch.get_num_threads(), source_revision=revision),
        elapsed_s=time.time() - start,
    )
    report(payload, levels, found)
    if args.json:
        Path(args.json).write_text(json.dumps(_json_safe(payload), indent=2) + "\n")
        log(f"figures written to {args.json}")
    return payload


def report(payload: dict, levels: dict, found: list[Target]) -> None:
    training = payload["training"]
    print(f"parameters: {payload['parameters']}; trained {training['steps']} steps of batch {training['batch_size']} "
          f"(seconds {', '.join(f'{k} {v:.0f}' for k, v in training['seconds'].items())}; final losses "
          f"{', '.join(f'{k} {v:.4g}' for k, v in training['last_loss'].items())})")
    for result in levels.values():
        print_level(result)
    if any("ebt" in result for result in levels.values()):
        print("\nthinking: EBT PSNR dB by descent steps × candidates (gain over the first row)")
        print(thinking_table(levels))
    print()
    for target in found:
        print(target.line())
    print(f"picture grid: {payload['picture']}")
