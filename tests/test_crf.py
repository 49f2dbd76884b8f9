"""Tests of wsss_jax.host.crf (DenseCRF) and wsss_jax.host.pool."""

from __future__ import annotations

import dataclasses
import math
import operator
import os

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from wsss_jax import defaults
from wsss_jax.data import label_png
from wsss_jax.host import crf
from wsss_jax.host import pool

VOC_MINI = os.path.join(os.path.dirname(__file__), 'data', 'voc_mini')
NUM_CLASSES = 21


def _voc(image_id):
  with Image.open(os.path.join(VOC_MINI, 'JPEGImages',
                               f'{image_id}.jpg')) as image:
    rgb = np.asarray(image.convert('RGB'))
  gt = label_png.read_label_png(
      os.path.join(VOC_MINI, 'SegmentationClass', f'{image_id}.png'))
  return rgb, gt


def _corrupted_probs(gt, blur=6.0, noise=0.3, seed=0):
  """Blurred one-hot GT plus uniform noise, normalised: (C, H, W) float32."""
  labels = np.where(gt == 255, 0, gt)
  onehot = (np.arange(NUM_CLASSES)[:, None, None] == labels[None])
  blurred = ndimage.gaussian_filter(onehot.astype(np.float32), (0, blur, blur))
  rng = np.random.RandomState(seed)
  noisy = blurred + noise * rng.rand(*blurred.shape).astype(np.float32)
  return noisy / noisy.sum(axis=0, keepdims=True)


def _miou(gt, pred):
  # Imported here so that spawned pool workers, which import this module to
  # find the test functions, do not pay for importing jax.
  from wsss_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  return metrics.scores(metrics.confusion_matrix(gt, pred, NUM_CLASSES))['miou']


@pytest.fixture(scope='module')
def voc_243():
  return _voc('2007_000243')


@pytest.fixture(scope='module')
def small_inputs(voc_243):
  """A 60x80 crop of the real image with noisy 3-class probabilities."""
  image, gt = voc_243
  image = np.ascontiguousarray(image[130:190, 180:260])
  gt = gt[130:190, 180:260]
  probs = _corrupted_probs(gt)[[0, 1, 2]]
  return image, probs


# ----------------------------------------------------------------------------
# CrfParams
# ----------------------------------------------------------------------------
def test_params_defaults_match_config():
  config = defaults.evaluation().crf_params
  assert crf.CrfParams.from_config(config) == crf.CrfParams()
  params = crf.CrfParams.from_config({'iterations': 5, 'bilateral_sxy': 55.0})
  assert params.iterations == 5 and params.bilateral_sxy == 55.0
  assert params.gauss_sxy == 1.0      # DeepLab-v2 POS_XY_STD


@pytest.mark.parametrize('kwargs, message', [
    (dict(iterations=0), 'iterations'),
    (dict(iterations=2.5), 'iterations'),
    (dict(gauss_sxy=0.0), 'gauss_sxy'),
    (dict(bilateral_srgb=-1.0), 'bilateral_srgb'),
    (dict(bilateral_compat=-1.0), 'bilateral_compat'),
])
def test_params_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    crf.CrfParams(**kwargs)


def test_params_from_config_rejects_unknown_fields():
  with pytest.raises(ValueError, match='bilateral_sigma'):
    crf.CrfParams.from_config({'bilateral_sigma': 3.0})


def test_crf_config_sections_are_built_from_params():
  # CrfParams' defaults are the one source of every CRF config section.
  assert dict(defaults.crf_config()) == dataclasses.asdict(crf.CrfParams())
  section = defaults.crf_config(gauss_sxy=3.0, bilateral_sxy=55.0)
  assert crf.CrfParams.from_config(section) == crf.CrfParams(
      gauss_sxy=3.0, bilateral_sxy=55.0)
  assert type(section.iterations) is int
  with pytest.raises(TypeError, match='bilateral_sigma'):
    defaults.crf_config(bilateral_sigma=3.0)
  with pytest.raises(ValueError, match='gauss_sxy'):
    defaults.crf_config(gauss_sxy=0.0)


