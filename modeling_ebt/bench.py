"""Speed and memory benchmarks: this implementation against the reference's way (recompute) and a same-size Llama.

    python -m modeling_ebt.bench train    [--quick] [--json PATH] [--variants default,time_embed] ...
    python -m modeling_ebt.bench generate [--quick] [--json PATH] [--variant default] ...

How it measures
- Every configuration (one row of a table) runs in its own process (multiprocessing, spawn), so its peak RSS is its
  own. The rows compared with each other form a *group*; a group's processes start together and are then driven in
  turns, one timed repetition of each per round, so that the load of a noisy machine falls on all of them alike.
  Only ratios within one group are compared with the targets.
- Warm-up runs first; timings are medians over the timed repetitions (`time.perf_counter`, CPU ops are synchronous).
  The git revision of the checkout is recorded at the start (and at the end, in case it changed during the run).
- Peak RSS: `VmHWM` of /proc/self/status (resource.getrusage where that is missing). Writing "5" to
  /proc/self/clear_refs resets it to the current RSS, which scopes a peak to a measured region.
- FLOPs: `torch.utils.flop_counter.FlopCounterMode` (matmuls and attention kernels, forward and backward), in a
  separate untimed run.
- torch intra-op threads: `--threads` (default: all cores this process may use), set in every worker and reported.
  OpenMP threads wait passively by default (`--omp-wait-policy`, exported as OMP_WAIT_POLICY to the workers): on a
  machine shared with other processes, spin-waiting threads lose their time slices at every parallel region and
  a model of small ops runs up to a hundred times slower, which says nothing about the model.

train: one training step = forward (energy descent with second-order graph for the EBT), backward, gradient
clipping (1.0) and an AdamW step. Our rows: "ours" (the default) and "ours+ckpt" (`activation_checkpointing_enable()`:
each descent step's graph is recomputed in the backward). tokens/s = batch × seq / median step time; peak RSS = the
worker's peak over the warm-up and timed steps (model, optimizer state and activations included; free heap left by
the untimed first step is returned first); FLOPs per token = FLOPs of forward + backward of one step / (batch × seq).
The first step of each EBT worker starts from the same seed in every mode, so its loss and energies give the sanity
line (the modes compute the same function).

generate: greedy decoding of exactly N new tokens (no EOS). Per generated token means the marginal cost:
(generating 1 + N tokens − generating 1 token) / N, so the prompt's prefill (= the 1-token generation) is reported on
its own. tokens/s = batch × N / (t(1+N) − t(1)). Memory growth = peak RSS during the call − RSS before it (free heap
memory is returned to the system with malloc_trim before each call, so the growth counts what the call touches).
FLOPs are counted on one sequence and multiplied by the batch size (every op is linear in the batch). The recompute
rows generate fewer new tokens (`--recompute-new-tokens`, default 4): each token costs a forward and backward over
the whole prefix, and as that cost grows with the prefix, fewer tokens understate it (the ratios err against us).
Each row repeats up to `--reps` times but stops once its timed runs took `--rep-budget` seconds (at least once); the
table says how many repetitions each row used.

Adding a row set to `generate` (e.g. long contexts): write a function returning groups of `GenCase`s and one
returning `Target`s, register them in `GENERATE_ROW_SETS` as a `RowSet`, and select it with `--rows`.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import multiprocessing
import os
import re
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from . import presets

# --- process measurements ---------------------------------------------------------------------------------------

_STATUS = "/proc/self/status"


def _status_bytes(key: str) -> int | None:
    try:
        with open(_STATUS) as f:
            match = re.search(rf"^{key}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def rss_bytes() -> int:
    """Current resident set size (0 where /proc is missing)."""
    return _status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or since the last `reset_peak_rss`."""
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_rss() -> bool:
    """Reset the peak RSS to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def release_free_memory() -> None:
    """Return free heap memory to the system (glibc), so that RSS measures live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --- models -----------------------------------------------------------------------------------------------------

VOCAB_SIZE = 257  # byte-level vocabulary
# the shipped sizes (configuration/sizes), plus "tiny" (2 layers of width 64) for the bench's own smoke tests
SIZES = {"tiny": dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
         **{name: presets.size_fields(name) for name in presets.size_names()}}
VARIANTS = ("default", "time_embed")


def ebt_config(size: str, variant: str, max_positions: int, **overrides) -> dict:
    return dict(vocab_size=VOCAB_SIZE, **SIZES[size], max_position_embeddings=max_positions, mcmc_num_steps=2,
                ebt_type=variant, **overrides)


def llama_config(size: str, max_positions: int, **overrides) -> dict:
    return dict(vocab_size=VOCAB_SIZE, **SIZES[size], max_position_embeddings=max_positions, **overrides)


