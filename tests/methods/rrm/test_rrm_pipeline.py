"""RRM's config variants and its pipeline end to end."""

from __future__ import annotations

import os

import pytest

from wsss_jax import run

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
  with pytest.raises(ValueError, match='rrm.py'):
    load_config('two_stage')


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
  results = run.train_and_evaluate(load_config('tiny'), str(tmp_path))
  assert [s['name'] for s in results['stages']] == [
      'classify', 'train', 'cam_quality', 'evaluate']
  assert results['training']['train']['initialisation']['init'] == str(
      tmp_path / 'classify' / 'model.npz')
  assert 0 <= results['val']['miou'] <= 100
  rrm = results['rrm']
  assert 0 <= rrm['val_miou_without_crf'] <= 100
  assert 0 <= rrm['cam_miou'] <= 100
  assert len(os.listdir(tmp_path / 'cam_quality' / 'cam')) == 4
  labels = rrm['reliable_labels']
  assert 0 <= labels['labelled_pct'] <= 100
  assert labels['precision'] is None or 0 <= labels['precision'] <= 100
  assert set(labels['per_class']) == set(results['dataset']['class_names'])
  assert labels['steps'][1] == 2