# ----------------------------------------------------------------------------
# dense_crf on a real VOC image
# ----------------------------------------------------------------------------
def test_crf_improves_noisy_blurred_gt(voc_243):
  # 2007_000243 (one aeroplane): measured 90.9 -> 93.1 mIoU.
  image, gt = voc_243
  probs = _corrupted_probs(gt)
  marginals = crf.dense_crf(image, probs)
  assert marginals.shape == (NUM_CLASSES,) + gt.shape
  assert marginals.dtype == np.float32
  assert (marginals >= 0).all()
  np.testing.assert_allclose(marginals.sum(axis=0), 1.0, atol=1e-4)
  before = _miou(gt, probs.argmax(axis=0))
  after = _miou(gt, marginals.argmax(axis=0))
  assert after >= before + 1.0, (before, after)


def test_crf_cleans_heavy_noise(voc_243):
  # Measured: 21.3 -> 89.6 mIoU (the noise flips most pixels to random
  # classes; the bilateral kernel restores the aeroplane).
  image, gt = voc_243
  probs = _corrupted_probs(gt, blur=8.0, noise=0.6, seed=1)
  before = _miou(gt, probs.argmax(axis=0))
  after = _miou(gt, crf.dense_crf(image, probs).argmax(axis=0))
  assert before < 40.0 and after > 80.0, (before, after)


def test_crf_ignores_per_pixel_scaling(small_inputs):
  image, probs = small_inputs
  scale = np.random.RandomState(0).uniform(0.3, 1.0, probs.shape[1:])
  reference = crf.dense_crf(image, probs)
  scaled = crf.dense_crf(image, (probs * scale).astype(np.float32))
  np.testing.assert_allclose(scaled, reference, atol=1e-4)


def test_crf_params_change_the_result(small_inputs):
  image, probs = small_inputs
  one_step = crf.dense_crf(image, probs, crf.CrfParams(iterations=1))
  ten_steps = crf.dense_crf(image, probs)
  assert np.abs(one_step - ten_steps).max() > 1e-3


def test_crf_rejects_bad_inputs(small_inputs):
  image, probs = small_inputs
  with pytest.raises(ValueError, match='channel-first'):
    crf.dense_crf(image, np.moveaxis(probs, 0, -1))
  with pytest.raises(ValueError, match='does not match'):
    crf.dense_crf(image, probs[:, :-1])
  with pytest.raises(ValueError, match='uint8'):
    crf.dense_crf(image.astype(np.float32), probs)
  with pytest.raises(ValueError, match=r'\(H, W, 3\)'):
    crf.dense_crf(image[..., 0], probs)
  with pytest.raises(ValueError, match='float'):
    crf.dense_crf(image, probs.argmax(axis=0)[None])
  bad = probs.copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match='NaN'):
    crf.dense_crf(image, bad)


def test_backend_registry(small_inputs):
  backend = crf.get_backend()
  assert backend.name == 'pydensecrf'
  assert isinstance(backend, crf.CrfBackend)
  image, probs = small_inputs
  np.testing.assert_array_equal(backend(image, probs, crf.CrfParams()),
                                crf.dense_crf(image, probs))
  with pytest.raises(ValueError, match="'nope'; available: .*'pydensecrf'"):
    crf.get_backend('nope')
  with pytest.raises(TypeError, match='not a CrfBackend'):
    crf.register_backend(object())


def test_dense_crf_batch_inline_and_workers(small_inputs):
  image, probs = small_inputs
  images = [image, image[:40]]
  probs_list = [probs, probs[:, :40]]
  expected = [crf.dense_crf(i, p) for i, p in zip(images, probs_list)]
  inline = list(crf.dense_crf_batch(images, probs_list, progress=False))
  for got, want in zip(inline, expected):
    np.testing.assert_array_equal(got, want)
  labels = list(crf.dense_crf_batch(images, probs_list, workers=2,
                                    argmax=True, progress=False))
  for got, want in zip(labels, expected):
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, want.argmax(axis=0))


