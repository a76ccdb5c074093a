"""Interoperability with pretrained checkpoints: Hugging Face safetensors, GGUF files and their tokenizers.

The CLI and the high-level entry points live in :mod:`tandem_jax.convert`.
"""

from tandem_jax.interop.hf_format import config_from_hf, config_to_hf, params_from_hf, params_to_hf
from tandem_jax.interop.hf_tokenizer import (HFTokenizer, check_same_tokenizer, load_tokenizer, save_tokenizer,
                                             tokenizer_path)

__all__ = ["HFTokenizer", "check_same_tokenizer", "config_from_hf", "config_to_hf", "load_tokenizer",
           "params_from_hf", "params_to_hf", "save_tokenizer", "tokenizer_path"]
