"""Tests of `python -m modeling_ebt.bench denoise` on tiny configurations (seconds): JSON schema and sanity of values.

The EBT half runs against a small energy-descent denoiser defined here with the API the bench is written against
(`Config(image_size=, patch_size=, num_channels=, hidden_size=, num_hidden_layers=, ...)`, `model(pixel_values=,
labels=).loss`, `model.denoise(noisy, steps=, num_candidates=).images`), so the bench is tested whether or not the
package's EBTForImageDenoising is in this checkout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import modeling_ebt
from modeling_ebt import bench, bench_denoise, images
from modeling_ebt.dit_baseline import DiTDenoiser

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class ToyVisionConfig:
    image_size: int
    patch_size: int
    num_channels: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int = 64
    mcmc_step_size: float = 0.5
    mcmc_num_steps: int = 2
    mcmc_step_size_lr_multiplier: float = 1.0


class ToyEnergyDenoiser(torch.nn.Module):
    """E(x) = mean over patches of an MLP's scalar output; x ← x − α ∂E/∂x from the noisy image; smooth L1 loss."""

    def __init__(self, config: ToyVisionConfig):
        super().__init__()
        self.config = config
        hidden, inner = config.hidden_size, config.intermediate_size
        self.embed = torch.nn.Linear(config.num_channels * config.patch_size**2, hidden)
        self.blocks = torch.nn.ModuleList(
            torch.nn.Sequential(torch.nn.Linear(hidden, inner), torch.nn.GELU(), torch.nn.Linear(inner, hidden))
            for _ in range(config.num_hidden_layers)
        )
        self.head = torch.nn.Linear(hidden, 1)
        self.alpha = torch.nn.Parameter(torch.tensor(config.mcmc_step_size))

    def energy(self, pixels):
        patches = torch.nn.functional.unfold(pixels, self.config.patch_size, stride=self.config.patch_size)
        hidden = self.embed(patches.transpose(1, 2))
        for block in self.blocks:
            hidden = hidden + block(hidden)
        return self.head(hidden).mean(dim=(1, 2))

    def descend(self, noisy, steps, create_graph):
        pixels, energies = noisy, []
        with torch.enable_grad():
            for _ in range(steps):
                pixels = pixels if create_graph else pixels.detach().requires_grad_()
                energy = self.energy(pixels)
                gradient = torch.autograd.grad(energy.sum(), pixels, create_graph=create_graph)[0]
                pixels = pixels - self.alpha * gradient
                energies.append(energy)
        return pixels, energies

    def forward(self, pixel_values, labels=None):
        images_out, _ = self.descend(pixel_values.requires_grad_(), self.config.mcmc_num_steps, create_graph=True)
        return SimpleNamespace(loss=torch.nn.functional.smooth_l1_loss(images_out, labels))

    def denoise(self, noisy, steps, num_candidates=1):
        starts = noisy.unsqueeze(0) + 0.01 * torch.randn(num_candidates, *noisy.shape) * (
            torch.arange(num_candidates) > 0).view(-1, 1, 1, 1, 1)
        outs, energies = self.descend(starts.flatten(0, 1), steps, create_graph=False)
        final = self.energy(outs).view(num_candidates, -1)
        chosen = final.argmin(dim=0)
        picked = outs.view(num_candidates, *noisy.shape)[chosen, torch.arange(noisy.shape[0])]
        return SimpleNamespace(images=picked.detach(), energies=energies)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ------------------------------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize("passes,t_star,expected", [(5, 99, (5, 1)), (100, 99, (100, 1)), (200, 99, (100, 2)),
                                                    (100, 49, (50, 2))])
def test_dit_schedule_splits_passes_into_chains_of_at_most_t_star_plus_one(passes, t_star, expected):
    assert bench_denoise.dit_schedule(passes, t_star) == expected


def test_dit_schedule_rejects_passes_that_do_not_split():
    with pytest.raises(ValueError, match="75 DiT passes cannot be split into 2 chains of at most 50 steps"):
        bench_denoise.dit_schedule(75, 49)


def test_missing_ebt_gives_a_clear_error(monkeypatch):
    monkeypatch.delattr(modeling_ebt, "EBTForImageDenoising", raising=False)
    with pytest.raises(RuntimeError, match="--models dit --dit-parameters N"):
        bench_denoise.ebt_classes()


def test_dit_only_needs_a_parameter_target(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["denoise", "--quick", "--models", "dit"])
    assert "--models dit needs --dit-parameters" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ the bench


def check_rows(rows: list[dict]) -> None:
    for row in rows:
        assert isinstance(row["forward_passes"], int) and row["forward_passes"] >= 1
        assert isinstance(row["psnr"], float) and 0 < row["psnr"] < 60
        assert isinstance(row["flops"], float) and row["flops"] > 0
        assert row["seconds_per_image"] > 0


