"""Publishing Energy-Based Transformers on the Hugging Face Hub (`ebt push`); installed as `modeling_ebt.hub`.

See `publish.py` for what is uploaded and `model_card_template.md` for the model card.
"""

from .publish import PushError, push, rerun_command, run_push, stage

__all__ = ["PushError", "push", "rerun_command", "run_push", "stage"]
