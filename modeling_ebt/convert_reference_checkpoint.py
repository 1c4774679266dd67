"""Convert a checkpoint of the reference EBT code (github alexiglad/EBT) into a `transformers` model directory.

    python -m modeling_ebt.convert_reference_checkpoint INPUT OUTPUT_DIR [--num-attention-heads N] ...

INPUT is a Lightning `.ckpt` (loaded with `weights_only=True`; its hyper-parameters supply the sizes) or a
safetensors state dict under the reference's parameter names (pass the sizes a state dict cannot tell:
`--num-attention-heads` and `--context-length`; the rest is inferred from the shapes). The output loads with
`AutoModelForCausalLM.from_pretrained(OUTPUT_DIR)`.
"""

import argparse
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from .configuration_ebt import EBTConfig
from .modeling_ebt import EBTForCausalLM

# reference name → our name; `{i}` is the layer index
KEY_MAP = {
    "alpha": "alpha",
    "embeddings.weight": "model.embed_tokens.weight",
    "vocab_to_embed.weight": "model.vocab_to_embed.weight",
    "transformer.time_embeddings.weight": "model.time_embeddings.weight",
    "transformer.norm.weight": "model.norm.weight",
    "transformer.final_layer.weight": "model.energy_head.weight",
    "transformer.layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "transformer.layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "transformer.layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "transformer.layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "transformer.layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "transformer.layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "transformer.layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
    "transformer.layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "transformer.layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
}
# kept in the config rather than the weights
CONFIG_ONLY_KEYS = {"langevin_dynamics_noise_std"}
# reference hyper-parameter → EBTConfig field, copied when present
HPARAM_FIELDS = [
    "mcmc_num_steps", "mcmc_step_size", "mcmc_step_size_learnable", "mcmc_step_size_lr_multiplier", "ebt_type",
    "normalize_initial_condition", "denoising_initial_condition", "gaussian_random_noise_scaling",
    "vocab_to_embed_uses_prob_dist", "langevin_dynamics_noise", "truncate_mcmc", "no_mcmc_detach",
    "randomize_mcmc_num_steps", "randomize_mcmc_step_size_scale", "mcmc_replay_buffer",
]


def interleaved_to_halves(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder the output rows of wq/wk from RoPE on adjacent pairs (reference) to RoPE on halves (ours)."""
    order = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))
    return weight.view(-1, head_dim, weight.shape[-1])[:, order].reshape(weight.shape)


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """State dict under the reference's names and the hyper-parameters (empty for safetensors)."""
    if not path.is_file():
        raise FileNotFoundError(f"no reference checkpoint at {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path)), {}
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # the unpickler's errors vary with the damage; torch's message advises unsafe loading
        raise ValueError(f"{path} cannot be loaded safely (weights_only=True): it is not a checkpoint, or it holds "
                         "objects other than tensors and plain containers. Convert only checkpoints you trust: save "
                         "their 'state_dict' with safetensors and pass that file with the sizes") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint: expected a dict with a 'state_dict' entry")
    state = {re.sub(r"^model\.", "", k): v for k, v in checkpoint["state_dict"].items()}
    return state, dict(checkpoint.get("hyper_parameters") or {})


def infer_config(state: dict, hparams: dict, num_attention_heads=None, context_length=None) -> EBTConfig:
    """EBTConfig from the tensors' shapes, the hyper-parameters and the sizes given on the command line."""
    for required in ("embeddings.weight", "transformer.final_layer.weight", "transformer.layers.0.attention.wk.weight",
                     "transformer.layers.0.feed_forward.w1.weight"):
        if required not in state:
            raise ValueError(f"not a reference EBT state dict: missing {required!r} (a reference EBT_NLP checkpoint "
                             "has embeddings, transformer.layers.N.* and transformer.final_layer weights)")
    vocab_size, hidden_size = state["embeddings.weight"].shape
    layers = {int(m.group(1)) for k in state if (m := re.match(r"transformer\.layers\.(\d+)\.", k))}
    heads = num_attention_heads or hparams.get("multiheaded_attention_heads")
    context = context_length or hparams.get("context_length")
    if heads is None or context is None:
        raise ValueError("a safetensors state dict does not say the number of attention heads or the context "
                         "length: pass --num-attention-heads and --context-length")
    fields = {name: hparams[name] for name in HPARAM_FIELDS if name in hparams}
    fields["ebt_type"] = "time_embed" if "transformer.time_embeddings.weight" in state else "default"
    if fields["ebt_type"] == "time_embed":
        fields["mcmc_num_steps"] = state["transformer.time_embeddings.weight"].shape[0]
    fields["mcmc_step_size"] = float(state["alpha"]) if "alpha" in state else fields.get("mcmc_step_size", 500.0)
    if "langevin_dynamics_noise_std" in state:
        fields["langevin_dynamics_noise"] = float(state["langevin_dynamics_noise_std"])
    fields["vocab_to_embed_uses_prob_dist"] = "vocab_to_embed.weight" not in state
    if hparams.get("contrastive_loss"):
        fields["contrastive_loss_coeff"] = float(hparams.get("contrastive_loss_coeff", 1.0))
    head_dim = hidden_size // heads
    return EBTConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=len(layers), num_attention_heads=heads,
        num_key_value_heads=state["transformer.layers.0.attention.wk.weight"].shape[0] // head_dim,
        intermediate_size=state["transformer.layers.0.feed_forward.w1.weight"].shape[0],
        max_position_embeddings=context + 1, **fields)


def convert_state_dict(state: dict, config: EBTConfig) -> dict:
    patterns = [(re.compile("^" + re.escape(src).replace(r"\{i\}", r"(\d+)") + "$"), dst)
                for src, dst in KEY_MAP.items()]
    converted = {}
    for key, tensor in state.items():
        if key in CONFIG_ONLY_KEYS:
            continue
        for pattern, target in patterns:
            if match := pattern.match(key):
                name = target.replace("{i}", match.group(1)) if match.groups() else target
                if key.endswith(("wq.weight", "wk.weight")):
                    tensor = interleaved_to_halves(tensor, config.head_dim)
                if key == "alpha":  # a 0-d scalar in the reference; a 1-element parameter here (FSDP shards it)
                    tensor = tensor.reshape(1)
                converted[name] = tensor.float().contiguous()
                break
        else:
            raise ValueError(f"unknown parameter {key!r} in the reference checkpoint: not an EBT_NLP weight this "
                             f"converter knows (see KEY_MAP)")
    return converted


def convert(input_path, output_dir, num_attention_heads=None, context_length=None) -> EBTForCausalLM:
    state, hparams = read_checkpoint(Path(input_path))
    config = infer_config(state, hparams, num_attention_heads, context_length)
    model = EBTForCausalLM(config)
    weights = convert_state_dict(state, config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(f"the reference checkpoint lacks {missing}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model shape "
                             f"{tuple(expected[name].shape)}")
    model.load_state_dict(weights, strict=True)
    model.save_pretrained(output_dir)
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", help="reference .ckpt (Lightning) or .safetensors state dict")
    parser.add_argument("output_dir", help="directory to write the transformers model to")
    parser.add_argument("--num-attention-heads", type=int, help="needed for a safetensors state dict")
    parser.add_argument("--context-length", type=int, help="the reference's context_length (safetensors input)")
    args = parser.parse_args(argv)
    model = convert(args.input, args.output_dir, args.num_attention_heads, args.context_length)
    print(f"wrote {model.config.ebt_type} EBT ({model.num_parameters():,} parameters) to {args.output_dir}")


if __name__ == "__main__":
    main()
