"""Energy-Based Transformers (Gladstone et al. 2025) for the Hugging Face ecosystem.

Importing the package registers the EBT classes with the `transformers` Auto classes.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_ebt import EBTConfig
from .modeling_ebt import EBTCache, EBTForCausalLM, EBTModel, EBTPreTrainedModel, ThinkingConfig
from .tokenization_ebt import EBTTokenizer, register_tokenizer

AutoConfig.register(EBTConfig.model_type, EBTConfig, exist_ok=True)
AutoModel.register(EBTConfig, EBTModel, exist_ok=True)
AutoModelForCausalLM.register(EBTConfig, EBTForCausalLM, exist_ok=True)
register_tokenizer()  # AutoTokenizer

__all__ = ["EBTCache", "EBTConfig", "EBTForCausalLM", "EBTModel", "EBTPreTrainedModel", "EBTTokenizer",
           "ThinkingConfig"]
