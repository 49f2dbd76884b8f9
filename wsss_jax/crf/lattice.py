"""The permutohedral lattice (Adams, Baek & Davis, Eurographics 2010), in jit.

A Gaussian filter over N points with d-dimensional features f (already
divided by their standard deviations: x/σ_xy, y/σ_xy[, r/σ_rgb, ...]):

    out_i ≈ Σ_j k(f_i, f_j) v_j,      v: (N, C) values, any C.

The points are lifted onto the hyperplane Σ x = 0 of R^{d+1}, which the
permutohedral lattice tiles with simplices.  Each point *splats* its value
onto the d + 1 vertices of its enclosing simplex with barycentric weights,
the lattice is *blurred* with [1/2, 1, 1/2] along each of its d + 1
directions, and each point *slices* the result back with the same weights.
The cost is O(N·d²) per filtering, independent of the kernel's width.

Everything is the algorithm and constants of Krähenbühl's `permutohedral.cpp`
(the lattice of pydensecrf and of the rloss / RRM code), so a filter here
equals theirs up to float rounding:

* elevation with scale (d + 1)·sqrt(2/3) / sqrt((i + 1)(i + 2)) per axis;
* the nearest remainder-0 point by rounding each coordinate to a multiple of
  d + 1, the rank (sort order) of the residuals, and the correction of the
  rounding when the coordinates do not sum to 0;
* blur weights 1 (self) and 1/2 per neighbour, no normalisation; a missing
  neighbour counts as 0;
* slicing scaled by 1 / (1 + 2^-d).

What differs is the hash table, which must live inside `jit` with static
shapes: the N·(d + 1) integer vertex keys are sorted lexicographically
(`lax.sort` with d key operands); equal neighbours in the sorted order share
a lattice index (a cumulative sum of "key changed" flags), so the table has
a fixed capacity of N·(d + 1) rows of which the first M are used.  A
vertex's blur neighbours (its key ± (1, …, 1) with ∓(d + 1) added on one
axis) are found by a vectorised binary search of the sorted table.  Nothing
leaves the device; the table is built once per image (`build`) and reused by
every filtering (`filter_values`), e.g. the iterations of a mean-field CRF.

The filter is linear in the values.  Its transpose is the same splat and
slice with the blur directions in the reverse order (`reverse=True`), which
`filter_values`'s custom VJP applies to the cotangent; the features are not
differentiated.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Lattice(NamedTuple):
  """One image's lattice (all arrays of static shape; P = N·(d + 1)).

  Attributes:
    vertex: (N, d + 1) int32, the table row of each point's simplex
      vertices.
    weight: (N, d + 1) float32 barycentric weights (each row sums to 1).
    neighbours: (d + 1, 2, K) int32, K the table's capacity (P unless
      `build` was given less): for blur direction j, the rows of the two
      neighbours of every table row; K (the zero row) where absent.
    num_vertices: () int32, M, the number of distinct vertices (rows in
      use when M ≤ K).
  """
  vertex: jax.Array
  weight: jax.Array
  neighbours: jax.Array
  num_vertices: jax.Array


def _scale_factors(d: int) -> np.ndarray:
  inv_std = np.sqrt(2.0 / 3.0) * (d + 1)
  i = np.arange(d, dtype=np.float64)
  return (inv_std / np.sqrt((i + 1) * (i + 2))).astype(np.float32)


def _canonical(d: int) -> np.ndarray:
  """(d + 1, d + 1) the canonical simplex: row k is the remainder-k vertex
  offset, indexed by rank."""
  canonical = np.zeros((d + 1, d + 1), np.int32)
  for k in range(d + 1):
    canonical[k, :d + 1 - k] = k
    canonical[k, d + 1 - k:] = k - (d + 1)
  return canonical


def elevate(features: jax.Array) -> jax.Array:
  """(N, d) features -> (N, d + 1) points on the hyperplane Σ x = 0.

  Adams, Baek & Davis (2010), the embedding E of the d-dimensional position
  space into H_d, as `permutohedral.cpp` computes it: coordinate j
  (1 ≤ j ≤ d) is Σ_{i ≥ j} c_i − j·c_{j−1} and coordinate 0 is Σ_i c_i,
  with c_i = f_i·scale_i (`_scale_factors`).  Hand-computed in
  tests/test_lattice.py (d = 2).
  """
  d = features.shape[-1]
  scaled = features.astype(jnp.float32) * _scale_factors(d)
  # suffix[j] = Σ_{i >= j} c_i, j = 0..d (suffix[d] = 0).
  suffix = jnp.concatenate(
      [jnp.cumsum(scaled[:, ::-1], axis=1)[:, ::-1],
       jnp.zeros_like(scaled[:, :1])], axis=1)
  j = jnp.arange(1, d + 1, dtype=jnp.float32)
  rest = suffix[:, 1:] - j * scaled
  return jnp.concatenate([suffix[:, :1], rest], axis=1)


def simplex(elevated: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The enclosing simplex of each elevated point.

  Adams, Baek & Davis (2010), splatting: the nearest remainder-0 point, the
  permutation (rank) that sorts the residual, and the barycentric
  coordinates of the point in the simplex (the rules and tie-breaks of
  `permutohedral.cpp`, module docstring).  Hand-computed in
  tests/test_lattice.py (d = 1).

  Args:
    elevated: (N, d + 1) points on Σ x = 0 (`elevate`).

  Returns:
    rem0: (N, d + 1) int32, the nearest remainder-0 lattice point (after the
      sum correction).
    rank: (N, d + 1) int32, the rank of each residual (0 = largest).
    barycentric: (N, d + 1) float32 weights of the vertices of remainder
      0..d.
  """
  d1 = elevated.shape[1]
  d = d1 - 1
  down_factor = jnp.float32(1.0 / d1)      # the C++ multiplies by 1/(d+1)
  down = elevated * down_factor
  up_value = jnp.ceil(down) * d1
  down_value = jnp.floor(down) * d1
  rem0 = jnp.where(up_value - elevated < elevated - down_value, up_value,
                   down_value)
  total = (jnp.sum(rem0, axis=1) / d1).astype(jnp.int32)
  residual = elevated - rem0
  # rank[i] = #{j : residual_j > residual_i, or equal and j < i}: the C++
  # pairwise loop's result (ties go to the lower index).
  greater = residual[:, None, :] > residual[:, :, None]
  ties = ((residual[:, None, :] == residual[:, :, None])
          & (jnp.arange(d1)[None, :] < jnp.arange(d1)[:, None])[None])
  rank = jnp.sum(greater | ties, axis=2).astype(jnp.int32)
  rem0 = rem0.astype(jnp.int32)
  rank = rank + total[:, None]
  low, high = rank < 0, rank > d
  rank = jnp.where(low, rank + d1, jnp.where(high, rank - d1, rank))
  rem0 = jnp.where(low, rem0 + d1, jnp.where(high, rem0 - d1, rem0))
  v = (elevated - rem0.astype(jnp.float32)) * down_factor
  # barycentric[d - rank_i] += v_i; barycentric[d - rank_i + 1] -= v_i.
  slots = jnp.arange(d + 2)
  first = (slots[None, None, :] == (d - rank)[:, :, None])
  second = (slots[None, None, :] == (d - rank + 1)[:, :, None])
  bary = jnp.sum(v[:, :, None] * (first.astype(jnp.float32)
                                  - second.astype(jnp.float32)), axis=1)
  bary = bary.at[:, 0].add(1.0 + bary[:, d + 1])
  return rem0, rank, bary[:, :d1]


