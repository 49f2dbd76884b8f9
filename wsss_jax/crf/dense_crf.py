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

`dense_crf` takes one image or a batch (leading axes): the bilateral
lattices of a batch share one table (`lattice.build`), and the Gaussian
kernel, the same for every image of one size, is built once and filters
the batch's labels as extra channels.  Each lattice is built once and
reused by every iteration.  Everything is jit-compatible with static
shapes; the parameters are Python floats baked into the program.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

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
  """(..., H·W, 5) features (x/sxy, y/sxy, c0/srgb, c1/srgb, c2/srgb) of
  (..., H, W, 3) images with values in 0..255."""
  *batch, height, width, channels = image.shape
  colours = image.reshape(tuple(batch) + (height * width, channels)).astype(
      jnp.float32) / srgb
  positions = jnp.broadcast_to(position_features(height, width, sxy),
                               tuple(batch) + (height * width, 2))
  return jnp.concatenate([positions, colours], axis=-1)


def normalised_kernel(lattice: lattice_lib.Lattice):
  """The symmetrically normalised kernel of a lattice (`lattice.build` of
  (..., N, d) features) as a function (..., N, C) -> (..., N, C):
  n ⊙ K(n ⊙ Q), n = 1/sqrt(K(1) + 1e-20)."""
  ones = jnp.ones(lattice.vertex.shape[:-1] + (1,), jnp.float32)
  norm = jax.lax.rsqrt(lattice_lib.filter_values(lattice, ones)
                       + NORM_EPSILON)

  def apply(values: jax.Array) -> jax.Array:
    return norm * lattice_lib.filter_values(lattice, norm * values)
  return apply


def _over_batch(kernel):
  """A kernel of one image's (N, d) features applied to (..., N, C) values
  of every image: the batch moves into the channels (the filter is linear
  per channel)."""
  def apply(values: jax.Array) -> jax.Array:
    n, channels = values.shape[-2:]
    flat = jnp.moveaxis(values.reshape((-1, n, channels)), 0, 1)
    out = kernel(flat.reshape(n, -1)).reshape(flat.shape)
    return jnp.moveaxis(out, 1, 0).reshape(values.shape)
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
    unary: (..., N, L) energies.
    kernels: normalised kernels, each (..., N, L) -> (..., N, L).
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


class _Kernel(NamedTuple):
  features: jax.Array     # (N, d) shared by the batch, or (..., N, d)
  weight: float           # the Potts weight
  shared: bool            # the same for every image (positions only)


def _kernels(images: jax.Array, params: CrfParams) -> list[_Kernel]:
  """The kernels with a non-zero weight, for (..., H, W, 3) images."""
  height, width = images.shape[-3:-1]
  kernels = []
  if params.gauss_compat:
    kernels.append(_Kernel(position_features(height, width, params.gauss_sxy),
                           float(params.gauss_compat), True))
  if params.bilateral_compat:
    kernels.append(_Kernel(
        bilateral_features(images, params.bilateral_sxy,
                           params.bilateral_srgb),
        float(params.bilateral_compat), False))
  return kernels


@functools.partial(jax.jit, static_argnums=1)
def _vertex_counts(images: jax.Array, params: CrfParams) -> list[jax.Array]:
  return [jnp.sum(lattice_lib.vertex_count(kernel.features))
          for kernel in _kernels(images, params)]


def lattice_capacity(images: jax.Array, params: CrfParams
                     ) -> tuple[int, ...]:
  """Table capacities, one per kernel with a non-zero weight (Gaussian,
  bilateral), for a (..., H, W, 3) batch: `lattice.capacity_for` of the
  vertex count (the batch's, summed over its images; the Gaussian kernel's
  of one image, which it shares).  Host ints, for `dense_crf`'s static
  `capacity`; costs one sort per kernel."""
  return tuple(lattice_lib.capacity_for(int(count))
               for count in _vertex_counts(images, params))


def dense_crf(image: jax.Array, probs: jax.Array,
              params: CrfParams = CrfParams(),
              capacity: int | Sequence[int] | None = None) -> jax.Array:
  """DenseCRF marginals of one image or a batch.

  Args:
    image: (..., H, W, 3) colours in 0..255 (uint8 or float), the channel
      order the bilateral kernel's colour features use (RGB everywhere
      here).
    probs: (..., H, W, L) class probabilities (they need not sum to 1; see
      `host.crf.dense_crf`).
    params: kernel parameters (`CrfParams`).
    capacity: table rows of each kernel's lattice (`lattice.build`: for
      the whole batch): one int for all kernels or one per kernel
      (`lattice_capacity` finds tight ones); None: always enough.

  Returns:
    (..., H, W, L) float32 marginals; each pixel sums to 1.
  """
  return dense_crf_and_overflow(image, probs, params, capacity)[0]


def dense_crf_and_overflow(image: jax.Array, probs: jax.Array,
                           params: CrfParams = CrfParams(),
                           capacity: int | Sequence[int] | None = None
                           ) -> tuple[jax.Array, jax.Array]:
  """`dense_crf`'s marginals and whether a capacity was too small (they are
  then wrong): to run with a guessed capacity and redo on overflow."""
  *batch, height, width, labels = probs.shape
  if image.shape[-3:-1] != (height, width) or image.shape[-1] != 3 or (
      list(image.shape[:-3]) != batch):
    raise ValueError(f'dense_crf: image (..., H, W, 3) must match probs '
                     f'(..., H, W, L) = {probs.shape}, got {image.shape}.')
  unary = unary_from_probs(probs).reshape(
      tuple(batch) + (height * width, labels))
  kernels = _kernels(image, params)
  if capacity is None or isinstance(capacity, int):
    capacity = (capacity,) * len(kernels)
  if len(capacity) != len(kernels):
    raise ValueError(f'dense_crf: {len(capacity)} capacities for '
                     f'{len(kernels)} kernels.')
  filters = []
  overflowed = jnp.zeros((), bool)
  for kernel, rows in zip(kernels, capacity):
    lattice = lattice_lib.build(kernel.features, rows)
    overflowed = overflowed | lattice_lib.overflowed(lattice)
    apply = normalised_kernel(lattice)
    filters.append(_over_batch(apply) if kernel.shared and batch else apply)
  q = mean_field(unary, filters, [kernel.weight for kernel in kernels],
                 params.iterations)
  return q.reshape(probs.shape), overflowed

