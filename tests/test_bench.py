"""Smoke tests of `python -m modeling_ebt.bench` (the --quick presets) and of its pure helpers.

The benchmarks' speed and memory targets are checked by the benchmark itself, as ratios measured side by side; no
test here asserts a timing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modeling_ebt import bench

REPO = Path(__file__).resolve().parents[1]


def run_bench(*argv: str, json_path: Path) -> dict:
    result = subprocess.run([sys.executable, "-m", "modeling_ebt.bench", *argv, "--json", str(json_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"bench {argv} failed:\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"
    assert result.stdout.strip(), "the benchmark prints its table on stdout"
    return json.loads(json_path.read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_targets(payload: dict) -> None:
    assert payload["targets"], "the benchmark reports its targets"
    for target in payload["targets"]:
        assert set(target) >= {"name", "value", "op", "threshold", "passed"}
        assert target["op"] in (">=", "<=")
        assert positive(target["value"]), target
        assert target["passed"] == (target["value"] >= target["threshold"] if target["op"] == ">="
                                    else target["value"] <= target["threshold"])


def test_train_quick(tmp_path):
    payload = run_bench("train", "--quick", json_path=tmp_path / "train.json")
    assert payload["command"] == "train"
    assert payload["environment"]["torch_threads"] >= 1
    rows = payload["rows"]
    assert {(r["label"], r["variant"]) for r in rows} == {
        (label, variant) for label in ("ours", "ours+ckpt", "recompute") for variant in ("default", "time_embed")
    } | {("llama", None)}
    for row in rows:
        assert row["error"] is None
        for key in ("tokens_per_s", "step_seconds", "peak_rss", "flops_per_token"):
            assert positive(row[key]), (row["label"], row["variant"], key, row[key])
        assert row["steps"] == len(row["step_seconds_all"]) >= 1
        assert row["tokens_per_s"] == pytest.approx(row["batch"] * row["seq"] / row["step_seconds"])
    # the EBT does more work per token than the same-size Llama (descent steps, second-order backward)
    llama = next(r for r in rows if r["label"] == "llama")
    assert all(r["flops_per_token"] > llama["flops_per_token"] for r in rows if r["model"] == "ebt")
    for variant in ("default", "time_embed"):
        sanity = payload["sanity"][variant]
        assert sanity["loss_rel_diff"] < 1e-4 and sanity["energies_rel_diff"] < 1e-4, sanity
        assert sanity["max_rel_diff"] == max(sanity["loss_rel_diff"], sanity["energies_rel_diff"])
        # the same function, its forward in slices of the batch (float sums in another order)
        assert sanity["checkpointing_loss_rel_diff"] < 1e-5
        # checkpointing recomputes each descent step's forward and input gradient in the backward
        ours, ckpt = (next(r for r in rows if r["label"] == label and r["variant"] == variant)
                      for label in ("ours", "ours+ckpt"))
        assert ckpt["flops_per_token"] > ours["flops_per_token"]
    check_targets(payload)
    assert len(payload["targets"]) == 16


def test_train_quick_with_bf16_autocast_rows(tmp_path):
    payload = run_bench("train", "--quick", "--variants", "default", "--autocast", "bfloat16",
                        json_path=tmp_path / "train.json")
    rows = {row["label"]: row for row in payload["rows"]}
    assert set(rows) == {"ours", "ours+ckpt", "recompute", "ours+bf16", "ours+ckpt+bf16", "recompute+bf16", "llama",
                         "llama+bf16"}
    for label, row in rows.items():
        assert row["error"] is None and positive(row["tokens_per_s"]) and positive(row["flops_per_token"])
        assert row["autocast"] == ("bfloat16" if label.endswith("+bf16") else None)
    names = [target["name"] for target in payload["targets"]]
    # a bf16 mode against the float32 baseline (the reference's precision), the bf16 baseline and the bf16 Llama
    assert [n for n in names if n.startswith("default: ours+bf16/")] == [
        "default: ours+bf16/recompute tokens/s", "default: ours+bf16/recompute peak RSS",
        "default: ours+bf16/recompute+bf16 tokens/s", "default: ours+bf16/recompute+bf16 peak RSS",
        "default: ours+bf16/llama+bf16 tokens/s", "default: ours+bf16/llama+bf16 peak RSS"]
    assert len(names) == 2 * 4 + 2 * 6
    check_targets(payload)


def test_generate_quick(tmp_path):
    payload = run_bench("generate", "--quick", json_path=tmp_path / "generate.json")
    assert payload["command"] == "generate"
    rows = payload["rows"]
    assert {r["label"] for r in rows} == {"cached", "recompute", "llama"}
    for row in rows:
        assert row["error"] is None
        assert row["reps"] >= 1 and len(row["seconds_1"]) == len(row["seconds_n"]) == row["reps"]
        for key in ("tokens_per_s", "seconds_per_step", "flops_per_token", "prefill_seconds", "prefill_flops",
                    "mem_growth", "prefill_mem_growth"):
            assert positive(row[key]), (row["label"], key, row[key])
        assert row["tokens_per_s"] == pytest.approx(row["batch"] / row["seconds_per_step"])
    by_label = {r["label"]: r for r in rows}
    # the cached descent does a small fraction of the reference's work per generated token
    assert by_label["cached"]["flops_per_token"] < by_label["recompute"]["flops_per_token"]
    check_targets(payload)


def test_targets_and_ratios():
    assert bench.Target("t", 2.0, ">=", 1.5).passed is True
    assert bench.Target("t", 0.6, "<=", 0.5).passed is False
    assert bench.Target("t", None, "<=", 0.5).passed is None
    assert "MISS" in bench.Target("t", 0.6, "<=", 0.5).line()
    assert bench.ratio(3.0, 2.0) == 1.5
    assert bench.ratio(None, 2.0) is None and bench.ratio(1.0, 0) is None


def test_quick_preset_keeps_explicit_options():
    args = bench.parse_args(["generate", "--quick", "--new-tokens", "6"])
    assert args.new_tokens == 6 and args.size == "tiny"
    assert args.prompt_lengths == bench.QUICK["generate"]["prompt_lengths"]
    args = bench.parse_args(["train", "--batch-size", "3"])
    assert args.batch_size == 3 and args.seq_len == 256 and args.size == "xxs" and not args.quick


def test_standard_rows_are_groups_of_three():
    args = bench.parse_args(["generate", "--prompt-lengths", "64,256", "--batch-sizes", "8,1"])
    groups = bench.standard_groups(args)
    assert [(g[0].batch, g[0].prompt_len) for g in groups] == [(1, 64), (1, 256), (8, 64), (8, 256)]
    for group in groups:
        assert [c.label for c in group] == ["cached", "recompute", "llama"]
        assert group[1].recompute and group[1].new_tokens == args.recompute_new_tokens
        # rows differing only in batch share their FLOP count
        assert group[0].flop_key() != group[1].flop_key()
    assert groups[0][0].flop_key() == groups[2][0].flop_key()


def test_peak_rss_helpers():
    assert bench.rss_bytes() >= 0 and bench.peak_rss_bytes() > 0
    if bench.reset_peak_rss():  # after a reset the peak is the current RSS, give or take a page
        assert bench.peak_rss_bytes() <= bench.rss_bytes() + 4 * 2**20


def test_generate_long_rows_quick(tmp_path):
    payload = run_bench("generate", "--rows", "long", "--size", "tiny", "--long-contexts", "48,96", "--window", "8",
                        "--long-new-tokens", "3", "--long-reps", "1", "--gqa-kv-heads", "1",
                        json_path=tmp_path / "long.json")
    rows = payload["rows"]
    assert {(r["context"], r["label"]) for r in rows} == {
        (c, label) for c in (48, 96) for label in ("full MHA", "full GQA kv1", "window 8 MHA", "window 8 GQA kv1")}
    for row in rows:
        # (per-token figures of 3 tokens on a tiny model can drown in timing noise: only the raw timings are checked)
        assert row["error"] is None and positive(row["prefill_seconds"]) and all(map(positive, row["seconds_n"]))
        assert row["kv_heads"] == (1 if "GQA" in row["label"] else 2)  # the tiny size has 2 heads
    targets = {t["name"]: t for t in payload["targets"]}
    windowed = targets["window 8 MHA: memory growth at 96 / at 48"]
    assert windowed["threshold"] == 1.5 and windowed["passed"] == (windowed["value"] <= 1.5)
    assert targets["full MHA: memory growth at 96 / at 48"]["threshold"] is None


def test_compiled_rows_pair_eager_and_compiled_at_batch_one():
    args = bench.parse_args(["generate", "--rows", "compiled", "--prompt-lengths", "64,256", "--device", "cpu"])
    groups = bench.compiled_groups(args)
    assert [[(c.label, c.batch, c.prompt_len, c.compiled) for c in g] for g in groups] == [
        [("eager", 1, p, False), ("compiled", 1, p, True)] for p in (64, 256)]
    assert all(g[0].flop_key() == g[1].flop_key() for g in groups)  # the compiled row shares eager's FLOP count


def _compiled_spec() -> dict:
    args = bench.parse_args(["generate", "--quick", "--rows", "compiled", "--reps", "1", "--device", "cpu",
                             "--threads", "1"])
    return bench.compiled_groups(args)[0][1].spec(args, count_flops=False), args


def test_compiled_row_is_skipped_with_a_note_without_compile_energy(monkeypatch):
    from modeling_ebt import EBTForCausalLM

    monkeypatch.delattr(EBTForCausalLM, "compile_energy", raising=False)
    spec, args = _compiled_spec()
    result = bench.measure_generate(spec)
    assert result == {"skipped": bench.COMPILE_MISSING}
    case = bench.compiled_groups(args)[0][1]
    row = bench.generate_row(case, [(result, None)], "compiled", args, flops=[10, 90])
    assert row["skipped"] == bench.COMPILE_MISSING and row["error"] is None
    assert row["tokens_per_s"] is None and row["flops_per_token"] is None and row["reps"] == 0
    target = bench.compiled_targets([row], args)[0]
    assert target.value is None and target.passed is None


def test_compiled_row_calls_compile_energy_and_times_the_model_it_returns(monkeypatch):
    from modeling_ebt import EBTForCausalLM

    calls = []

    def compile_energy(self, **kwargs):
        calls.append(kwargs)
        return self

    monkeypatch.setattr(EBTForCausalLM, "compile_energy", compile_energy, raising=False)
    spec, _ = _compiled_spec()
    result = bench.measure_generate(spec)
    assert calls == [{}]
    assert len(result["first"]) == len(result["full"]) == 1
    assert positive(result["full"][0]["seconds"]) and result["flops"] is None


def test_mfu_and_default_peaks(monkeypatch):
    assert bench.mfu(2e9, 50.0, 1.0) == pytest.approx(0.1)  # 1e11 FLOP/s of 1e12
    assert bench.mfu(2e9, 50.0, None) is None and bench.mfu(None, 50.0, 1.0) is None
    assert bench.default_peak_tflops("cpu", "float32") is None
    for name, dtype, peak in (("NVIDIA H100 PCIe", "bfloat16", 756.0), ("NVIDIA H100 80GB HBM3", "float32", 67.0),
                              ("NVIDIA A100-SXM4-80GB", "bfloat16", 312.0), ("NVIDIA H200", "bfloat16", 989.0),
                              ("Tesla T4", "float32", None)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert bench.default_peak_tflops("cuda", dtype) == peak, name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error shown without a GPU")
def test_cuda_device_without_a_gpu_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["train", "--device", "cuda"])
    error = capsys.readouterr().err
    assert "--device cuda: no CUDA device is visible" in error and "use --device cpu" in error


def test_peak_memory_counts_a_cpu_allocation():
    memory = bench.PeakMemory("cpu")
    memory.start()
    block = torch.ones(16, 2**20)  # 64 MiB, written
    assert memory.growth() >= 60 * 2**20
    del block


def test_summary_prints_one_table_of_train_and_generate_rows(tmp_path, capsys):
    env = dict(device="cuda", dtype="float32")
    train = dict(command="train", args=dict(size="xxs"), environment=env, targets=[], rows=[dict(
        variant="default", label="ours", batch=8, seq=256, tokens_per_s=12345.0, step_seconds=0.166,
        peak_memory=3 * 2**30, flops_per_token=2.18e8, mfu=0.0412, error=None)])
    generate = dict(command="generate", args=dict(size="small"), environment=env, targets=[
        dict(name="p256 b1: cached/Llama tokens/s", value=0.3, op=">=", threshold=1 / 6, passed=True)], rows=[dict(
            group="standard p256 b1", label="cached", batch=1, prompt_len=256, tokens_per_s=88.0,
            seconds_per_step=0.0114, mem_growth=2**20, flops_per_token=None, mfu=None, error=None, skipped=None)])
    paths = []
    for name, payload in (("train.json", train), ("generate.json", generate)):
        (tmp_path / name).write_text(json.dumps(payload))
        paths.append(str(tmp_path / name))
    assert bench.main(["summary", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["bench", "size", "device"]
    train_line = next(line for line in lines if line.lstrip().startswith("train"))
    assert train_line.split()[:8] == ["train", "xxs", "cuda", "float32", "default", "ours", "8×256", "12,345.0"]
    assert "3072.0" in train_line and "4.12%" in train_line and "166" in train_line
    generate_line = next(line for line in lines if line.lstrip().startswith("generate"))
    assert "1×p256" in generate_line and "11.4" in generate_line and "PASS" in lines[-1]


def test_device_check_without_a_gpu_fails_clearly():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(["bash", str(REPO / "scripts" / "device_check.sh")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "no CUDA GPU is visible" in done.stderr and "--dry-run" in done.stderr


def test_reference_rows_follow_the_dtype_and_autocast_of_the_rows_they_measure():
    """The reference code runs at --dtype, and under --autocast as well, each compared with the baseline of its
    own precision (the rows' building and targets; running the reference itself needs its checkout)."""
    args = bench.parse_args(["train", "--variants", "default", "--autocast", "bfloat16", "--dtype", "bfloat16",
                             "--reference-repo", "/nowhere/EBT"])
    cases = [c for c in bench.train_cases(["default"], args) if c["model"] == "reference"]
    assert [(c["label"], c["autocast"], c["dtype"]) for c in cases] == [("reference", None, "bfloat16"),
                                                                         ("reference+bf16", "bfloat16", "bfloat16")]
    assert all(c["reference_repo"] == "/nowhere/EBT" for c in cases)

    def row(label, tokens_per_s):
        return dict(label=label, variant="default", error=None, tokens_per_s=tokens_per_s, flops_per_token=1e9,
                    peak_memory=2**30)

    rows = [row("recompute", 100.0), row("reference", 95.0), row("recompute+bf16", 200.0), row("reference+bf16", 100.0)]
    targets = {t.name: t for t in bench.baseline_targets("default", rows, args)}
    assert set(targets) == {f"default: recompute{s}/reference{s} {figure}" for s in ("", "+bf16")
                            for figure in ("FLOPs/token", "tokens/s", "peak RSS")}
    assert targets["default: recompute/reference tokens/s"].value == pytest.approx(100 / 95)
    assert targets["default: recompute+bf16/reference+bf16 tokens/s"].value == pytest.approx(2.0)


def test_generation_against_llama_uses_issue_14s_bar_at_prompt_256_batch_1():
    args = bench.parse_args(["generate", "--prompt-lengths", "256", "--batch-sizes", "1,8"])
    rows = [dict(rowset="standard", label=label, prompt_len=256, batch=batch, tokens_per_s=speed, flops_per_token=1.0,
                 mem_growth=1.0, error=None)
            for batch in (1, 8) for label, speed in (("cached", 21.0), ("recompute", 1.0), ("llama", 100.0))]
    targets = {t.name: t for t in bench.standard_targets(rows, args)}
    b1, b8 = targets["p256 b1: cached/Llama tokens/s"], targets["p256 b8: cached/Llama tokens/s"]
    assert (b1.threshold, b8.threshold) == (0.22, pytest.approx(1 / 6))
    assert b1.value == pytest.approx(0.21) and not b1.passed and b8.passed