def build_model(model: str, config: dict):
    if model == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        return LlamaForCausalLM(LlamaConfig(**config))
    from modeling_ebt import EBTConfig, EBTForCausalLM

    return EBTForCausalLM(EBTConfig(**config))


def _model_info(model) -> dict:
    import torch

    return dict(parameters=sum(p.numel() for p in model.parameters()),
                attn_implementation=getattr(model.config, "_attn_implementation", None),
                torch_threads=torch.get_num_threads(), torch_version=torch.__version__)


# --- jobs: what a worker process runs ----------------------------------------------------------------------------


class TrainJob:
    """One training configuration: a model, its optimizer and one fixed batch."""

    SANITY_SEED = 1234

    def __init__(self, spec: dict):
        import torch
        import torch.utils.flop_counter  # noqa: F401  (slow first import, done while nothing is timed)

        self.torch = torch
        self.baseline_rss = rss_bytes()
        torch.manual_seed(spec["seed"])
        self.is_ebt = spec["model"] == "ebt"
        self.model = build_model(spec["model"], spec["config"]).train()
        if spec.get("checkpointing"):
            self.model.activation_checkpointing_enable()
        generator = torch.Generator().manual_seed(spec["seed"] + 1)
        self.ids = torch.randint(0, VOCAB_SIZE, (spec["batch"], spec["seq"]), generator=generator)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=spec["lr"], weight_decay=0.01)
        self.thinking = None
        if self.is_ebt and spec["recompute"]:
            from modeling_ebt import ThinkingConfig

            self.thinking = ThinkingConfig(recompute=True)
        self.peak_reset = False
        self.info = _model_info(self.model)

    def _forward(self):
        if self.thinking is not None:
            return self.model(self.ids, labels=self.ids, thinking=self.thinking)
        return self.model(input_ids=self.ids, labels=self.ids)

    def _update(self):
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def _step(self) -> float:
        out = self._forward()
        out.loss.backward()
        loss = out.loss.item()
        del out
        self._update()
        return loss

    def first_step(self) -> dict:
        """The first training step, from a fixed seed, under the FLOP counter: FLOPs, loss and energies."""
        from torch.utils.flop_counter import FlopCounterMode

        self.torch.manual_seed(self.SANITY_SEED)
        with FlopCounterMode(display=False) as counter:
            out = self._forward()
            out.loss.backward()
        result = dict(flops=counter.get_total_flops(), loss=out.loss.item())
        if self.is_ebt:
            result["energies"] = out.energies.detach().clone()
        del out
        self._update()
        return result

    def start_peak(self) -> bool:
        """Scope the peak RSS to what follows (warm-up and timed steps): free heap memory left by the untimed first
        step (run under the FLOP counter) is returned to the system first, as before every generate call."""
        release_free_memory()
        self.peak_reset = reset_peak_rss()
        return self.peak_reset

    def warmup(self) -> float:
        return self._step()

    def timed_step(self) -> float:
        start = time.perf_counter()
        self._step()
        return time.perf_counter() - start

    def memory(self) -> dict:
        return dict(peak_rss=peak_rss_bytes(), rss=rss_bytes(), baseline_rss=self.baseline_rss,
                    peak_reset=self.peak_reset)


class GenerateJob:
    """One generation configuration: a model and a fixed prompt batch."""

    def __init__(self, spec: dict):
        import torch
        import torch.utils.flop_counter  # noqa: F401  (slow first import, done while nothing is timed)

        self.torch = torch
        torch.manual_seed(spec["seed"])
        self.model = build_model(spec["model"], spec["config"]).eval()
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0
        generator = torch.Generator().manual_seed(spec["seed"] + 1)
        self.ids = torch.randint(1, VOCAB_SIZE, (spec["batch"], spec["prompt_len"]), generator=generator)
        self.new_tokens = spec["new_tokens"]
        self.extra = dict(recompute=True) if spec["model"] == "ebt" and spec["recompute"] else {}
        self.recompute = bool(self.extra)
        self.short_warmup = self.recompute or spec.get("short_warmup", False)
        self.extra.update(spec.get("generate_kwargs", {}))
        self.info = _model_info(self.model)

    def _generate(self, new_tokens: int, batch: int | None = None, prompt_len: int | None = None):
        ids = self.ids[:batch, :prompt_len]
        out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                                  **self.extra)
        if out.shape != (ids.shape[0], ids.shape[1] + new_tokens):
            raise RuntimeError(f"generate returned shape {tuple(out.shape)}, expected "
                               f"{(ids.shape[0], ids.shape[1] + new_tokens)}")
        return out

    def flops(self, tokens: list[int], batch: int) -> list[int]:
        """FLOPs of generating each of `tokens` new tokens for the first `batch` prompts."""
        from torch.utils.flop_counter import FlopCounterMode

        counts = []
        for n in tokens:
            with FlopCounterMode(display=False) as counter:
                self._generate(n, batch)
            counts.append(counter.get_total_flops())
        return counts

    def warmup(self) -> None:
        """Recompute: one token from a short prompt (lazy initialisation; the full-size call is long). Otherwise a
        full-size generation."""
        if self.short_warmup:
            self._generate(1, prompt_len=min(16, self.ids.shape[1]))
        else:
            self._generate(1 + self.new_tokens)

    def run(self, new_tokens: int) -> dict:
        """Time one generation of `new_tokens` tokens and the peak RSS growth during it."""
        release_free_memory()
        before = rss_bytes()
        scoped = reset_peak_rss()
        start = time.perf_counter()
        self._generate(new_tokens)
        seconds = time.perf_counter() - start
        return dict(seconds=seconds, growth=max(peak_rss_bytes() - before, 0), peak_reset=scoped)


