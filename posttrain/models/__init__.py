"""Models: load a causal LM (or a scalar-head reward model) and its tokenizer, attach adapters, compute logits
where they are needed, export."""

from posttrain.models.adapters import attach_adapter, count_parameters, is_peft_model
from posttrain.models.forward import token_logits
from posttrain.models.loading import load_model, load_tokenizer

__all__ = ["attach_adapter", "count_parameters", "is_peft_model", "load_model", "load_tokenizer", "token_logits"]