def test_dense_crf_batch_errors(small_inputs):
  image, probs = small_inputs
  with pytest.raises(ValueError, match='different lengths'):
    list(crf.dense_crf_batch([image, image], [probs], progress=False))
  with pytest.raises(pool.WorkerError, match='item 1'):
    list(crf.dense_crf_batch([image, image], [probs, probs[:, :5]],
                             progress=False))


# ----------------------------------------------------------------------------
# HostPool (exercised here because dense_crf_batch is its main user)
# ----------------------------------------------------------------------------
def _slow_square(value):
  """Later items finish first, so ordering is really tested."""
  import time  # pylint: disable=g-import-not-at-top
  time.sleep(0.02 * (5 - value % 5))
  return value * value


@pytest.mark.parametrize('workers', [0, 2])
def test_pool_map_keeps_order(workers):
  results = list(pool.pool_map(_slow_square, range(12), workers,
                               progress=False))
  assert results == [v * v for v in range(12)]


@pytest.mark.parametrize('workers', [0, 2])
def test_pool_error_names_item(workers):
  with pytest.raises(pool.WorkerError, match='item 2') as info:
    list(pool.pool_map(math.sqrt, [4.0, 1.0, -1.0, 9.0], workers,
                       desc='sqrt', progress=False))
  assert 'sqrt failed' in str(info.value)
  assert info.value.index == 2
  assert isinstance(info.value.__cause__, ValueError)


def test_pool_bounds_work_in_flight():
  pulled = []

  def items():
    for value in range(20):
      pulled.append(value)
      yield value

  consumed = 0
  with pool.HostPool(_slow_square, workers=2, max_in_flight=3,
                     progress=False) as host:
    for result in host.imap(items()):
      consumed += 1
      assert len(pulled) - consumed <= 3
      assert result == (consumed - 1) ** 2
  assert consumed == 20


def test_pool_submit_and_drain_overlap_pattern():
  collected = []
  with pool.HostPool(operator.neg, workers=0) as host:
    for value in range(5):
      collected.extend(host.submit(value))
    collected.extend(host.drain())
  assert collected == [0, -1, -2, -3, -4]


def test_pool_requires_draining_and_open_block():
  host = pool.HostPool(_slow_square, workers=1, max_in_flight=4,
                       progress=False)
  with pytest.raises(RuntimeError, match='not open'):
    host.submit(1)
  with pytest.raises(RuntimeError, match='not collected'):
    with host:
      host.submit(1)
      host.submit(2)


def test_pool_rejects_bad_arguments():
  with pytest.raises(ValueError, match='workers'):
    pool.HostPool(abs, workers=-1)
  with pytest.raises(ValueError, match='max_in_flight'):
    pool.HostPool(abs, workers=1, max_in_flight=0)
  with pytest.raises(TypeError, match='cannot be pickled'):
    pool.HostPool(lambda x: x, workers=1)


def test_params_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    crf.CrfParams().iterations = 3  # type: ignore[misc]


# Slow: a kill test (a parent process and its pool worker, SIGKILL).
@pytest.mark.slow
def test_pool_workers_exit_when_the_parent_is_killed(tmp_path):
  import signal  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  script = tmp_path / 'parent.py'
  script.write_text(
      'import time\n'
      'from wsss_jax.host import pool\n'
      'if __name__ == "__main__":\n'
      '  p = pool.HostPool(abs, workers=1)\n'
      '  p.__enter__()\n'
      '  p.submit(-1)\n'
      '  list(p.drain())\n'
      '  print("started", flush=True)\n'
      '  print(list(p._executor._processes)[0], flush=True)\n'
      '  time.sleep(60)\n')
  parent = subprocess.Popen([sys.executable, str(script)],
                            stdout=subprocess.PIPE, text=True)
  parent.stdout.readline()
  worker = int(parent.stdout.readline())
  os.kill(worker, 0)                         # alive while the parent lives
  parent.send_signal(signal.SIGKILL)
  parent.wait()
  deadline = time.time() + 10
  while time.time() < deadline:
    try:
      os.kill(worker, 0)
    except ProcessLookupError:
      return
    time.sleep(0.2)
  os.kill(worker, signal.SIGKILL)
  raise AssertionError('pool worker outlived its killed parent')