JOBS = {"train": TrainJob, "generate": GenerateJob}


def _worker_main(conn, spec: dict, threads: int) -> None:
    """Entry point of a worker process: build the job, then answer commands until "stop"."""
    import torch

    torch.set_num_threads(threads)
    try:
        job = JOBS[spec["job"]](spec)
        conn.send(("ok", job.info))
        while True:
            command, kwargs = conn.recv()
            if command == "stop":
                break
            conn.send(("ok", getattr(job, command)(**kwargs)))
    except Exception as exc:  # reported to the parent, which marks the row as failed
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


class Worker:
    """Parent-side handle of one worker process. A failure (exception or death) is kept in `error`; later calls
    then return None, so one failing configuration does not stop the others."""

    def __init__(self, context, spec: dict, threads: int, name: str):
        self.name, self.spec, self.error, self.info = name, spec, None, {}
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, spec, threads), daemon=True)
        self.process.start()
        child.close()

    def _receive(self):
        try:
            status, payload = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(10)
            code = self.process.exitcode
            hint = " (killed: out of memory?)" if code == -9 else ""
            self.error = f"worker process died, exit code {code}{hint}"
            return None
        if status == "error":
            self.error = payload.splitlines()[0]
            print(f"[bench] {self.name} failed:\n{payload}", file=sys.stderr)
            return None
        return payload

    def wait_ready(self) -> None:
        self.info = self._receive() or {}

    def call(self, command: str, **kwargs):
        if self.error:
            return None
        try:
            self.conn.send((command, kwargs))
        except (BrokenPipeError, OSError):
            return self._receive()
        return self._receive()

    def close(self) -> None:
        if self.process.is_alive():
            try:
                self.conn.send(("stop", {}))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(30)
            if self.process.is_alive():
                self.process.terminate()
                self.process.join(10)
        self.conn.close()


def start_workers(specs: list[dict], names: list[str], threads: int) -> list[Worker]:
    context = multiprocessing.get_context("spawn")  # a fresh interpreter: the environment set in main() applies
    workers = [Worker(context, spec, threads, name) for spec, name in zip(specs, names)]
    for worker in workers:  # the processes import and build concurrently; nothing is timed yet
        worker.wait_ready()
    return workers


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- targets and tables -----------------------------------------------------------------------------------------


@dataclass
class Target:
    """A ratio and its target: `value` ≥ `threshold` (op ">=") or ≤ (op "<="). value None: not measured;
    threshold None: a ratio reported for comparison, with no target."""

    name: str
    value: float | None
    op: str
    threshold: float | None

    @property
    def passed(self) -> bool | None:
        if self.threshold is None or self.value is None or not math.isfinite(self.value):
            return None
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def as_dict(self) -> dict:
        return dict(name=self.name, value=self.value, op=self.op, threshold=self.threshold, passed=self.passed)

    def line(self) -> str:
        if self.threshold is None:
            return f"{self.name:<58} {_fmt(self.value, '.3g'):>9}   (for comparison, no target)"
        status = {True: "PASS", False: "MISS", None: "n/a"}[self.passed]
        return f"{self.name:<58} {_fmt(self.value, '.3g'):>9}   target {self.op} {self.threshold:<8.4g} {status}"


def ratio(a, b) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def _fmt(value, spec: str = ".3g") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def format_table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _gib(n) -> str:
    return _fmt(n / 2**30 if n is not None else None, ".3f")


