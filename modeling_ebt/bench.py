"""Speed and memory benchmarks: this implementation against the reference's way (recompute) and a same-size Llama.

    python -m modeling_ebt.bench train    [--quick] [--device cpu|cuda] [--json PATH] [--variants default,time_embed]
    python -m modeling_ebt.bench generate [--quick] [--device cpu|cuda] [--json PATH] [--rows standard,compiled,long]
    python -m modeling_ebt.bench summary  PATH [PATH ...]    (one table of the rows of several --json files)
    python -m modeling_ebt.bench denoise  [--quick] [--json PATH] [--max-steps N] [--minutes M] [--size S]
                                          (EBT against a same-size DiT on image denoising: modeling_ebt.bench_denoise)

Time: the synchronising clock of torch.utils.benchmark, one call at a time, kept as `Measurement`s (medians, a
`Compare` table). Memory: CUDA max_memory_allocated reset per region (all rows in this process), or on CPU the peak
RSS, each configuration in its own process. FLOPs: FlopCounterMode, untimed; MFU over `--peak-tflops`. The rows of
a group run in turn (`--rounds` times); only ratios within a group meet the targets. The README's "Benchmarks"
section says what each row measures.

train: forward (energy descent with its second-order graph), backward, clipping, AdamW; rows ours, ours+ckpt,
recompute (the reference's computation, the baseline) per variant and one Llama, and with `--reference-repo PATH` the
reference code itself per variant (modeling_ebt.bench_reference); tokens/s = batch × seq / median step; the first step
(same seed in every EBT row) gives FLOPs and the sanity line. generate: greedy, exactly N new tokens; per token =
(t(1+N) − t(1)) / N, the 1-token call (prefill) on its own; memory growth = peak during the call − before it. Row sets
(`--rows`): standard, compiled (`model.compile_energy()` vs eager, batch 1), long (sliding window vs full attention);
a new one is a `RowSet` in `GENERATE_ROW_SETS`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

import torch
from torch.utils import benchmark
from torch.utils.flop_counter import FlopCounterMode

from . import bench_reference, presets

# --- sizes and models -------------------------------------------------------------------------------------------

VOCAB_SIZE = 257  # byte-level vocabulary
# the shipped sizes (modeling_ebt.presets), plus "tiny" (2 layers of width 64) for the bench's own smoke tests
SIZES = {"tiny": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
         **{name: presets.size_fields(name) for name in presets.size_names()}}
VARIANTS = ("default", "time_embed")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def ebt_config(size: str, variant: str, max_positions: int, **overrides) -> dict:
    return dict(vocab_size=VOCAB_SIZE, **SIZES[size], max_position_embeddings=max_positions, mcmc_num_steps=2,
                ebt_type=variant, **overrides)


def llama_config(size: str, max_positions: int) -> dict:
    return dict(vocab_size=VOCAB_SIZE, **SIZES[size], max_position_embeddings=max_positions)


def build_model(spec: dict) -> torch.nn.Module:
    """The spec's model on its device and dtype, from its seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from modeling_ebt import EBTConfig, EBTForCausalLM

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    model = (LlamaForCausalLM(LlamaConfig(**spec["config"])) if spec["model"] == "llama"
             else EBTForCausalLM(EBTConfig(**spec["config"])))
    return model.to(device=spec["device"], dtype=DTYPES[spec["dtype"]])