def test_bench_dit_only_from_the_command_line(tmp_path):
    json_path, out = tmp_path / "denoise.json", tmp_path / "pictures"
    result = subprocess.run(
        [sys.executable, "-m", "modeling_ebt.bench", "denoise", "--quick", "--models", "dit", "--dit-parameters",
         "30000", "--threads", "1", "--json", str(json_path), "--output-dir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "noise level 0.2" in result.stdout and "DiT" in result.stdout
    payload = json.loads(json_path.read_text())
    assert payload["ebt"] == [] and payload["parameters"]["ebt"] is None
    assert abs(payload["parameters"]["dit"] - 30000) <= 1500
    check_rows(payload["dit"])
    dit = {row["forward_passes"]: row for row in payload["dit"]}
    assert sorted(dit) == [5, 100, 200]
    assert (dit[200]["steps"], dit[200]["repeats"], dit[200]["t_star"]) == (100, 2, 99)
    assert dit[200]["flops"] == pytest.approx(2 * dit[100]["flops"]) == pytest.approx(40 * dit[5]["flops"])
    assert Path(payload["picture"]).is_file()


def test_dit_flops_per_pass_is_the_whole_call_divided_by_its_passes():
    torch.manual_seed(0)
    model = DiTDenoiser.from_size(8, 2, num_layers=1, num_heads=2, head_dim=8)
    noisy = images.add_noise(torch.zeros(1, 3, 8, 8))
    whole = bench_denoise.flops_of(lambda: model.denoise(noisy, steps=7))
    assert whole == 7 * bench_denoise.dit_flops_per_pass(model, noisy, 0.2) > 0


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench_denoise")
    patch = pytest.MonkeyPatch()
    patch.setattr(bench_denoise, "ebt_classes", lambda: (ToyVisionConfig, ToyEnergyDenoiser))
    argv = ["denoise", "--quick", "--threads", "1", "--json", str(folder / "denoise.json"), "--output-dir",
            str(folder), "--ebt-config", json.dumps({"intermediate_size": 453, "mcmc_step_size": 0.3})]
    threads = torch.get_num_threads()
    try:
        assert bench.main(argv) == 0
    finally:
        patch.undo()
        torch.set_num_threads(threads)  # --threads 1 set it for the whole process
    return json.loads((folder / "denoise.json").read_text())


def test_bench_json_has_the_issue_schema(bench_run):
    assert {"noisy_psnr", "ebt", "dit", "parameters"} <= set(bench_run)
    assert isinstance(bench_run["noisy_psnr"], float)
    assert set(bench_run["parameters"]) == {"ebt", "dit"}
    assert all(isinstance(count, int) for count in bench_run["parameters"].values())
    for name in ("ebt", "dit"):
        assert bench_run[name] and all({"forward_passes", "psnr", "flops"} <= set(row) for row in bench_run[name])
        check_rows(bench_run[name])


def test_bench_models_are_the_same_size_and_trained_the_same_steps(bench_run):
    parameters = bench_run["parameters"]
    assert abs(parameters["dit"] - parameters["ebt"]) <= 0.05 * parameters["ebt"]
    assert bench_run["parameter_ratio"] == pytest.approx(parameters["dit"] / parameters["ebt"])
    training = bench_run["training"]
    assert training["steps"] == 3 and set(training["seconds"]) == {"ebt", "dit"}
    assert all(is_number(loss) for loss in training["last_loss"].values())


def test_bench_ebt_rows_count_steps_times_candidates(bench_run):
    rows = {(row["steps"], row["candidates"]): row for row in bench_run["ebt"]}
    assert set(rows) == {(1, 1), (2, 1), (1, 2), (2, 2)}
    for (steps, candidates), row in rows.items():
        assert row["forward_passes"] == steps * candidates
    assert rows[(2, 1)]["flops"] > rows[(1, 1)]["flops"]  # a descent step costs a forward and an input gradient
    assert rows[(1, 2)]["flops"] > rows[(1, 1)]["flops"]


def test_bench_levels_form_the_thinking_table(bench_run):
    levels = bench_run["levels"]
    assert set(levels) == {"0.1", "0.2", "0.3"}
    assert levels["0.2"]["ebt"] == bench_run["ebt"] and levels["0.2"]["dit"] == bench_run["dit"]
    assert levels["0.2"]["noisy_psnr"] == bench_run["noisy_psnr"]
    noisy = [levels[key]["noisy_psnr"] for key in ("0.1", "0.2", "0.3")]
    assert noisy[0] > noisy[1] > noisy[2]
    assert levels["0.1"]["dit"][0]["t_star"] < 99 < levels["0.3"]["dit"][0]["t_star"]
    assert [row["forward_passes"] for row in levels["0.1"]["dit"]] == [100]  # --dit-level-steps
    for key in ("0.1", "0.3"):  # FLOPs depend on the calls, not on the noise
        assert [row["flops"] for row in levels[key]["ebt"]] == [row["flops"] for row in bench_run["ebt"]]


def test_bench_noisy_psnr_is_that_of_the_fixed_evaluation_noise(bench_run):
    args = SimpleNamespace(**bench_run["args"])
    validation = images.image_crops(images.VALIDATION_PHOTOS, args.size, args.stride, args.scale)
    clean = bench_denoise.evaluation_images(validation, args.eval_images)
    noisy = bench_denoise.noisy_images(clean, 0.2, args.seed)
    unit = lambda x: np.clip((x.numpy().astype(np.float64) + 1) / 2, 0, 1)  # noqa: E731
    expected = -10 * np.log10(((unit(noisy) - unit(clean)) ** 2).mean())
    assert bench_run["noisy_psnr"] == pytest.approx(expected, rel=1e-5)


def test_bench_targets_and_picture(bench_run):
    names = [target["name"] for target in bench_run["targets"]]
    assert any("<= 3 passes" in name for name in names) and any("FLOPs" in name for name in names)
    for target in bench_run["targets"]:
        assert target["passed"] == (target["value"] >= target["threshold"] if target["op"] == ">="
                                    else target["value"] <= target["threshold"])
    picture = np.asarray(Image.open(bench_run["picture"]))
    rows, zoom, size, padding = 4, 4, bench_run["args"]["size"], 2  # noisy, EBT, DiT, clean
    assert picture.shape[0] == padding + rows * (size * zoom + padding)