def _mib(n) -> str:
    return _fmt(n / 2**20 if n is not None else None, ".1f")


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _clean(obj):
    """JSON-safe copy: NaN/inf become null, tuples lists."""
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return _finite_or_none(obj)


def write_json(path: str | None, payload: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(_clean(payload), f, indent=2)
        log(f"figures written to {path}")


def source_revision() -> str | None:
    """The git commit of the checkout this module runs from ("+dirty" with local changes), None outside git."""
    import subprocess

    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "."], cwd=here,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment(threads: int, revision: str | None) -> dict:
    import platform

    import torch
    import transformers

    return dict(torch_threads=threads, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"),
                source_revision=revision, source_revision_at_end=source_revision(), cpu_count=os.cpu_count(),
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                machine=platform.machine(), peak_reset_supported=reset_peak_rss())


# --- train ------------------------------------------------------------------------------------------------------

TRAIN_TARGETS = {  # variant: (min ours/recompute tokens/s, max ours/recompute peak RSS)
    "default": (1.5, 0.50),
    "time_embed": (1.2, 0.60),
}
TRAIN_LLAMA_TARGETS = (0.25, 3.4)  # min ours/Llama tokens/s, max ours/Llama peak RSS


def _relative_difference(a, b) -> float:
    """max |a − b| / max |b| (a scale-aware relative difference of tensors or numbers)."""
    import torch

    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-30))


def run_train_group(variants: list[str], args) -> tuple[list[dict], dict]:
    """Ours and recompute for each variant, and one Llama, side by side. Returns the rows and, per variant, the
    sanity figures (ours vs recompute on the first batch)."""
    max_positions = args.seq_len + 1
    group = "+".join(variants)
    cases = []  # (label, model, variant, config, recompute)
    for variant in variants:
        config = ebt_config(args.size, variant, max_positions)
        cases += [("ours", "ebt", variant, config, False), ("ours+ckpt", "ebt", variant, config, False),
                  ("recompute", "ebt", variant, config, True)]
    cases.append(("llama", "llama", None, llama_config(args.size, max_positions), False))
    specs = [dict(job="train", model=model, config=config, recompute=recompute, batch=args.batch_size,
                  seq=args.seq_len, seed=args.seed, lr=args.lr, checkpointing=label.endswith("+ckpt"))
             for label, model, _, config, recompute in cases]
    names = [f"train {variant or group}/{label}" for label, _, variant, *_ in cases]
    log(f"train {group}: starting {len(specs)} workers")
    workers = start_workers(specs, names, args.threads)
    try:
        first = []
        for worker in workers:
            log(f"{worker.name}: first step (FLOP count, sanity)")
            first.append(worker.call("first_step"))
        for worker in workers:
            worker.call("start_peak")
            for _ in range(args.warmup):
                log(f"{worker.name}: warm-up step")
                worker.call("warmup")
        times = [[] for _ in workers]
        for step in range(args.steps):
            for worker, record in zip(workers, times):
                seconds = worker.call("timed_step")
                if seconds is not None:
                    record.append(seconds)
                    log(f"{worker.name}: step {step + 1}/{args.steps} {seconds:.2f} s")
        memory = [worker.call("memory") or {} for worker in workers]
    finally:
        for worker in workers:
            worker.close()
    tokens = args.batch_size * args.seq_len
    rows = []
    for (label, model, variant, _, recompute), worker, record, mem, head in zip(cases, workers, times, memory, first):
        median = statistics.median(record) if record else None
        rows.append(dict(
            group=group, label=label, model=model, variant=variant, recompute=recompute, batch=args.batch_size,
            seq=args.seq_len, steps=len(record), step_seconds=median, step_seconds_all=record,
            tokens_per_s=tokens / median if median else None, peak_rss=mem.get("peak_rss"),
            baseline_rss=mem.get("baseline_rss"), peak_reset=mem.get("peak_reset"),
            flops_per_token=head["flops"] / tokens if head else None, threads=args.threads,
            parameters=worker.info.get("parameters"), attn_implementation=worker.info.get("attn_implementation"),
            error=worker.error))
    sanity = {}
    for variant in variants:
        ours, ckpt, rec = (head for (label, _, v, *_), head in zip(cases, first) if v == variant)
        entry = dict(loss_rel_diff=None, energies_rel_diff=None, max_rel_diff=None)
        if ours and rec:
            entry = dict(loss_rel_diff=_relative_difference(ours["loss"], rec["loss"]),
                         energies_rel_diff=_relative_difference(ours["energies"], rec["energies"]),
                         energies_rel_diff_per_step=[_relative_difference(a, b)
                                                     for a, b in zip(ours["energies"], rec["energies"])],
                         loss_ours=ours["loss"], loss_recompute=rec["loss"])
            entry["max_rel_diff"] = max(entry["loss_rel_diff"], entry["energies_rel_diff"])
        # activation checkpointing recomputes the same function from the same seed: the same loss
        entry["checkpointing_loss_rel_diff"] = (_relative_difference(ckpt["loss"], ours["loss"]) if ours and ckpt
                                                else None)
        sanity[variant] = entry
    return rows, sanity


