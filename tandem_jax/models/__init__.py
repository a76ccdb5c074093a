"""Models: the decoder, Tandem (Eq. 2), LLM-to-SLM."""

from tandem_jax.models.config import TandemConfig, TransformerConfig
from tandem_jax.models.llm_to_slm import LLMToSLM
from tandem_jax.models.tandem import TandemLM, block_mask
from tandem_jax.models.transformer import Transformer

__all__ = ["TandemConfig", "TransformerConfig", "Transformer", "TandemLM", "LLMToSLM", "block_mask"]