def random_ids(spec: dict, shape: tuple[int, int], low: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(spec["seed"] + 1)
    return torch.randint(low, VOCAB_SIZE, shape, generator=generator).to(spec["device"])


def model_info(model) -> dict:
    config = getattr(model, "config", None)  # the reference's model has none
    return dict(parameters=sum(p.numel() for p in model.parameters()),
                attn_implementation=getattr(config, "_attn_implementation", None))


# --- the device: memory, peak FLOP/s, where a configuration runs --------------------------------------------------


def _proc_status_bytes(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def rss_bytes() -> int:
    """Current resident set size (0 where /proc is missing)."""
    return _proc_status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or since the last `reset_peak_rss`."""
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Return free heap memory to the system (glibc), so that RSS counts live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """The peak memory of a region from `start()`: CUDA's max_memory_allocated, else the process's peak RSS."""

    def __init__(self, device: str):
        self.device, self.cuda, self.before, self.scoped = torch.device(device), device.startswith("cuda"), 0, False

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before, self.scoped = torch.cuda.memory_allocated(self.device), True
        else:
            release_free_memory()
            self.before, self.scoped = rss_bytes(), reset_peak_rss()

    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device) if self.cuda else peak_rss_bytes()

    def growth(self) -> int:
        return max(self.peak() - self.before, 0)


# dense peak TFLOP/s (no sparsity) from NVIDIA's datasheets, matched in this order on the device name
PEAK_TFLOPS = {"H200": dict(float32=67.0, bfloat16=989.0), "H100 PCIe": dict(float32=51.0, bfloat16=756.0),
               "H100": dict(float32=67.0, bfloat16=989.0), "A100": dict(float32=19.5, bfloat16=312.0),
               "L4": dict(float32=30.3, bfloat16=121.0)}


def default_peak_tflops(device: str, dtype: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((peaks[dtype] for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def mfu(flops_per_token, tokens_per_s, peak_tflops) -> float | None:
    """Model FLOP utilisation: achieved FLOP/s over the peak."""
    if not (flops_per_token and tokens_per_s and peak_tflops):
        return None
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)


def _measured(measure: Callable[[dict], dict], spec: dict) -> dict:
    log(f"{spec['name']}: measuring")
    return measure(spec)


def _outcome(get_result: Callable[[], dict], name: str) -> tuple[dict | None, str | None]:
    """(result, None) or (None, the error): a failing configuration is reported in its row, the others go on."""
    try:
        return get_result(), None
    except BrokenProcessPool:
        return None, "worker process died (killed: out of memory?)"
    except Exception as exc:  # noqa: BLE001 - recorded in the row, with the traceback on stderr
        cause = exc.__cause__ or exc  # a worker's traceback travels as the cause
        print(f"[bench] {name} failed:\n{''.join(traceback.format_exception(cause))}", file=sys.stderr)
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def run_round(measure: Callable[[dict], dict], specs: list[dict]) -> list[tuple[dict | None, str | None]]:
    """measure(spec) for every spec, one after the other. On CPU each in a fresh process of its own, whose peak RSS
    is its own, started when the one before has exited (idle workers would keep OpenMP threads that spin, or that
    sleep and wake late under OMP_WAIT_POLICY=passive: either skews latency-bound rows). On CUDA in this process
    (peaks are reset per region)."""
    if specs[0]["device"] != "cpu":
        outcomes = []
        for spec in specs:
            outcomes.append(_outcome(lambda spec=spec: measure(spec), spec["name"]))
            gc.collect()
            torch.cuda.empty_cache()
        return outcomes
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: the environment set in main() applies
    outcomes = []
    for spec in specs:  # one process at a time, gone before the next starts: no idle worker holds CPU threads
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            outcomes.append(_outcome(pool.submit(_measured, measure, spec).result, spec["name"]))
    return outcomes


def timed(fn: Callable[[], object]) -> float:
    start = benchmark.timer()
    fn()
    return benchmark.timer() - start


def measurement(times: list[float], label: str, sub_label: str, description: str, threads: int):
    spec = benchmark.TaskSpec(stmt=label, setup="", label=label, sub_label=sub_label, description=description,
                              num_threads=threads)
    return benchmark.Measurement(number_per_run=1, raw_times=times, task_spec=spec)


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- targets, tables, records -----------------------------------------------------------------------------------


@dataclass
class Target:
    """A ratio and its target: `value` ≥ `threshold` (op ">="), ≤ (op "<=") or within `threshold` of 1 (op "±",
    |value − 1| ≤ threshold). value None: not measured; threshold None: a ratio reported for comparison."""

    name: str
    value: float | None
    op: str
    threshold: float | None

    @property
    def passed(self) -> bool | None:
        if self.threshold is None or self.value is None or not math.isfinite(self.value):
            return None
        if self.op == "±":
            return abs(self.value - 1) <= self.threshold
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def as_dict(self) -> dict:
        return dict(name=self.name, value=self.value, op=self.op, threshold=self.threshold, passed=self.passed)

    def line(self) -> str:
        if self.threshold is None:
            return f"{self.name:<58} {_fmt(self.value):>9}   (for comparison, no target)"
        status = {True: "PASS", False: "MISS", None: "n/a"}[self.passed]
        target = f"1 ± {self.threshold:<4.4g}" if self.op == "±" else f"{self.op} {self.threshold:<8.4g}"
        return f"{self.name:<58} {_fmt(self.value):>9}   target {target} {status}"


def ratio(a, b) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _fmt(value, spec: str = ".3g", scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value * scale, spec)


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells])


def _json_safe(obj):
    """NaN/inf become null, tuples lists."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def source_revision() -> str | None:
    """The git commit of the checkout this module runs from ("+dirty" with local changes), None outside git."""
    here = os.path.dirname(os.path.abspath(__file__))

    def git(*argv):
        return subprocess.run(["git", *argv], cwd=here, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "-uno", ".") else "")
    except (OSError, subprocess.SubprocessError):
        return None


def environment(args, revision: str | None) -> dict:
    import transformers

    cuda = args.device.startswith("cuda")
    return dict(torch_threads=args.threads, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                ld_preload=os.environ.get("LD_PRELOAD"),  # e.g. tcmalloc (README "Benchmarks"), inherited by workers
                device=args.device,
                device_name=torch.cuda.get_device_name(torch.device(args.device)) if cuda else platform.processor(),
                dtype=args.dtype, peak_tflops=args.peak_tflops, memory="cuda max_memory_allocated" if cuda else
                "peak RSS", source_revision=revision, source_revision_at_end=source_revision(),
                cpu_count=os.cpu_count(), torch=torch.__version__, cuda=torch.version.cuda,
                transformers=transformers.__version__, python=platform.python_version(), machine=platform.machine())


def finish(command: str, args, start: float, revision, rows, targets, **extra) -> dict:
    for target in targets:
        print(target.line())
    print(f"\nelapsed {time.time() - start:.0f} s")
    payload = dict(command=command, args=vars(args), environment=environment(args, revision), rows=rows,
                   targets=[t.as_dict() for t in targets], elapsed_s=time.time() - start, **extra)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(_json_safe(payload), f, indent=2)
        log(f"figures written to {args.json}")
    return payload


def memory_name(args) -> str:
    return "CUDA memory" if args.device.startswith("cuda") else "RSS"


def _spec(args, name: str, **fields) -> dict:
    return dict(name=name, device=args.device, dtype=args.dtype, threads=args.threads, seed=args.seed, **fields)


# --- train ------------------------------------------------------------------------------------------------------

TRAIN_TARGETS = (3.0, 0.25)  # min ours/recompute tokens/s, max ours/recompute peak memory (issue 14: 3×, 75% less)
TRAIN_LLAMA_TARGETS = (0.25, 2.0)  # min ours/Llama tokens/s, max ours/Llama peak memory
# the recompute baseline against the reference code, side by side: FLOPs within 5%, tokens/s and peak memory within 15%
BASELINE_TOLERANCES = dict(flops_per_token=0.05, tokens_per_s=0.15, peak_memory=0.15)
SANITY_SEED = 1234


class TrainJob:
    """One training configuration, in its worker: a model, its optimizer and one fixed batch."""

    def __init__(self, spec: dict):
        from modeling_ebt import ThinkingConfig

        self.reference = spec["model"] == "reference"
        if self.reference:
            torch.set_num_threads(spec["threads"])
            torch.manual_seed(spec["seed"])
            self.model = bench_reference.build_reference(spec["reference_repo"], spec["config"], spec["batch"],
                                                         spec["seq"]).to(spec["device"], DTYPES[spec["dtype"]]).train()
        else:
            self.model = build_model(spec).train()
        if spec["checkpointing"]:
            self.model.activation_checkpointing_enable()
        self.ids = random_ids(spec, (spec["batch"], spec["seq"]))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=spec["lr"], weight_decay=0.01)
        self.extra = dict(thinking=ThinkingConfig(recompute=True)) if spec["recompute"] else {}
        self.autocast = spec.get("autocast")
        self.device_type = torch.device(spec["device"]).type

    def forward(self):
        """The forward under the row's autocast, as the Trainer's bf16=True runs it (the backward outside)."""
        dtype = DTYPES[self.autocast] if self.autocast else None
        with torch.autocast(self.device_type, dtype=dtype, enabled=self.autocast is not None):
            if self.reference:
                return bench_reference.reference_forward(self.model, self.ids)
            return self.model(input_ids=self.ids, labels=self.ids, **self.extra)

    def update(self) -> None:
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        self.forward().loss.backward()
        self.update()

    def first_step(self) -> dict:
        """The first step, from the sanity seed, under the FLOP counter: its FLOPs, loss and energies."""
        torch.manual_seed(SANITY_SEED)
        with FlopCounterMode(display=False) as counter:
            out = self.forward()
            out.loss.backward()
        energies = out.energies.detach().float().cpu() if getattr(out, "energies", None) is not None else None
        first = dict(flops=counter.get_total_flops(), loss=out.loss.item(), energies=energies)
        del out
        self.update()
        return first


