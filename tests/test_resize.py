"""Bilinear resizing conventions against explicit references."""

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.ops import resize

# Jitted: one compilation per shape instead of one per operation.
resize_bilinear = jax.jit(resize.resize_bilinear, static_argnums=(1, 2))


def _reference(x, out, align_corners):
  """Separable bilinear interpolation written from the definitions."""
  def axis_weights(n_in, n_out):
    i = np.arange(n_out, dtype=np.float64)
    if align_corners:
      src = i * (n_in - 1) / max(n_out - 1, 1)
    else:
      src = np.clip((i + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    w = np.zeros((n_out, n_in))
    w[np.arange(n_out), lo] += 1 - frac
    w[np.arange(n_out), hi] += frac
    return w
  wy = axis_weights(x.shape[1], out[0])
  wx = axis_weights(x.shape[2], out[1])
  return np.einsum('yi,xj,bijc->byxc', wy, wx, x, optimize=True)


def test_align_corners_false_matches_pytorch_definition():
  x = np.random.default_rng(0).normal(size=(1, 5, 7, 2))
  for out in ((10, 14), (3, 4), (11, 6)):
    got = resize_bilinear(jnp.asarray(x, jnp.float32), out, False)
    np.testing.assert_allclose(got, _reference(x, out, False), atol=1e-5)


def test_align_corners_true_matches_definition():
  x = np.random.default_rng(1).normal(size=(2, 41, 41, 3))
  got = resize_bilinear(jnp.asarray(x, jnp.float32), (321, 321), True)
  np.testing.assert_allclose(got, _reference(x, (321, 321), True), atol=1e-4)
  # Corners are exactly preserved with align_corners=True.
  np.testing.assert_allclose(got[:, 0, 0], x[:, 0, 0], atol=1e-5)
  np.testing.assert_allclose(got[:, -1, -1], x[:, -1, -1], atol=1e-5)


def test_upsampling_4_to_8_gives_pytorch_values():
  x = jnp.arange(4, dtype=jnp.float32).reshape(1, 1, 4, 1)
  got = resize_bilinear(jnp.broadcast_to(x, (1, 2, 4, 1)), (2, 8), False)
  np.testing.assert_allclose(
      got[0, 0, :, 0], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-6)


def test_align_corners_true_to_a_side_of_one_samples_the_first_index():
  # PyTorch: an output side of 1 takes input index 0 on that side.
  x = jnp.arange(8, dtype=jnp.float32).reshape(1, 2, 4, 1)   # rows 0-3, 4-7
  row = resize_bilinear(x, (1, 4), align_corners=True)
  np.testing.assert_allclose(np.asarray(row)[0, :, :, 0], [[0, 1, 2, 3]])
  column = resize_bilinear(x, (2, 1), align_corners=True)
  np.testing.assert_allclose(np.asarray(column)[0, :, :, 0], [[0], [4]])
  both = resize_bilinear(x, (1, 1), align_corners=True)
  np.testing.assert_allclose(np.asarray(both)[0, :, :, 0], [[0]])
  # From one row to three: every output row copies it.
  up = resize_bilinear(x[:, :1], (3, 7), align_corners=True)
  np.testing.assert_allclose(np.asarray(up)[0, :, 0, 0], [0, 0, 0])
  np.testing.assert_allclose(np.asarray(up)[0, 0, :, 0],
                             [0, 0.5, 1, 1.5, 2, 2.5, 3], atol=1e-6)