def train_targets(variant: str, rows: list[dict], mode: str = "ours") -> list[Target]:
    """The targets for one of our modes: "ours" (the default) or "ours+ckpt" (activation checkpointing)."""
    def row(label, variant):
        return next((r for r in rows if r["label"] == label and r["variant"] == variant and not r["error"]), {})

    ours, rec, llama = row(mode, variant), row("recompute", variant), row("llama", None)
    speed, memory = TRAIN_TARGETS[variant]
    return [
        Target(f"{variant}: {mode}/recompute tokens/s", ratio(ours.get("tokens_per_s"), rec.get("tokens_per_s")),
               ">=", speed),
        Target(f"{variant}: {mode}/recompute peak RSS", ratio(ours.get("peak_rss"), rec.get("peak_rss")), "<=",
               memory),
        Target(f"{variant}: {mode}/Llama tokens/s", ratio(ours.get("tokens_per_s"), llama.get("tokens_per_s")),
               ">=", TRAIN_LLAMA_TARGETS[0]),
        Target(f"{variant}: {mode}/Llama peak RSS", ratio(ours.get("peak_rss"), llama.get("peak_rss")), "<=",
               TRAIN_LLAMA_TARGETS[1]),
    ]


def cmd_train(args) -> dict:
    start, revision = time.time(), source_revision()
    rows, targets, sanity = [], [], {}
    # One group per variant keeps the memory of the idle workers of a group within RAM at full size (each holds its
    # heap between steps); `--one-group` (the quick preset) measures all rows side by side with a single Llama.
    groups = [args.variants] if args.one_group else [[v] for v in args.variants]
    for variants in groups:
        group_rows, group_sanity = run_train_group(variants, args)
        rows += group_rows
        sanity.update(group_sanity)
        for variant in variants:
            targets += train_targets(variant, group_rows) + train_targets(variant, group_rows, "ours+ckpt")
    header = (f"bench train: size {args.size}, batch {args.batch_size} × seq {args.seq_len}, 2 descent steps, "
              f"AdamW step included; torch threads {args.threads} (OMP_WAIT_POLICY {args.omp_wait_policy}); "
              f"{args.warmup} warm-up + {args.steps} timed steps "
              f"per row (median); the rows of a group run interleaved, "
              f"groups: {'one' if args.one_group else 'one per variant, each with its own Llama'}")
    table = format_table(
        ["group", "mode", "tokens/s", "step s", "peak RSS GiB", "GFLOP/token", "steps", "attn", "error"],
        [[r["variant"] or r["group"], r["label"], _fmt(r["tokens_per_s"], ".1f"), _fmt(r["step_seconds"], ".2f"),
          _gib(r["peak_rss"]), _fmt(r["flops_per_token"] / 1e9 if r["flops_per_token"] else None, ".4f"),
          r["steps"], r["attn_implementation"] or "-", r["error"] or ""] for r in rows])
    print(header + f"; source {revision or 'unknown'}")
    print(table)
    print()
    for variant, s in sanity.items():
        steps = ", ".join(_fmt(d, ".1e") for d in s.get("energies_rel_diff_per_step") or [])
        print(f"sanity ({variant}): max relative difference ours vs recompute on the first batch: loss "
              f"{_fmt(s.get('loss_rel_diff'), '.2e')}, energies {_fmt(s.get('energies_rel_diff'), '.2e')} "
              f"(per descent step: {steps}; each step amplifies float32 round-off); loss with activation "
              f"checkpointing vs without {_fmt(s.get('checkpointing_loss_rel_diff'), '.2e')}")
    print()
    for target in targets:
        print(target.line())
    print(f"\nelapsed {time.time() - start:.0f} s")
    payload = dict(command="train", args=vars(args), environment=environment(args.threads, revision), rows=rows,
                   sanity=sanity, targets=[t.as_dict() for t in targets], elapsed_s=time.time() - start)
    write_json(args.json, payload)
    return payload