def measure_train(spec: dict) -> dict:
    """First step (FLOPs, sanity), then the peak memory over the warm-up and timed steps."""
    job = TrainJob(spec)
    first = job.first_step()
    memory = PeakMemory(spec["device"])
    memory.start()
    for _ in range(spec["warmup"]):
        job.step()
    times = [timed(job.step) for _ in range(spec["steps"])]
    return dict(first=first, times=times, peak=memory.peak(), scoped=memory.scoped, info=model_info(job.model))


AUTOCAST_SUFFIX = {"bfloat16": "+bf16"}  # the label suffix of the rows run under `--autocast`


def precisions(args) -> list[tuple[str | None, str]]:
    """(autocast dtype, label suffix) of the rows: float32, and the `--autocast` dtype when given."""
    return [(None, "")] + ([(args.autocast, AUTOCAST_SUFFIX[args.autocast])] if args.autocast else [])


def train_cases(variants: list[str], args) -> list[dict]:
    group, positions = "+".join(variants), args.seq_len + 1
    cases = [dict(label=label + suffix, model="ebt", variant=variant, autocast=autocast,
                  config=ebt_config(args.size, variant, positions), recompute=label == "recompute",
                  checkpointing=label == "ours+ckpt")
             for variant in variants for autocast, suffix in precisions(args)
             for label in ("ours", "ours+ckpt", "recompute")]
    if args.reference_repo:  # at --dtype, and under --autocast too, like the rows it is the yardstick of
        cases += [dict(label="reference" + suffix, model="reference", variant=variant, autocast=autocast,
                       recompute=False, checkpointing=False, config=ebt_config(args.size, variant, positions),
                       reference_repo=args.reference_repo)
                  for variant in variants for autocast, suffix in precisions(args)]
    cases += [dict(label="llama" + suffix, model="llama", variant=None, autocast=autocast,
                   config=llama_config(args.size, positions), recompute=False, checkpointing=False)
              for autocast, suffix in precisions(args)]
    return [_spec(args, f"train {case['variant'] or group}/{case['label']}", group=group, batch=args.batch_size,
                  seq=args.seq_len, lr=args.lr, steps=args.steps, warmup=args.warmup, **case) for case in cases]


def train_row(spec: dict, outcomes: list, args) -> dict:
    done = [result for result, _ in outcomes if result]
    times = [t for result in done for t in result["times"]]
    median = statistics.median(times) if times else None
    tokens = args.batch_size * args.seq_len
    tokens_per_s = tokens / median if median else None
    flops = done[0]["first"]["flops"] / tokens if done else None
    peak = max(result["peak"] for result in done) if done else None
    cuda = args.device.startswith("cuda")
    return dict(
        group=spec["group"], label=spec["label"], model=spec["model"], variant=spec["variant"],
        recompute=spec["recompute"], autocast=spec.get("autocast"), batch=args.batch_size, seq=args.seq_len,
        steps=len(times), rounds=len(done),
        step_seconds=median, step_seconds_all=times, tokens_per_s=tokens_per_s, peak_memory=peak,
        peak_rss=None if cuda else peak, peak_cuda=peak if cuda else None,
        peak_reset=all(result["scoped"] for result in done) if done else None, flops_per_token=flops,
        mfu=mfu(flops, tokens_per_s, args.peak_tflops), threads=args.threads, device=args.device, dtype=args.dtype,
        parameters=done[0]["info"]["parameters"] if done else None,
        attn_implementation=done[0]["info"]["attn_implementation"] if done else None,
        error=next((error for _, error in outcomes if error), None))


