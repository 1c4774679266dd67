"""The image denoiser: EBTVisionConfig, EBTImageProcessor, EBTVisionModel / EBTForImageDenoising (shapes, the 2-D
rotary code, the descent and its gradient, candidates, errors), the Auto classes, remote code, the Trainer and the
`ebt train --task denoise` / `ebt eval` commands, all on tiny models."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageToImage,
    Trainer,
    TrainingArguments,
)

from modeling_ebt import EBTForImageDenoising, EBTImageProcessor, EBTVisionConfig, EBTVisionModel, ThinkingConfig
from modeling_ebt.cli import main
from modeling_ebt.image_processing_ebt import patchify, unpatchify
from modeling_ebt.modeling_ebt import apply_rotary, hashed_normal


def tiny_vision_config(**overrides) -> EBTVisionConfig:
    fields = dict(image_size=8, patch_size=2, num_channels=3, hidden_size=16, num_attention_heads=2,
                  num_hidden_layers=2, mcmc_num_steps=2, mcmc_step_size=2.0)
    fields.update(overrides)
    return EBTVisionConfig(**fields)


def tiny_denoiser(seed=0, head_scale=1.0, dtype=torch.float32, **overrides) -> EBTForImageDenoising:
    """A tiny denoiser whose energy head is random (an untrained one's is zero: a flat energy)."""
    torch.manual_seed(seed)
    model = EBTForImageDenoising(tiny_vision_config(**overrides)).to(dtype).eval()
    with torch.no_grad():
        model.model.energy_head.weight.normal_(0, head_scale)
    return model


def images(batch=3, size=8, channels=3, seed=1, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1).to(dtype)


# --- config and processor ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value, message", [
    ("patch_size", 3, "patch_size=3 is invalid: expected a divisor of image_size=8"),
    ("hidden_size", 12, "hidden_size=12 is invalid: .*multiple of 4"),
    ("num_channels", 0, "num_channels=0 is invalid"),
    ("noise_level", 1.5, r"noise_level=1.5 is invalid: expected a number in \(0, 1\]"),
    ("loss_type", "huber", "loss_type='huber' is invalid"),
    ("ebt_type", "adaln", "ebt_type='adaln' is invalid"),
    ("mcmc_step_size", 0.0, "mcmc_step_size=0.0 is invalid"),
    ("randomize_mcmc_step_size_scale", 0.5, "randomize_mcmc_step_size_scale=0.5 is invalid"),
    ("truncate_mcmc", "yes", "truncate_mcmc='yes' is invalid"),
])
def test_config_rejects_bad_fields(field, value, message):
    with pytest.raises(ValueError, match=f"EBTVisionConfig.{message}"):
        tiny_vision_config(**{field: value})
    config = tiny_vision_config()
    if field not in ("patch_size", "hidden_size"):  # relations are checked by validate(), fields on assignment
        with pytest.raises(ValueError, match=message):
            setattr(config, field, value)