# --- generate ---------------------------------------------------------------------------------------------------


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
    extra: dict = field(default_factory=dict)  # anything a row set wants to carry into its rows and targets
    generate_kwargs: dict = field(default_factory=dict)  # passed to `generate` (e.g. prefill_chunk_size)
    count_flops: bool = True
    short_warmup: bool = False  # warm up on a short prompt (the full-size call is long)

    def flop_key(self) -> str:
        """FLOPs per sequence are shared by the rows that differ only in batch size."""
        return json.dumps([self.model, self.config, self.recompute, self.prompt_len, self.new_tokens], sort_keys=True)


@dataclass
class RowSet:
    """groups(args) → groups of cases measured side by side; targets(rows, args) → the targets on their rows."""

    groups: Callable[[argparse.Namespace], list[list[GenCase]]]
    targets: Callable[[list[dict], argparse.Namespace], list[Target]]
    description: str = ""


def standard_groups(args) -> list[list[GenCase]]:
    """Cached vs recompute vs same-size Llama, per (prompt length, batch size)."""
    longest = max(args.prompt_lengths) + max(args.new_tokens, args.recompute_new_tokens) + 1
    max_positions = max(args.max_positions, longest)
    groups = []
    for batch in sorted(args.batch_sizes):  # batch 1 first: its FLOP counts serve the larger batches
        for prompt in args.prompt_lengths:
            group = f"standard p{prompt} b{batch}"
            config = ebt_config(args.size, args.variant, max_positions)
            common = dict(group=group, prompt_len=prompt, batch=batch)
            groups.append([
                GenCase(label="cached", model="ebt", config=config, new_tokens=args.new_tokens, reps=args.reps,
                        **common),
                GenCase(label="recompute", model="ebt", config=config, new_tokens=args.recompute_new_tokens,
                        reps=args.reps, recompute=True, **common),
                GenCase(label="llama", model="llama", config=llama_config(args.size, max_positions),
                        new_tokens=args.new_tokens, reps=args.reps, **common),
            ])
    return groups


def _find(rows: list[dict], **match) -> dict | None:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()) and not row.get("error"):
            return row
    return None


def standard_targets(rows: list[dict], args) -> list[Target]:
    targets = []
    for batch in sorted(args.batch_sizes):
        def pair(label, prompt, key, batch=batch):
            ours = _find(rows, rowset="standard", label="cached", prompt_len=prompt, batch=batch)
            other = _find(rows, rowset="standard", label=label, prompt_len=prompt, batch=batch)
            return ratio(ours and ours[key], other and other[key])

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
        for prompt in args.prompt_lengths:
            targets.append(Target(f"p{prompt} b{batch}: cached/Llama tokens/s", pair("llama", prompt, "tokens_per_s"),
                                  ">=", 1 / 6))
    return targets


def long_context_groups(args) -> list[list[GenCase]]:
    """Per context length: full attention vs a sliding window, each with MHA and GQA; batch 1, cached generation,
    the prompt prefilled in chunks of `--window` tokens (so a windowed model never holds more than O(window))."""
    max_positions = max(args.long_contexts) + args.long_new_tokens + 1
    groups = []
    for context in args.long_contexts:
        cases = []
        for attention, window in (("full", None), (f"window {args.window}", args.window)):
            for heads, kv_heads in (("MHA", None), (f"GQA kv{args.gqa_kv_heads}", args.gqa_kv_heads)):
                config = ebt_config(args.size, args.variant, max_positions, sliding_window=window,
                                    num_key_value_heads=kv_heads)
                cases.append(GenCase(
                    group=f"long c{context}", label=f"{attention} {heads}", model="ebt", config=config,
                    prompt_len=context, batch=1, new_tokens=args.long_new_tokens, reps=args.long_reps,
                    generate_kwargs=dict(prefill_chunk_size=args.window), count_flops=False, short_warmup=True,
                    extra=dict(context=context, window=window, kv_heads=kv_heads or config["num_attention_heads"])))
        groups.append(cases)
    return groups


def long_context_targets(rows: list[dict], args) -> list[Target]:
    """With the window: per-token time at 8K within 1.5× of 512, memory growth flat from 512 to the longest context
    (full attention's ratios are printed beside them, with no target)."""
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
    "long": RowSet(long_context_groups, long_context_targets,
                   "long contexts: full attention vs sliding window, MHA vs GQA (per-token time and memory)"),
}


