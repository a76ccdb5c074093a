"""Training losses: Tandem-Distil's λ mix, pads excluded from every term, the distillation temperature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tandem_jax.data import PAD_ID
from tandem_jax.training import losses
from tandem_jax.training.program import to_batch


def _case(seed=0, b=2, t=5, v=7):
  rng = np.random.default_rng(seed)
  student = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(b, t, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
  mask = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.float32)[:b, :t]
  return student, teacher, targets, mask


def _reference(student, teacher, targets, mask, lam, temp):
  """The Tandem-Distil loss written out in numpy: λ·CE(GT) + (1-λ)·T²·CE(softmax(t/T), log_softmax(s/T))."""
  s, t, y, m = (np.asarray(a, np.float64) for a in (student, teacher, targets, mask))
  log_softmax = lambda x: x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) \
      - x.max(-1, keepdims=True)  # noqa: E731
  ce = -np.take_along_axis(log_softmax(s), y[..., None].astype(int), -1)[..., 0]
  kd = -np.sum(np.exp(log_softmax(t / temp)) * log_softmax(s / temp), -1)
  mean = lambda x: np.sum(x * m) / np.sum(m)  # noqa: E731
  return lam * mean(ce) + (1 - lam) * temp ** 2 * mean(kd)


@pytest.mark.parametrize("lam,temp", [(1.0, 1.0), (0.5, 1.0), (0.2, 1.0), (0.0, 1.0), (0.5, 2.0)])
def test_distil_loss_mixes_ce_and_distillation(lam, temp):
  student, teacher, targets, mask = _case()
  loss, metrics = losses.training_loss(student, targets, mask, teacher, lam, temp)
  np.testing.assert_allclose(float(loss), _reference(student, teacher, targets, mask, lam, temp), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["ce"]), _reference(student, teacher, targets, mask, 1.0, 1.0), rtol=1e-5)


def test_padded_positions_count_nowhere():
  student, teacher, targets, mask = _case(1)
  loss, _ = losses.training_loss(student, targets, mask, teacher, 0.5)
  off = mask[..., None] == 0  # change everything at the masked positions: the loss must not move
  loss2, _ = losses.training_loss(jnp.where(off, 9.0, student), jnp.where(off[..., 0], 0, targets), mask,
                                  jnp.where(off, -9.0, teacher), 0.5)
  assert float(loss) == float(loss2)
  # The batch mask: a pad id is never a target, and an extra mask removes more.
  tokens = jnp.asarray([[5, 6, 7, PAD_ID, PAD_ID], [5, 6, 7, 8, 9]], jnp.int32)
  batch = to_batch(tokens)
  np.testing.assert_array_equal(batch["targets"], tokens[:, 1:])
  np.testing.assert_array_equal(batch["mask"], [[1, 1, 0, 0], [1, 1, 1, 1]])
  extra = jnp.asarray([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], jnp.float32)
  np.testing.assert_array_equal(to_batch(tokens, extra)["mask"], [[1, 1, 0, 0], [1, 1, 0, 0]])


def test_distillation_gradients_do_not_shrink_with_the_temperature():
  """With the T² factor the distillation gradient tends to a T-independent limit; without it, it falls as 1/T²."""
  student, teacher, targets, mask = _case(2)
  grads = [jax.grad(lambda s, T=temp: losses.training_loss(s, targets, mask, teacher, 0.0, T)[0])(student)
           for temp in (8.0, 16.0)]
  ratio = float(jnp.linalg.norm(grads[0]) / jnp.linalg.norm(grads[1]))
  assert 0.9 < ratio < 1.1, ratio