def test_config_defaults_and_derived_values():
    config = EBTVisionConfig()
    assert (config.intermediate_size, config.num_key_value_heads) == (config.hidden_size, config.num_attention_heads)
    assert config.num_patches == (32 // 4) ** 2 and config.num_landscapes == 2 and config.evaluation_steps == 2
    assert tiny_vision_config(ebt_type="default").num_landscapes == 1


def test_patchify_matches_crops_and_inverts():
    pixels = images(batch=2, size=8)
    patches = patchify(pixels, 2)
    assert patches.shape == (2, 16, 12)
    for index in (0, 5, 15):
        row, col = divmod(index, 4)
        torch.testing.assert_close(patches[:, index], pixels[:, :, 2 * row:2 * row + 2, 2 * col:2 * col + 2].flatten(1))
    assert torch.equal(unpatchify(patches, 2, 3, 8, 8), pixels)
    with pytest.raises(ValueError, match="do not split into patches of 3×3"):
        patchify(pixels, 3)


def test_image_processor_normalises_and_round_trips(tmp_path):
    processor = EBTImageProcessor.for_config(tiny_vision_config())
    picture = np.random.default_rng(0).integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
    pixels = processor([Image.fromarray(picture)], return_tensors="pt").pixel_values
    torch.testing.assert_close(pixels[0], torch.from_numpy(picture).permute(2, 0, 1).float() / 127.5 - 1)
    assert np.array_equal(processor.postprocess(pixels)[0], picture)
    big = processor([Image.fromarray(np.zeros((20, 30, 3), np.uint8))], return_tensors="pt").pixel_values
    assert big.shape == (1, 3, 8, 8) and bool((big == -1).all())
    assert torch.equal(processor.unpatchify(processor.patchify(pixels)), pixels)
    processor.save_pretrained(tmp_path)
    loaded = EBTImageProcessor.from_pretrained(tmp_path)
    assert loaded.patch_size == 2 and dict(loaded.size)["height"] == 8
    assert json.loads((tmp_path / "preprocessor_config.json").read_text())["image_processor_type"] == \
        "EBTImageProcessor"


# --- the energy function -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ebt_type", ["default", "time_embed"])
def test_shapes(ebt_type):
    model = tiny_denoiser(ebt_type=ebt_type)
    clean = images()
    noisy = clean + 0.3 * torch.randn_like(clean)
    out = model(pixel_values=noisy, labels=clean)
    steps = 2
    assert out.images.shape == clean.shape and out.step_images.shape == (steps, *clean.shape)
    assert out.energies.shape == (steps, 3) and out.step_losses.shape == (steps,)
    assert out.descent_steps.tolist() == [steps] * 3 and out.loss.dim() == 0
    torch.testing.assert_close(out.loss, out.step_losses.mean())
    base = model.model(pixel_values=noisy)
    assert base.patch_energies.shape == (3, 16)
    torch.testing.assert_close(base.energies, base.patch_energies.mean(dim=1))
    torch.testing.assert_close(out.energies[0], base.energies)


def test_untrained_denoiser_returns_its_input():
    """The energy head starts at zero, as the reference's: E is flat, the descent does not move the image."""
    torch.manual_seed(0)
    model = EBTForImageDenoising(tiny_vision_config(mcmc_step_size=1000.0))
    noisy = images()
    assert torch.equal(model.denoise(noisy).images, noisy)


def test_rotary_2d_scores_depend_only_on_the_offset():
    """q·k after the 2-D rotation is a function of (Δrow, Δcol): shifting both tokens leaves it unchanged."""
    model = tiny_denoiser(hidden_size=32, num_attention_heads=2)
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64).unbind(0)

    def score(pos_q, pos_k):
        rows, cols = torch.tensor([pos_q[0], pos_k[0]]), torch.tensor([pos_q[1], pos_k[1]])
        cos, sin = model.model.rotary_emb(q, rows, cols)
        return float((apply_rotary(q, cos[:, :1], sin[:, :1]) * apply_rotary(k, cos[:, 1:], sin[:, 1:])).sum())

    assert score((1, 2), (3, 1)) == pytest.approx(score((4, 6), (6, 5)), abs=1e-6)  # float32 angles
    assert score((1, 2), (3, 1)) != pytest.approx(score((1, 2), (1, 3)), abs=1e-6)  # another offset, another score
    assert score((0, 0), (2, 0)) != pytest.approx(score((0, 0), (0, 2)), abs=1e-6)  # rows and columns differ
    assert score((0, 0), (0, 2)) != pytest.approx(score((0, 0), (0, 0)), abs=1e-6)  # columns count too


def test_rotary_2d_angles():
    """Pair i < head_dim / 4 turns by row · θ_i, pair head_dim / 4 + i by column · θ_i, θ_i = theta^(−4i / head_dim),
    in the split-halves layout (dimension j and j + head_dim / 2 form a pair)."""
    model = tiny_denoiser(hidden_size=32, num_attention_heads=2)  # head_dim 16: 4 frequencies per axis
    rows, cols = torch.tensor([0, 3, 1]), torch.tensor([0, 2, 5])
    cos, sin = model.model.rotary_emb(torch.zeros(1), rows, cols)
    theta = 10000.0 ** (-torch.arange(4) * 4 / 16)
    angles = torch.cat((rows[:, None] * theta, cols[:, None] * theta), dim=1)  # tokens × 8 pairs
    torch.testing.assert_close(cos[0], torch.cat((angles, angles), dim=1).cos())
    torch.testing.assert_close(sin[0], torch.cat((angles, angles), dim=1).sin())
    patch_rows, patch_cols = model.model.grid_positions("cpu")
    assert (patch_rows[:6].tolist(), patch_cols[:6].tolist()) == ([0, 1, 1, 1, 1, 2], [0, 1, 2, 3, 4, 1])


