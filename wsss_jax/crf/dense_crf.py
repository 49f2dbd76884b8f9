"""Mean-field DenseCRF (Krähenbühl & Koltun, NIPS 2011) on the lattice.

The parameterisation and semantics of pydensecrf as `wsss_jax.host.crf`
calls it (`CrfParams`, the same field names), so either backend can serve
the same config:

* unary U = −log(clip(p, 1e-5, 1)) (pydensecrf's `unary_from_softmax`);
* a Gaussian kernel on (x/gauss_sxy, y/gauss_sxy) and a bilateral kernel on
  (x/bilateral_sxy, y/bilateral_sxy, r/srgb, g/srgb, b/srgb), x the column
  and y the row index, colours in 0..255 in the image's channel order;
* each kernel symmetrically normalised: K̃(Q) = n ⊙ K(n ⊙ Q) with
  n = 1/sqrt(K(1) + 1e-20), K the lattice filter (`lattice.filter_values`),
  which includes each pixel's own contribution as pydensecrf's does;
* Potts compatibility: the pairwise term of a kernel of weight w is
  −w·K̃(Q), so each iteration is Q ← softmax(−U + Σ_k w_k K̃_k(Q)) over the
  labels, starting from Q = softmax(−U);
* `iterations` mean-field steps; the marginals Q are returned.

`dense_crf` handles one image, `dense_crf_batch` a batch (vmapped: each
image builds its own two lattices once and reuses them every iteration).
Both are jit-compatible with static shapes; the parameters are Python
floats baked into the program.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from wsss_jax.crf import lattice as lattice_lib
from wsss_jax.host.crf import CrfParams

PROB_FLOOR = 1e-5       # pydensecrf's `unary_from_softmax` clip
NORM_EPSILON = 1e-20    # pydensecrf's DenseKernel normalisation


def unary_from_probs(probs: jax.Array) -> jax.Array:
  """U = −log(clip(p, 1e-5, 1)), any shape."""
  return -jnp.log(jnp.clip(probs.astype(jnp.float32), PROB_FLOOR, 1.0))


def position_features(height: int, width: int, sxy: float) -> jax.Array:
  """(H·W, 2) features (x/sxy, y/sxy) in row-major pixel order."""
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                            jnp.arange(width, dtype=jnp.float32),
                            indexing='ij')
  return jnp.stack([cols.reshape(-1) / sxy, rows.reshape(-1) / sxy], axis=1)


def bilateral_features(image: jax.Array, sxy: float, srgb: float
                       ) -> jax.Array:
  """(H·W, 5) features (x/sxy, y/sxy, c0/srgb, c1/srgb, c2/srgb) of an
  (H, W, 3) image with values in 0..255."""
  height, width = image.shape[:2]
  colours = image.reshape(-1, image.shape[-1]).astype(jnp.float32) / srgb
  return jnp.concatenate([position_features(height, width, sxy), colours],
                         axis=1)


def normalised_kernel(features: jax.Array, capacity: int | None = None):
  """The symmetrically normalised kernel of (N, d) features as a function
  (N, C) -> (N, C): n ⊙ K(n ⊙ Q), n = 1/sqrt(K(1) + 1e-20)."""
  lattice = lattice_lib.build(features, capacity)
  ones = jnp.ones((features.shape[0], 1), jnp.float32)
  norm = jax.lax.rsqrt(lattice_lib.filter_values(lattice, ones)
                       + NORM_EPSILON)

  def apply(values: jax.Array) -> jax.Array:
    return norm * lattice_lib.filter_values(lattice, norm * values)
  return apply


def mean_field(unary: jax.Array, kernels, weights, iterations: int
               ) -> jax.Array:
  """Q after `iterations` steps of Q ← softmax(−U + Σ_k w_k K̃_k(Q)).

  Krähenbühl & Koltun (2011), the mean-field update of Algorithm 1 with the
  Potts compatibility μ(l, l') = [l ≠ l']: the Potts penalty of the other
  labels equals −w·K̃(Q)_l up to a per-pixel constant, which the softmax
  removes; pydensecrf computes exactly this (the kernel includes the pixel
  itself).  Hand-computed in tests/test_lattice.py.

  Args:
    unary: (N, L) energies.
    kernels: normalised kernels, each (N, L) -> (N, L).
    weights: their Potts weights w_k.
    iterations: >= 0 (0 returns softmax(−U)).
  """
  q = jax.nn.softmax(-unary, axis=-1)

  def step(q, _):
    energy = -unary
    for kernel, weight in zip(kernels, weights):
      energy = energy + weight * kernel(q)
    return jax.nn.softmax(energy, axis=-1), None

  q, _ = jax.lax.scan(step, q, None, length=int(iterations))
  return q


def _kernel_features(image: jax.Array, params: CrfParams
                     ) -> list[tuple[jax.Array, float]]:
  """(features, Potts weight) of each kernel with a non-zero weight."""
  height, width = image.shape[:2]
  kernels = []
  if params.gauss_compat:
    kernels.append((position_features(height, width, params.gauss_sxy),
                    float(params.gauss_compat)))
  if params.bilateral_compat:
    kernels.append((bilateral_features(image, params.bilateral_sxy,
                                       params.bilateral_srgb),
                    float(params.bilateral_compat)))
  return kernels


@functools.partial(jax.jit, static_argnums=1)
def _largest_vertex_count(images: jax.Array, params: CrfParams) -> jax.Array:
  def count(image):
    return functools.reduce(jnp.maximum, [
        lattice_lib.vertex_count(features)
        for features, _ in _kernel_features(image, params)], jnp.int32(0))
  return jnp.max(jax.vmap(count)(images))


def lattice_capacity(images: jax.Array, params: CrfParams) -> int:
  """A table capacity that holds every lattice of a (B, H, W, 3) batch: the
  next power of two of the largest vertex count (a host int, for
  `dense_crf`'s static `capacity`; costs one sort per kernel and image)."""
  return lattice_lib.capacity_for(int(_largest_vertex_count(images, params)))


def dense_crf(image: jax.Array, probs: jax.Array,
              params: CrfParams = CrfParams(),
              capacity: int | None = None) -> jax.Array:
  """DenseCRF marginals of one image.

  Args:
    image: (H, W, 3) colours in 0..255 (uint8 or float), the channel order
      the bilateral kernel's colour features use (RGB everywhere here).
    probs: (H, W, L) class probabilities (they need not sum to 1; see
      `host.crf.dense_crf`).
    params: kernel parameters (`CrfParams`).
    capacity: table rows of each lattice (`lattice.build`; None: always
      enough, N·(d + 1)); `lattice_capacity` finds a tight one.

  Returns:
    (H, W, L) float32 marginals; each pixel sums to 1.
  """
  height, width, labels = probs.shape
  if image.shape[:2] != (height, width) or image.shape[-1] != 3:
    raise ValueError(f'dense_crf: image (H, W, 3) must match probs '
                     f'(H, W, L) = {probs.shape}, got {image.shape}.')
  unary = unary_from_probs(probs).reshape(height * width, labels)
  pairs = _kernel_features(image, params)
  kernels = [normalised_kernel(features, capacity) for features, _ in pairs]
  q = mean_field(unary, kernels, [weight for _, weight in pairs],
                 params.iterations)
  return q.reshape(height, width, labels)


def dense_crf_batch(images: jax.Array, probs: jax.Array,
                    params: CrfParams = CrfParams(),
                    capacity: int | None = None) -> jax.Array:
  """`dense_crf` over a batch: (B, H, W, 3), (B, H, W, L) -> (B, H, W, L)."""
  return jax.vmap(lambda image, p: dense_crf(image, p, params, capacity))(
      images, probs)
