"""`ebt study thinking`: three models on the same blocks, the loss grid, the JSON the issue spells out."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from modeling_ebt import EBTForCausalLM, EBTTokenizer, ThinkingConfig
from modeling_ebt.cli import main
from modeling_ebt.data import build_lm_datasets
from modeling_ebt.study import prediction_loss

REPO = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tiny_shakespeare.txt"


@pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason=f"{TINY_SHAKESPEARE} is not on this machine (shared data "
                    "of the development machines and CI)")
def test_thinking_study_trains_three_models_and_scores_them_on_the_same_blocks(tmp_path):
    ood = tmp_path / "ood.txt"
    ood.write_text((REPO / "README.md").read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "study"
    status = main(["study", "thinking", "--output-dir", str(out), "--max-steps", "3", "--corpus",
                   str(TINY_SHAKESPEARE), "--ood-corpus", str(ood), "--block-size", "32", "--batch-size", "4",
                   "--eval-samples", "4", "--steps", "1", "2", "4", "--candidates", "1", "2", "--cache-dir",
                   str(tmp_path / "cache")])
    assert status == 0
    report = json.loads((out / "thinking_study.json").read_text())
    assert (out / "thinking_study.png").stat().st_size > 0
    assert report["tokens"] == {"s1": 3 * 4 * 32, "s2": 3 * 4 * 32, "llama": 3 * 4 * 32}
    assert report["trained_steps"] == {"s1": 2, "s2": 3}  # cpu-small: 2 steps; s2-cpu: 1 landscape, 2..3 steps
    rows = report["results"]
    assert {(r["model"], r["corpus"]) for r in rows} == {(m, c) for m in ("s1", "s2", "llama")
                                                          for c in ("validation", str(ood))}
    llama = [r for r in rows if r["model"] == "llama"]
    assert len(llama) == 2 and all(r["steps"] is None and r["candidates"] is None and r["langevin"] is None
                                   for r in llama)
    assert all(math.isfinite(r["loss"]) for r in rows)
    s1_steps = {(r["steps"], r["langevin"]) for r in rows if r["model"] == "s1" and r["corpus"] == "validation"
                and r["candidates"] == 1}
    assert {(1, False), (2, False), (1, True), (2, True)} <= s1_steps
    assert any(r["candidates"] == 2 for r in rows if r["model"] == "s2")
    assert report["fewest_trained_steps"] == {"s1": 2, "s2": 2}  # s2-cpu draws 2 or 3 steps
    damped = [r for r in rows if r["damp_extra_steps"]]  # beyond the trained steps only
    assert all(r["steps"] > report["trained_steps"][r["model"]] for r in damped)
    assert {(r["model"], r["corpus"], r["steps"], r["langevin"], r["accept_lower_energies"]) for r in damped
            if not r.get("combined")} == {(m, c, 4, False, False) for m in ("s1", "s2")
                                          for c in ("validation", str(ood))}

    # the summary: each EBT's losses at its fewest and most trained steps, its best row and the gains against both
    assert len(report["summary"]) == 4
    for entry in report["summary"]:
        mine = [r for r in rows if r["model"] == entry["model"] and r["corpus"] == entry["corpus"]]

        def plain(steps, mine=mine, damped=False):
            return next(r["loss"] for r in mine if (r["steps"], r["candidates"], r["langevin"],
                                                    r["accept_lower_energies"], r["damp_extra_steps"])
                        == (steps, 1, False, False, damped))
        trained = report["trained_steps"][entry["model"]]
        assert entry["trained"] == plain(trained) and entry["fewest"] == plain(2)
        assert entry["best"] == min(r["loss"] for r in mine)
        thinking = min(r["loss"] for r in mine if r["steps"] >= trained)  # thinking never spends fewer steps
        from_fewest = min(r["loss"] for r in mine if r["steps"] >= 2)
        assert (entry["thinking"], entry["thinking_from_fewest"]) == (thinking, from_fewest)
        assert entry["gain_pct"] == pytest.approx(100 * (1 - math.exp(thinking - entry["trained"])))
        assert entry["gain_vs_fewest_pct"] == pytest.approx(100 * (1 - math.exp(from_fewest - entry["fewest"])))
        if entry["model"] == "s1":  # 4 steps = 2x the trained 2, plain and damped
            assert entry["longer_2x"] == plain(4) - entry["trained"]
            assert entry["longer_2x_damped"] == plain(4, damped=True) - entry["trained"]
        assert entry["llama"] == next(r["loss"] for r in rows if r["model"] == "llama"
                                      and r["corpus"] == entry["corpus"])

    # each row is the loss of the saved model on the validation blocks, recomputed independently
    blocks = build_lm_datasets(EBTTokenizer(), str(TINY_SHAKESPEARE), block_size=32, validation_fraction=0.1,
                               cache_dir=tmp_path / "cache")["validation"].select(range(4))
    batches = [{k: torch.as_tensor(v) for k, v in blocks[0:4].items()}]
    s1 = EBTForCausalLM.from_pretrained(out / "s1").eval()
    # a plain row, one that keeps only steps lowering the energy, one with damped extra steps
    for steps, accept, damped in ((1, False, False), (2, True, False), (4, False, True)):
        row = next(r for r in rows if r["model"] == "s1" and r["corpus"] == "validation" and r["steps"] == steps
                   and r["candidates"] == 1 and not r["langevin"] and r["accept_lower_energies"] == accept
                   and r["damp_extra_steps"] == damped)
        thinking = ThinkingConfig(steps=steps, langevin_noise=0.0, accept_lower_energies=accept,
                                  damp_extra_steps=damped)
        assert prediction_loss(s1, batches, thinking) == pytest.approx(row["loss"], rel=1e-5)
    llama = AutoModelForCausalLM.from_pretrained(out / "llama").eval()
    with torch.no_grad():
        expected = float(llama(**batches[0]).loss)
    assert expected == pytest.approx(next(r["loss"] for r in rows if r["model"] == "llama"
                                          and r["corpus"] == "validation"), rel=1e-5)
    assert sum(p.numel() for p in llama.parameters()) < sum(p.numel() for p in s1.parameters())  # no V×D candidate map


def test_study_arguments_refuse_empty_grids():
    with pytest.raises(SystemExit):
        main(["study", "thinking"])  # --output-dir is required
    assert main(["study", "thinking", "--output-dir", "x", "--max-steps", "0"]) == 1


@pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason=f"{TINY_SHAKESPEARE} is not on this machine")
def test_thinking_search_records_each_setting_with_the_studys_summary(tmp_path):
    import subprocess
    import sys

    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"base": {}, "alpha20": {"model": {"mcmc_step_size": 20.0}}}))
    results = tmp_path / "search.jsonl"
    command = [sys.executable, str(REPO / "scripts/thinking_search.py"), "--settings", str(settings), "--max-steps",
               "2", "--eval-samples", "2", "--corpus", str(TINY_SHAKESPEARE), "--block-size", "32", "--batch-size",
               "2", "--cache-dir", str(tmp_path / "cache"), "--results", str(results)]
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["setting"] for r in records] == ["base", "alpha20"] and all("error" not in r for r in records)
    assert [r["alpha"] for r in records] == [5.0, 20.0]  # s2-cpu's fixed α, then the setting's
    for record in records:
        assert (record["trained_steps"], record["fewest_trained_steps"]) == (3, 2)
        steps = {r["steps"] for r in record["rows"] if r["candidates"] == 1}
        assert steps == {1, 2, 3, 6, 12}
        plain = next(r["loss"] for r in record["rows"] if (r["steps"], r["candidates"], r["langevin"],
                                                           r["accept_lower_energies"], r["damp_extra_steps"])
                     == (3, 1, False, False, False))
        assert record["summary"]["validation"]["trained"] == plain
    model = EBTForCausalLM.from_pretrained(tmp_path / "models" / "alpha20-seed0")
    assert float(model.alpha.detach()) == 20.0
    # a second run finds both recorded and trains nothing
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    assert len(results.read_text().splitlines()) == 2


@pytest.mark.skipif(not TINY_SHAKESPEARE.is_file(), reason=f"{TINY_SHAKESPEARE} is not on this machine")
def test_candidate_starts_scores_agree_with_the_models_own_self_verification(tmp_path):
    """scripts/candidate_starts.py descends candidates as copies of each block; its figures must equal the model's
    own `num_candidates` path and plain evaluation, computed independently by `prediction_loss`."""
    import subprocess
    import sys

    from modeling_ebt.arguments import StudyArguments
    from modeling_ebt.study import blocks

    from .conftest import tiny_model

    model = tiny_model(ebt_type="time_embed", mcmc_num_steps=1, randomize_mcmc_num_steps=2,
                       randomize_mcmc_num_steps_min=2, langevin_dynamics_noise=1.0, normalize_initial_condition=True)
    model.save_pretrained(tmp_path / "model")
    command = [sys.executable, str(REPO / "scripts/candidate_starts.py"), "--model", str(tmp_path / "model"),
               "--candidates", "3", "--noise", "0.5", "--corpus", "validation", "--training-corpus",
               str(TINY_SHAKESPEARE), "--eval-samples", "4", "--block-size", "32", "--batch-size", "2",
               "--cache-dir", str(tmp_path / "cache"), "--json", str(tmp_path / "starts.json")]
    subprocess.run(command, check=True, capture_output=True, cwd=tmp_path)
    report = json.loads((tmp_path / "starts.json").read_text())
    rows = {(r["start"], r["noise"]): r for r in report["results"]["validation"]}
    assert set(rows) == {("independent", 0.0), ("independent", 0.5), ("first_step", 0.5),
                         ("first_step_perturbed", 0.5)} and report["trained_steps"] == 3

    args = StudyArguments(output_dir=str(tmp_path), eval_samples=4, block_size=32, batch_size=2,
                          cache_dir=str(tmp_path / "cache"))
    _, batches = blocks(EBTTokenizer(), str(TINY_SHAKESPEARE), args, model.config)
    plain = prediction_loss(model, batches, ThinkingConfig(langevin_noise=0.0))
    best_of_3 = prediction_loss(model, batches, ThinkingConfig(num_candidates=3, langevin_noise=0.0))
    assert best_of_3 != pytest.approx(plain, abs=1e-4)  # the candidates differ: the check below can fail
    independent = rows[("independent", 0.0)]
    assert independent["first"] == pytest.approx(plain, abs=1e-4)
    assert independent["energy_pick"] == pytest.approx(best_of_3, abs=1e-4)
    # candidate 1 of the perturbed start is the unperturbed first step, descended the remaining steps: plain
    assert rows[("first_step_perturbed", 0.5)]["first"] == pytest.approx(plain, abs=1e-4)
    for row in rows.values():
        assert row["oracle"] <= min(row["first"], row["energy_pick"]) + 1e-6 and 0 <= row["agreement"] <= 1

    refused = subprocess.run([*command[:4], "--candidates", "1", "--json", str(tmp_path / "x.json")],
                             capture_output=True, text=True, cwd=tmp_path)
    assert refused.returncode == 2 and "--candidates must be at least 2" in refused.stderr