def test_energy_gradient_matches_finite_differences():
    model = tiny_denoiser(dtype=torch.float64)
    x = images(batch=2, dtype=torch.float64).requires_grad_()
    probs, energy, grad = model.energy_gradient(model.model.energy, x, 1, False, False)
    x = x.detach()
    direction = torch.randn_like(x)
    eps = 1e-6
    numeric = (model.model.energy(x + eps * direction, 1) - model.model.energy(x - eps * direction, 1)) / (2 * eps)
    torch.testing.assert_close((grad * direction).flatten(1).sum(1), numeric, rtol=1e-6, atol=1e-9)
    assert torch.equal(probs, x)  # images descend on the pixels themselves


def test_descent_step_is_x_minus_alpha_gradient():
    model = tiny_denoiser(dtype=torch.float64)
    x = images(dtype=torch.float64)
    out = model.denoise(x, steps=1, step_size=0.5)
    xr = x.clone().requires_grad_()
    (grad,) = torch.autograd.grad(model.model.energy(xr, 0).sum(), xr)
    torch.testing.assert_close(out.images, x - 0.5 * grad)


def test_descent_lowers_the_energy():
    model = tiny_denoiser(dtype=torch.float64, head_scale=3.0)
    out = model.denoise(images(batch=4, dtype=torch.float64), steps=6, step_size=0.01)
    energies = torch.cat((out.energies, out.final_energies[None]))  # before each step, then after the last
    assert bool((energies[1:] < energies[:-1]).all()), energies


def test_candidates_keep_the_lowest_final_energy():
    """Against an independent computation: each candidate's start descended alone, the lowest energy picked."""
    model = tiny_denoiser(dtype=torch.float64, head_scale=3.0)
    noisy = images(batch=4, dtype=torch.float64)
    out = model.denoise(noisy, steps=3, num_candidates=3, candidate_noise=0.5)
    perturbations = [torch.zeros_like(noisy[0])] + [hashed_normal(torch.tensor([c]), noisy[0].numel(), seed=1)
                                                     .view_as(noisy[0]).double() for c in (1, 2)]
    alone = [model.denoise(noisy + 0.5 * p, steps=3) for p in perturbations]
    finals = torch.stack([a.final_energies for a in alone])  # candidates × batch
    best = finals.argmin(dim=0)
    assert len(set(best.tolist())) > 1, "the test needs images whose best candidate differs"
    torch.testing.assert_close(out.final_energies, finals.min(dim=0).values)
    for i, c in enumerate(best.tolist()):
        torch.testing.assert_close(out.images[i], alone[c].images[i])
        torch.testing.assert_close(out.energies[:, i], alone[c].energies[:, i])
    assert bool((out.final_energies <= alone[0].final_energies).all())


def test_denoising_is_the_same_alone_or_in_a_batch():
    model = tiny_denoiser(head_scale=3.0)
    noisy = images(batch=4)
    batched = model.denoise(noisy, steps=2, num_candidates=2)
    single = model.denoise(noisy[2:3], steps=2, num_candidates=2)
    torch.testing.assert_close(batched.images[2:3], single.images)


def test_energy_tolerance_stops_each_image():
    model = tiny_denoiser(dtype=torch.float64, head_scale=3.0)
    noisy = images(dtype=torch.float64)
    stopped = model.denoise(noisy, steps=5, energy_tolerance=1e9, step_size=0.05)
    assert stopped.descent_steps.tolist() == [1, 1, 1]
    torch.testing.assert_close(stopped.images, model.denoise(noisy, steps=1, step_size=0.05).images)
    never = model.denoise(noisy, steps=5, energy_tolerance=0.0, step_size=0.05)
    torch.testing.assert_close(never.images, model.denoise(noisy, steps=5, step_size=0.05).images)


def test_thinking_options_act():
    model = tiny_denoiser(head_scale=3.0)
    noisy = images()
    plain = model.denoise(noisy, steps=2)
    assert not torch.allclose(model.denoise(noisy, steps=2, langevin_noise=0.1).images, plain.images)
    assert model.denoise(noisy, steps=5).step_images.shape[0] == 5  # past the 2 landscapes: the last one repeats
    with torch.inference_mode():
        torch.testing.assert_close(model.denoise(noisy, steps=2).images, plain.images)


