"""The `:voc` variant end to end on the real VOC samples (tests/data/voc_mini),
with weights loaded from a local .npz, at a tiny width so it runs on CI."""

import os

import jax
import pytest

from wsss_jax import run
from wsss_jax.models import weights
from wsss_jax.segmentation import build_segmenter
from wsss_jax.runtime import make_runtime
from wsss_jax.training import state as state_lib

from test_end_to_end import load_config

HERE = os.path.dirname(os.path.abspath(__file__))


def _voc_config(tmp_path):
  config = load_config('box_baseline', 'voc')
  config.data.data_dir = str(tmp_path / 'prepared')
  config.data.voc.voc_root = os.path.join(HERE, 'data', 'voc_mini')
  config.data.train_split = 'train'        # no SBD here: no train_aug
  config.model.update(width=0.0625, fc_dim=16)
  config.input.update(crop_size=64, batch_size=2, worker_count=0)
  config.train.update(num_steps=1, log_every=1, checkpoint_every=1,
                      eval_every=0)
  config.eval.update(batch_size=2, crf_workers=0)
  config.report.num_examples = 1
  return config


@pytest.mark.slow
def test_voc_variant_trains_from_local_weights_on_real_images(tmp_path):
  config = _voc_config(tmp_path)
  # A local weight file for this (tiny) network, as the converter would write.
  rt = make_runtime(config)
  model = build_segmenter(rt)
  variables = jax.device_get(state_lib.init_variables(
      model, jax.random.PRNGKey(7), (1, 64, 64, 3)))
  init_file = str(tmp_path / 'init.npz')
  sha = weights.save_weights(init_file, weights.flatten_variables(variables))
  config.model.init_weights = init_file

  results = run.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['dataset']['name'] == 'voc'
  assert results['dataset']['num_classes'] == 21
  assert results['val']['num_images'] == 3            # the 3 real val images
  assert results['pseudo']['split'] == 'train'
  assert 0 < results['pseudo']['miou'] < 100          # box fills vs real masks
  init = results['backbone']['initialisation']
  assert init['init'] == os.path.abspath(init_file)
  assert init['sha256'] == sha
  assert results['full_config']['input']['normalization'] == ''
  predictions = tmp_path / 'run' / 'evaluate' / 'predictions' / 'val'
  assert sorted(os.listdir(predictions)) == [
      '2007_000033.png', '2007_000042.png', '2007_000676.png']


# Slow: the pipeline prepares the real VOC samples and initialises the network
# before it opens the weight file.
@pytest.mark.slow
def test_missing_weight_file_is_a_clear_error(tmp_path):
  config = _voc_config(tmp_path)
  config.model.init_weights = str(tmp_path / 'nope.npz')
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    run.train_and_evaluate(config, str(tmp_path / 'run'))
