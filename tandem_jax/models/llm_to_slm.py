"""LLM-to-SLM, arXiv 2402.16844 (PAPER_NOTES §3).

The frozen primary encodes the prompt once, in parallel; an MLP projector (Linear-ReLU-Linear, d_L -> d_S) maps its
final (normed) hidden states onto the secondary's width and the result is *added* to the secondary's embeddings of
the prompt tokens. The secondary then generates alone: the primary never runs per generated token.

With a decoder-only primary the encoding is causal, so running the primary over prompt + response and masking the
response positions gives exactly the prompt-only encoding; training uses that to stay one batched pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tandem_jax import cache as kvcache
from tandem_jax.models.config import TransformerConfig, dtype_of
from tandem_jax.models.transformer import Transformer


class LLMToSLM(nnx.Module):
  def __init__(self, primary_cfg: TransformerConfig, secondary_cfg: TransformerConfig, rngs: nnx.Rngs,
               projector_hidden: int | None = None):
    if primary_cfg.vocab_size != secondary_cfg.vocab_size:
      raise ValueError(f"LLM-to-SLM needs one tokenizer: primary vocab_size {primary_cfg.vocab_size} != "
                       f"secondary vocab_size {secondary_cfg.vocab_size}")
    hidden = projector_hidden or 2 * secondary_cfg.d_model
    dt, pd = dtype_of(secondary_cfg.dtype), dtype_of(secondary_cfg.param_dtype)
    self.primary = Transformer(primary_cfg, rngs)
    self.secondary = Transformer(secondary_cfg, rngs)
    self.proj_in = nnx.Linear(primary_cfg.d_model, hidden, dtype=dt, param_dtype=pd, rngs=rngs,
                              kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                                                ("primary_embed", "proj_hidden")),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("proj_hidden",)))
    # Zero-initialised output: training starts from the plain secondary.
    self.proj_out = nnx.Linear(hidden, secondary_cfg.d_model, dtype=dt, param_dtype=pd, rngs=rngs,
                               kernel_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                                 ("proj_hidden", "embed")),
                               bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)))

  def prompt_embeddings(self, tokens_bt, prompt_len_b):
    """[B, T, D_S]: projected primary encoding at prompt positions (< prompt_len), zero elsewhere."""
    _, hidden = self.primary.forward(tokens_bt, return_hidden=True)
    enc = jax.lax.stop_gradient(self.primary.normed(hidden[-1]))
    z = self.proj_out(jax.nn.relu(self.proj_in(enc)))
    in_prompt = jnp.arange(tokens_bt.shape[1])[None, :] < prompt_len_b[:, None]
    return jnp.where(in_prompt[..., None], z, 0).astype(z.dtype)

  def forward(self, tokens_bt, prompt_len_b):
    """Teacher-forced secondary logits [B, T, V] with the prompt fused in."""
    return self.secondary.forward(tokens_bt, extra_embed_btd=self.prompt_embeddings(tokens_bt, prompt_len_b))[0]

  def prefill(self, prompt_bt, prompt_len_b, secondary_cache: kvcache.KVCache):
    """Encodes right-padded prompts once and prefills the secondary; returns (logits, cache) like ``prefill``."""
    extra = self.prompt_embeddings(prompt_bt, prompt_len_b)
    logits, _, cache = self.secondary.prefill(prompt_bt, prompt_len_b, secondary_cache, extra_embed_btd=extra)
    return logits, cache
