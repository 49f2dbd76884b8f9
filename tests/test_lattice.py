"""The permutohedral lattice, its exact reference and the JAX DenseCRF."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from wsss_jax.crf import dense_crf as jax_crf
from wsss_jax.crf import exact
from wsss_jax.crf import lattice
from wsss_jax.host import crf as host_crf

import device_checks  # pylint: disable=g-bad-import-order
from test_crf import _corrupted_probs, _voc  # pylint: disable=g-bad-import-order

# One lattice unit along a d = 1 feature: c = f·2/sqrt(3) (`_scale_factors`).
UNIT_1D = np.sqrt(3.0) / 2.0


def _matrix(features, reverse=False):
  """The (N, N) linear map of the lattice filter (column j = filter of e_j)."""
  n = features.shape[0]
  built = lattice.build(jnp.asarray(features, jnp.float32))
  return np.asarray(lattice.filter_values(built, jnp.eye(n), reverse))


# ----------------------------------------------------------------------------
# Hand-computed lattices
# ----------------------------------------------------------------------------
def test_one_point_in_one_dimension():
  # Splat v on key 0 (weight 1); blur twice with [1/2, 1, 1/2]: key 0 gets
  # v, key 1 v/2, then key 0 v + v/4; slice with alpha = 1/(1 + 1/2).
  out = lattice.gaussian_filter(jnp.zeros((1, 1)), jnp.array([[2.0, -1.0]]))
  np.testing.assert_allclose(out, [[2.0 * 5 / 6, -5 / 6]], rtol=1e-6)


def test_two_points_half_a_lattice_unit_apart():
  # Point 0 (value a) sits on key 0; point 1 (b), half a unit on, splats
  # b/2 on keys 0 and 1.  Blurs: key 0 = 1.25a + 1.125b, key 1 = a + 1.125b;
  # point 1 slices half of each.
  matrix = _matrix(np.array([[0.0], [0.5 * UNIT_1D]]))
  np.testing.assert_allclose(matrix, np.array([[1.25, 1.125],
                                               [1.125, 1.125]]) * 2 / 3,
                             rtol=1e-5)


def test_one_point_in_two_dimensions():
  # Keys (0,0) [v], (1,1) and (2,-1) [0].  Direction 0 links (0,0)-(2,-1),
  # direction 1 (1,1)-(2,-1), direction 2 (0,0)-(1,1):
  # (0,0): v -> v -> v + 0.5·0.25v = 1.125v; alpha = 1/(1 + 1/4).
  out = lattice.gaussian_filter(jnp.zeros((1, 2)), jnp.ones((1, 1)))
  np.testing.assert_allclose(out, [[0.9]], rtol=1e-6)


def test_elevation_and_simplex_by_hand():
  # d = 2, f = (1, 0): scales sqrt(2/3)·3/sqrt(2) = sqrt(3) and
  # sqrt(2/3)·3/sqrt(6) = 1, so c = (sqrt(3), 0) and the point is
  # (c0 + c1, c1 − c0, −2·c1) = (sqrt(3), −sqrt(3), 0).
  np.testing.assert_allclose(lattice.elevate(jnp.array([[1.0, 0.0]])),
                             [[np.sqrt(3), -np.sqrt(3), 0.0]], rtol=1e-6)
  # d = 1, half a unit from the origin: elevated (0.5, −0.5) rounds to
  # (0, 0); residuals (0.5, −0.5) rank (0, 1); v = (0.25, −0.25) gives the
  # weights (0.5, 0.5) of the remainder-0 and remainder-1 vertices.
  rem0, rank, bary = lattice.simplex(jnp.array([[0.5, -0.5]]))
  np.testing.assert_array_equal(rem0, [[0, 0]])
  np.testing.assert_array_equal(rank, [[0, 1]])
  np.testing.assert_allclose(bary, [[0.5, 0.5]], rtol=1e-6)


def test_mean_field_by_hand():
  # One pixel, two labels, U = (0, ln 2): Q0 = softmax(−U) = (2/3, 1/3).
  # With the identity as the kernel and w = 1, one step gives
  # softmax(−U + Q0) = softmax(2/3, 1/3 − ln 2).
  unary = jnp.array([[0.0, np.log(2.0)]])
  np.testing.assert_allclose(
      jax_crf.mean_field(unary, [], [], 0), [[2 / 3, 1 / 3]], rtol=1e-6)
  first = 1.0 / (1.0 + 0.5 * np.exp(-1.0 / 3.0))
  np.testing.assert_allclose(
      jax_crf.mean_field(unary, [lambda q: q], [1.0], 1),
      [[first, 1.0 - first]], rtol=1e-6)
  np.testing.assert_allclose(jax_crf.unary_from_probs(
      jnp.array([0.5, 0.0, 2.0])), [np.log(2.0), -np.log(1e-5), 0.0],
                             rtol=1e-6)


def test_barycentric_weights_and_vertices():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(50, 3)).astype(np.float32) * 3
  built = lattice.build(jnp.asarray(features))
  np.testing.assert_allclose(np.sum(built.weight, axis=1), 1.0, atol=1e-5)
  assert np.all(np.asarray(built.weight) >= -1e-6)
  # The same point twice shares its vertices; M counts distinct keys.
  doubled = lattice.build(jnp.asarray(np.concatenate([features, features])))
  assert int(doubled.num_vertices) == int(built.num_vertices)
  assert int(built.num_vertices) <= 50 * 4


# ----------------------------------------------------------------------------
# Linear algebra and gradients
# ----------------------------------------------------------------------------
def test_reverse_filter_is_the_transpose():
  rng = np.random.default_rng(1)
  features = rng.normal(size=(40, 5)).astype(np.float32) * 1.5
  forward, backward = _matrix(features), _matrix(features, reverse=True)
  np.testing.assert_allclose(backward, forward.T, atol=1e-6)
  # ⟨A y, x⟩ = ⟨y, Aᵀ x⟩ for the filter as called.
  y = rng.normal(size=(40, 3)).astype(np.float32)
  x = rng.normal(size=(40, 3)).astype(np.float32)
  built = lattice.build(jnp.asarray(features))
  left = np.sum(np.asarray(lattice.filter_values(built, y)) * x)
  right = np.sum(y * np.asarray(lattice.filter_values(built, x, True)))
  assert abs(left - right) < 1e-4 * abs(left)


def test_linear_in_the_values():
  rng = np.random.default_rng(2)
  built = lattice.build(jnp.asarray(rng.normal(size=(30, 2)), jnp.float32))
  a, b = rng.normal(size=(2, 30, 4)).astype(np.float32)
  combined = lattice.filter_values(built, 2 * a - 3 * b)
  np.testing.assert_allclose(
      combined, 2 * lattice.filter_values(built, a)
      - 3 * lattice.filter_values(built, b), atol=1e-5)


def test_gradient_matches_finite_differences_and_the_transpose():
  rng = np.random.default_rng(3)
  features = jnp.asarray(rng.normal(size=(25, 5)), jnp.float32)
  values = jnp.asarray(rng.normal(size=(25, 2)), jnp.float32)
  weights = jnp.asarray(rng.normal(size=(25, 2)), jnp.float32)
  built = lattice.build(features)

  def loss(v):
    return jnp.sum(weights * lattice.filter_values(built, v))
  grad = jax.grad(loss)(values)
  np.testing.assert_allclose(grad, lattice.filter_values(built, weights,
                                                         True), atol=1e-6)
  direction = jnp.asarray(rng.normal(size=(25, 2)), jnp.float32)
  step = 1e-2
  finite = (loss(values + step * direction)
            - loss(values - step * direction)) / (2 * step)
  np.testing.assert_allclose(finite, jnp.sum(grad * direction), rtol=1e-3)
  # Through the one-shot filter, features are not differentiated.
  feature_grad = jax.grad(lambda f: jnp.sum(
      lattice.gaussian_filter(f, values)))(features)
  assert np.all(np.asarray(feature_grad) == 0)


def test_normalised_filter_keeps_a_constant_constant():
  rng = np.random.default_rng(4)
  built = lattice.build(jnp.asarray(rng.normal(size=(60, 5)) * 2,
                                    jnp.float32))
  norm = lattice.filter_values(built, jnp.ones((60, 1)))
  out = lattice.filter_values(built, jnp.full((60, 3), 7.0)) / norm
  np.testing.assert_allclose(out, 7.0, rtol=1e-5)


def test_compiles_once_for_a_batch_shape():
  @jax.jit
  def batched(features, values):
    return jax.vmap(lattice.gaussian_filter)(features, values)
  rng = np.random.default_rng(5)
  for _ in range(3):
    out = batched(jnp.asarray(rng.normal(size=(2, 20, 3)), jnp.float32),
                  jnp.asarray(rng.normal(size=(2, 20, 4)), jnp.float32))
    assert np.all(np.isfinite(out))
  assert batched._cache_size() == 1  # pylint: disable=protected-access


def test_a_tight_capacity_gives_the_same_filter():
  rng = np.random.default_rng(7)
  # Clustered features: far fewer distinct vertices than N·(d + 1).
  features = jnp.asarray(np.repeat(rng.normal(size=(20, 3)) * 3, 10, axis=0)
                         + rng.normal(size=(200, 3)) * 0.05, jnp.float32)
  values = jnp.asarray(rng.normal(size=(200, 4)), jnp.float32)
  count = int(lattice.vertex_count(features))
  assert count < 200 * 4
  capacity = lattice.capacity_for(count)
  assert count <= capacity <= max(64, 1.25 * count)
  # Counts of one bucket share the capacity (and so the compilation).
  assert lattice.capacity_for(capacity) == capacity
  assert [lattice.capacity_for(c) for c in (1, 64, 65, 1000, 1025, 1147394)
          ] == [64, 64, 80, 1024, 1280, 1310720]
  full, tight = lattice.build(features), lattice.build(features, capacity)
  assert not bool(lattice.overflowed(tight))
  assert tight.neighbours.shape[-1] == capacity
  np.testing.assert_allclose(lattice.filter_values(tight, values),
                             lattice.filter_values(full, values), atol=1e-5)
  small = lattice.build(features, count // 2)
  assert bool(lattice.overflowed(small))


def test_a_batch_is_one_table_and_filters_each_image_alone():
  rng = np.random.default_rng(8)
  # Two images with very different vertex counts, in one table.
  spread = np.repeat(rng.normal(size=(1, 80, 3)) * 4, 2, axis=0)
  spread[1] = np.repeat(spread[1, :8], 10, axis=0)
  features = jnp.asarray(spread, jnp.float32)
  values = jnp.asarray(rng.normal(size=(2, 80, 4)), jnp.float32)
  counts = np.asarray(lattice.vertex_count(features))
  assert counts.shape == (2,) and counts[1] < counts[0]
  for image in range(2):
    assert counts[image] == int(lattice.vertex_count(features[image]))
  # One table for the batch: its capacity bounds the sum of the counts.
  total = int(counts.sum())
  batch = lattice.build(features, total)
  assert batch.vertex.shape == (2, 80, 4)
  assert not bool(lattice.overflowed(batch))
  for image in range(2):
    np.testing.assert_allclose(
        lattice.filter_values(batch, values)[image],
        lattice.filter_values(lattice.build(features[image]),
                              values[image]), atol=1e-5)
  assert bool(lattice.overflowed(lattice.build(features, total - 1)))


def test_keys_too_wide_to_pack_fall_back_to_one_word_per_column():
  # Two clusters 40,000 lattice units apart: the (image, x, y) key ranges
  # multiply to more than 2^31, so the table sorts one column per word.
  rng = np.random.default_rng(9)
  cluster = rng.normal(size=(10, 2)).astype(np.float32)
  features = jnp.asarray(np.concatenate([cluster, cluster + 40000.0]))
  keys, _ = lattice._vertex_keys(features[None])  # pylint: disable=protected-access
  groups = lattice._word_groups(3, 3)  # pylint: disable=protected-access
  assert not bool(lattice._fits(keys.radix, groups))  # pylint: disable=protected-access
  values = jnp.asarray(rng.normal(size=(20, 2)), jnp.float32)
  both = lattice.gaussian_filter(features, values)
  # Far apart, the clusters do not interact: each filters as if alone.
  for part in (slice(0, 10), slice(10, 20)):
    np.testing.assert_allclose(
        both[part], lattice.gaussian_filter(features[part], values[part]),
        atol=1e-5)
  assert int(lattice.vertex_count(features)) == 2 * int(
      lattice.vertex_count(features[:10]))


# ----------------------------------------------------------------------------
# Against the exact Gaussian
# ----------------------------------------------------------------------------
def test_exact_filter_by_hand():
  features = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
  values = jnp.array([[1.0], [10.0], [100.0]])
  out = exact.exact_gaussian_filter(features, values, block=2)
  e = np.exp
  expected = [1 + 10 * e(-0.5) + 100 * e(-2.0),
              e(-0.5) + 10 + 100 * e(-2.5),
              e(-2.0) + 10 * e(-2.5) + 100]
  np.testing.assert_allclose(out[:, 0], expected, rtol=1e-6)


def test_lattice_follows_the_exact_filter_on_a_smooth_image():
  """Normalised (K v / K 1) lattice and exact filters of a smooth signal
  on a 24×24 grid with colour features: close, not equal."""
  rng = np.random.default_rng(6)
  height = width = 24
  image = ndimage.gaussian_filter(rng.uniform(0, 255, (height, width, 3)),
                                  (3, 3, 0))
  features = jax_crf.bilateral_features(jnp.asarray(image), 5.0, 10.0)
  values = jnp.asarray(ndimage.gaussian_filter(
      rng.normal(size=(height, width, 2)), (2, 2, 0)).reshape(-1, 2),
                       jnp.float32)
  ones = jnp.ones((height * width, 1))
  built = lattice.build(features)
  approx = lattice.filter_values(built, values) / lattice.filter_values(
      built, ones)
  reference = (exact.exact_gaussian_filter(features, values)
               / exact.exact_gaussian_filter(features, ones))
  error = np.linalg.norm(approx - reference) / np.linalg.norm(reference)
  assert error < 0.15, error


# ----------------------------------------------------------------------------
# DenseCRF against pydensecrf
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('params', [
    host_crf.CrfParams(gauss_sxy=3.0, bilateral_sxy=55.0),   # BANA stage 2
    host_crf.CrfParams(),                                      # DeepLab-v2
])
def test_dense_crf_agrees_with_pydensecrf_on_a_real_image(params):
  image, gt = _voc('2007_000243')
  image = np.ascontiguousarray(image[100:220, 150:310])
  gt = gt[100:220, 150:310]
  probs = _corrupted_probs(gt, blur=5.0)
  reference = host_crf.dense_crf(image, probs, params)
  capacity = jax_crf.lattice_capacity(jnp.asarray(image)[None], params)
  assert max(capacity) < image.shape[0] * image.shape[1] * 6
  ours = np.asarray(jax.jit(lambda i, p: jax_crf.dense_crf(
      i, p, params, capacity))(jnp.asarray(image),
                               jnp.asarray(probs.transpose(1, 2, 0))))
  ours = ours.transpose(2, 0, 1)
  agreement = np.mean(ours.argmax(0) == reference.argmax(0))
  assert agreement >= 0.995, agreement
  assert np.max(np.abs(ours - reference)) < 0.05


def test_a_batch_gives_each_image_its_own_marginals():
  # The bilateral lattices share one table and the Gaussian kernel filters
  # the batch as extra channels: each image as if alone.
  image, gt = _voc('2007_000243')
  crops = [(100, 150), (20, 40)]
  images = np.stack([image[r:r + 40, c:c + 56] for r, c in crops])
  probs = np.stack([_corrupted_probs(gt[r:r + 40, c:c + 56])[:5].transpose(
      1, 2, 0) for r, c in crops])
  params = host_crf.CrfParams(iterations=4)
  batch = jax_crf.dense_crf(jnp.asarray(images), jnp.asarray(probs), params)
  for k in range(2):
    np.testing.assert_allclose(
        batch[k], jax_crf.dense_crf(jnp.asarray(images[k]),
                                    jnp.asarray(probs[k]), params),
        atol=1e-5)


def test_dense_crf_degenerate_inputs_are_finite():
  params = host_crf.CrfParams(iterations=3)
  for image, probs in [
      (np.full((7, 9, 3), 120, np.uint8), np.full((7, 9, 4), 0.25)),
      (np.zeros((1, 1, 3), np.uint8), np.array([[[0.2, 0.8]]])),
      (np.random.default_rng(0).integers(0, 255, (5, 6, 3)).astype(np.uint8),
       np.zeros((5, 6, 3))),            # all unaries at the clip floor
  ]:
    out = np.asarray(jax_crf.dense_crf(jnp.asarray(image),
                                       jnp.asarray(probs, jnp.float32),
                                       params))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_the_jax_crf_serves_as_the_host_crf_backend():
  # Importing the backend registers 'jax'.
  from wsss_jax.crf import backend as backend_lib  # pylint: disable=g-import-not-at-top
  image, gt = _voc('2007_000243')
  image, gt = np.ascontiguousarray(image[150:214, 200:280]), gt[150:214,
                                                                200:280]
  probs = _corrupted_probs(gt)[[0, 1, 2, 15]]
  params = host_crf.CrfParams(iterations=5)
  # A flat image of the same size first: the capacities it leaves are too
  # small for the real one, which must count its vertices and run again.
  host_crf.get_backend('jax')(np.full_like(image, 90), probs, params)
  key = (image.shape, 4, params)
  flat_capacity = backend_lib._capacities[key]  # pylint: disable=protected-access
  ours = host_crf.get_backend('jax')(image, probs, params)
  assert backend_lib._capacities[key][1] > flat_capacity[1]  # pylint: disable=protected-access
  reference = host_crf.get_backend('pydensecrf')(image, probs, params)
  assert ours.shape == reference.shape and ours.dtype == np.float32
  assert np.mean(ours.argmax(0) == reference.argmax(0)) >= 0.995
  labels = host_crf.crf_item((image, probs), params, argmax=True,
                             backend='jax')
  np.testing.assert_array_equal(labels, ours.argmax(0))
  with pytest.raises(ValueError, match='channel-first'):
    host_crf.get_backend('jax')(image, probs.transpose(1, 2, 0), params)


# Slow: a fresh process with 4 devices compiles the CRF and the energy
# gradient twice (sharded and not), about 20 s.
@pytest.mark.slow
def test_sharded_over_devices_equals_one_device():
  report = device_checks.run_check('four_devices_crf_check.py')
  for name, values in report.items():
    assert values['devices'] == 4, (name, values)
    assert values['max_diff'] < 1e-5, (name, values)
