"""Decoding: `ar`, `speed`, `tandem`, `tandem_speed`, `llm_to_slm`, each one jitted `lax.while_loop`."""

from tandem_jax.decoding.api import METHODS, DecodeResult, generate
from tandem_jax.decoding.sampling import SamplingParams, speculative_accept

__all__ = ["METHODS", "DecodeResult", "generate", "SamplingParams", "speculative_accept"]
