"""Bad input gets a clear error naming what is wrong (issue checklist)."""

import json

import numpy as np
import pytest

from wsss_jax import config_checks, defaults
from wsss_jax.data import pipeline, registry
from wsss_jax.data.label_png import LabelFolder, MissingLabelsError


def _tiny_data():
  config = defaults.shapes_data()
  config.shapes.update(image_size=32, num_train=8, num_val=4)
  return config


def test_pseudo_label_folder_missing_ids_lists_them(tmp_path):
  dataset = registry.open_dataset(_tiny_data())
  index = dataset.index('train')
  folder = LabelFolder(str(tmp_path / 'labels'))
  for image_id in index.image_ids[:5]:
    folder.write(image_id, np.zeros((32, 32), np.uint8))
  with pytest.raises(MissingLabelsError) as error:
    pipeline.with_label_folders(dataset.source('train'),
                                {'pseudo': folder.root}, index.image_ids)
  assert '3' in str(error.value) and index.image_ids[5] in str(error.value)


def test_pseudo_label_of_wrong_size_names_the_file(tmp_path):
  dataset = registry.open_dataset(_tiny_data())
  index = dataset.index('train')
  folder = LabelFolder(str(tmp_path / 'labels'))
  for image_id in index.image_ids:
    folder.write(image_id, np.zeros((31, 32), np.uint8))
  source = pipeline.with_label_folders(dataset.source('train'),
                                       {'pseudo': folder.root},
                                       index.image_ids)
  with pytest.raises(ValueError, match=index.image_ids[0]):
    source[0]


def test_unknown_dataset_and_split_are_named():
  config = _tiny_data()
  config.name = 'pascal'
  with pytest.raises(registry.DatasetError, match='pascal'):
    registry.open_dataset(config)
  dataset = registry.open_dataset(_tiny_data())
  with pytest.raises(registry.DatasetError, match='train_aug'):
    dataset.source('train_aug')


def test_missing_voc_root_is_a_clear_error(tmp_path):
  config = defaults.voc_data()
  config.data_dir = str(tmp_path / 'prepared')
  config.voc.voc_root = str(tmp_path / 'nowhere' / 'VOC2012')
  with pytest.raises(Exception, match='nowhere'):
    registry.open_dataset(config)


@pytest.mark.parametrize('field, value, message', [
    ('optim.lr', -0.1, 'optim.lr'),
    ('input.crop_size', 600, 'eval.bucket_size'),
    ('train.num_steps', 0, 'train.num_steps'),
    ('input.scale_range', (1.5, 0.5), 'input.scale_range'),
    ('crf.backend', 'cuda', "crf.backend: must be one of \\('pydensecrf', "
     "'jax'\\), got 'cuda'"),
])
def test_out_of_range_config_values(field, value, message):
  config = defaults.base_config('x', 'supervised')
  config.eval.bucket_size = 512
  section, name = field.split('.')
  config[section][name] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.validate(config)


def test_all_invalid_fields_are_listed_at_once():
  config = defaults.base_config('x', 'supervised')
  config.optim.lr = -1.0
  config.optim.weight_decay = -1.0
  with pytest.raises(config_checks.ConfigError) as error:
    config_checks.validate(config)
  assert 'optim.lr' in str(error.value)
  assert 'optim.weight_decay' in str(error.value)


def test_workdir_of_an_older_config_compares_equal_with_neutral_new_fields(
    tmp_path):
  """A config.json written before train.ema_decay existed compares equal to
  a config that keeps EMA off, and differs in that field when it is on."""
  config = defaults.base_config('supervised', method='supervised')
  config.train.ema_decay, config.optim.warmup_steps = 0.0, 0
  fields, previous = config_checks.update_workdir_config(config,
                                                         str(tmp_path))
  assert previous is None
  path = tmp_path / 'config.json'
  saved = json.loads(path.read_text())
  del saved['train']['ema_decay'], saved['optim']['warmup_steps']
  del saved['crf']
  path.write_text(json.dumps(saved))
  again, previous = config_checks.update_workdir_config(config,
                                                        str(tmp_path))
  assert again == previous == fields
  path.write_text(json.dumps(saved))
  config.train.ema_decay = 0.99
  changed, previous = config_checks.update_workdir_config(config,
                                                          str(tmp_path))
  assert {k for k in set(changed) | set(previous)
          if changed.get(k) != previous.get(k)} == {'train.ema_decay'}
  assert json.loads(path.read_text())['train']['ema_decay'] == 0.99


def test_resume_safe_fields_never_count_as_changes():
  config = defaults.base_config('supervised', method='supervised')
  fields = config_checks.comparable_fields(
      config_checks.config_as_dict(config))
  assert 'eval.crf_workers' not in fields and 'eval.crf' in fields