def _lex_less(a: jax.Array, b: jax.Array) -> jax.Array:
  """a < b in lexicographic order over the last axis."""
  less = a[..., -1] < b[..., -1]
  for k in range(a.shape[-1] - 2, -1, -1):
    less = (a[..., k] < b[..., k]) | ((a[..., k] == b[..., k]) & less)
  return less


def _find(table: jax.Array, queries: jax.Array, missing: int) -> jax.Array:
  """Row of each query in the lexicographically sorted (P, d) table, or
  `missing`."""
  size = table.shape[0]

  def halve(_, bounds):
    low, high = bounds
    mid = (low + high) // 2
    right = _lex_less(table[jnp.minimum(mid, size - 1)], queries) & (
        mid < size)
    return jnp.where(right, mid + 1, low), jnp.where(right, high, mid)

  # A loop, not unrolled: XLA would fuse the unrolled steps into one
  # expression that recomputes every earlier step twice per step (2^steps).
  low, _ = jax.lax.fori_loop(
      0, int(np.ceil(np.log2(size + 1))), halve,
      (jnp.zeros(queries.shape[:1], jnp.int32),
       jnp.full(queries.shape[:1], size, jnp.int32)))
  row = jnp.minimum(low, size - 1)
  hit = (low < size) & jnp.all(table[row] == queries, axis=1)
  return jnp.where(hit, row, missing).astype(jnp.int32)


