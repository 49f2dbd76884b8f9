"""BANA stage-1 background-aware pooling (Eqs. 1–4) by hand-computed cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.methods.bana import bap

# The paper's settings of the arguments a test does not vary.
_PAPER = dict(sampling='aligned', pooling='bap', min_background_fraction=0.125)

# Jitted once per shape and static setting: eager op-by-op dispatch is slow.
_forward_jit = jax.jit(bap.bap_forward, static_argnames=(
    'grid', 'roi_grid', 'sampling', 'max_samples', 'pooling',
    'min_background_fraction'))


def _forward(*args, **kwargs):
  return _forward_jit(*args, **{'roi_grid': (1, 1), **_PAPER, **kwargs})


_sample = jax.jit(bap.bilinear_sample)
_sampling_grid = jax.jit(bap.box_sampling_grid, static_argnums=(1, 2, 3, 4))
_pool = jax.jit(bap.pool_boxes, static_argnums=(4,))
_loss = jax.jit(bap.bap_loss, static_argnums=(2,))
_attention = jax.jit(bap.background_attention)


def _f(x):
  return jnp.asarray(x, jnp.float32)


# ---------------------------------------------------------------- masks


def test_background_mask_by_hand():
  # 4x6 crop whose last column is padding; box A covers rows 0-1, cols 0-1;
  # B rows 1-2, cols 3-4; C (fractional) only pixel (3, 0): its x-range
  # [0.5, 1.5) holds the centre 0.5 but not 1.5; the padded row is ignored.
  boxes = _f([[[0, 0, 2, 2], [3, 1, 5, 3], [0.5, 3, 1.5, 4], [0, 0, 6, 4]]])
  labels = jnp.asarray([[1, 2, 3, -1]], jnp.int32)
  valid = jnp.ones((1, 4, 6), bool).at[:, :, 5].set(False)
  expected = np.array([[0, 0, 1, 1, 1, 0],
                       [0, 0, 1, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [0, 1, 1, 1, 1, 0]], bool)
  got = bap.background_mask(boxes, labels, valid)
  np.testing.assert_array_equal(got[0], expected)


def test_downsample_mask_is_legacy_nearest():
  rng = np.random.default_rng(0)
  mask = rng.random((2, 8, 8)) > 0.5
  got = bap.downsample_mask(jnp.asarray(mask), 3, 5)
  # floor(i·8/3) = 0, 2, 5 (rows); floor(j·8/5) = 0, 1, 3, 4, 6 (columns).
  np.testing.assert_array_equal(got, mask[:, [0, 2, 5]][:, :, [0, 1, 3, 4, 6]])
  assert got.dtype == jnp.bool_


def test_pad_to_grid_odd_and_even():
  x = jnp.arange(30, dtype=jnp.float32).reshape(1, 5, 6, 1) + 1
  y = bap.pad_to_grid(x, 4)
  assert y.shape == (1, 8, 8, 1)
  # Rows: pad 3 (odd) all at the bottom; columns: pad 2 split 1 + 1.
  np.testing.assert_array_equal(y[0, :5, 1:7], x[0])
  assert float(jnp.sum(y)) == float(jnp.sum(x))
  assert bap.pad_to_grid(x, 1).shape == x.shape
  assert bap.pad_to_grid(jnp.ones((1, 41, 41, 2)), 4).shape == (1, 44, 44, 2)
  np.testing.assert_array_equal(
      bap.pad_to_grid(jnp.ones((1, 41, 41)), 4)[0, 41:], 0.0)


# ---------------------------------------------------------------- queries


def test_grid_queries_by_hand():
  # f(i, j) = [4i + j, 1]; cells of 2x2.  Cell 0 all foreground (invalid);
  # cell 1 one bg pixel (0, 3); cell 2 all bg; cell 3 bg at (2, 2), (3, 3).
  idx = np.arange(16, dtype=np.float32).reshape(4, 4)
  feats = _f(np.stack([idx, np.ones_like(idx)], -1)[None])
  mask = np.zeros((1, 4, 4), bool)
  mask[0, 0, 3] = True
  mask[0, 2:4, 0:2] = True
  mask[0, 2, 2] = mask[0, 3, 3] = True
  q, qv = bap.grid_queries(feats, jnp.asarray(mask), 2)
  np.testing.assert_array_equal(qv[0], [False, True, True, True])
  np.testing.assert_allclose(
      q[0], [[0, 0], [3, 1], [10.5, 1], [12.5, 1]], rtol=1e-6)


def test_grid_queries_with_odd_padding():
  # 5x5 with grid 2 -> padded to 6x6 (bottom/right), cells of 3x3.
  feats = jnp.arange(25, dtype=jnp.float32).reshape(1, 5, 5, 1)
  q, qv = bap.grid_queries(feats, jnp.ones((1, 5, 5), bool), 2)
  f = np.arange(25, dtype=np.float32).reshape(5, 5)
  expected = [f[:3, :3].mean(), f[:3, 3:].mean(), f[3:, :3].mean(),
              f[3:, 3:].mean()]
  np.testing.assert_allclose(q[0, :, 0], expected, rtol=1e-6)
  assert bool(jnp.all(qv))


# ---------------------------------------------------------------- sampling


# 9x9 image, 5x5 features: x_f = x·4/8 = x/2.
_BOXES = _f([[[1, 2, 8, 3], [2, 0, 7, 9]]])


def test_sampling_grid_aligned_by_hand():
  coords, sv, counts = _sampling_grid(_BOXES, (9, 9), (5, 5), 6)
  assert coords.shape == (1, 2, 6, 6, 2) and sv.shape == (1, 2, 6, 6)
  # Box 0: columns 1..7 -> 0.5..3.5, BW = 4 - 0 = 4; row 2 -> 1, BH = 1.
  # Box 1: columns 2..6 -> 1..3, BW = 2; rows 0..8 -> 0..4, BH = 4.
  np.testing.assert_array_equal(counts[0], [[1, 4], [4, 2]])
  np.testing.assert_allclose(coords[0, 0, 0, :4, 1], [0.5, 1.5, 2.5, 3.5])
  np.testing.assert_allclose(coords[0, 0, 0, :4, 0], 1.0)
  np.testing.assert_allclose(coords[0, 1, :4, 0, 0], [0, 4 / 3, 8 / 3, 4],
                             rtol=1e-6)
  np.testing.assert_allclose(coords[0, 1, 0, :2, 1], [1, 3])
  expected = np.zeros((2, 6, 6), bool)
  expected[0, :1, :4] = True
  expected[1, :4, :2] = True
  np.testing.assert_array_equal(sv[0], expected)


def test_sampling_grid_ac_false_by_hand():
  coords, sv, counts = _sampling_grid(_BOXES, (9, 9), (5, 5), 6,
                                             'grid_sample_ac_false')
  np.testing.assert_array_equal(counts[0], [[1, 4], [4, 2]])
  # x_n = x/4 - 1, read at ((x_n + 1)·5 - 1)/2.
  # Box 0 columns: x_n -0.75..0.75 -> 0.125, 1.375, 2.625, 3.875; row 2 ->
  # x_n -0.5 -> 0.75.  Box 1 columns 2, 6 -> 0.75, 3.25; rows 0..8 -> x_n
  # -1, -1/3, 1/3, 1 -> -0.5, 7/6, 17/6, 4.5.
  np.testing.assert_allclose(coords[0, 0, 0, :4, 1],
                             [0.125, 1.375, 2.625, 3.875], rtol=1e-6)
  np.testing.assert_allclose(coords[0, 0, 0, 0, 0], 0.75, rtol=1e-6)
  np.testing.assert_allclose(coords[0, 1, 0, :2, 1], [0.75, 3.25], rtol=1e-6)
  np.testing.assert_allclose(coords[0, 1, :4, 0, 0],
                             [-0.5, 7 / 6, 17 / 6, 4.5], rtol=1e-6)


def test_sampling_grid_clips_to_max_samples():
  coords, sv, counts = _sampling_grid(_BOXES, (9, 9), (5, 5), 3)
  np.testing.assert_array_equal(counts[0, 0], [1, 3])
  np.testing.assert_allclose(coords[0, 0, 0, :, 1], [0.5, 2.0, 3.5])
  with pytest.raises(ValueError):
    bap.box_sampling_grid(_BOXES, (9, 9), (5, 5), 3, 'nearest')


def _np_bilinear(feats, y, x):
  h, w = feats.shape[:2]
  y0, x0 = int(np.floor(y)), int(np.floor(x))
  out = np.zeros(feats.shape[-1])
  for yi, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
    for xi, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
      if 0 <= yi < h and 0 <= xi < w:
        out += wy * wx * feats[yi, xi]
  return out


def test_bilinear_sample_matches_numpy_and_zero_pads():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
  coords = np.stack([rng.uniform(-1.5, 4.5, (2, 3, 2, 2)),
                     rng.uniform(-1.5, 5.5, (2, 3, 2, 2))], -1)
  got = np.asarray(_sample(_f(feats), _f(coords)))
  for idx in np.ndindex(2, 3, 2, 2):
    b = idx[0]
    want = _np_bilinear(feats[b], *coords[idx].astype(np.float32))
    np.testing.assert_allclose(got[idx], want, rtol=1e-5, atol=1e-6)
  # Integer positions read the feature exactly; outside reads 0; half a
  # cell outside reads half the border value.
  rows, cols = np.meshgrid(np.arange(4), np.arange(5), indexing='ij')
  grid = _f(np.stack([rows, cols], -1)[None, None])       # (1, 1, 4, 5, 2)
  exact = _sample(_f(feats[:1]), grid)
  np.testing.assert_array_equal(exact[0, 0], feats[0])
  edge = _sample(_f(feats[:1]),
                             _f([[[[[-1, -1], [-0.5, 0]], [[3.25, 4], [0, 5]]]]]))
  np.testing.assert_allclose(edge[0, 0, 0, 0], 0.0)
  np.testing.assert_allclose(edge[0, 0, 0, 1], 0.5 * feats[0, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(edge[0, 0, 1, 0], 0.75 * feats[0, 3, 4], rtol=1e-6)
  np.testing.assert_allclose(edge[0, 0, 1, 1], 0.0)


# ---------------------------------------------------------------- attention


def test_background_attention_by_hand():
  roi = _f([[[[[2, 0, 0], [0, 3, 0]], [[-1, 0, 0], [1, 1, 0]]]]])  # 1,1,2,2,3
  queries = _f([[[1, 0, 0], [0, 1, 0]]])
  a = _attention(roi, queries, jnp.asarray([[True, False]]))
  # Equal direction -> 1 (weight 0); orthogonal -> 0; opposite -> ReLU 0.
  np.testing.assert_allclose(a[0, 0], [[1, 0], [0, 1 / np.sqrt(2)]],
                             rtol=1e-6, atol=1e-7)
  a2 = _attention(roi, queries, jnp.asarray([[True, True]]))
  np.testing.assert_allclose(a2[0, 0], [[0.5, 0.5], [0, 1 / np.sqrt(2)]],
                             rtol=1e-6, atol=1e-7)
  a0 = _attention(roi, queries, jnp.zeros((1, 2), bool))
  np.testing.assert_array_equal(a0, 0.0)
  zero = _attention(jnp.zeros_like(roi), queries,
                                  jnp.ones((1, 2), bool))
  np.testing.assert_array_equal(zero, 0.0)


# ---------------------------------------------------------------- pooling


def test_pool_boxes_weighted_mean_by_hand():
  roi = np.full((1, 1, 3, 3, 1), 100.0, np.float32)   # invalid samples: 100
  roi[0, 0, :2, :2, 0] = [[1, 2], [3, 4]]
  weights = np.full((1, 1, 3, 3), 7.0, np.float32)
  weights[0, 0, :2, :2] = [[0, 0.5], [1, 1]]
  sv = np.zeros((1, 1, 3, 3), bool)
  sv[0, 0, :2, :2] = True
  counts = jnp.asarray([[[2, 2]]], jnp.int32)
  r = bap.pool_boxes(_f(roi), _f(weights), jnp.asarray(sv), counts)
  assert r.shape == (1, 1, 1, 1)
  np.testing.assert_allclose(r[0, 0, 0, 0], (0.5 * 2 + 3 + 4) / 2.5, rtol=1e-6)


def _onehot_roi(size):
  eye = np.eye(size * size, dtype=np.float32).reshape(size, size, -1)
  return _f(eye[None, None])


@pytest.mark.parametrize('counts, rows, cols', [
    ((5, 4), [(0, 3), (2, 5)], [(0, 2), (2, 4)]),
    ((1, 5), [(0, 1), (0, 1)], [(0, 3), (2, 5)]),
    ((4, 1), [(0, 2), (2, 4)], [(0, 1), (0, 1)]),
])
def test_pool_boxes_2x2_windows(counts, rows, cols):
  size = 6
  roi = _onehot_roi(size)
  n_r, n_c = counts
  sv = np.zeros((1, 1, size, size), bool)
  sv[0, 0, :n_r, :n_c] = True
  r = _pool(roi, jnp.ones((1, 1, size, size)), jnp.asarray(sv),
            jnp.asarray([[counts]], jnp.int32), (2, 2))
  assert r.shape == (1, 1, 4, size * size)
  for cell in range(4):
    (r0, r1), (c0, c1) = rows[cell // 2], cols[cell % 2]
    want = np.zeros((size, size), np.float32)
    want[r0:r1, c0:c1] = 1.0 / ((r1 - r0) * (c1 - c0))
    np.testing.assert_allclose(r[0, 0, cell].reshape(size, size), want,
                               rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- forward


def _hand_scene():
  """9x9 image, 5x5 features (D = 2); x_f = x/2.

  Box 0 covers pixels 0..4: cells 0..2, sampled (aligned) at the cells
  (0, 0), (0, 2), (2, 0), (2, 2).  Box 1 is the single pixel (2, 4) -> cell
  (1, 2); box 2 the pixel column 4 -> feature column 2, rows 0, 4/3, 8/3, 4;
  box 3 is padding.  Legacy nearest picks pixel rows/cols 0, 1, 3, 5, 7
  (never column 4), so the 3x3 cell block (0..2, 0..2) is foreground and
  the 16 other cells are background [1, 0]: one query (grid 1) = [1, 0].
  """
  f = np.zeros((1, 5, 5, 2), np.float32)
  f[0, :, :] = [1, 0]
  f[0, :3, :3] = [5, 5]                               # A = 1/√2
  f[0, 0, 0] = [0, 1]                                 # orthogonal: A = 0
  f[0, 0, 2] = [1, 0]                                 # = query:    A = 1
  f[0, 2, 0] = [1, 1]                                 # A = 1/√2
  f[0, 2, 2] = [0, 2]                                 # A = 0
  boxes = _f([[[0, 0, 5, 5], [4, 2, 5, 3], [4, 0, 5, 9], [0, 0, 9, 9]]])
  labels = jnp.asarray([[3, 1, 2, -1]], jnp.int32)
  valid = jnp.ones((1, 9, 9), bool)
  return _f(f), boxes, labels, valid


def test_bap_forward_hand_computed():
  f, boxes, labels, valid = _hand_scene()
  out = _forward(f, boxes, labels, valid, grid=1)
  np.testing.assert_allclose(out['queries'][0, 0], [1, 0], rtol=1e-6)
  assert not bool(out['fallback'][0])
  s = 1 / np.sqrt(2)
  np.testing.assert_allclose(out['attention'][0, 0, :2, :2],
                             [[0, 1], [s, 0]], rtol=1e-6, atol=1e-7)
  want = (np.array([0, 1]) + (1 - s) * np.array([1, 1])
          + np.array([0, 2])) / (3 - s)
  np.testing.assert_allclose(out['fg'][0, 0, 0], want, rtol=1e-5)
  np.testing.assert_array_equal(out['fg_labels'], [[[3], [1], [2], [-1]]])
  np.testing.assert_array_equal(out['fg'][0, 3], 0.0)
  # One-pixel box: its single sample, whatever its (non-zero) weight.
  np.testing.assert_allclose(out['fg'][0, 1, 0], [5, 5], rtol=1e-6)
  np.testing.assert_array_equal(jnp.sum(out['sample_valid'], (2, 3))[0],
                                [4, 1, 4, 0])
  assert bool(jnp.all(jnp.isfinite(out['fg'])))
  # GAP (Table 1 baseline): plain mean of the samples.
  gap = _forward(f, boxes, labels, valid, grid=1, pooling='gap')
  np.testing.assert_allclose(gap['fg'][0, 0, 0], [0.5, 1.0], rtol=1e-6)
  np.testing.assert_allclose(gap['fg'][0, 1, 0], [5, 5], rtol=1e-6)
  # Feature column 2 holds [1,0], [5,5], [0,2], [1,0], [1,0] in rows 0..4;
  # read at rows 0, 4/3, 8/3, 4: [1,0], 2/3·[5,5] + 1/3·[0,2],
  # 1/3·[0,2] + 2/3·[1,0], [1,0].
  col = np.array([[1, 0], [10 / 3, 4], [2 / 3, 2 / 3], [1, 0]])
  np.testing.assert_allclose(gap['fg'][0, 2, 0], col.mean(0), rtol=1e-5)
  np.testing.assert_array_equal(gap['attention'], 0.0)
  np.testing.assert_allclose(gap['queries'], out['queries'])


def test_code_compatible_forward_on_thin_boxes():
  # roi_grid (2, 2) with n = 1 along an axis, grid_sample_ac_false sampling:
  # pixel (2, 4) -> x_n = 0, y_n = -0.5 -> feature (0.75, 2), between
  # f(0, 2) = [1, 0] and f(1, 2) = [5, 5]: [4, 3.75] in all four cells.
  f, boxes, labels, valid = _hand_scene()
  out = _forward(f, boxes, labels, valid, grid=1, pooling='gap',
                 roi_grid=(2, 2), sampling='grid_sample_ac_false')
  assert out['fg'].shape == (1, 4, 4, 2)
  np.testing.assert_allclose(out['fg'][0, 1], np.tile([4, 3.75], (4, 1)),
                             rtol=1e-6)
  np.testing.assert_array_equal(jnp.sum(out['sample_valid'], (2, 3))[0],
                                [4, 1, 4, 0])
  assert bool(jnp.all(jnp.isfinite(out['fg'])))
  np.testing.assert_array_equal(out['fg_labels'][0, :, 0], [3, 1, 2, -1])


def test_fallback_at_one_eighth_background_and_without_queries():
  rng = np.random.default_rng(2)
  f = _f(rng.normal(size=(4, 8, 8, 3)))
  boxes = _f([[[0, 0, 8, 7]],        # background = row 7: 8/64 -> fallback
              [[0, 0, 7, 7]],        # 15/64 -> BAP
              [[0, 0, 0, 0]],        # no box; only 8 valid pixels
              [[0, 0, 8, 7]]])
  labels = jnp.asarray([[1], [1], [-1], [1]], jnp.int32)
  valid = np.ones((4, 8, 8), bool)
  valid[2] = False
  valid[2, 0] = True
  valid[3] = False                   # all padding: no background at all
  out = _forward(f, boxes, labels, jnp.asarray(valid), grid=2)
  np.testing.assert_allclose(out['background_fraction'],
                             [0.125, 15 / 64, 0.125, 0.0])
  np.testing.assert_array_equal(out['fallback'], [True, False, True, True])
  assert bool(jnp.any(out['query_valid'][0]))   # still classified
  assert not bool(jnp.any(out['query_valid'][3]))
  np.testing.assert_array_equal(out['attention'][0], 0.0)
  # Fallback image: plain (weight-1) average over its box samples.
  coords, sv, _ = _sampling_grid(boxes[:1], (8, 8), (8, 8), 9)
  roi = _sample(f[:1], coords)
  plain = jnp.sum(roi * sv[..., None], axis=(2, 3)) / jnp.sum(sv)
  np.testing.assert_allclose(out['fg'][0, 0, 0], plain[0, 0], rtol=1e-5)


def test_fallback_without_valid_query():
  # 8 -> 3 legacy nearest picks pixel rows 0, 2, 5, all inside the box;
  # the background (rows 6-7, 1/4 of the crop) never reaches the features.
  rng = np.random.default_rng(3)
  f = _f(rng.normal(size=(1, 3, 3, 2)))
  out = _forward(f, _f([[[0, 0, 8, 6]]]), jnp.asarray([[2]]),
                        jnp.ones((1, 8, 8), bool), grid=1)
  assert float(out['background_fraction'][0]) == 0.25
  assert not bool(jnp.any(out['query_valid']))
  assert bool(out['fallback'][0])
  assert bool(jnp.all(jnp.isfinite(out['fg'])))


def test_jit_compiles_once_for_different_boxes():
  traces = []

  def fwd(f, boxes, labels, valid):
    traces.append(1)
    return bap.bap_forward(f, boxes, labels, valid, grid=2, roi_grid=(2, 2),
                           **_PAPER)

  jitted = jax.jit(fwd)
  rng = np.random.default_rng(4)
  f = _f(rng.normal(size=(2, 5, 5, 3)))
  valid = jnp.ones((2, 9, 9), bool)
  labels = jnp.asarray([[1, -1], [2, 3]], jnp.int32)
  a = jitted(f, _f([[[0, 0, 9, 9], [0, 0, 0, 0]], [[1, 1, 3, 4], [2, 0, 9, 2]]]),
             labels, valid)
  b = jitted(f, _f([[[4, 4, 5, 5], [0, 0, 0, 0]], [[0, 0, 9, 2], [5, 1, 6, 9]]]),
             labels, valid)
  assert len(traces) == 1 and jitted._cache_size() == 1
  assert a['fg'].shape == b['fg'].shape == (2, 2, 4, 3)
  np.testing.assert_array_equal(a['fg_labels'][0, 1], -1)
  np.testing.assert_array_equal(a['fg'][0, 1], 0.0)


# ---------------------------------------------------------------- loss


def test_bap_loss_by_hand():
  kernel = _f([[0, 2], [1, 0]])                       # (D = 2, C = 2)
  out = {'fg': _f([[[[1, 0]], [[5, 5]]]]),            # second row padded
         'fg_labels': jnp.asarray([[[1], [-1]]], jnp.int32),
         'queries': _f([[[0, 1], [9, 9]]]),           # second query invalid
         'query_valid': jnp.asarray([[True, False]])}
  loss, metrics = _loss(out, kernel, False)
  # fg logits [0, 2] -> target 1; query logits [1, 0] -> target 0.
  want = (np.log1p(np.exp(-2.0)) + np.log1p(np.exp(-1.0))) / 2
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert float(metrics['fg_accuracy']) == 1.0
  assert float(metrics['bg_accuracy']) == 1.0
  assert float(metrics['num_fg_rows']) == 1.0
  assert float(metrics['num_bg_rows']) == 1.0


def test_balanced_rows_average_the_fg_and_bg_means():
  kernel = _f([[0, 2], [1, 0]])
  out = {'fg': _f([[[[1, 0]], [[0, 1]]]]),            # logits [0, 2], [1, 0]
         'fg_labels': jnp.asarray([[[1], [1]]], jnp.int32),
         'queries': _f([[[0, 1]]]),                   # logits [1, 0]
         'query_valid': jnp.asarray([[True]])}
  fg = [np.log1p(np.exp(-2.0)), np.log1p(np.exp(1.0))]
  bg = np.log1p(np.exp(-1.0))
  plain, _ = bap.bap_loss(out, kernel, balance=False)
  balanced, _ = bap.bap_loss(out, kernel, balance=True)
  np.testing.assert_allclose(plain, (sum(fg) + bg) / 3, rtol=1e-6)
  np.testing.assert_allclose(balanced, 0.5 * (np.mean(fg) + bg), rtol=1e-6)


@jax.jit
def _loss_and_grads(f, kernel, boxes, labels, valid):
  def objective(f, kernel):
    out = bap.bap_forward(f, boxes, labels, valid, grid=2, roi_grid=(2, 2),
                          **_PAPER)
    return bap.bap_loss(out, kernel, balance=False)[0]
  return jax.value_and_grad(objective, argnums=(0, 1))(f, kernel)


@pytest.mark.parametrize('case', ['no_boxes', 'all_box', 'no_rows'])
def test_bap_loss_finite_gradients_in_edge_cases(case):
  rng = np.random.default_rng(5)
  f = _f(rng.normal(size=(2, 5, 5, 4)))
  kernel = _f(rng.normal(size=(4, 3)) * 0.1)
  valid = jnp.ones((2, 9, 9), bool)
  boxes = _f(np.tile([[[0, 0, 9, 9]]], (2, 2, 1)))
  if case == 'no_boxes':
    labels = jnp.full((2, 2), -1, jnp.int32)
  elif case == 'all_box':
    labels = jnp.asarray([[1, -1], [2, 1]], jnp.int32)
  else:
    labels = jnp.full((2, 2), -1, jnp.int32)
    valid = jnp.zeros_like(valid)
  loss, (gf, gk) = _loss_and_grads(f, kernel, boxes, labels, valid)
  assert np.isfinite(float(loss))
  assert bool(jnp.all(jnp.isfinite(gf))) and bool(jnp.all(jnp.isfinite(gk)))
  if case == 'no_rows':
    assert float(loss) == 0.0
    np.testing.assert_array_equal(gf, 0.0)
  else:
    assert float(loss) > 0.0
    assert float(jnp.max(jnp.abs(gk))) > 0.0