@pytest.mark.parametrize("option", ["truncate_mcmc", "no_mcmc_detach", "randomize", "checkpointing"])
def test_training_options(option):
    overrides = {"truncate_mcmc": dict(truncate_mcmc=True), "no_mcmc_detach": dict(no_mcmc_detach=True),
                 "randomize": dict(randomize_mcmc_num_steps=2, randomize_mcmc_step_size_scale=2.0),
                 "checkpointing": {}}[option]
    model = tiny_denoiser(**overrides).train()
    clean = images()
    noisy = clean + 0.3 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    out = model(pixel_values=noisy, labels=clean)
    out.loss.backward()
    assert model.alpha.grad is not None and torch.isfinite(model.alpha.grad)
    if option == "truncate_mcmc":
        torch.testing.assert_close(out.loss, out.step_losses[-1])
    if option == "randomize":
        counts = set()
        for seed in range(8):
            torch.manual_seed(seed)
            counts.add(model(pixel_values=noisy, labels=clean).step_images.shape[0])
        assert counts <= {2, 3, 4} and len(counts) > 1
        model.eval()
        assert model(pixel_values=noisy).step_images.shape[0] == 4  # evaluation: the most steps training draws
    if option == "checkpointing":
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        model.activation_checkpointing_enable()
        again = model(pixel_values=noisy, labels=clean)
        again.loss.backward()
        torch.testing.assert_close(again.loss, out.loss)
        for name, grad in grads.items():
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, msg=name)


@pytest.mark.parametrize("pixels, error, message", [
    (torch.zeros(2, 3, 16, 16), ValueError, "has 16×16 pixels, the model reads 8×8"),
    (torch.zeros(2, 1, 8, 8), ValueError, "has 1 channels, the model reads 3"),
    (torch.full((2, 3, 8, 8), float("nan")), ValueError, "contains NaN or infinite values"),
    (torch.zeros(2, 3, 8, 8, dtype=torch.uint8), TypeError, "must be floating point .* EBTImageProcessor"),
    (torch.zeros(3, 8, 8), ValueError, r"non-empty batch × 3 × 8 × 8 tensor, got shape \(3, 8, 8\)"),
    (np.zeros((2, 3, 8, 8), np.float32), TypeError, "must be a torch.Tensor"),
])
def test_bad_pixel_values(pixels, error, message):
    model = tiny_denoiser()
    with pytest.raises(error, match=message):
        model(pixel_values=pixels)
    with pytest.raises(error, match=message):
        model.denoise(pixels)


def test_bad_labels_and_knobs():
    model = tiny_denoiser()
    noisy = images()
    with pytest.raises(ValueError, match="labels .* must have the shape of pixel_values"):
        model(pixel_values=noisy, labels=noisy[:2])
    labels = noisy.clone()
    labels[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="labels contains NaN"):
        model(pixel_values=noisy, labels=labels)
    with pytest.raises(ValueError, match="num_candidates=0 is invalid"):
        model.denoise(noisy, num_candidates=0)
    with pytest.raises(ValueError, match="candidate_noise must be a number >= 0"):
        model.denoise(noisy, num_candidates=2, candidate_noise=-1.0)
    with pytest.raises(ValueError, match="recompute applies to language"):
        model(pixel_values=noisy, thinking=ThinkingConfig(recompute=True))
    with pytest.raises(FloatingPointError, match="non-finite update .* lower mcmc_step_size"):
        tiny_denoiser(head_scale=3.0).denoise(noisy, step_size=1e300)


# --- saving, loading, remote code ------------------------------------------------------------------------------


def test_auto_classes_round_trip_safetensors(tmp_path):
    model = tiny_denoiser()
    model.save_pretrained(tmp_path)
    EBTImageProcessor.for_config(model.config).save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not (tmp_path / "pytorch_model.bin").exists()
    assert type(AutoConfig.from_pretrained(tmp_path)) is EBTVisionConfig
    loaded = AutoModelForImageToImage.from_pretrained(tmp_path).eval()
    assert type(loaded) is EBTForImageDenoising and type(AutoModel.from_pretrained(tmp_path)) is EBTVisionModel
    assert type(AutoImageProcessor.from_pretrained(tmp_path)) is EBTImageProcessor
    noisy = images()
    assert torch.equal(loaded.denoise(noisy, num_candidates=2).images, model.denoise(noisy, num_candidates=2).images)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "ebt_vision"
    assert config["auto_map"]["AutoModelForImageToImage"] == "modeling_ebt_vision.EBTForImageDenoising"
    for name in ("modeling_ebt_vision.py", "modeling_ebt.py", "configuration_ebt_vision.py", "configuration_ebt.py",
                 "image_processing_ebt.py"):
        assert (tmp_path / name).is_file(), name