def relative_difference(a, b) -> float:
    """max |a − b| / max |b| (a scale-aware relative difference of tensors or numbers)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def train_sanity(firsts: dict[str, dict | None]) -> dict:
    """Ours against recompute (loss and energies of the first step) and against checkpointing (loss)."""
    ours, ckpt, rec = firsts.get("ours"), firsts.get("ours+ckpt"), firsts.get("recompute")
    entry = dict(loss_rel_diff=None, energies_rel_diff=None, max_rel_diff=None, checkpointing_loss_rel_diff=None)
    if ours and rec:
        entry.update(loss_rel_diff=relative_difference(ours["loss"], rec["loss"]),
                     energies_rel_diff=relative_difference(ours["energies"], rec["energies"]),
                     energies_rel_diff_per_step=[relative_difference(a, b)
                                                 for a, b in zip(ours["energies"], rec["energies"])],
                     loss_ours=ours["loss"], loss_recompute=rec["loss"])
        entry["max_rel_diff"] = max(entry["loss_rel_diff"], entry["energies_rel_diff"])
    if ours and ckpt:  # checkpointing recomputes the same function from the same seed
        entry["checkpointing_loss_rel_diff"] = relative_difference(ckpt["loss"], ours["loss"])
    return entry


def run_rounds(measure, specs: list[dict], rounds: int) -> list[list]:
    """Every spec `rounds` times, the rows of a round in turn; per spec the list of (result, error)."""
    outcomes = [[] for _ in specs]
    for round_index in range(rounds):
        log(f"{specs[0]['name']} and {len(specs) - 1} more: round {round_index + 1}/{rounds}")
        for record, outcome in zip(outcomes, run_round(measure, specs)):
            record.append(outcome)
    return outcomes


def run_train_group(variants: list[str], args) -> tuple[list[dict], dict, list]:
    specs = train_cases(variants, args)
    outcomes = run_rounds(measure_train, specs, args.rounds)
    rows = [train_row(spec, record, args) for spec, record in zip(specs, outcomes)]
    sanity = {variant: train_sanity({spec["label"]: record[0][0] and record[0][0]["first"]
                                     for spec, record in zip(specs, outcomes) if spec["variant"] == variant})
              for variant in variants}
    timings = [measurement(row["step_seconds_all"], "train step", row["label"], row["variant"] or "llama",
                           args.threads) for row in rows if row["step_seconds_all"]]
    return rows, sanity, timings


def train_modes(args) -> list[str]:
    """Our training modes: ours and ours+ckpt (activation checkpointing), and under `--autocast` both again."""
    return [mode + suffix for _, suffix in precisions(args) for mode in ("ours", "ours+ckpt")]


def train_targets(variant: str, rows: list[dict], args, mode: str = "ours") -> list[Target]:
    """The targets of one of our modes against the baseline as the reference runs (`recompute`, float32: the
    reference's default precision, 32-true) and against the Llama of the same precision. A mode under autocast is
    also compared with the baseline under the same autocast."""
    def row(label, variant):
        return next((r for r in rows if r["label"] == label and r["variant"] == variant and not r["error"]), {})

    suffix = next((suffix for _, suffix in precisions(args) if suffix and mode.endswith(suffix)), "")
    ours, llama = row(mode, variant), row("llama" + suffix, None)
    baselines = ["recompute"] + (["recompute" + suffix] if suffix else [])
    speed, memory = TRAIN_TARGETS
    peak = f"peak {memory_name(args)}"
    targets = []
    for baseline in baselines:
        rec = row(baseline, variant)
        targets += [
            Target(f"{variant}: {mode}/{baseline} tokens/s", ratio(ours.get("tokens_per_s"), rec.get("tokens_per_s")),
                   ">=", speed),
            Target(f"{variant}: {mode}/{baseline} {peak}", ratio(ours.get("peak_memory"), rec.get("peak_memory")),
                   "<=", memory)]
    return targets + [
        Target(f"{variant}: {mode}/llama{suffix} tokens/s", ratio(ours.get("tokens_per_s"), llama.get("tokens_per_s")),
               ">=", TRAIN_LLAMA_TARGETS[0]),
        Target(f"{variant}: {mode}/llama{suffix} {peak}", ratio(ours.get("peak_memory"), llama.get("peak_memory")),
               "<=", TRAIN_LLAMA_TARGETS[1]),
    ]


def baseline_targets(variant: str, rows: list[dict], args) -> list[Target]:
    """The recompute baseline against the reference code in the same run, at each precision (float32, and the
    `--autocast` dtype when given): recompute/reference per figure."""
    def row(label):
        return next((r for r in rows if r["label"] == label and r["variant"] == variant and not r["error"]), {})

    names = dict(flops_per_token="FLOPs/token", tokens_per_s="tokens/s", peak_memory=f"peak {memory_name(args)}")
    targets = []
    for _, suffix in precisions(args):
        rec, ref = row("recompute" + suffix), row("reference" + suffix)
        targets += [Target(f"{variant}: recompute{suffix}/reference{suffix} {names[key]}",
                           ratio(rec.get(key), ref.get(key)), "±", tolerance)
                    for key, tolerance in BASELINE_TOLERANCES.items()]
    return targets


def print_train(rows: list[dict], sanity: dict, timings: list, args, revision) -> None:
    print(f"bench train: size {args.size}, batch {args.batch_size} × seq {args.seq_len}, 2 descent steps, AdamW step "
          f"included; {args.device} {args.dtype}, torch threads {args.threads} (OMP_WAIT_POLICY "
          f"{args.omp_wait_policy or 'unset'}); {args.warmup} warm-up + {args.steps} timed steps per row and round, "
          f"{args.rounds} round(s), rows of a group in turn; source {revision or 'unknown'}")
    benchmark.Compare(timings).print()
    print(format_table(
        ["group", "mode", "tokens/s", "step s", f"peak {memory_name(args)} GiB", "GFLOP/token", "MFU", "steps",
         "attn", "error"],
        [[r["variant"] or r["group"], r["label"], _fmt(r["tokens_per_s"], ".1f"), _fmt(r["step_seconds"], ".3g"),
          _fmt(r["peak_memory"], ".3f", 2**-30), _fmt(r["flops_per_token"], ".4f", 1e-9), _fmt(r["mfu"], ".2%"),
          r["steps"], r["attn_implementation"] or "-", r["error"] or ""] for r in rows]))
    print()
    for variant, s in sanity.items():
        steps = ", ".join(_fmt(d, ".1e") for d in s.get("energies_rel_diff_per_step") or [])
        print(f"sanity ({variant}): max relative difference ours vs recompute on the first batch: loss "
              f"{_fmt(s['loss_rel_diff'], '.2e')}, energies {_fmt(s['energies_rel_diff'], '.2e')} (per descent "
              f"step: {steps}; each step amplifies float32 round-off); loss with activation checkpointing vs without "
              f"{_fmt(s['checkpointing_loss_rel_diff'], '.2e')}")
    print()


def cmd_train(args) -> dict:
    """Every variant's rows and one Llama, as one group."""
    start, revision = time.time(), source_revision()
    rows, sanity, timings = run_train_group(args.variants, args)
    targets = [target for variant in args.variants for mode in train_modes(args)
               for target in train_targets(variant, rows, args, mode)]
    if args.reference_repo:
        targets += [target for variant in args.variants for target in baseline_targets(variant, rows, args)]
    print_train(rows, sanity, timings, args, revision)
    return finish("train", args, start, revision, rows, targets, sanity=sanity)


# --- generate ---------------------------------------------------------------------------------------------------

COMPILE_MISSING = "skipped: this modeling_ebt has no EBTForCausalLM.compile_energy()"


@dataclass
class GenCase:
    """One row of the generate benchmark. `config` holds the model's config kwargs."""

    group: str
    label: str
    model: str
    config: dict
    prompt_len: int
    batch: int
    new_tokens: int
    reps: int
    recompute: bool = False
    compiled: bool = False  # model.compile_energy() before the warm-up
    extra: dict = field(default_factory=dict)  # anything a row set wants to carry into its rows and targets
    generate_kwargs: dict = field(default_factory=dict)  # passed to `generate` (e.g. prefill_chunk_size)
    count_flops: bool = True
    short_warmup: bool = False  # warm up on a short prompt (the full-size call is long)

    def flop_key(self) -> str:
        """FLOPs per sequence are shared by the rows that differ only in batch size."""
        return json.dumps([self.model, self.config, self.recompute, self.prompt_len, self.new_tokens], sort_keys=True)

    def spec(self, args, count_flops: bool) -> dict:
        fields = {k: getattr(self, k) for k in ("model", "config", "prompt_len", "batch", "new_tokens", "reps",
                                                "recompute", "compiled", "generate_kwargs", "short_warmup")}
        return _spec(args, f"{self.group}/{self.label}", count_flops=count_flops, rep_budget=args.rep_budget,
                     **fields)


class GenerateJob:
    """One generation configuration, in its worker: a model and a fixed prompt batch."""

    def __init__(self, spec: dict):
        self.model = build_model(spec).eval()
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0
        self.ids = random_ids(spec, (spec["batch"], spec["prompt_len"]), low=1)
        self.kwargs = dict(recompute=True, **spec["generate_kwargs"]) if spec["recompute"] else spec["generate_kwargs"]

    def generate(self, new_tokens: int, batch: int | None = None, prompt_len: int | None = None) -> None:
        ids = self.ids[:batch, :prompt_len]
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                                  **self.kwargs)
        if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected "
                               f"{(ids.shape[0], ids.shape[1] + new_tokens)}")

    def flops(self, tokens: list[int]) -> list[int]:
        """FLOPs of generating each of `tokens` new tokens for the first prompt."""
        counts = []
        for n in tokens:
            with FlopCounterMode(display=False) as counter:
                self.generate(n, batch=1)
            counts.append(counter.get_total_flops())
        return counts


