"""One training step (forward with the second-order descent, then backward) of a small time_embed EBT on one long
sequence, full attention against a sliding window: time and peak RSS growth.

    python scripts/long_context_training.py WINDOW|full SEQ_LEN
"""

import sys
import time

import torch

from modeling_ebt import EBTConfig, EBTForCausalLM


def status_gb(key: str) -> float:
    return int(open("/proc/self/status").read().split(f"{key}:")[1].split()[0]) / 1e6


def main(window_arg: str, seq_arg: str) -> None:
    torch.set_num_threads(1)
    window, seq = (None if window_arg == "full" else int(window_arg)), int(seq_arg)
    torch.manual_seed(0)
    config = EBTConfig(vocab_size=257, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                       ebt_type="time_embed", mcmc_num_steps=2, mcmc_step_size=5.0, max_position_embeddings=seq,
                       sliding_window=window)
    model = EBTForCausalLM(config).train()
    ids = torch.randint(0, 256, (1, seq))
    base = status_gb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:  # reset the peak RSS to the current RSS
        refs.write("5")
    start = time.perf_counter()
    out = model(ids, labels=ids)
    out.loss.backward()
    seconds = time.perf_counter() - start
    print(f"window={window} seq={seq}: step {seconds:.1f} s, peak RSS growth {status_gb('VmHWM') - base:.2f} GB, "
          f"loss {out.loss.item():.1f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