REMOTE_SCRIPT = '''
import importlib.abc
import sys


class BlockModelingEbt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "modeling_ebt" or name.startswith("modeling_ebt."):
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)


sys.meta_path.insert(0, BlockModelingEbt())
import torch
from transformers import AutoImageProcessor, AutoModel, AutoModelForImageToImage

source, inputs, out = sys.argv[1:4]
torch.set_num_threads(1)
model = AutoModelForImageToImage.from_pretrained(source, trust_remote_code=True).eval()
processor = AutoImageProcessor.from_pretrained(source, trust_remote_code=True)
noisy = torch.load(inputs)
result = {"images": model.denoise(noisy, steps=3, num_candidates=2).images,
          "classes": [type(x).__module__ + "." + type(x).__name__ for x in (model.config, model, processor)],
          "base": type(AutoModel.from_pretrained(source, trust_remote_code=True)).__name__,
          "modeling_ebt_loaded": any(name.split(".")[0] == "modeling_ebt" for name in sys.modules)}
torch.save(result, out)
'''


def test_remote_code_loads_without_the_package(tmp_path):
    model = tiny_denoiser()
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    EBTImageProcessor.for_config(model.config).save_pretrained(folder)
    noisy = images()
    torch.save(noisy, tmp_path / "noisy.pt")
    (tmp_path / "remote.py").write_text(REMOTE_SCRIPT)
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-I", str(tmp_path / "remote.py"), str(folder), str(tmp_path / "noisy.pt"),
                          str(tmp_path / "out.pt")], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    remote = torch.load(tmp_path / "out.pt", weights_only=False)
    assert torch.equal(remote["images"], model.denoise(noisy, steps=3, num_candidates=2).images)
    assert all(name.startswith("transformers_modules.") for name in remote["classes"]), remote["classes"]
    assert remote["base"] == "EBTVisionModel" and not remote["modeling_ebt_loaded"]


# --- training ------------------------------------------------------------------------------------------------


def test_stock_trainer_lowers_the_loss_on_a_fixed_batch(tmp_path):
    model = tiny_denoiser(head_scale=0.0).train()  # as constructed: a zero energy head
    clean = images(batch=8)
    noisy = clean * 0.8 + 0.4 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(2))
    rows = [{"pixel_values": n, "labels": c} for n, c in zip(noisy, clean)]
    with torch.no_grad():
        before = float(model(pixel_values=noisy, labels=clean).loss)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=15, per_device_train_batch_size=8,
                             learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    trainer.train()
    with torch.no_grad():
        after = model.eval()(pixel_values=noisy, labels=clean)
    assert float(after.loss) < 0.9 * before, (before, float(after.loss))
    predicted = trainer.predict(rows)  # the stock evaluation loop: predictions are the denoised images
    torch.testing.assert_close(torch.as_tensor(predicted.predictions), after.images)
    assert predicted.metrics["test_loss"] == pytest.approx(float(after.loss), rel=1e-5)


TINY_FLAGS = ["--model-arg", "image_size=8", "--model-arg", "patch_size=2", "--model-arg", "hidden_size=16",
              "--model-arg", "num_attention_heads=2", "--model-arg", "num_hidden_layers=1", "--batch-size", "8",
              "--eval-samples", "8", "--no-progress"]


def test_cli_trains_and_evaluates_a_denoiser(tmp_path, capsys):
    out = tmp_path / "denoiser"
    assert main(["train", "--task", "denoise", "--output-dir", str(out), "--max-steps", "3", *TINY_FLAGS]) == 0
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "training_summary.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["task"] == "denoise" and summary["steps"] == 3
    assert summary["eval"]["psnr"] > summary["eval"]["noisy_psnr"] - 1.0  # three steps: near the identity
    model = AutoModelForImageToImage.from_pretrained(out)
    assert model.config.image_size == 8 and type(AutoImageProcessor.from_pretrained(out)) is EBTImageProcessor
    assert main(["eval", str(out), "--steps", "1,2", "--candidates", "1,2", "--noise-levels", "0.1,0.3",
                 "--eval-samples", "8"]) == 0
    report = json.loads((out / "denoise_eval.json").read_text())
    assert set(report["levels"]) == {"0.1", "0.3"}
    low, high = report["levels"]["0.1"], report["levels"]["0.3"]
    assert set(low["by_steps"]) == {"1", "2"} and set(low["by_candidates"]) == {"1", "2"}
    assert low["noisy_psnr"] > high["noisy_psnr"]  # more noise, lower PSNR
    assert {"psnr", "mse", "forward_passes"} <= set(low["by_steps"]["2"])


