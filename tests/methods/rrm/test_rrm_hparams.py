"""RRM's hyper-parameter presets and the `:voc` / `:two_step` settings."""

from __future__ import annotations

import os

import pytest

from wsss_jax import run
from wsss_jax.methods.rrm import hparams, pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))))


def load_config(arg=''):
  return run.load_config_file(os.path.join(REPO, 'configs', 'rrm.py'), arg)


def test_paper_preset_keeps_the_config():
  config = load_config('voc')
  assert config.rrm.hparam_preset == 'paper'
  assert hparams.apply_hparam_preset(config) is config
  # The paper's values live in the :voc setting itself.
  assert (config.optim.name, config.optim.lr, config.optim.momentum,
          config.optim.weight_decay) == ('sgd', 1e-3, 0.9, 5e-4)
  assert (config.input.crop_size, config.input.batch_size) == (321, 4)
  assert tuple(config.input.scale_range) == (0.7, 1.3)


def test_official_routes_set_the_codes_values_and_keep_momentum():
  config = load_config('voc,official_code')
  assert config.rrm.hparam_preset == 'official_cls_weight'
  applied = hparams.apply_hparam_preset(config)
  assert applied is not config and config.optim.lr == 1e-3
  assert (applied.optim.lr, applied.optim.weight_decay,
          applied.input.batch_size, applied.train.num_steps,
          applied.rrm.classify_steps) == (7e-4, 1e-5, 4, 20000, 0)
  assert applied.optim.momentum == 0.9          # not the code's 1e-5
  config.rrm.hparam_preset = 'official_init'
  applied = hparams.apply_hparam_preset(config)
  # 24 epochs of batch 8 over train_aug (10,582 images), in two halves.
  assert applied.rrm.classify_steps == applied.train.num_steps == 15876
  assert (applied.rrm.classify_lr, applied.optim.lr,
          applied.input.crop_size) == (0.01, 7e-4, 448)


def test_bad_preset_names_the_field():
  config = load_config('tiny')
  config.rrm.hparam_preset = 'official'
  with pytest.raises(ValueError, match='rrm.hparam_preset'):
    hparams.apply_hparam_preset(config)


def test_voc_setting_starts_from_a_classifier_file():
  config = load_config('voc')
  assert config.model.backbone == 'resnet38_psa'
  assert config.rrm.classify_steps == 0       # res38_cls.pth is the start
  assert tuple(config.model.dont_load) == ()   # its fc8 is loaded
  assert (config.rrm.seg_channels, config.rrm.seg_dilation) == (512, 12)
  assert (config.rrm.energy_weight, config.rrm.energy_sigma_xy,
          config.rrm.energy_sigma_rgb) == (1e-7, 100.0, 15.0)
  assert config.eval.crf and tuple(config.eval.scales) == (1.0,)


def test_second_step_trains_its_own_model_with_its_recipe():
  benchmark = pipeline.second_step_config(load_config('two_step'))
  assert benchmark.model.backbone == load_config().model.backbone
  assert (benchmark.optim.lr, benchmark.input.batch_size,
          benchmark.train.num_steps) == (3e-3, 16, 700)
  assert tuple(benchmark.optim.head_modules) == ('head',)
  voc = pipeline.second_step_config(load_config('two_step,voc'))
  assert voc.model.backbone == 'resnet101_deeplab'
  assert voc.model.weights_source == 'caffe'
  assert (voc.optim.lr, voc.input.batch_size, voc.train.num_steps) == (
      2.5e-4, 10, 20000)
  labels = pipeline.label_eval_config(load_config('two_step'))
  assert labels.crf and tuple(labels.scales) == (1.0,) and not labels.flip
  assert labels.crf_params.bilateral_sxy == 83.0
