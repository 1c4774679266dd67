"""The reference implementation (github alexiglad/EBT, model/nlp/ebt.py, unmodified) as rows of `bench train`.

`python -m modeling_ebt.bench train --reference-repo PATH` adds, per variant, a row that trains the reference's
`EBT_NLP` side by side with this package's rows, in a process of its own, on the same batch shape, sizes and optimizer:
the yardstick of the `recompute` baseline (FLOPs, tokens/s and peak memory within a few per cent of it). Nothing of the
reference is copied here: its modules are imported from PATH at run time (a checkout of the repository), and the
bench's Python needs what they import (`pip install pytorch_lightning torchmetrics`). The reference reads its
tokenizer through `AutoTokenizer`: this package's byte-level tokenizer (257 ids, end of text 256) saved to a temporary
folder stands in for it. Its model/model_utils.py imports torchvision at the top, for image code the language model
never calls; PyPI's torchvision does not load beside the CPU torch 2.13 build, so where torchvision is missing an empty
placeholder module stands in for it (any use of it raises).
"""

import importlib
import importlib.util
import sys
import tempfile
import types
from argparse import Namespace

import torch

# The reference's train_model.py defaults for the fields of EBT_NLP and setup_ebt that EBTConfig has no field for
# (the others come from the config: reference_hparams).
REFERENCE_DEFAULTS = dict(
    execution_mode="pretrain", normalize_initial_condition_only_first_step=False,
    langevin_dynamics_noise_learnable=False, randomize_mcmc_step_size_scale=1.0, randomize_mcmc_num_steps=0,
    randomize_mcmc_num_steps_min=0, randomize_mcmc_num_steps_final_landscape=False, clamp_futures_grad=False,
    clamp_futures_grad_max_change=9.0, absolute_clamp=0.0, sharpen_predicted_distribution=0.0,
    soften_target_prob_dist=0.0, reconstruction_coeff=1.0, contrastive_loss=False, contrastive_loss_coeff=0.0,
    mcmc_replay_buffer=False, num_modality_processing_mlp_layers=1, weight_initialization_method="xavier",
    weight_initialization_gain=1.0, ebt_norm="rms", ebt_act_func="silu", dyt_alpha_init=0.5,
    debug_unused_parameters=False)


def reference_hparams(config, batch: int, seq: int, tokenizer_dir: str) -> Namespace:
    """The reference's hyperparameters for an `EBTConfig`, batch × seq observed tokens."""
    fields = ("normalize_initial_condition", "denoising_initial_condition", "gaussian_random_noise_scaling",
              "vocab_to_embed_uses_prob_dist", "mcmc_num_steps", "mcmc_step_size", "mcmc_step_size_learnable",
              "langevin_dynamics_noise", "truncate_mcmc", "no_mcmc_detach", "ebt_type")
    return Namespace(**{
        **REFERENCE_DEFAULTS, **{name: getattr(config, name) for name in fields}, "tokenizer": tokenizer_dir,
        "batch_size_per_device": batch, "context_length": seq, "embedding_dim": config.hidden_size,
        "num_transformer_blocks": config.num_hidden_layers, "multiheaded_attention_heads": config.num_attention_heads,
        "ffn_dim_multiplier": config.intermediate_size / config.hidden_size})


class _Absent(types.ModuleType):
    """A placeholder for a module the reference imports but its language model never uses."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Absent(f"{self.__name__}.{name}")

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self.__name__} is a placeholder (torchvision is not installed): the reference's language "
                           "model should not call it")


def _placeholder_torchvision() -> None:
    """After Lightning, torchmetrics and diffusers have looked for the real torchvision (and found none)."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    for library in ("pytorch_lightning", "torchmetrics", "diffusers"):
        importlib.import_module(library)
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.models",
                 "torchvision.utils"):
        sys.modules.setdefault(name, _Absent(name))


def build_reference(repo: str, config: dict, batch: int, seq: int) -> torch.nn.Module:
    """The reference's EBT_NLP for an EBTConfig's kwargs `config`, imported from the checkout at `repo`."""
    from modeling_ebt import EBTConfig, EBTTokenizer  # importing modeling_ebt registers EBTTokenizer with AutoTokenizer

    config = EBTConfig(**config)

    if repo not in sys.path:
        sys.path.insert(0, repo)
    _placeholder_torchvision()
    try:
        module = importlib.import_module("model.nlp.ebt")
    except ImportError as error:
        raise ImportError(f"cannot import the reference's model.nlp.ebt from {repo} ({error}); the bench's Python "
                          "needs what it imports: pip install pytorch_lightning torchmetrics") from error
    tokenizer_dir = tempfile.mkdtemp(prefix="ebt-reference-tokenizer-")
    EBTTokenizer().save_pretrained(tokenizer_dir)
    model = module.EBT_NLP(reference_hparams(config, batch, seq, tokenizer_dir))
    width = model.transformer.layers[0].feed_forward.w1.out_features
    if width != config.intermediate_size:
        raise ValueError(f"the reference built an MLP of width {width}, not {config.intermediate_size}")
    return model


class ReferenceOutput:
    def __init__(self, log: dict):
        self.loss, self.energies = log["loss"], None


def reference_forward(model, ids: torch.Tensor) -> ReferenceOutput:
    """One training forward of the reference: observed `ids`, targets `ids` shifted (its forward_loss_wrapper takes
    S + 1 tokens; the last column repeats the first so that it predicts as many tokens as our rows)."""
    full = torch.cat((ids, ids[:, :1]), dim=1)
    return ReferenceOutput(model.forward_loss_wrapper({"input_ids": full}, phase="train"))
