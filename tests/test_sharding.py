"""Data parallelism: one step on 8 devices equals one step on 1 device."""

import pytest

import device_checks  # pylint: disable=g-bad-import-order


# Slow: a fresh process with 8 devices compiles four whole training steps
# (two networks, 1 and 8 devices), about 20 s; the other tests keep it short.
@pytest.mark.slow
def test_eight_devices_equal_one_device():
  report = device_checks.run_check('eight_devices_check.py')
  for name, values in report.items():
    assert abs(values['loss_1'] - values['loss_8']) < 1e-5, (name, values)
    assert values['max_param_diff'] < 1e-6, (name, values)
    assert values['max_batch_stats_diff'] < 1e-5, (name, values)
  # Trained BN really has statistics, computed over the global batch.
  assert report['resnet_trained_bn']['num_batch_stats'] > 0