def measure_generate(spec: dict) -> dict:
    """FLOPs (untimed), warm-up, then per repetition the 1-token and the (1+N)-token call with their memory growth."""
    job = GenerateJob(spec)
    if spec["compiled"]:
        if not hasattr(job.model, "compile_energy"):
            return dict(skipped=COMPILE_MISSING)
        job.model = job.model.compile_energy() or job.model
    n = spec["new_tokens"]
    flops = job.flops([1, 1 + n]) if spec["count_flops"] else None
    for _ in range(2 if spec["compiled"] else 1):  # a compiled model may recompile once for dynamic shapes
        if spec["short_warmup"]:  # one token from a short prompt: lazy initialisation (the full-size call is long)
            job.generate(1, prompt_len=16)
        else:
            job.generate(1 + n)
    memory, calls = PeakMemory(spec["device"]), {1: [], 1 + n: []}
    for _ in range(spec["reps"]):
        for tokens, record in calls.items():
            memory.start()
            seconds = timed(lambda tokens=tokens: job.generate(tokens))
            record.append(dict(seconds=seconds, growth=memory.growth(), scoped=memory.scoped))
        if sum(r["seconds"] for record in calls.values() for r in record) >= spec["rep_budget"]:
            break
    return dict(first=calls[1], full=calls[1 + n], flops=flops, info=model_info(job.model))


@dataclass
class RowSet:
    """groups(args) → groups of cases measured side by side; targets(rows, args) → the targets on their rows."""

    groups: Callable[[argparse.Namespace], list[list[GenCase]]]
    targets: Callable[[list[dict], argparse.Namespace], list[Target]]
    description: str = ""


def _positions(args, longest: int) -> int:
    return max(args.max_positions, longest + 1)


def standard_groups(args) -> list[list[GenCase]]:
    """Cached vs recompute vs same-size Llama, per (prompt length, batch size)."""
    positions = _positions(args, max(args.prompt_lengths) + max(args.new_tokens, args.recompute_new_tokens))
    config = ebt_config(args.size, args.variant, positions)
    groups = []
    for batch in sorted(args.batch_sizes):  # batch 1 first: its FLOP counts serve the larger batches
        for prompt in args.prompt_lengths:
            common = dict(group=f"standard p{prompt} b{batch}", prompt_len=prompt, batch=batch, reps=args.reps)
            groups.append([
                GenCase(label="cached", model="ebt", config=config, new_tokens=args.new_tokens, **common),
                GenCase(label="recompute", model="ebt", config=config, new_tokens=args.recompute_new_tokens,
                        recompute=True, short_warmup=True, **common),
                GenCase(label="llama", model="llama", config=llama_config(args.size, positions),
                        new_tokens=args.new_tokens, **common),
            ])
    return groups


