"""RRM's config variants and its pipeline end to end."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from wsss_jax import prediction, run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))))


def load_config(arg=''):
  return run.load_config_file(os.path.join(REPO, 'configs', 'rrm.py'), arg)


def test_variants_set_the_table2_rows():
  assert load_config().rrm.label_source == 'rrm'
  assert load_config().rrm.energy_weight > 0
  assert load_config('ce_only').rrm.energy_weight == 0
  assert load_config('cam_labels').rrm.label_source == 'cam'
  assert load_config('cam_labels,tiny').train.num_steps == 2
  two_step = load_config('two_step')
  assert two_step.rrm.label_source == 'rrm'
  assert two_step.rrm.energy_weight == load_config().rrm.energy_weight
  with pytest.raises(ValueError, match='rrm.py'):
    load_config('two_stage')


@pytest.mark.slow
def test_tiny_two_step_run_end_to_end(tmp_path):
  """The two-step variant runs the one-step stages (named as in the default
  variant but for its evaluation) and then the second step."""
  results = run.train_and_evaluate(load_config('two_step,tiny'),
                                   str(tmp_path))
  assert [s['name'] for s in results['stages']] == [
      'classify', 'train', 'cam_quality', 'one_step_evaluate',
      'one_step_labels', 'deeplab', 'evaluate']
  assert results['training']['train']['initialisation']['init'] == str(
      tmp_path / 'classify' / 'model.npz')
  # The second step starts from the segmenter's own initialisation.
  assert results['training']['deeplab']['initialisation']['init'] == (
      'builtin:shapes_pretrain')
  assert 0 <= results['val']['miou'] <= 100
  rrm = results['rrm']
  assert 0 <= rrm['val_miou_without_crf'] <= 100
  assert 0 <= rrm['one_step']['val_miou'] <= 100
  assert 0 <= rrm['one_step']['val_miou_without_crf'] <= 100
  assert 0 <= rrm['cam_miou'] <= 100
  assert len(os.listdir(tmp_path / 'cam_quality' / 'cam')) == 4
  labels = rrm['reliable_labels']
  assert 0 <= labels['labelled_pct'] <= 100
  assert labels['precision'] is None or 0 <= labels['precision'] <= 100
  assert set(labels['per_class']) == set(results['dataset']['class_names'])
  assert labels['steps'][1] == 2
  # Every training image labelled by the one-step network, fully (the
  # predictions leave no pixel unlabelled) and scored.
  folder = tmp_path / 'one_step_labels' / 'labels'
  assert len(os.listdir(folder)) == 8
  for name in os.listdir(folder):
    assert np.asarray(Image.open(folder / name)).max() < 255
  assert 0 <= results['pseudo']['miou'] <= 100
  # Prediction (no dataset splits) loads either step's network.
  for stage in (None, 'train'):
    _, network, _ = prediction.load_run(str(tmp_path), stage)
    assert network.stage == (stage or 'deeplab')
  # Fig. 3's rows in the report, every cell written.
  report = (tmp_path / 'report.md').read_text()
  assert '## Reliable labels (RRM Fig. 3)' in report
  for column in ('CAM', 'I_crf', 'I_cam', 'I_final', 'prediction'):
    assert (tmp_path / 'one_step_evaluate' / 'figures' /
            f'rrm_shapes_train_000000_{column}.png').exists()
