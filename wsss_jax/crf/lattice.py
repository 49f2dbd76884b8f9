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
shapes.  The N·(d + 1) integer vertex keys of every image, with the image
index as a leading column, are packed into a few uint32 words (mixed radix
over the columns' value ranges, up to three columns a word; one word per
column when the ranges are too wide) and sorted (`lax.sort`).  Equal
neighbours in the sorted order share a lattice row (a cumulative sum of
"key changed" flags), so the table has a fixed capacity K of rows of which
the first M (all images' vertices) are used.  A vertex's blur neighbours
(its key ± (1, …, 1) with ∓(d + 1) added on one axis) are found by a
vectorised binary search of the sorted table.  Nothing leaves the device;
the table is built once per batch (`build`) and reused by every filtering
(`filter_values`), e.g. the iterations of a mean-field CRF.

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
  """The lattices of a batch of images in one table of K rows (static
  shapes).

  Attributes:
    vertex: (..., N, d + 1) int32, the table row of each point's simplex
      vertices (row K is the zero row, which also takes vertices dropped
      for want of capacity).
    weight: (..., N, d + 1) float32 barycentric weights (each row sums to
      1).
    neighbours: (d + 1, 2, K) int32: for blur direction j, the rows of the
      two neighbours of every table row; the zero row K where absent.
    num_vertices: (...) int32, M per image, the number of distinct vertices
      (the table's first sum(M) rows are in use when sum(M) ≤ K).
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
  """Row of each query in the lexicographically sorted (R, W) table, or
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
  # The bounds start from the queries (zeros_like), not from constants, so
  # that inside `shard_map` they vary over the devices as the loop's do.
  first = jnp.zeros_like(queries[:, 0], jnp.int32)
  low, _ = jax.lax.fori_loop(0, int(np.ceil(np.log2(size + 1))), halve,
                             (first, first + size))
  row = jnp.minimum(low, size - 1)
  hit = (low < size) & jnp.all(table[row] == queries, axis=1)
  return jnp.where(hit, row, missing).astype(jnp.int32)


def _check_features(features: jax.Array) -> tuple[int, int]:
  if features.ndim < 2 or features.shape[-1] < 1:
    raise ValueError(f'lattice: features must be (..., N, d) with d >= 1, '
                     f'got {features.shape}.')
  return features.shape[-2:]


# Keys are packed into uint32 words of up to this many columns (the image
# index is a column too) when their value ranges allow; sorting and
# searching 2 words instead of d + 1 columns halves the build on a CPU.
_COLUMNS_PER_WORD = 3
_PACKED_LIMIT = 2.0 ** 31    # < 2^32 with room for float32 rounding
_EMPTY = np.uint32(0xFFFFFFFF)   # no packed or single-column word reaches it


def _word_groups(columns: int, per_word: int) -> tuple[tuple[int, ...], ...]:
  return tuple(tuple(range(start, min(start + per_word, columns)))
               for start in range(0, columns, per_word))


def _encode(columns: jax.Array, low: jax.Array, radix: jax.Array,
            groups: tuple[tuple[int, ...], ...]
            ) -> tuple[jax.Array, jax.Array]:
  """(..., c) int32 columns -> ((..., W) uint32 words, (...) in range).

  Each word is a mixed-radix number of its group's columns (offset by
  `low`, digit k in base `radix[k]`, the group's first column the most
  significant): one-to-one on keys within the ranges when each group's
  radix product is below 2^32 (`_fits`).  Keys outside the ranges (a
  neighbour beyond the data) are flagged, not encoded.
  """
  offset = columns - low
  valid = jnp.all((offset >= 0) & (offset < radix), axis=-1)
  offset = offset.astype(jnp.uint32)
  base = radix.astype(jnp.uint32)
  words = []
  for group in groups:
    # The first column is the most significant digit, so that the words
    # sort the keys by image first.
    word = offset[..., group[0]]
    for k in group[1:]:
      word = word * base[k] + offset[..., k]
    words.append(word)
  return jnp.stack(words, axis=-1), valid


def _fits(radix: jax.Array, groups) -> jax.Array:
  """Whether every group's radix product leaves its words one-to-one."""
  radix = radix.astype(jnp.float32)
  return functools.reduce(jnp.logical_and, [
      jnp.prod(radix[np.asarray(group)]) <= _PACKED_LIMIT for group in groups])


class _Keys(NamedTuple):
  """The N·(d + 1) vertex keys of B images, with the image index."""
  columns: jax.Array      # (B·N·(d + 1), d + 1) int32: image, key[:d]
  low: jax.Array          # (d + 1,) column minima
  radix: jax.Array        # (d + 1,) column ranges + 1
  per_image: int          # N·(d + 1)


def _vertex_keys(features: jax.Array) -> tuple[_Keys, jax.Array]:
  """The keys of every point's simplex vertices, and the (B·N, d + 1)
  barycentric weights, of (B, N, d) features."""
  images, n, d = features.shape
  rem0, rank, bary = simplex(elevate(features.reshape(images * n, d)))
  canonical = jnp.asarray(_canonical(d))
  # Vertex k of point i: rem0 + canonical[k, rank]; its key is the first d
  # coordinates (the last follows from Σ = 0).
  keys = rem0[:, None, :] + canonical[:, rank].transpose(1, 0, 2)
  per_image = n * (d + 1)
  image = jnp.repeat(jnp.arange(images, dtype=jnp.int32), per_image)
  columns = jnp.concatenate([image[:, None],
                             keys[:, :, :d].reshape(images * per_image, d)],
                            axis=1)
  low = jnp.min(columns, axis=0)
  radix = jnp.max(columns, axis=0) - low + 1
  return _Keys(columns, low, radix, per_image), bary


def _sort(keys: _Keys, groups):
  """Sorted words, the permutation, each sorted entry's global vertex rank
  and the vertex count per image."""
  words, _ = _encode(keys.columns, keys.low, keys.radix, groups)
  order = jnp.arange(words.shape[0], dtype=jnp.int32)
  *sorted_words, permutation = jax.lax.sort(
      tuple(words[:, k] for k in range(words.shape[1])) + (order,),
      num_keys=words.shape[1])
  sorted_words = jnp.stack(sorted_words, axis=1)
  changed = jnp.concatenate([jnp.ones((1,), bool), jnp.any(
      sorted_words[1:] != sorted_words[:-1], axis=1)])
  rank = jnp.cumsum(changed.astype(jnp.int32)) - 1
  # The image is the leading column, so image b's entries are the sorted
  # positions [b·per_image, (b + 1)·per_image).
  count = (rank[keys.per_image - 1::keys.per_image]
           - rank[::keys.per_image] + 1)
  return sorted_words, permutation, rank, count


def _packed_or_not(keys: _Keys, function):
  """function(groups) with the packed words when the key ranges fit in
  them, else with one word per column (always one-to-one)."""
  columns = keys.columns.shape[1]
  packed = _word_groups(columns, _COLUMNS_PER_WORD)
  single = _word_groups(columns, 1)
  if packed == single:
    return function(single)
  return jax.lax.cond(_fits(keys.radix, packed),
                      lambda: function(packed), lambda: function(single))


def _as_batch(features: jax.Array) -> tuple[jax.Array, tuple[int, ...]]:
  n, d = _check_features(features)
  batch = features.shape[:-2]
  return features.reshape((int(np.prod(batch, dtype=int)), n, d)), batch


def vertex_count(features: jax.Array) -> jax.Array:
  """M, the number of distinct lattice vertices of (..., N, d) features,
  one per image (..., ), to choose a `capacity`."""
  flat, batch = _as_batch(features)
  keys, _ = _vertex_keys(flat)
  return _packed_or_not(keys, lambda groups: _sort(keys, groups)[-1]
                        ).reshape(batch)


def capacity_for(count: int, minimum: int = 64) -> int:
  """A static capacity for `count` vertices: `count` rounded up to a
  multiple of an eighth of its power of two (4/8 … 8/8 of it), so that at
  most 25 % of the rows go unused and images of one size share a few
  compilations (the rounding to a power of two left up to half the table
  unused, and the blur and search cost O(rows))."""
  count = max(int(count), minimum)
  step = 1 << max(0, (count - 1).bit_length() - 3)
  return -(-count // step) * step


def _hash_table(keys: _Keys, capacity: int, groups):
  """(table row of every key, (d + 1, 2, K) blur neighbours, vertex count
  per image): the batch's vertices in rows [0, K), K the capacity, sorted
  by image and key; row K is the zero row."""
  sorted_words, permutation, rank, count = _sort(keys, groups)
  slot = jnp.where(rank < capacity, rank, capacity)
  vertex = jnp.zeros_like(slot).at[permutation].set(slot,
                                                    unique_indices=True)
  # The table: row r holds the r-th distinct key of the batch (the image
  # index its leading column); unused rows hold _EMPTY, above every key, so
  # the table stays sorted for the binary search.
  table = jnp.full((capacity, sorted_words.shape[1]), _EMPTY,
                   jnp.uint32).at[slot].set(sorted_words, mode='drop')
  table_columns = jnp.zeros((capacity, keys.columns.shape[1]),
                            jnp.int32).at[slot].set(
                                keys.columns[permutation], mode='drop')
  rows = jnp.arange(capacity, dtype=jnp.int32)
  used = rows <= rank[-1]
  d = keys.columns.shape[1] - 1
  neighbours = []
  for j in range(d + 1):
    # Neighbour along direction j: key + (1, ..., 1) with -d on axis j (the
    # image column unchanged).
    plus = np.ones((d + 1,), np.int32)
    plus[0] = 0
    if j < d:
      plus[1 + j] = -d
    query, inside = _encode(table_columns + plus, keys.low, keys.radix,
                            groups)
    found = _find(table, query, capacity)
    first = jnp.where(used & inside, found, capacity)
    # The other neighbour needs no search: b = key − offset exactly when
    # key = b + offset, so it is the inverse map of `first` (one-to-one on
    # the rows found; rows not found point at the zero row).
    second = jnp.full((capacity,), capacity, jnp.int32).at[first].set(
        rows, mode='drop')
    neighbours.append(jnp.stack([first, second]))
  return vertex, jnp.stack(neighbours), count


def build(features: jax.Array, capacity: int | None = None) -> Lattice:
  """The lattices of (..., N, d) features (d ≥ 1, float): one per image of
  the leading batch axes, in one table.

  `capacity` (static) is the number of table rows for the whole batch:
  B·N·(d + 1) by default, which always suffices.  Real images use far fewer
  vertices than that (a 500×375 photo: 8,000 to 310,000 of 1.1 million for
  BANA's bilateral kernel), and the blur and the neighbour search cost
  O(capacity), so a caller that knows a bound (the sum of `vertex_count`
  over the batch, `capacity_for`) passes it.  Vertices beyond the capacity
  are dropped (their splats lost): check `overflowed`.

  The batch is one flat table rather than a vmap: XLA:CPU runs a flat
  gather or scatter several times faster than a batched one.
  """
  flat, batch = _as_batch(features)
  images, n, d = flat.shape
  capacity = images * n * (d + 1) if capacity is None else int(capacity)
  if capacity < 1:
    raise ValueError(f'lattice.build: capacity must be >= 1, got {capacity}.')
  keys, bary = _vertex_keys(flat)
  vertex, neighbours, count = _packed_or_not(
      keys, functools.partial(_hash_table, keys, capacity))
  return Lattice(vertex=vertex.reshape(batch + (n, d + 1)),
                 weight=bary.reshape(batch + (n, d + 1)),
                 neighbours=neighbours, num_vertices=count.reshape(batch))


def overflowed(lattice: Lattice) -> jax.Array:
  """Whether `build`'s capacity was too small (the filter is then wrong)."""
  return jnp.sum(lattice.num_vertices) > lattice.neighbours.shape[-1]


def _splat_blur_slice(lattice: Lattice, values: jax.Array,
                      reverse: bool) -> jax.Array:
  d1 = lattice.vertex.shape[-1]
  rows = lattice.neighbours.shape[-1]           # K; row K is zero
  channels = values.shape[-1]
  # The barriers keep each stage a materialised array: fused together, XLA
  # recomputes gathers of gathers (the filter ran 2.6× slower on a CPU).
  barrier = jax.lax.optimization_barrier
  weighted = barrier((lattice.weight[..., None] * values[..., None, :]
                      ).reshape(-1, channels))
  grid = jax.ops.segment_sum(weighted, lattice.vertex.reshape(-1),
                             num_segments=rows + 1)
  # Dropped vertices (over capacity) splat onto the zero row: clear it.
  grid = grid.at[rows].set(0.0)
  zero = jnp.zeros((1, channels), grid.dtype)
  directions = range(d1 - 1, -1, -1) if reverse else range(d1)
  for j in directions:
    first, second = lattice.neighbours[j]
    grid = barrier(grid)
    # The zero row is appended, not blurred in place: updating the whole
    # grid from gathers of itself ran 3× slower on a CPU.
    grid = jnp.concatenate(
        [grid[:rows] + 0.5 * (grid[first] + grid[second]), zero])
  grid = barrier(grid)
  alpha = 1.0 / (1.0 + 2.0 ** (-(d1 - 1)))
  # One gather per simplex vertex, accumulated: gathering all d + 1 at once
  # into an (..., N, d + 1, C) array and summing ran 2× slower on a CPU.
  sliced = 0.0
  for k in range(d1):
    sliced = sliced + grid[lattice.vertex[..., k]] * lattice.weight[..., k,
                                                                    None]
  return alpha * sliced


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def filter_values(lattice: Lattice, values: jax.Array,
                  reverse: bool = False) -> jax.Array:
  """(..., N, C) values -> (..., N, C) lattice-filtered values (splat,
  blur, slice), the batch axes those of `build`'s features.

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
  """One-shot: `filter_values(build(features), values)` for (..., N, d)
  features and (..., N, C) values."""
  return filter_values(build(jax.lax.stop_gradient(features)), values)
