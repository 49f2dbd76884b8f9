"""One-step end-to-end runs of every config's `:tiny` variant."""

import json
import os
import subprocess
import sys

import pytest
from ml_collections import config_flags  # noqa: F401  (loads config files)

from wsss_jax import run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, variant='tiny'):
  return run.load_config_file(
      os.path.join(REPO, 'configs', f'{name}.py'), variant)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['supervised', 'box_baseline'])
def test_tiny_config_runs_end_to_end_and_resumes(name, tmp_path):
  config = load_config(name)
  workdir = str(tmp_path / name)
  results = run.train_and_evaluate(config, workdir)
  assert results['config'] == {'name': name, 'variant': 'tiny'}
  assert results['method'] == name
  assert results['dataset']['name'] == 'shapes'
  assert results['backbone']['name'] == 'vgg16_largefov'
  assert 0.0 <= results['val']['miou'] <= 100.0
  assert set(results['val']['per_class_iou']) == set(
      results['dataset']['class_names'])
  assert 0.0 <= results['val']['pixel_acc'] <= 100.0
  assert [s['name'] for s in results['stages']][-1] == 'evaluate'
  assert all(s['status'] == 'done' for s in results['stages'])
  assert results['versions']['jax'] and results['devices']
  assert {'git_commit', 'git_dirty', 'argv', 'time'} <= set(
      results['provenance'])
  assert results['full_config']['train']['num_steps'] == 2
  if name == 'box_baseline':
    assert 40.0 < results['pseudo']['miou'] < 90.0   # box fills, not GT
  else:
    assert results['pseudo'] is None
  with open(os.path.join(workdir, 'results.json')) as f:
    assert json.load(f)['val']['miou'] == results['val']['miou']
  report = open(os.path.join(workdir, 'report.md')).read()
  assert 'val mIoU' in report and 'curve_train.png' in report
  assert os.path.exists(os.path.join(workdir, 'report', 'curve_train.png'))
  predictions = os.path.join(workdir, 'evaluate', 'predictions', 'val')
  assert len(os.listdir(predictions)) == results['val']['num_images'] == 4
  # Rerunning the same command resumes: every stage is complete, so skipped.
  again = run.train_and_evaluate(config, workdir)
  assert all(s['status'] == 'skipped' for s in again['stages'])
  assert again['val']['miou'] == results['val']['miou']
  # The rerun reports what the results cost, not its own near-zero time.
  # Stage times are rounded to 0.01 s; their float sum may exceed the
  # rounded total by an ulp (10.030000000000001 vs 10.03).
  stage_total = sum(s['wall_s'] for s in results['stages'])
  assert again['wall_s'] >= stage_total - 1e-6 and stage_total > 0
  assert again['session_wall_s'] < again['wall_s']


@pytest.mark.slow
def test_changed_config_reruns_only_the_stages_that_read_it(tmp_path):
  config = load_config('supervised')
  run.train_and_evaluate(config, str(tmp_path))
  config.eval.crf = True          # an evaluation setting: evaluate only
  again = run.train_and_evaluate(config, str(tmp_path))
  assert [(s['name'], s['status']) for s in again['stages']] == [
      ('train', 'skipped'), ('evaluate', 'done')]
  assert again['val']['protocol']['crf'] is True
  config.train.num_steps = 3      # one more step, from the last checkpoint
  longer = run.train_and_evaluate(config, str(tmp_path))
  assert [s['status'] for s in longer['stages']] == ['done', 'done']
  assert longer['training']['train']['resumed_from_step'] == 2
  assert longer['training']['train']['steps'] == 3
  assert not list(tmp_path.glob('train.replaced-*'))
  config.optim.lr = 0.5           # anything else: the stage starts over
  restarted = run.train_and_evaluate(config, str(tmp_path))
  assert restarted['training']['train']['resumed_from_step'] is None
  assert len(list(tmp_path.glob('train.replaced-*'))) == 1


def _main(*args, cwd=REPO, timeout=300):
  return subprocess.run([sys.executable, '-m', 'wsss_jax.main', *args],
                        cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, env=dict(os.environ,
                                                  JAX_PLATFORMS='cpu'))


@pytest.mark.parametrize('args, message', [
    (['--config.optim.lrr=0.1'],
     "--config.optim.lrr: no config field 'lrr'. Did you mean 'lr'?"),
    (['--config.train.num_steps=1.5'], '--config.train.num_steps=1.5'),
    (['--config.optim.lr=-1'], 'optim.lr: must be > 0, got -1.0'),
    (['--config.eval.scales=abc'], 'eval.scales: must be non-empty'),
])
def test_config_mistakes_are_one_message_and_exit_2(args, message, tmp_path):
  result = _main('--config=configs/supervised.py:tiny',
                 f'--workdir={tmp_path}', *args)
  assert result.returncode == 2
  assert message in result.stderr
  assert 'Traceback' not in result.stderr
  assert not os.path.exists(tmp_path / 'results.json')


@pytest.mark.parametrize('config, message', [
    ('configs/supervised.py:nonsense', "Unknown variant 'nonsense'"),
    ('configs/nonexistent.py', 'No such file'),
])
def test_a_bad_config_argument_is_one_message_and_exit_2(config, message,
                                                         tmp_path):
  result = _main(f'--config={config}', f'--workdir={tmp_path}')
  assert result.returncode == 2
  assert message in result.stderr and 'Traceback' not in result.stderr


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match='Unknown variant'):
    load_config('supervised', 'nonsense')