def _find(rows: list[dict], **match) -> dict | None:
    return next((row for row in rows if all(row.get(k) == v for k, v in match.items()) and not row.get("error")),
                None)


def _pair(rows, rowset, ours, other, key, **match) -> float | None:
    """ratio of `key` between the rows labelled `ours` and `other` that share `match`."""
    a, b = _find(rows, rowset=rowset, label=ours, **match), _find(rows, rowset=rowset, label=other, **match)
    return ratio(a and a[key], b and b[key])


def standard_targets(rows: list[dict], args) -> list[Target]:
    targets = []
    for batch in sorted(args.batch_sizes):
        def pair(label, prompt, key, batch=batch):
            return _pair(rows, "standard", "cached", label, key, prompt_len=prompt, batch=batch)

        if 256 in args.prompt_lengths:
            targets.append(Target(f"p256 b{batch}: cached/recompute FLOPs per token",
                                  pair("recompute", 256, "flops_per_token"), "<=", 0.01))
            targets.append(Target(f"p256 b{batch}: cached/recompute tokens/s",
                                  pair("recompute", 256, "tokens_per_s"), ">=", 20))
        if 1024 in args.prompt_lengths:
            targets.append(Target(f"p1024 b{batch}: cached/recompute tokens/s",
                                  pair("recompute", 1024, "tokens_per_s"), ">=", 50))
            targets.append(Target(f"p1024 b{batch}: cached/recompute memory growth",
                                  pair("recompute", 1024, "mem_growth"), "<=", 0.25))
        for prompt in args.prompt_lengths:  # issue 14 asks 0.22 at prompt 256 and batch 1; 1/6 elsewhere
            targets.append(Target(f"p{prompt} b{batch}: cached/Llama tokens/s", pair("llama", prompt, "tokens_per_s"),
                                  ">=", 0.22 if (prompt, batch) == (256, 1) else 1 / 6))
    return targets


def compiled_groups(args) -> list[list[GenCase]]:
    """`model.compile_energy()` against eager, batch 1, per prompt length (timed after a warm-up that compiles)."""
    config = ebt_config(args.size, args.variant, _positions(args, max(args.prompt_lengths) + args.new_tokens))
    return [[GenCase(group=f"compiled p{prompt} b1", label=label, model="ebt", config=config, prompt_len=prompt,
                     batch=1, new_tokens=args.new_tokens, reps=args.reps, compiled=label == "compiled",
                     count_flops=label == "eager") for label in ("eager", "compiled")]
            for prompt in args.prompt_lengths]


def compiled_targets(rows: list[dict], args) -> list[Target]:
    return [Target(f"p{prompt} b1: compiled/eager tokens/s",
                   _pair(rows, "compiled", "compiled", "eager", "tokens_per_s", prompt_len=prompt), ">=", 1.5)
            for prompt in args.prompt_lengths]


def long_context_groups(args) -> list[list[GenCase]]:
    """Per context length: full attention vs a sliding window, each with MHA and GQA; batch 1, cached generation,
    the prompt prefilled in chunks of `--window` tokens (so a windowed model never holds more than O(window))."""
    positions = max(args.long_contexts) + args.long_new_tokens + 1
    groups = []
    for context in args.long_contexts:
        cases = []
        for attention, window in (("full", None), (f"window {args.window}", args.window)):
            for heads, kv_heads in (("MHA", None), (f"GQA kv{args.gqa_kv_heads}", args.gqa_kv_heads)):
                config = ebt_config(args.size, args.variant, positions, sliding_window=window,
                                    num_key_value_heads=kv_heads)
                cases.append(GenCase(
                    group=f"long c{context}", label=f"{attention} {heads}", model="ebt", config=config,
                    prompt_len=context, batch=1, new_tokens=args.long_new_tokens, reps=args.long_reps,
                    generate_kwargs=dict(prefill_chunk_size=args.window), count_flops=False, short_warmup=True,
                    extra=dict(context=context, window=window, kv_heads=kv_heads or config["num_attention_heads"])))
        groups.append(cases)
    return groups


def long_context_targets(rows: list[dict], args) -> list[Target]:
    """With the window: per-token time at 8K within 1.5× of the shortest context, memory growth flat up to the
    longest (full attention's ratios are printed beside them, with no target)."""
    targets, first, longest = [], min(args.long_contexts), max(args.long_contexts)
    for label in sorted({r["label"] for r in rows}):
        def at(context, key, label=label):
            row = _find(rows, rowset="long", label=label, context=context)
            return row and row[key]

        windowed = label.startswith("window")
        if 8192 in args.long_contexts:
            targets.append(Target(f"{label}: time per token at 8K / at {first}",
                                  ratio(at(8192, "seconds_per_step"), at(first, "seconds_per_step")),
                                  "<=", 1.5 if windowed else None))
        targets.append(Target(f"{label}: memory growth at {longest} / at {first}",
                              ratio(at(longest, "mem_growth"), at(first, "mem_growth")),
                              "<=", 1.5 if windowed else None))
    return targets


GENERATE_ROW_SETS: dict[str, RowSet] = {
    "standard": RowSet(standard_groups, standard_targets,
                       "cached vs recompute vs same-size Llama at each prompt length and batch size"),
    "compiled": RowSet(compiled_groups, compiled_targets, "model.compile_energy() vs eager at batch 1"),
    "long": RowSet(long_context_groups, long_context_targets,
                   "long contexts: full attention vs sliding window, MHA vs GQA (per-token time and memory)"),
}


