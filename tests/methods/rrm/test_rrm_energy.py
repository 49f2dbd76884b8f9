"""RRM's dense energy loss (Eqs. 10–14): hand-computed cases, a dense N × N
reference, the two backward rules, the kernels and degenerate inputs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.methods.rrm import energy as E
from wsss_jax.ops.resize import resize_bilinear

RNG = np.random.default_rng(0)


def _dense_filter(features, values, include_self):
  """Σ_j exp(−½‖f_i − f_j‖²) v_j per image from the explicit N × N matrix
  (float64), the diagonal zeroed unless include_self."""
  features = np.asarray(features, np.float64)
  values = np.asarray(values, np.float64)
  out = []
  for f, v in zip(features, values):
    weights = np.exp(-0.5 * np.sum((f[:, None] - f[None]) ** 2, axis=-1))
    if not include_self:
      np.fill_diagonal(weights, 0.0)
    out.append(weights @ v)
  return np.stack(out)


def _dense_energy(probs, gate, roi, features, include_self):
  """−(1/B) Σ S P̃ [G P̃] with the dense filter, float64."""
  probs = np.asarray(probs, np.float64)
  batch, h, w, channels = probs.shape
  masked = (probs * np.asarray(roi)[..., None]).reshape(batch, h * w,
                                                        channels)
  filtered = _dense_filter(features, masked, include_self)
  gate = np.asarray(gate, np.float64).reshape(batch, h * w, 1)
  return -np.sum(gate * masked * filtered) / batch


def _random_case(batch=2, h=6, w=5, channels=3):
  images = RNG.uniform(0, 255, (batch, h, w, 3)).astype(np.float32)
  probs = jax.nn.softmax(jnp.asarray(RNG.normal(size=(batch, h, w, channels)),
                                     jnp.float32))
  gate = jnp.asarray(RNG.uniform(size=(batch, h, w)), jnp.float32)
  roi = jnp.asarray(RNG.uniform(size=(batch, h, w)) > 0.2)
  return jnp.asarray(images), probs, gate, roi


# ----------------------------------------------------------------------------
# RRM Eq. 14: the gate
# ----------------------------------------------------------------------------
def test_gate_by_hand():
  # (0,0) labelled in the ROI: 1 − 0.7; (0,1) unlabelled in the ROI: 1;
  # (1,0) unlabelled padding: 1; (1,1) labelled padding: 0.
  probs = jnp.asarray([[[[0.7, 0.3], [0.4, 0.6]],
                        [[0.5, 0.5], [0.9, 0.1]]]])
  labelled = jnp.asarray([[[True, False], [False, True]]])
  roi = jnp.asarray([[[True, True], [False, False]]])
  np.testing.assert_allclose(E.energy_gate(probs, labelled, roi),
                             [[[0.3, 1.0], [1.0, 0.0]]], atol=1e-6)
  # A constant for the gradient.
  grad = jax.grad(lambda p: jnp.sum(E.energy_gate(p, labelled, roi)))(probs)
  np.testing.assert_array_equal(grad, 0.0)


# ----------------------------------------------------------------------------
# The half-resolution grid
# ----------------------------------------------------------------------------
@pytest.mark.parametrize('size', [(6, 8), (7, 9)])
def test_exact_half_is_the_two_by_two_mean(size):
  # Source 2i + 0.5: the mean of the block at (2i, 2j); for odd sizes too,
  # since the output is floor(H/2) (321 -> 160).
  h, w = size
  x = jnp.asarray(RNG.normal(size=(2, h, w, 3)), jnp.float32)
  out = E.downsample_bilinear(x, 0.5, 'exact_half')
  hh, ww = h // 2, w // 2
  blocks = np.asarray(x)[:, :2 * hh, :2 * ww].reshape(2, hh, 2, ww, 2, 3)
  np.testing.assert_allclose(out, blocks.mean(axis=(2, 4)), atol=1e-6)


def test_size_ratio_is_resize_bilinear_and_differs_for_odd_sizes():
  x = jnp.asarray(RNG.normal(size=(1, 9, 7, 2)), jnp.float32)
  out = E.downsample_bilinear(x, 0.5, 'size_ratio')
  assert out.shape == (1, 4, 3, 2)
  np.testing.assert_allclose(out, resize_bilinear(x, (4, 3)), atol=1e-6)
  assert not np.allclose(out, E.downsample_bilinear(x, 0.5, 'exact_half'),
                         atol=1e-3)


def test_nearest_takes_even_pixels_and_scale_one_is_identity():
  x = jnp.arange(7 * 5).reshape(1, 7, 5)
  np.testing.assert_array_equal(E.downsample_nearest(x, 0.5),
                                np.asarray(x)[:, [0, 2, 4]][:, :, [0, 2]])
  assert E.downsampled_size(321, 0.5) == 160
  assert E.downsample_nearest(x, 1.0) is x
  probs = jnp.ones((1, 7, 5, 2))
  np.testing.assert_array_equal(
      E.downsample_bilinear(probs, 1.0, 'exact_half'), probs)


# ----------------------------------------------------------------------------
# RRM Eq. 11: features and filters
# ----------------------------------------------------------------------------
def test_features_by_hand():
  images = jnp.zeros((1, 2, 3, 3)).at[0, 1, 2].set(jnp.asarray([30., 60., 90.]))
  features = E.energy_features(images, 2.0, 15.0)
  assert features.shape == (1, 6, 5)
  # Row 1, column 2 is pixel 5 (row-major): x = 2, y = 1.
  np.testing.assert_allclose(features[0, 5], [1.0, 0.5, 2.0, 4.0, 6.0])
  np.testing.assert_allclose(features[0, 1], [0.5, 0.0, 0.0, 0.0, 0.0])


@pytest.mark.parametrize('kernel,include_self,factor', [
    ('exact_gaussian', False, 1.0),
    ('lattice_scaled', True, E.LATTICE_ENERGY_RATIO)])
def test_exact_filters_equal_the_dense_matrix(kernel, include_self, factor):
  # 64 × 65 pixels per image, two images: three blocks of 2016 query
  # points, the last one padded.
  features = jnp.asarray(RNG.normal(size=(2, 64 * 65, 5)) * 3, jnp.float32)
  values = jnp.asarray(RNG.uniform(size=(2, 64 * 65, 2)), jnp.float32)
  out = E.filter_gaussian(features, values, kernel)
  expected = factor * _dense_filter(features, values, include_self)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('kernel,include_self,factor', [
    ('exact_gaussian', False, 1.0),
    ('lattice_scaled', True, E.LATTICE_ENERGY_RATIO)])
def test_custom_vjp_filter_gradient_equals_dense_autodiff(kernel,
                                                          include_self,
                                                          factor):
  features = jnp.asarray(RNG.normal(size=(2, 30, 5)), jnp.float32)
  values = jnp.asarray(RNG.uniform(size=(2, 30, 3)), jnp.float32)
  weights = jnp.asarray(RNG.normal(size=(2, 30, 3)), jnp.float32)

  def dense(f, v):
    matrix = jnp.exp(-0.5 * jnp.sum((f[:, :, None] - f[:, None]) ** 2, -1))
    if not include_self:
      matrix = matrix * (1.0 - jnp.eye(f.shape[1]))
    return factor * jnp.einsum('bij,bjc->bic', matrix, v)

  def loss(filter_fn, v):
    return jnp.sum(weights * filter_fn(features, v) ** 2)

  ours = jax.grad(functools.partial(
      loss, lambda f, v: E.filter_gaussian(f, v, kernel)))(values)
  reference = jax.grad(functools.partial(loss, dense))(values)
  np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-5)
  # The features are not differentiated.
  grad_f = jax.grad(lambda f: jnp.sum(E.filter_gaussian(f, values, kernel)))(
      features)
  np.testing.assert_array_equal(grad_f, 0.0)


def test_backward_stores_no_pairwise_matrix():
  # The VJP keeps the features, not the blocks' N-wide weights.
  n = 64 * 65
  features = jnp.asarray(RNG.normal(size=(1, n, 5)), jnp.float32)
  values = jnp.asarray(RNG.uniform(size=(1, n, 2)), jnp.float32)
  _, vjp = jax.vjp(
      lambda v: E.filter_gaussian(features, v, 'exact_gaussian'), values)
  largest = max(np.size(leaf) for leaf in jax.tree_util.tree_leaves(vjp))
  assert largest <= n * 5


# ----------------------------------------------------------------------------
# RRM Eqs. 12–13: the energy
# ----------------------------------------------------------------------------
def test_two_pixels_by_hand():
  # One row of two pixels of the same colour, σ_xy = 1: G = exp(−½).
  # P(0) = (1, 0), P(1) = (½, ½), S = (½, 1):
  # E = −[½·(1·½)·G + 1·(½·1 + ½·0)·G] = −¾·exp(−½).
  probs = jnp.asarray([[[[1.0, 0.0], [0.5, 0.5]]]])
  gate = jnp.asarray([[[0.5, 1.0]]])
  roi = jnp.ones((1, 1, 2), bool)
  features = E.energy_features(jnp.full((1, 1, 2, 3), 100.0), 1.0, 15.0)
  value = E.dense_energy(probs, gate, roi, features, 'exact_gaussian',
                         'autodiff')
  np.testing.assert_allclose(value, -0.75 * np.exp(-0.5), rtol=1e-6)
  # With the self terms, S(i)·Σ_c P_c(i)² = ½·1 + 1·½, scaled by 0.596.
  value = E.dense_energy(probs, gate, roi, features, 'lattice_scaled',
                         'autodiff')
  np.testing.assert_allclose(
      value, -E.LATTICE_ENERGY_RATIO * (1.0 + 0.75 * np.exp(-0.5)),
      rtol=1e-6)


@pytest.mark.parametrize('kernel,include_self,factor', [
    ('exact_gaussian', False, 1.0),
    ('lattice_scaled', True, E.LATTICE_ENERGY_RATIO)])
def test_energy_equals_dense_reference(kernel, include_self, factor):
  images, probs, gate, roi = _random_case()
  features = E.energy_features(images, 2.0, 60.0)
  for backward in E.BACKWARDS:
    value = E.dense_energy(probs, gate, roi, features, kernel, backward)
    expected = factor * _dense_energy(probs, gate, roi, features,
                                      include_self)
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def _gradients(probs, gate, roi, features, kernel='exact_gaussian'):
  return [jax.grad(lambda p, b=b: E.dense_energy(p, gate, roi, features,
                                                 kernel, b))(probs)
          for b in E.BACKWARDS]


def test_autodiff_gradient_by_formula():
  # −(S·G P̃ + G(S·P̃))/B with respect to P̃, times the ROI for P.
  images, probs, gate, roi = _random_case()
  features = E.energy_features(images, 2.0, 60.0)
  autodiff, _ = _gradients(probs, gate, roi, features)
  batch, h, w, c = probs.shape
  masked = (np.asarray(probs, np.float64)
            * np.asarray(roi)[..., None]).reshape(batch, h * w, c)
  s = np.asarray(gate, np.float64).reshape(batch, h * w, 1)
  expected = -(s * _dense_filter(features, masked, False)
               + _dense_filter(features, s * masked, False)) / batch
  expected = expected.reshape(probs.shape) * np.asarray(roi)[..., None]
  np.testing.assert_allclose(autodiff, expected, rtol=1e-4, atol=1e-6)


def test_rloss_backward_equals_autodiff_only_for_a_uniform_gate():
  images, probs, _, roi = _random_case()
  features = E.energy_features(images, 2.0, 60.0)
  uniform = jnp.full(roi.shape, 0.7)
  autodiff, rloss = _gradients(probs, uniform, roi, features)
  np.testing.assert_allclose(rloss, autodiff, rtol=1e-5, atol=1e-6)
  # Its formula: −2·S·G P̃/B on P̃, times the ROI for P.
  _, probs, gate, _ = _random_case()
  autodiff, rloss = _gradients(probs, gate, roi, features)
  batch, h, w, c = probs.shape
  masked = (np.asarray(probs, np.float64)
            * np.asarray(roi)[..., None]).reshape(batch, h * w, c)
  s = np.asarray(gate, np.float64).reshape(batch, h * w, 1)
  expected = (-2.0 * s * _dense_filter(features, masked, False)
              / batch).reshape(probs.shape) * np.asarray(roi)[..., None]
  np.testing.assert_allclose(rloss, expected, rtol=1e-4, atol=1e-6)
  # A non-uniform gate: the rules differ (≈ 29 % here; the official code's
  # documented ≈ 30 % on a tiny case).
  relative = np.abs(autodiff - rloss).sum() / np.abs(autodiff).sum()
  assert relative > 0.05


def test_permutohedral_is_about_half_the_exact_energy():
  # The un-normalised lattice (self weight ≈ 0.48, mass ≈ 0.53 of the exact
  # kernel) on a smooth 12 × 12 image: measured 0.48–0.52 on such images
  # (0.52 at the training settings, 160², σ 50/15, on a synthetic image; the
  # official code's measurement gave 0.596); a loose band.
  yy, xx = np.mgrid[0:12, 0:12] / 12.0
  images = 255.0 * np.stack([0.5 + 0.5 * np.sin(3 * xx), yy,
                             (xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.1], -1)
  images = jnp.asarray(images[None], jnp.float32)
  logits = np.stack([3 * xx, 3 * yy, 3 * (1 - xx)], -1)[None] * 3
  probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32))
  gate = jnp.ones((1, 12, 12))
  roi = jnp.ones((1, 12, 12), bool)
  features = E.energy_features(images, 4.0, 15.0)
  lattice = E.dense_energy(probs, gate, roi, features, 'permutohedral',
                           'autodiff')
  scaled = E.dense_energy(probs, gate, roi, features, 'lattice_scaled',
                          'autodiff')
  ratio = float(lattice / (scaled / E.LATTICE_ENERGY_RATIO))
  assert 0.4 < ratio < 0.7, ratio


# ----------------------------------------------------------------------------
# RRM Eqs. 10–14 from the full-resolution crop
# ----------------------------------------------------------------------------
OPTIONS = dict(sigma_xy=8.0, sigma_rgb=40.0, scale=0.5,
               kernel='exact_gaussian', backward='autodiff',
               sigma_assignment='code', downsample_interp='exact_half')


def _crop(batch=2, h=8, w=10, channels=3):
  images = jnp.asarray(RNG.integers(0, 256, (batch, h, w, 3)), jnp.uint8)
  logits = jnp.asarray(RNG.normal(size=(batch, h, w, channels)) * 2,
                       jnp.float32)
  # The last four columns are padding: whole 2 × 2 blocks, so the half grid's
  # in-ROI probabilities average no padded pixel.
  roi = jnp.ones((batch, h, w), bool).at[:, :, -4:].set(False)
  labels = jnp.asarray(RNG.integers(0, channels, (batch, h, w)))
  labels = jnp.where(RNG.uniform(size=(batch, h, w)) < 0.5, 255, labels)
  return images, logits, roi, labels


def test_loss_composes_the_half_resolution_pieces():
  images, logits, roi, labels = _crop()
  probs = jax.nn.softmax(logits)
  value = jax.jit(functools.partial(E.dense_energy_loss, **OPTIONS))(
      images, probs, roi, labels)
  # By hand: pixels (2i, 2j) for image, ROI and labels, 2 × 2 means for the
  # probabilities, the gate from those, σ_xy 8 -> 4 px.
  p = np.asarray(probs, np.float64).reshape(2, 4, 2, 5, 2, 3).mean((2, 4))
  roi_h = np.asarray(roi)[:, ::2, ::2]
  labelled = np.asarray(labels)[:, ::2, ::2] != 255
  gate = np.where(labelled, np.maximum(roi_h - p.max(-1), 0.0), 1.0)
  features = E.energy_features(np.asarray(images)[:, ::2, ::2], 4.0, 40.0)
  expected = _dense_energy(p, gate, roi_h, features, False)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  # The padding adds nothing: changing the probabilities there changes
  # nothing.
  moved = jax.nn.softmax(jnp.where(roi[..., None], logits, -logits))
  np.testing.assert_allclose(
      E.dense_energy_loss(images, moved, roi, labels, **OPTIONS), value,
      rtol=1e-6)


def test_paper_literal_swaps_the_sigmas():
  images, logits, roi, labels = _crop()
  probs = jax.nn.softmax(logits)
  options = dict(OPTIONS, sigma_xy=40.0, sigma_rgb=8.0,
                 sigma_assignment='paper_literal')
  np.testing.assert_allclose(
      E.dense_energy_loss(images, probs, roi, labels, **options),
      E.dense_energy_loss(images, probs, roi, labels, **OPTIONS), rtol=1e-6)


def test_scale_one_uses_the_full_grid():
  images, logits, roi, labels = _crop(batch=1, h=4, w=5)
  probs = jax.nn.softmax(logits)
  value = E.dense_energy_loss(images, probs, roi, labels,
                              **dict(OPTIONS, scale=1.0))
  gate = E.energy_gate(probs, labels != 255, roi)
  features = E.energy_features(images, 8.0, 40.0)
  np.testing.assert_allclose(
      value, _dense_energy(probs, gate, roi, features, False), rtol=1e-5)


def _degenerate(case):
  images, logits, roi, labels = _crop()
  if case == 'no_labelled_pixel':
    labels = jnp.full_like(labels, 255)
  elif case == 'all_labelled':
    labels = jnp.zeros_like(labels)
  elif case == 'all_padding':
    roi = jnp.zeros_like(roi)
  elif case == 'one_class':
    logits = logits[..., :1]
    labels = jnp.where(labels == 255, 255, 0)
  elif case == 'single_colour':
    images = jnp.full_like(images, 128)
  return images, logits, roi, labels


@pytest.mark.parametrize('backward', E.BACKWARDS)
@pytest.mark.parametrize('case', ['no_labelled_pixel', 'all_labelled',
                                  'all_padding', 'one_class',
                                  'single_colour'])
def test_degenerate_inputs_are_finite(case, backward):
  images, logits, roi, labels = _degenerate(case)
  options = dict(OPTIONS, backward=backward)
  value, grad = jax.value_and_grad(
      lambda z: E.dense_energy_loss(images, jax.nn.softmax(z), roi, labels,
                                    **options))(logits)
  assert np.isfinite(value) and value <= 0.0
  assert np.all(np.isfinite(grad))
  if case == 'all_padding':
    assert value == 0.0
    np.testing.assert_array_equal(grad, 0.0)


def test_degenerate_inputs_are_finite_with_the_lattice():
  images, logits, roi, labels = _degenerate('single_colour')
  labels = jnp.full_like(labels, 255)
  for crop_roi in (roi, jnp.zeros_like(roi)):
    value, grad = jax.value_and_grad(
        lambda z, r=crop_roi: E.dense_energy_loss(
            images, jax.nn.softmax(z), r, labels,
            **dict(OPTIONS, kernel='permutohedral')))(logits)
    assert np.isfinite(value) and value <= 0.0
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize('option,bad', [
    ('kernel', 'gaussian'), ('backward', 'custom'),
    ('sigma_assignment', 'paper'), ('downsample_interp', 'nearest'),
    ('scale', 0.25)])
def test_bad_options_raise(option, bad):
  images, logits, roi, labels = _crop(batch=1, h=4, w=4)
  with pytest.raises(ValueError, match=option):
    E.dense_energy_loss(images, jax.nn.softmax(logits), roi, labels,
                        **dict(OPTIONS, **{option: bad}))


def test_bad_options_raise_in_the_pieces():
  features = jnp.zeros((1, 4, 5))
  with pytest.raises(ValueError, match='kernel'):
    E.filter_gaussian(features, jnp.zeros((1, 4, 2)), 'lattice')
  with pytest.raises(ValueError, match="'autodiff', 'rloss_custom'"):
    E.dense_energy(jnp.zeros((1, 2, 2, 2)), jnp.ones((1, 2, 2)),
                   jnp.ones((1, 2, 2), bool), features, 'exact_gaussian',
                   'torch')
  with pytest.raises(ValueError, match='downsample_interp'):
    E.downsample_bilinear(jnp.zeros((1, 4, 4, 1)), 0.5, 'bicubic')