def _check_features(features: jax.Array) -> tuple[int, int]:
  if features.ndim != 2 or features.shape[1] < 1:
    raise ValueError(f'lattice: features must be (N, d) with d >= 1, got '
                     f'{features.shape}.')
  return features.shape


def _sorted_vertices(features: jax.Array):
  """(bary, permutation, sorted keys, row of each sorted entry, M) for the
  N·(d + 1) simplex vertices of (N, d) features."""
  n, d = _check_features(features)
  size = n * (d + 1)
  rem0, rank, bary = simplex(elevate(features))
  canonical = jnp.asarray(_canonical(d))
  # Vertex k of point i: rem0 + canonical[k, rank]; its key is the first d
  # coordinates (the last follows from Σ = 0).
  keys = rem0[:, None, :] + canonical[:, rank].transpose(1, 0, 2)
  keys = keys[:, :, :d].reshape(size, d)
  order = jnp.arange(size, dtype=jnp.int32)
  *sorted_keys, permutation = jax.lax.sort(
      tuple(keys[:, k] for k in range(d)) + (order,), num_keys=d)
  sorted_keys = jnp.stack(sorted_keys, axis=1)
  changed = jnp.concatenate([jnp.ones((1,), bool), jnp.any(
      sorted_keys[1:] != sorted_keys[:-1], axis=1)])
  row_of_sorted = jnp.cumsum(changed.astype(jnp.int32)) - 1
  return bary, permutation, sorted_keys, row_of_sorted, row_of_sorted[-1] + 1


def vertex_count(features: jax.Array) -> jax.Array:
  """M, the number of distinct lattice vertices of (N, d) features (to
  choose a `capacity`)."""
  return _sorted_vertices(features)[-1]


def capacity_for(count: int, minimum: int = 64) -> int:
  """A static capacity for `count` vertices: the next power of two (so that
  images of one size share a few compilations)."""
  return max(minimum, 1 << max(0, int(count) - 1).bit_length())