def test_cli_rejects_language_options_for_denoising(tmp_path, capsys):
    assert main(["train", "--task", "denoise", "--output-dir", str(tmp_path / "x"), "--max-steps", "1",
                 "--corpus", "some.txt"]) == 1
    assert "--corpus does not apply to --task denoise" in capsys.readouterr().err


# --- the denoiser's run folder: no token on disk, checkpoints and the final save renamed into place ---------------


def test_a_denoising_run_writes_no_token_and_only_complete_checkpoints(tmp_path):
    from modeling_ebt.checkpointing import is_complete_checkpoint

    token = "hf_FakeTokenForTheVisionRunTest4321"
    out = tmp_path / "denoiser"
    assert main(["train", "--task", "denoise", "--output-dir", str(out), "--max-steps", "4", "--save-steps", "2",
                 "--training-arg", f"hub_token={token}", *TINY_FLAGS]) == 0
    written = [p for p in out.rglob("*") if p.is_file()]
    assert [p for p in written if token.encode() in p.read_bytes()] == []
    args = torch.load(out / "checkpoint-4" / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.max_steps == 4
    assert [p.name for p in out.iterdir() if p.name.startswith("tmp-")] == []
    assert is_complete_checkpoint(out / "checkpoint-2") and is_complete_checkpoint(out / "checkpoint-4")
    # the final model is the last step's weights
    final = AutoModelForImageToImage.from_pretrained(out)
    last = AutoModelForImageToImage.from_pretrained(out / "checkpoint-4")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), last.state_dict().values()))


def test_the_denoising_trainer_refuses_to_push_a_hub_token_and_stops_a_collapsed_step_size(tmp_path):
    from modeling_ebt.training import DescentCollapseError
    from modeling_ebt.training_vision import DenoisingTrainer

    args = TrainingArguments(output_dir=str(tmp_path), push_to_hub=True, hub_model_id="alice/x", report_to="none",
                             hub_token="hf_FakeTokenThatMustNotBeUploaded8765", use_cpu=True)
    with pytest.raises(ValueError, match="upload the token inside training_args.bin"):
        DenoisingTrainer(model=tiny_denoiser(), args=args)
    # α learnt down to its floor: the guard of the language trainer stops this one too, naming what to change
    model = tiny_denoiser().train()
    with torch.no_grad():
        model.alpha.fill_(1e-5)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to="none", use_cpu=True,
                             per_device_train_batch_size=2, save_strategy="no")
    rows = [{"pixel_values": x, "labels": x} for x in images(4)]
    with pytest.raises(DescentCollapseError, match="mcmc_step_size_lr_multiplier=9000"):
        DenoisingTrainer(model=model, args=args, train_dataset=rows).train()


def test_a_denoising_run_killed_in_its_final_save_leaves_no_partial_file_and_can_be_redone(tmp_path):
    out = tmp_path / "denoiser"
    flags = ["-m", "modeling_ebt.cli", "train", "--task", "denoise", "--output-dir", str(out), "--max-steps", "2",
             *TINY_FLAGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "EBT_FAULT_INJECTION": "final-file-committed=kill@1"}
    killed = subprocess.run([sys.executable, *flags], env=env, capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "training_summary.json").exists()  # the run is not marked finished
    assert (out / "tmp-final").is_dir() and len(list((out / "tmp-final").iterdir())) >= 2
    committed = [p.name for p in out.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors")]
    assert "model.safetensors" not in committed or "config.json" not in committed  # one file moved, not all
    assert main(["train", "--task", "denoise", "--output-dir", str(out), "--max-steps", "2", "--overwrite",
                 *TINY_FLAGS]) == 0
    assert not (out / "tmp-final").exists() and (out / "training_summary.json").is_file()
    assert AutoModelForImageToImage.from_pretrained(out).config.image_size == 8