def run_generate_group(cases: list[GenCase], rowset: str, args, flop_cache: dict) -> list[dict]:
    specs = [dict(job="generate", model=c.model, config=c.config, recompute=c.recompute, batch=c.batch,
                  prompt_len=c.prompt_len, new_tokens=c.new_tokens, seed=args.seed, short_warmup=c.short_warmup,
                  generate_kwargs=c.generate_kwargs) for c in cases]
    names = [f"{c.group}/{c.label}" for c in cases]
    log(f"{cases[0].group}: starting {len(specs)} workers")
    workers = start_workers(specs, names, args.threads)
    try:
        for case, worker in zip(cases, workers):
            key = case.flop_key()
            if case.count_flops and key not in flop_cache:
                log(f"{worker.name}: counting FLOPs (1 sequence, 1 and {1 + case.new_tokens} tokens)")
                flop_cache[key] = worker.call("flops", tokens=[1, 1 + case.new_tokens], batch=1)
        for worker in workers:
            log(f"{worker.name}: warm-up")
            worker.call("warmup")
        runs = [([], []) for _ in cases]
        spent = [0.0 for _ in cases]  # timed seconds per row; a row stops repeating past --rep-budget
        for rep in range(max(c.reps for c in cases)):
            for i, (case, worker, (first, full)) in enumerate(zip(cases, workers, runs)):
                if rep >= case.reps or (rep > 0 and spent[i] >= args.rep_budget):
                    continue
                one = worker.call("run", new_tokens=1)
                many = worker.call("run", new_tokens=1 + case.new_tokens)
                if one and many:
                    first.append(one)
                    full.append(many)
                    spent[i] += one["seconds"] + many["seconds"]
                    log(f"{worker.name}: rep {rep + 1}/{case.reps}: 1 token {one['seconds']:.2f} s, "
                        f"{1 + case.new_tokens} tokens {many['seconds']:.2f} s")
    finally:
        for worker in workers:
            worker.close()
    rows = []
    for case, worker, (first, full) in zip(cases, workers, runs):
        n, batch = case.new_tokens, case.batch
        t1 = statistics.median(r["seconds"] for r in first) if first else None
        tn = statistics.median(r["seconds"] for r in full) if full else None
        step = (tn - t1) / n if first and full else None
        if step is not None and step <= 0:
            step = None  # noise swamped the difference: report nothing rather than nonsense
        flops = flop_cache.get(case.flop_key())
        rows.append(dict(
            rowset=rowset, group=case.group, label=case.label, model=case.model, recompute=case.recompute,
            variant=case.config.get("ebt_type"), prompt_len=case.prompt_len, batch=batch, new_tokens=n,
            reps=len(full), threads=args.threads,
            tokens_per_s=batch / step if step else None, seconds_per_step=step,
            flops_per_token=(flops[1] - flops[0]) / n if flops else None,
            prefill_seconds=t1, prefill_flops=flops[0] * batch if flops else None,
            mem_growth=max(r["growth"] for r in full) if full else None,
            prefill_mem_growth=max(r["growth"] for r in first) if first else None,
            seconds_1=[r["seconds"] for r in first], seconds_n=[r["seconds"] for r in full],
            peak_reset=all(r["peak_reset"] for r in first + full) if full else None,
            attn_implementation=worker.info.get("attn_implementation"), error=worker.error, **case.extra))
    return rows


def cmd_generate(args) -> dict:
    start, revision = time.time(), source_revision()
    rows, targets, flop_cache = [], [], {}
    for name in args.rows:
        rowset = GENERATE_ROW_SETS[name]
        set_rows = []
        for cases in rowset.groups(args):
            set_rows += run_generate_group(cases, name, args, flop_cache)
        rows += set_rows
        targets += rowset.targets(set_rows, args)
    print(f"bench generate: size {args.size}, variant {args.variant}, 2 descent steps, greedy; torch threads "
          f"{args.threads} (OMP_WAIT_POLICY {args.omp_wait_policy}); source {revision or 'unknown'}.\n"
          f"Per generated token = marginal cost (t(1+new) - t(1)) / new, medians over `reps`; tok/s = batch * new / "
          f"(t(1+new) - t(1));\nFLOPs counted on one sequence, times the batch; mem growth = peak RSS during the "
          f"(1+new)-token call - RSS before it (max over reps).\nRows repeat up to {args.reps} times, until their "
          f"timed runs took {args.rep_budget:g} s; recompute rows generate {args.recompute_new_tokens} new tokens "
          f"(their cost per token grows with the prefix: fewer tokens understate it).")
    print(format_table(
        ["group", "mode", "prompt", "batch", "new", "reps", "tok/s", "ms/token-step", "MFLOP/token",
         "mem growth MiB", "error"],
        [[r["group"], r["label"], r["prompt_len"], r["batch"], r["new_tokens"], r["reps"], _fmt(r["tokens_per_s"]),
          _fmt(r["seconds_per_step"] * 1e3 if r["seconds_per_step"] else None, ".1f"),
          _fmt(r["flops_per_token"] / 1e6 if r["flops_per_token"] else None, ".1f"), _mib(r["mem_growth"]),
          r["error"] or ""] for r in rows]))
    print("\nprefill (the 1-token generation, reported on its own):")
    print(format_table(
        ["group", "mode", "prefill s", "prefill GFLOP", "prefill mem MiB"],
        [[r["group"], r["label"], _fmt(r["prefill_seconds"], ".3f"),
          _fmt(r["prefill_flops"] / 1e9 if r["prefill_flops"] else None, ".3f"), _mib(r["prefill_mem_growth"])]
         for r in rows]))
    print()
    for target in targets:
        print(target.line())
    print(f"\nelapsed {time.time() - start:.0f} s")
    payload = dict(command="generate", args=vars(args), environment=environment(args.threads, revision), rows=rows,
                   targets=[t.as_dict() for t in targets], elapsed_s=time.time() - start)
    write_json(args.json, payload)
    return payload


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