def build(features: jax.Array, capacity: int | None = None) -> Lattice:
  """The lattice of one image's (N, d) features (d ≥ 1, float).

  `capacity` (static) is the number of table rows: N·(d + 1) by default,
  which always suffices.  Real images use far fewer vertices than that
  (a 500×375 photo: 8,000 of 1.1 million for BANA's bilateral kernel), and
  the blur and the neighbour search cost O(capacity), so a caller that knows
  a bound (`vertex_count`, `capacity_for`) passes it.  Vertices beyond the
  capacity are dropped (their splats lost): check `overflowed`.
  """
  n, d = _check_features(features)
  bary, permutation, sorted_keys, row_of_sorted, num_vertices = (
      _sorted_vertices(features))
  d1 = d + 1
  size = n * d1
  capacity = size if capacity is None else int(capacity)
  if capacity < 1:
    raise ValueError(f'lattice.build: capacity must be >= 1, got {capacity}.')
  kept = jnp.where(row_of_sorted < capacity, row_of_sorted, capacity)
  vertex = jnp.zeros((size,), jnp.int32).at[permutation].set(kept)
  # The table: row r holds the r-th distinct key; unused rows hold the
  # largest key, so the whole table stays sorted for the binary search.
  fill = jnp.iinfo(jnp.int32).max
  table = jnp.full((capacity, d), fill, jnp.int32).at[row_of_sorted].set(
      sorted_keys, mode='drop')
  rows = jnp.arange(capacity, dtype=jnp.int32)
  used = rows < num_vertices
  neighbours = []
  for j in range(d1):
    plus = jnp.ones((d,), jnp.int32)
    if j < d:
      plus = plus.at[j].set(-d)
    first = jnp.where(used, _find(table, table + plus, capacity), capacity)
    # The other neighbour needs no search: b = key − offset exactly when
    # key = b + offset, so it is the inverse map of `first` (one-to-one on
    # the rows found; rows not found point at the zero row).
    second = jnp.full((capacity + 1,), capacity, jnp.int32).at[first].set(
        rows)[:capacity]
    neighbours.append(jnp.stack([first, second]))
  return Lattice(vertex=vertex.reshape(n, d1), weight=bary,
                 neighbours=jnp.stack(neighbours),
                 num_vertices=num_vertices)


def overflowed(lattice: Lattice) -> jax.Array:
  """Whether `build`'s capacity was too small (the filter is then wrong)."""
  return lattice.num_vertices > lattice.neighbours.shape[-1]


def _splat_blur_slice(lattice: Lattice, values: jax.Array,
                      reverse: bool) -> jax.Array:
  n, d1 = lattice.vertex.shape
  capacity = lattice.neighbours.shape[-1]
  channels = values.shape[1]
  weighted = (lattice.weight[:, :, None] * values[:, None, :]).reshape(
      n * d1, channels)
  # Row `capacity` is the zero row: absent neighbours and dropped vertices.
  grid = jax.ops.segment_sum(weighted, lattice.vertex.reshape(n * d1),
                             num_segments=capacity + 1)
  grid = grid.at[capacity].set(0.0)
  directions = range(d1 - 1, -1, -1) if reverse else range(d1)
  for j in directions:
    first, second = lattice.neighbours[j]
    blurred = grid[:capacity] + 0.5 * (grid[first] + grid[second])
    grid = jnp.concatenate([blurred, jnp.zeros((1, channels), grid.dtype)])
  alpha = 1.0 / (1.0 + 2.0 ** (-(d1 - 1)))
  sliced = grid[lattice.vertex] * lattice.weight[:, :, None]
  return alpha * jnp.sum(sliced, axis=1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def filter_values(lattice: Lattice, values: jax.Array,
                  reverse: bool = False) -> jax.Array:
  """(N, C) values -> (N, C) lattice-filtered values (splat, blur, slice).

  `reverse=True` blurs the directions in the reverse order: the transpose
  of the forward filter, which the VJP applies to the cotangent.
  """
  return _splat_blur_slice(lattice, values.astype(jnp.float32), reverse)


def _filter_fwd(lattice, values, reverse):
  return filter_values(lattice, values, reverse), lattice


def _filter_bwd(reverse, lattice, cotangent):
  zeros = jax.tree_util.tree_map(
      lambda x: (np.zeros(x.shape, jax.dtypes.float0)
                 if not jnp.issubdtype(x.dtype, jnp.floating)
                 else jnp.zeros_like(x)), lattice)
  return zeros, _splat_blur_slice(lattice, cotangent, not reverse)


filter_values.defvjp(_filter_fwd, _filter_bwd)


def gaussian_filter(features: jax.Array, values: jax.Array) -> jax.Array:
  """One-shot: `filter_values(build(features), values)` for (N, d) features
  and (N, C) values."""
  return filter_values(build(jax.lax.stop_gradient(features)), values)
