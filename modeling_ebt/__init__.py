"""Energy-Based Transformers (Gladstone et al. 2025) for the Hugging Face ecosystem.

Importing the package registers the EBT classes with the `transformers` Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_ebt import EBTConfig
from .modeling_ebt import EBTForCausalLM, EBTModel, EBTPreTrainedModel, ThinkingConfig

AutoConfig.register(EBTConfig.model_type, EBTConfig, exist_ok=True)
AutoModel.register(EBTConfig, EBTModel, exist_ok=True)
AutoModelForCausalLM.register(EBTConfig, EBTForCausalLM, exist_ok=True)

try:  # the tokenizer module registers itself with AutoTokenizer
    from .tokenization_ebt import EBTTokenizer, register_tokenizer

    register_tokenizer()
except ImportError:  # pragma: no cover - only while the tokenizer module is being written
    EBTTokenizer = None

__all__ = ["EBTConfig", "EBTForCausalLM", "EBTModel", "EBTPreTrainedModel", "EBTTokenizer", "ThinkingConfig"]
