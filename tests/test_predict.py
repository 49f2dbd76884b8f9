"""wsss_jax.predict: a finished run's network on a folder of images."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from wsss_jax import config_io, prediction, run
from wsss_jax.config_checks import ConfigError
from wsss_jax.data import label_png, registry
from wsss_jax.stages import MethodPipeline, Network, Stage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _save(path, array, mode=None):
  Image.fromarray(array, mode).save(path)


# ---------------------------------------------------------------------------
# The folder
# ---------------------------------------------------------------------------
def test_output_names_keep_stems_unless_two_files_share_one():
  assert prediction.output_names(['a.jpg', 'a.png', 'b.jpg']) == {
      'a.jpg': 'a_jpg', 'a.png': 'a_png', 'b.jpg': 'b'}


def test_bucket_side_rounds_the_longer_side_up():
  assert prediction.bucket_side(100, 30, 128) == 128
  assert prediction.bucket_side(129, 30, 128) == 256
  assert prediction.bucket_side(32, 32, 8) == 32


def test_list_images_errors_and_filters(tmp_path):
  with pytest.raises(prediction.PredictionError, match='not a folder'):
    prediction.list_images(str(tmp_path / 'missing'))
  (tmp_path / 'notes.txt').write_text('x')
  with pytest.raises(prediction.PredictionError, match='no image file'):
    prediction.list_images(str(tmp_path))
  _save(tmp_path / 'B.PNG', np.zeros((4, 4, 3), np.uint8))
  _save(tmp_path / 'a.jpg', np.zeros((4, 4, 3), np.uint8))
  assert prediction.list_images(str(tmp_path)) == ['B.PNG', 'a.jpg']


def test_unreadable_and_unsupported_images_are_skipped_with_a_reason(
    tmp_path):
  (tmp_path / 'broken.jpg').write_bytes(b'not a jpeg')
  with pytest.raises(prediction.SkippedImage, match='unreadable'):
    prediction.image_size(str(tmp_path / 'broken.jpg'))
  _save(tmp_path / 'deep.png', np.zeros((5, 6), np.uint16))
  with pytest.raises(prediction.SkippedImage, match="mode 'I;16'"):
    prediction.image_size(str(tmp_path / 'deep.png'))
  _save(tmp_path / 'grey.png', np.full((5, 6), 7, np.uint8))
  assert prediction.image_size(str(tmp_path / 'grey.png')) == (5, 6)
  rgb = prediction.read_rgb(str(tmp_path / 'grey.png'))
  assert rgb.shape == (5, 6, 3) and (rgb == 7).all()


# ---------------------------------------------------------------------------
# The run's config and network
# ---------------------------------------------------------------------------
def test_run_config_round_trips_through_config_json(tmp_path):
  with pytest.raises(FileNotFoundError, match='No run directory'):
    config_io.load_run_config(str(tmp_path / 'missing'))
  with pytest.raises(FileNotFoundError, match='not the workdir of a run'):
    config_io.load_run_config(str(tmp_path))
  (tmp_path / 'config.json').write_text(json.dumps(
      {'eval': {'scales': [0.5, 1.0], 'crf': False, 'batch_size': 4,
                'fusion': 'mean_probs', 'bucket_size': None}}))
  config = config_io.load_run_config(str(tmp_path))
  assert config.eval.scales == (0.5, 1.0)   # tuples again
  # Fields added after the run was made read as what the run computed.
  assert config.crf.backend == 'pydensecrf'
  assert config.train.ema_decay == 0.0
  # A method's section is filled only in that method's configs.
  assert 'rrm' not in config
  (tmp_path / 'config.json').write_text(json.dumps({'rrm': {'gamma': 4.0}}))
  assert config_io.load_run_config(str(tmp_path)).rrm.hparam_preset == 'paper'
  (tmp_path / 'config.json').write_text(json.dumps(
      {'eval': {'scales': [0.5, 1.0], 'crf': False, 'batch_size': 4,
                'fusion': 'mean_probs', 'bucket_size': None}}))
  config = config_io.load_run_config(str(tmp_path))
  config_io.apply_override(config, 'eval.crf=True')
  config_io.apply_override(config, 'eval.scales=[1, 1.5]')
  config_io.apply_override(config, 'eval.batch_size=8')
  assert config.eval.crf is True and config.eval.scales == (1, 1.5)
  assert config.eval.batch_size == 8


def test_overrides_name_the_field_and_the_closest_names():
  config = ml_collections.ConfigDict(
      {'eval': {'crf': False, 'batch_size': 4}, 'model': {'width': 1.0}})
  with pytest.raises(ConfigError, match=r"no field 'crff'.*Did you mean crf"):
    config_io.apply_override(config, 'eval.crff=True')
  with pytest.raises(ConfigError, match='expected True or False'):
    config_io.apply_override(config, 'eval.crf=yes')
  with pytest.raises(ConfigError, match='expected a int'):
    config_io.apply_override(config, 'eval.batch_size=four')
  with pytest.raises(ConfigError, match='only config.eval fields'):
    config_io.apply_override(config, 'model.width=2.0', ('eval',))
  with pytest.raises(ConfigError, match='field=value'):
    config_io.apply_override(config, 'eval.crf')


def test_select_network_defaults_to_the_evaluated_one():
  def stage(name, network=None):
    return Stage(name, lambda context, stage_dir: {}, network=network)
  pipeline = MethodPipeline(
      [stage('labels'), stage('classifier', Network('classifier', 'rt1')),
       stage('train', Network('train', 'rt')),
       stage('evaluate', Network('train', 'rt'))],
      eval_stage='evaluate', train_stages=('classifier', 'train'))
  assert prediction.select_network(pipeline, None).stage == 'train'
  assert prediction.select_network(pipeline, 'classifier').runtime == 'rt1'
  with pytest.raises(prediction.PredictionError,
                     match=r"'labels' trains no network.*'classifier'"):
    prediction.select_network(pipeline, 'labels')


def test_known_classes_refuse_to_read_data():
  classes = registry.KnownClasses('shapes', ('background', 'disc'))
  assert classes.num_classes == 2
  with pytest.raises(registry.DatasetError, match='classes only'):
    classes.source('val')
  with pytest.raises(registry.DatasetError, match='classes only'):
    classes.splits  # pylint: disable=pointless-statement


# ---------------------------------------------------------------------------
# End to end on a finished tiny run
# ---------------------------------------------------------------------------
@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  config = run.load_config_file(
      os.path.join(REPO, 'configs', 'supervised.py'), 'tiny')
  workdir = str(tmp_path_factory.mktemp('run') / 'supervised')
  results = run.train_and_evaluate(config, workdir)
  return workdir, results


@pytest.mark.slow          # one tiny run (~20 s) shared by the tests below
def test_predictions_equal_the_evaluation_and_cover_every_readable_image(
    finished_run, tmp_path):
  workdir, results = finished_run
  config = run.load_config_file(
      os.path.join(REPO, 'configs', 'supervised.py'), 'tiny')
  dataset = registry.open_dataset(config.data)
  images = tmp_path / 'images'
  images.mkdir()
  source = dataset.source(config.data.val_split)
  ids = []
  for i in range(len(source)):
    example = source[i]
    ids.append(str(example['image_id']))
    _save(images / f'{ids[-1]}.png', example['image'])
  _save(images / 'wide.jpg', np.full((20, 150, 3), 90, np.uint8))   # 2nd bucket
  _save(images / 'grey.png', np.full((17, 9), 200, np.uint8))
  (images / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
  _save(images / 'deep.png', np.zeros((8, 8), np.uint16))
  out = tmp_path / 'out'

  summary = prediction.predict_folder(workdir, str(images), str(out),
                                      overlays=True, bucket_multiple=8,
                                      progress=False)
  assert summary['found'] == len(ids) + 4
  assert summary['written'] == len(ids) + 2
  assert [s['file'] for s in summary['skipped']] == ['broken.jpg',
                                                     'deep.png']
  assert summary['stage'] == 'train'
  assert summary['buckets'] == {'24': 1, '32': len(ids), '152': 1}
  # Same bucket as the evaluator (32 px): the labels are the evaluation's.
  evaluated = os.path.join(workdir, 'evaluate', 'predictions', 'val')
  for image_id in ids:
    ours = label_png.read_label_png(out / f'{image_id}.png')
    np.testing.assert_array_equal(
        ours, label_png.read_label_png(os.path.join(evaluated,
                                                    f'{image_id}.png')))
  wide = label_png.read_label_png(out / 'wide.png')
  assert wide.shape == (20, 150)
  assert wide.max() < len(results['dataset']['class_names'])
  assert Image.open(out / 'overlays' / 'grey.jpg').size == (9, 17)
  with open(out / 'predictions.json') as f:
    assert json.load(f)['written'] == summary['written']


@pytest.mark.slow
def test_eval_overrides_and_a_named_stage(finished_run, tmp_path):
  workdir, _ = finished_run
  images = tmp_path / 'images'
  images.mkdir()
  rng = np.random.default_rng(0)
  _save(images / 'a.png', rng.integers(0, 255, (30, 40, 3), np.uint8))
  summary = prediction.predict_folder(
      workdir, str(images), str(tmp_path / 'out'), stage='train',
      overrides=['eval.crf=True', 'eval.flip=True', 'eval.crf_workers=0'],
      progress=False)
  assert summary['protocol']['crf'] and summary['protocol']['flip']
  assert label_png.read_label_png(tmp_path / 'out' / 'a.png').shape == (30, 40)
  with pytest.raises(prediction.PredictionError, match='trains no network'):
    prediction.predict_folder(workdir, str(images), str(tmp_path / 'o2'),
                              stage='evaluate', progress=False)
  with pytest.raises(ConfigError, match='only config.eval'):
    prediction.predict_folder(workdir, str(images), str(tmp_path / 'o3'),
                              overrides=['train.num_steps=3'])


def _predict_cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'wsss_jax.predict', *args], cwd=REPO,
      capture_output=True, text=True, timeout=300, check=False)


def test_command_line_errors_are_one_line_without_traceback(tmp_path):
  result = _predict_cli(f'--workdir={tmp_path / "nope"}',
                        f'--images={tmp_path}', f'--out={tmp_path / "o"}')
  assert result.returncode == 2
  assert 'No run directory' in result.stderr
  assert 'Traceback' not in result.stderr


@pytest.mark.slow
def test_command_line_writes_one_png_per_image(finished_run, tmp_path):
  workdir, _ = finished_run
  images = tmp_path / 'images'
  images.mkdir()
  for name in ('x.jpg', 'y.jpg'):
    _save(images / name, np.full((24, 24, 3), 120, np.uint8))
  result = _predict_cli(f'--workdir={workdir}', f'--images={images}',
                        f'--out={tmp_path / "out"}',
                        '--config.eval.scales=[1.0, 0.5]')
  assert result.returncode == 0, result.stderr[-2000:]
  assert sorted(os.listdir(tmp_path / 'out')) == ['predictions.json',
                                                   'x.png', 'y.png']
  assert 'Predicted 2 of 2 images' in result.stderr
