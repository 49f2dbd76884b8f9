"""experiments/benchmark_crf.py: its measurements on tiny inputs return the
contract's fields with sane values (the full run is an experiment)."""

from __future__ import annotations

import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'experiments'))
import benchmark_crf  # noqa: E402  pylint: disable=g-import-not-at-top


def test_measurements_on_small_images():
  samples = benchmark_crf.resized(benchmark_crf.voc_samples(2), 40, 48, 5)
  assert samples[0][0].shape == (40, 48, 3)
  assert samples[0][1].shape == (5, 40, 48)
  np.testing.assert_allclose(samples[0][1].sum(0), 1.0, rtol=1e-5)
  params = benchmark_crf.PARAMETER_SETS['bana_labels']
  agreement = benchmark_crf.agreement(samples, params)
  assert agreement['images'] == 2
  assert agreement['agreement_pct'] >= 99.5
  speed = benchmark_crf.speed(samples, params, batch=2)
  for key in ('jax_images_per_second', 'pool_images_per_second',
              'single_images_per_second'):
    assert speed[key] > 0
  assert (speed['height'], speed['width'], speed['labels']) == (40, 48, 5)
  accuracy = benchmark_crf.filter_accuracy(samples[0][0], 24, 8.0, 15.0)
  assert 0 <= accuracy['normalised_rel_error'] < 0.1
  assert 0.3 < accuracy['energy_ratio'] < 1.0


def test_benchmark_samples_are_the_embedded_validation_images():
  samples = benchmark_crf.benchmark_samples(2)
  image, probs = samples[0]
  assert image.shape == (128, 128, 3) and image.dtype == np.uint8
  assert probs.shape == (7, 128, 128)
  np.testing.assert_allclose(probs.sum(0), 1.0, rtol=1e-5)
  # Two different images, and the noisy unaries still follow the shapes.
  assert not np.array_equal(samples[0][0], samples[1][0])
  assert np.mean(probs.argmax(0) > 0) > 0.01
