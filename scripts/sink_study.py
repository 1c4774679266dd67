"""Do sink tokens help a sliding window? A measurement on the default corpus (README, "Long sequences").

    python scripts/sink_study.py [--steps 250] [--window 32] [--sinks 4] [--out runs/sink-study]

Trains the main job's model (recipe cpu-small, 4xs) three times for the same number of steps on 256-byte blocks:
with full attention, with a sliding window W, and with the window plus S sink tokens. Then evaluates every trained
model under each attention setting (full; window; window + sinks: `from_pretrained(..., sliding_window=W,
num_sink_tokens=S)` changes only the attention pattern, not the weights) on the same validation blocks, with the same
initial noise, and prints the cross-entropy (nats/byte) of the positions inside the first window (< W, where the
settings see the same tokens) and beyond it (>= W, where the window hides the start of the block).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import modeling_ebt  # noqa: F401  (registers the Auto classes)
from modeling_ebt.data import build_lm_datasets
from modeling_ebt.tokenization_ebt import EBTTokenizer
from modeling_ebt.training import TrainOptions, run_training

BLOCK = 256


def train(out: Path, steps: int, model_args: dict) -> Path:
    run_training(TrainOptions(output_dir=str(out), recipe="cpu-small", max_steps=steps, block_size=BLOCK,
                              batch_size=16, eval_samples=0, training_args={"logging_steps": 50}, overwrite=True,
                              progress=False, model_args=model_args))
    return out


@torch.no_grad()
def position_losses(folder: Path, blocks: torch.Tensor, window: int, **attention) -> tuple[float, float]:
    model = AutoModelForCausalLM.from_pretrained(folder, **attention).eval()
    torch.manual_seed(0)  # the same initial noise for every model and setting
    losses = []
    for batch in blocks.split(16):
        logits = model(batch).logits[:, :-1]
        losses.append(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none"))
    loss = torch.cat(losses)  # blocks × (BLOCK − 1): loss[:, t] is the prediction of token t + 1 from tokens ≤ t
    return float(loss[:, :window].mean()), float(loss[:, window:].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--window", type=int, default=32)
    parser.add_argument("--sinks", type=int, default=4)
    parser.add_argument("--eval-blocks", type=int, default=128)
    parser.add_argument("--out", default="runs/sink-study")
    args = parser.parse_args()
    out = Path(args.out)
    window = dict(sliding_window=args.window)
    settings = {
        "full": dict(sliding_window=None, num_sink_tokens=0),
        f"window {args.window}": dict(window, num_sink_tokens=0),
        f"window {args.window} + {args.sinks} sinks": dict(window, num_sink_tokens=args.sinks),
    }
    trained = {name: train(out / name.replace(" ", "_").replace("+", "and"), args.steps, attention)
               for name, attention in settings.items()}

    validation = build_lm_datasets(EBTTokenizer(), None, block_size=BLOCK)["validation"]
    blocks = torch.as_tensor(validation[: args.eval_blocks]["input_ids"])
    results = {trained_as: {evaluated_as: position_losses(folder, blocks, args.window, **attention)
                            for evaluated_as, attention in settings.items()}
               for trained_as, folder in trained.items()}
    print(f"\ncross-entropy (nats/byte) on {len(blocks)} validation blocks of {BLOCK} bytes after {args.steps} steps; "
          f"positions < {args.window} | >= {args.window}")
    print(f"{'trained with':>24} | " + " | ".join(f"{name:>24}" for name in settings))
    for trained_as, row in results.items():
        print(f"{trained_as:>24} | " + " | ".join(f"{a:>11.3f} {b:>11.3f} " for a, b in row.values()))
    (out / "results.json").write_text(json.dumps(dict(args=vars(args), results=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
