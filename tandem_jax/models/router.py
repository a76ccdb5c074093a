"""Adaptive block length (PAPER_NOTES §1.7): a 2-layer MLP that decides after every draft token whether to verify.

Features of the secondary's next-token distribution q: its entropy, its top-k probabilities, and the secondary's
embeddings of those top-k tokens. The MLP has two heads, each a soft-target binary cross-entropy on one rejection
label at the same position (p = the primary's distribution there):

* ``sampled`` (the paper's): TV(q, p), the probability that speculative sampling rejects the draft (β = 1 - TV, §2.2),
  computed on the distributions acceptance uses: both warped by the sampling setting the router is trained for
  (``Router.sampling``: temperature, top-k, top-p; the paper's raw softmax is temperature 1). Decoding refuses a
  router whose setting differs from the call's (the greedy head serves every greedy call);
* ``greedy`` (ours, CHOICE): 1[argmax q != argmax p], the rejection event of greedy verification. The TV label
  is a poor proxy there: a drafter whose argmax agrees 93% of the time still has TV ~0.2, so a TV router at τ = 0.8
  stops most greedy blocks after a draft or two.

At decode time drafting continues while the predicted acceptance 1 - r of the decoding mode's head stays >= τ
(paper: 0.8), up to γ_max tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# A sampling setting as (temperature, top_k, top_p), the fields of decoding.sampling.SamplingParams (models sit below
# decoding: a plain tuple keeps them apart). RAW, the paper's label: TV of the raw softmaxes.
RAW = (1.0, 0, 1.0)


def features(logits_bv: jax.Array, embed_vd: jax.Array, top_k: int) -> jax.Array:
  """[B, 1 + k + k*D]: entropy, top-k probabilities, the (unscaled) embeddings of the top-k tokens."""
  logp = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
  p = jnp.exp(logp)
  entropy = -jnp.sum(p * logp, axis=-1, keepdims=True)
  top_p, top_i = jax.lax.top_k(p, top_k)
  emb = jnp.take(embed_vd, top_i, axis=0).astype(jnp.float32)  # [B, k, D]
  return jnp.concatenate([entropy, top_p, emb.reshape(emb.shape[0], -1)], axis=-1)


HEADS = ("sampled", "greedy")  # output columns of Router: rejection under speculative sampling / greedy verification


def tv_distance(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """Total-variation distance between softmax(p) and softmax(q) over the last (vocabulary) axis: [..., V] -> [...].

  The probability that speculative sampling rejects a draft from q against p (1 - β, §2.2); also the TV metric of
  training (tandem_jax.training.losses)."""
  p = jax.nn.softmax(p_logits.astype(jnp.float32), -1)
  q = jax.nn.softmax(q_logits.astype(jnp.float32), -1)
  return 0.5 * jnp.sum(jnp.abs(p - q), axis=-1)


def labels(p_logits_bv: jax.Array, q_logits_bv: jax.Array, warp=None) -> jax.Array:
  """[B, 2] rejection labels per head (HEADS): TV(q', p') of the distributions sampling draws from (``warp``:
  logits -> probabilities, e.g. decoding.sampling.probs at the router's setting; None: the raw softmax) and whether
  the argmaxes differ."""
  mismatch = jnp.argmax(p_logits_bv, -1) != jnp.argmax(q_logits_bv, -1)
  if warp is None:
    tv = tv_distance(p_logits_bv, q_logits_bv)
  else:
    tv = 0.5 * jnp.sum(jnp.abs(warp(p_logits_bv) - warp(q_logits_bv)), axis=-1)
  return jnp.stack([tv, mismatch.astype(jnp.float32)], axis=-1)


class Router(nnx.Module):
  """``sampling``: the setting (temperature > 0, top_k, top_p) whose warped distributions the sampled head's label
  compares; a sampling call with another setting is refused (:func:`tandem_jax.decoding.api.generate`)."""

  def __init__(self, d_embed: int, top_k: int = 4, hidden: int = 64, *, rngs: nnx.Rngs,
               sampling: tuple = RAW):
    if top_k < 1 or hidden < 1:
      raise ValueError(f"Router needs top_k >= 1 and hidden >= 1, got top_k={top_k}, hidden={hidden}")
    temperature, k, top_p = sampling
    if not temperature > 0:
      raise ValueError("Router.sampling is the setting of its sampled head: temperature must be > 0")
    self.top_k = top_k
    self.sampling = (float(temperature), int(k), float(top_p))
    d_in = 1 + top_k + top_k * d_embed
    self.norm = nnx.LayerNorm(d_in, rngs=rngs, scale_init=nnx.with_partitioning(nnx.initializers.ones_init(),
                                                                                   ("norm",)),
                              bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("norm",)))
    self.hidden = nnx.Linear(d_in, hidden, rngs=rngs,
                             kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None)),
                             bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))
    self.out = nnx.Linear(hidden, len(HEADS), rngs=rngs,
                          kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, None)),
                          bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (None,)))

  def __call__(self, logits_bv: jax.Array, embed_vd: jax.Array) -> jax.Array:
    """[B, 2] logits of the predicted rejection probability r, one column per head (HEADS)."""
    x = self.norm(features(logits_bv, embed_vd, self.top_k))
    return self.out(jax.nn.gelu(self.hidden(x)))

  def accept_prob(self, logits_bv, embed_vd, greedy: bool = False):
    """[B] predicted acceptance 1 - r of the next draft under greedy or sampled verification."""
    return 1.0 - jax.nn.sigmoid(self(logits_bv, embed_vd)[:, HEADS.index("greedy" if greedy else "sampled")])


def router_loss(r_logits_b2, labels_b2, weights_b=None) -> jax.Array:
  """Soft-target BCE per head, -[y log r + (1 - y) log(1 - r)], averaged over positions (optionally weighted:
  ``weights`` [B] for both heads or [B, 2] per head, each head learning on its own positions) and summed over the
  heads."""
  loss = optax.sigmoid_binary_cross_entropy(r_logits_b2, labels_b2)
  if weights_b is None:
    return jnp.sum(jnp.mean(loss, axis=0))
  w = jnp.broadcast_to(weights_b[:, None] if weights_b.ndim == 1 else weights_b, loss.shape)
  return jnp.sum(jnp.sum(loss * w, axis=0) / jnp.maximum(jnp.sum(w, axis=0), 1.0))


def sampling_of(router_config) -> tuple:
  """The sampled head's setting (temperature, top_k, top_p) from a config's ``router`` section (``sampling``; the
  raw softmax when absent, as in configs written before the field existed)."""
  s = router_config.get("sampling", None)
  if not s:
    return RAW
  return (float(s.get("temperature", 1.0)), int(s.get("top_k", 0)), float(s.get("top_p", 1.0)))