def generate_row(case: GenCase, outcomes: list, rowset: str, args, flops) -> dict:
    done = [result for result, _ in outcomes if result and "skipped" not in result]
    flops = flops if done else None
    first = [r for result in done for r in result["first"]]
    full = [r for result in done for r in result["full"]]
    n, batch = case.new_tokens, case.batch
    t1 = statistics.median(r["seconds"] for r in first) if first else None
    step = (statistics.median(r["seconds"] for r in full) - t1) / n if full else None
    step = step if step and step > 0 else None  # noise swamped the difference: nothing rather than nonsense
    tokens_per_s, flops_per_token = batch / step if step else None, (flops[1] - flops[0]) / n if flops else None
    return dict(
        rowset=rowset, group=case.group, label=case.label, model=case.model, recompute=case.recompute,
        compiled=case.compiled, variant=case.config.get("ebt_type"), prompt_len=case.prompt_len, batch=batch,
        new_tokens=n, reps=len(full), threads=args.threads, device=args.device, dtype=args.dtype,
        tokens_per_s=tokens_per_s, seconds_per_step=step, flops_per_token=flops_per_token,
        mfu=mfu(flops_per_token, tokens_per_s, args.peak_tflops), prefill_seconds=t1,
        prefill_flops=flops[0] * batch if flops else None,
        mem_growth=max(r["growth"] for r in full) if full else None,
        prefill_mem_growth=max(r["growth"] for r in first) if first else None,
        seconds_1=[r["seconds"] for r in first], seconds_n=[r["seconds"] for r in full],
        peak_reset=all(r["scoped"] for r in first + full) if full else None,
        attn_implementation=done[0]["info"]["attn_implementation"] if done else None,
        skipped=next((result["skipped"] for result, _ in outcomes if result and "skipped" in result), None),
        error=next((error for _, error in outcomes if error), None), **case.extra)


def run_generate_group(cases: list[GenCase], rowset: str, args, flop_cache: dict) -> list[dict]:
    specs = [case.spec(args, count_flops=case.count_flops and case.flop_key() not in flop_cache) for case in cases]
    outcomes = run_rounds(measure_generate, specs, args.rounds)
    for case, record in zip(cases, outcomes):
        counted = next((result["flops"] for result, _ in record if result and result.get("flops")), None)
        if counted:
            flop_cache[case.flop_key()] = counted
    return [generate_row(case, record, rowset, args, flop_cache.get(case.flop_key()))
            for case, record in zip(cases, outcomes)]


def print_generate(rows: list[dict], args, revision) -> None:
    print(f"bench generate: size {args.size}, variant {args.variant}, 2 descent steps, greedy; {args.device} "
          f"{args.dtype}, torch threads {args.threads} (OMP_WAIT_POLICY {args.omp_wait_policy or 'unset'}); source "
          f"{revision or 'unknown'}.\nPer generated token = marginal cost (t(1+new) - t(1)) / new, medians over "
          f"`reps`; tok/s = batch * new / (t(1+new) - t(1)); FLOPs counted on one sequence, times the batch;\nmem "
          f"growth = peak {memory_name(args)} during the (1+new)-token call - before it (max over reps). Rows repeat "
          f"up to {args.reps} times, until their timed calls took {args.rep_budget:g} s, {args.rounds} round(s); "
          f"recompute rows generate {args.recompute_new_tokens} new tokens (fewer tokens understate their cost).")
    timed_rows = [r for r in rows if r["seconds_n"]]
    benchmark.Compare([measurement(r["seconds_n"], "generate: the (1+new)-token call", r["group"], r["label"],
                                   args.threads) for r in timed_rows]).print()
    print(format_table(
        ["group", "mode", "prompt", "batch", "new", "reps", "tok/s", "ms/token-step", "MFLOP/token", "MFU",
         "mem growth MiB", "prefill s", "prefill MiB", "error / note"],
        [[r["group"], r["label"], r["prompt_len"], r["batch"], r["new_tokens"], r["reps"], _fmt(r["tokens_per_s"]),
          _fmt(r["seconds_per_step"], ".1f", 1e3), _fmt(r["flops_per_token"], ".1f", 1e-6), _fmt(r["mfu"], ".2%"),
          _fmt(r["mem_growth"], ".1f", 2**-20), _fmt(r["prefill_seconds"], ".3f"),
          _fmt(r["prefill_mem_growth"], ".1f", 2**-20), r["error"] or r["skipped"] or ""] for r in rows]))
    print()


def cmd_generate(args) -> dict:
    start, revision = time.time(), source_revision()
    rows, targets, flop_cache = [], [], {}
    for name in args.rows:
        rowset = GENERATE_ROW_SETS[name]
        set_rows = [row for cases in rowset.groups(args) for row in run_generate_group(cases, name, args, flop_cache)]
        rows += set_rows
        targets += rowset.targets(set_rows, args)
    print_generate(rows, args, revision)
    return finish("generate", args, start, revision, rows, targets)


# --- summary: one table of several runs ---------------------------------------------------------------------------


def summary_table(payloads: list[dict]) -> str:
    """One line per row of each payload (train and generate), with the figures that compare across runs."""
    lines = []
    for payload in payloads:
        args, env = payload["args"], payload["environment"]
        for r in payload["rows"]:
            train = payload["command"] == "train"
            memory = r.get("peak_memory") if train else r.get("mem_growth")
            lines.append([payload["command"], args["size"], f"{env['device']} {env['dtype']}",
                          (r["variant"] or "-") if train else r["group"], r["label"],
                          f"{r['batch']}×{r['seq']}" if train else f"{r['batch']}×p{r['prompt_len']}",
                          _fmt(r["tokens_per_s"], ",.1f"), _fmt(r["step_seconds"] if train else r["seconds_per_step"],
                                                               ".3g", 1e3),
                          _fmt(memory, ".1f", 2**-20), _fmt(r["flops_per_token"], ".4g", 1e-9), _fmt(r["mfu"], ".2%"),
                          r["error"] or r.get("skipped") or ""])
    return format_table(["bench", "size", "device", "group", "mode", "shape", "tokens/s", "ms/step or token",
                         "MiB peak/growth", "GFLOP/token", "MFU", "error / note"], lines)


