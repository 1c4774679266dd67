"""Energy-Based Transformers (Gladstone et al. 2025) for the Hugging Face ecosystem.

Importing the package registers the EBT classes with the `transformers` Auto classes: the language EBT
(`EBTConfig`, model_type "ebt") and the image denoiser (`EBTVisionConfig`, model_type "ebt_vision").
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoModelForImageToImage

from .configuration_ebt import EBTConfig
from .configuration_ebt_vision import EBTVisionConfig
from .image_processing_ebt import EBTImageProcessor
from .modeling_ebt import EBTCache, EBTForCausalLM, EBTModel, EBTPreTrainedModel, EnergyDescentMixin, ThinkingConfig
from .modeling_ebt_vision import EBTForImageDenoising, EBTVisionModel
from .tokenization_ebt import EBTTokenizer, register_tokenizer

AutoConfig.register(EBTConfig.model_type, EBTConfig, exist_ok=True)
AutoModel.register(EBTConfig, EBTModel, exist_ok=True)
AutoModelForCausalLM.register(EBTConfig, EBTForCausalLM, exist_ok=True)
register_tokenizer()  # AutoTokenizer

AutoConfig.register(EBTVisionConfig.model_type, EBTVisionConfig, exist_ok=True)
AutoModel.register(EBTVisionConfig, EBTVisionModel, exist_ok=True)
AutoModelForImageToImage.register(EBTVisionConfig, EBTForImageDenoising, exist_ok=True)
AutoImageProcessor.register(EBTVisionConfig, image_processor_classes={"pil": EBTImageProcessor}, exist_ok=True)

__all__ = ["EBTCache", "EBTConfig", "EBTForCausalLM", "EBTForImageDenoising", "EBTImageProcessor", "EBTModel",
           "EBTPreTrainedModel", "EBTTokenizer", "EBTVisionConfig", "EBTVisionModel", "EnergyDescentMixin",
           "ThinkingConfig"]
