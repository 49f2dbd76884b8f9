"""`configs/rrm.py:voc` end to end on the real VOC samples
(tests/data/voc_mini) from a PSA-named ResNet-38 file converted with
`convert_weights --layout=psa_resnet38`, at a tiny width so it runs on CI."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from wsss_jax import run
from wsss_jax.tools import convert_weights as cw

TESTS = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
REPO = os.path.dirname(TESTS)
sys.path.insert(0, TESTS)
from torch_reference import fake_psa_resnet38  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.mark.slow
def test_voc_setting_trains_from_a_converted_psa_classifier(tmp_path):
  state = fake_psa_resnet38(np.random.default_rng(3), width=1 / 16,
                            classes=20, seg_hidden=8)
  source = str(tmp_path / 'res38_cls.npz')
  np.savez(source, **state)
  init_file = str(tmp_path / 'res38_cls_converted.npz')
  cw.convert_file(source, 'psa_resnet38', init_file)

  config = run.load_config_file(os.path.join(REPO, 'configs', 'rrm.py'),
                                'voc')
  config.data.data_dir = str(tmp_path / 'prepared')
  config.data.voc.voc_root = os.path.join(TESTS, 'data', 'voc_mini')
  config.data.train_split = 'train'        # no SBD here: no train_aug
  config.model.update(width=1 / 16, init_weights=init_file)
  config.input.update(crop_size=64, batch_size=2, worker_count=0)
  config.train.update(num_steps=1, log_every=1, checkpoint_every=1,
                      eval_every=0)
  config.rrm.update(seg_channels=8, seg_dilation=2, cam_scales=(0.5, 1.0),
                    cam_quality_images=2)
  config.rrm.label_crf.iterations = 2
  config.eval.update(batch_size=2, crf_workers=0)
  config.eval.crf_params.iterations = 2
  config.report.num_examples = 1

  results = run.train_and_evaluate(config, str(tmp_path / 'run'))
  # No classify stage: training starts from the converted classifier.
  assert [s['name'] for s in results['stages']] == [
      'train', 'cam_quality', 'evaluate']
  init = results['training']['train']['initialisation']
  assert init['init'] == os.path.abspath(init_file)
  assert init['missing'] == []                 # fc8 and the head loaded too
  assert results['dataset']['num_classes'] == 21
  assert results['val']['num_images'] == 3
  assert results['full_config']['model']['backbone'] == 'resnet38_psa'
  assert 0 <= results['rrm']['cam_miou'] <= 100
  assert 0 <= results['rrm']['reliable_labels']['labelled_pct'] <= 100