def cmd_summary(args) -> dict:
    payloads = []
    for path in args.paths:
        with open(path) as f:
            payloads.append(json.load(f))
    print(summary_table(payloads))
    targets = [t for p in payloads for t in p["targets"]]
    for t in targets:
        print(Target(t["name"], t["value"], t["op"], t["threshold"]).line())
    return dict(rows=[r for p in payloads for r in p["rows"]])


# --- command line -----------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(choices):
    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",") if x.strip()]
        for name in names:
            if name not in choices:
                raise argparse.ArgumentTypeError(f"{name!r} is not one of {', '.join(choices)}")
        return names
    return parse


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


QUICK = {
    "train": dict(size="tiny", batch_size=2, seq_len=32, steps=2, warmup=0),
    "generate": dict(size="tiny", prompt_lengths=[32], batch_sizes=[2], new_tokens=8, recompute_new_tokens=4, reps=3,
                     max_positions=128),
}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=sorted(SIZES), default="xxs", help="model size (default xxs)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu, cuda or cuda:N (default: cuda where available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="the weights' dtype (default float32)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: NVIDIA's dense figure for known GPUs at --dtype; "
                        "none on CPU)")
    p.add_argument("--rounds", type=int, default=1, help="times every row of a group is measured, in turn (default 1)")
    p.add_argument("--threads", type=int, default=default_threads(),
                   help="torch intra-op threads (default: all usable cores)")
    p.add_argument("--omp-wait-policy", choices=["passive", "active"],
                   default=(os.environ.get("OMP_WAIT_POLICY") or "").lower() or None,
                   help="OMP_WAIT_POLICY of the workers (default: the environment's, else OpenMP's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")


def _train_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per row and round (median; default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (default 1)")
    p.add_argument("--variants", type=_names(VARIANTS), default=list(VARIANTS),
                   help="comma-separated EBT variants (default: default,time_embed)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--reference-repo", metavar="PATH",
                   help="a checkout of github.com/alexiglad/EBT: adds a row per variant training the reference code "
                        "itself (needs pytorch_lightning and torchmetrics; see modeling_ebt/bench_reference.py)")
    p.add_argument("--autocast", choices=["bfloat16"], default=None,
                   help="also run ours, ours+ckpt, recompute and Llama under torch.autocast at this dtype (float32 "
                        "weights and descent state, the forward autocast, as TrainingArguments(bf16=True) runs it)")
    p.add_argument("--one-group", action="store_true",
                   help="kept for old command lines: the variants always form one group, with one Llama")


def _generate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variant", choices=VARIANTS, default="default")
    p.add_argument("--rows", type=_names(list(GENERATE_ROW_SETS)), default=["standard"],
                   help=f"comma-separated row sets: {', '.join(GENERATE_ROW_SETS)} (default standard)")
    p.add_argument("--prompt-lengths", type=_ints, default=[64, 256, 1024])
    p.add_argument("--batch-sizes", type=_ints, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens of the cached, compiled and Llama rows")
    p.add_argument("--recompute-new-tokens", type=int, default=4,
                   help="new tokens of the recompute rows (default 4: each costs a full forward+backward over the "
                        "whole prefix; its cost per token grows with the prefix, so fewer tokens understate it)")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions per row and round, at most (default 3)")
    p.add_argument("--rep-budget", type=float, default=60.0,
                   help="a row stops repeating once its timed calls took this many seconds; it runs at least once "
                        "(default 60: the long recompute rows run once or twice)")
    p.add_argument("--long-contexts", type=_ints, default=[512, 2048, 8192, 16384],
                   help="context lengths of the `long` row set")
    p.add_argument("--window", type=int, default=256, help="sliding window of the `long` row set")
    p.add_argument("--gqa-kv-heads", type=int, default=2, help="key/value heads of its GQA rows")
    p.add_argument("--long-new-tokens", type=int, default=16)
    p.add_argument("--long-reps", type=int, default=2)
    p.add_argument("--max-positions", type=int, default=2048,
                   help="max_position_embeddings of the models (raised to fit the longest sequence)")


def build_parser(quick: str | None = None) -> argparse.ArgumentParser:
    """The command line; `quick` names the command whose defaults the --quick preset replaces."""
    parser = argparse.ArgumentParser(prog="python -m modeling_ebt.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add in (("train", "training throughput, peak memory and FLOPs", _train_parser),
                                 ("generate", "generation throughput, FLOPs and memory growth", _generate_parser)):
        command = sub.add_parser(name, help=help_text)
        _common(command)
        add(command)
        if name == quick:
            command.set_defaults(**QUICK[name])
    summary = sub.add_parser("summary", help="one table of the rows of several --json files")
    summary.add_argument("paths", nargs="+", metavar="PATH")
    from . import bench_denoise  # imports this module: only once it is loaded

    denoise = sub.add_parser("denoise", help="image denoising: EBT against a same-size DiT (bench_denoise)")
    bench_denoise.add_arguments(denoise)
    if quick == "denoise":
        denoise.set_defaults(**bench_denoise.QUICK)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = argv[0] if argv and "--quick" in argv else None
    parser = build_parser(quick)
    args = parser.parse_args(argv)
    if args.command == "summary":
        return args
    if args.command == "denoise":
        from . import bench_denoise

        return bench_denoise.finalize_args(args, parser)
    if args.threads < 1 or args.rounds < 1:
        parser.error("--threads and --rounds must be >= 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is visible (torch {torch.__version__}, built with CUDA "
                     f"{torch.version.cuda}); use --device cpu")
    if args.peak_tflops is None:
        args.peak_tflops = default_peak_tflops(args.device, args.dtype)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "summary":
        cmd_summary(args)
        return 0
    if args.command == "denoise":
        from . import bench_denoise

        bench_denoise.run(args)
        return 0
    if args.omp_wait_policy:
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # inherited by the spawned workers
    payload = cmd_train(args) if args.command == "train" else cmd_generate(args)
    return 1 if any(r.get("error") for r in payload["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