TRAIN_QUICK = dict(size="tiny", batch_size=2, seq_len=32, steps=2, warmup=0, one_group=True)
GENERATE_QUICK = dict(size="tiny", prompt_lengths=[32], batch_sizes=[2], new_tokens=8, recompute_new_tokens=4,
                      reps=3, max_positions=128)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m modeling_ebt.bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--size", choices=sorted(SIZES), default="xxs", help="model size (default xxs)")
        p.add_argument("--threads", type=int, default=default_threads(),
                       help="torch intra-op threads per worker (default: all usable cores)")
        p.add_argument("--omp-wait-policy", choices=["passive", "active"],
                       default=os.environ.get("OMP_WAIT_POLICY", "passive").lower(),
                       help="OMP_WAIT_POLICY of the workers (default: the environment's, else passive)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
        p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")

    train = sub.add_parser("train", help="training throughput, peak RSS and FLOPs")
    common(train)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--seq-len", type=int, default=256)
    train.add_argument("--steps", type=int, default=5, help="timed steps per row (median; default 5)")
    train.add_argument("--warmup", type=int, default=1, help="untimed steps after the first (default 1)")
    train.add_argument("--variants", type=_names(VARIANTS), default=list(VARIANTS),
                       help="comma-separated EBT variants (default: default,time_embed)")
    train.add_argument("--lr", type=float, default=1e-4)
    train.add_argument("--one-group", action="store_true",
                       help="measure all variants side by side in one group with one Llama (more memory at once)")

    gen = sub.add_parser("generate", help="generation throughput, FLOPs and memory: cached vs recompute vs Llama")
    common(gen)
    gen.add_argument("--variant", choices=VARIANTS, default="default")
    gen.add_argument("--rows", type=_names(list(GENERATE_ROW_SETS)), default=["standard"],
                     help=f"comma-separated row sets: {', '.join(GENERATE_ROW_SETS)} (default standard)")
    gen.add_argument("--prompt-lengths", type=_ints, default=[64, 256, 1024])
    gen.add_argument("--batch-sizes", type=_ints, default=[1, 8])
    gen.add_argument("--new-tokens", type=int, default=32, help="new tokens of the cached and Llama rows")
    gen.add_argument("--recompute-new-tokens", type=int, default=4,
                     help="new tokens of the recompute rows (default 4: each costs a full forward+backward over the "
                          "whole prefix; its cost per token grows with the prefix, so fewer tokens understate it)")
    gen.add_argument("--reps", type=int, default=3, help="timed repetitions per row, at most (default 3)")
    gen.add_argument("--rep-budget", type=float, default=60.0,
                     help="a row stops repeating once its timed runs took this many seconds; it runs at least once "
                          "(default 60: the long recompute rows run once or twice)")
    gen.add_argument("--long-contexts", type=_ints, default=[512, 2048, 8192, 16384],
                     help="context lengths of the `long` row set")
    gen.add_argument("--window", type=int, default=256, help="sliding window of the `long` row set")
    gen.add_argument("--gqa-kv-heads", type=int, default=2, help="key/value heads of its GQA rows")
    gen.add_argument("--long-new-tokens", type=int, default=16)
    gen.add_argument("--long-reps", type=int, default=2)
    gen.add_argument("--max-positions", type=int, default=2048,
                     help="max_position_embeddings of the models (raised to fit the longest sequence)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.quick:  # the preset fills in what the command line left at its default
        preset = TRAIN_QUICK if args.command == "train" else GENERATE_QUICK
        sub = parser._subparsers._group_actions[0].choices[args.command]
        for key, value in preset.items():
            if getattr(args, key) == sub.get_default(key):
                setattr(args, key, value)
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()  # inherited by the spawned workers
    payload = cmd_train(args) if args.command == "train" else cmd_generate(args)
    failed = [r for r in payload["rows"] if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
