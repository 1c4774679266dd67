"""Shared test helpers: tiny model configs and the location of ../shared (present in CI, not on users' machines)."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# The tests (and their subprocesses) never write into the user's datasets cache, where load_dataset keeps the
# corpora it reads: set before anything imports `datasets`, which reads it at import.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="ebt-tests-hf-datasets-")
atexit.register(shutil.rmtree, os.environ["HF_DATASETS_CACHE"], ignore_errors=True)

import pytest  # noqa: E402
import torch  # noqa: E402

from modeling_ebt import EBTConfig, EBTForCausalLM  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE_FIXTURES = SHARED / "fixtures" / "reference_ebt"
TINY_SHAKESPEARE = SHARED / "data" / "tiny_shakespeare.txt"

# The tests use tiny models: one thread is as fast as two, and keeps concurrent processes from thrashing (spinning
# OpenMP threads made tiny models ~100x slower on this 2-core machine). Subprocess tests set OMP_NUM_THREADS=1 alike.
torch.set_num_threads(1)


def tiny_config(**overrides) -> EBTConfig:
    fields = dict(vocab_size=257, hidden_size=32, num_attention_heads=4, num_hidden_layers=2,
                  max_position_embeddings=64, mcmc_num_steps=2, mcmc_step_size=5.0, eos_token_id=256,
                  pad_token_id=256)
    fields.update(overrides)
    return EBTConfig(**fields)


def tiny_model(seed=0, **overrides) -> EBTForCausalLM:
    torch.manual_seed(seed)
    return EBTForCausalLM(tiny_config(**overrides)).eval()


def require_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is absent: the ../shared folder beside the checkout holds the reference fixtures and "
                    f"corpus (present on developer machines and in CI only)")
    return path
