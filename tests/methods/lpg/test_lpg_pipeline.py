"""LPG's config variants, options, network, variable assembly and its
pipeline end to end."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax import defaults, run
from wsss_jax.data import schema
from wsss_jax.methods import build_pipeline
from wsss_jax.methods.lpg import generate, objective
from wsss_jax.methods.lpg import model as lpg_model
from wsss_jax.models import build
from wsss_jax.models import weights as weights_lib
from wsss_jax.models.hourglass import HourglassNet
from wsss_jax.training import state as state_lib
from wsss_jax.training.step import LossContext

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))))


def load_config(arg=''):
  return run.load_config_file(os.path.join(REPO, 'configs', 'lpg.py'), arg)


def test_variants_and_switches():
  config = load_config()
  assert (config.lpg.schedule, config.lpg.fusion, config.lpg.stages) == (
      'stagewise', 'overlap_rate', 3)
  assert config.lpg.aux_data.name == 'shapes_aux'
  assert load_config('fixed').lpg.schedule == 'fixed'
  assert load_config('first_come').lpg.fusion == 'first_come'
  assert 0.13 < load_config('semi').lpg.semi_fraction < 0.14
  official = load_config('official_code').lpg
  assert official.fusion == 'first_come'
  assert official.round1_input == 'box_image_only'
  assert official.padding_as_background
  assert load_config('fixed,first_come,tiny').train.num_steps == 2
  with pytest.raises(ValueError, match='lpg.py'):
    load_config('fixed,stagewise')


def test_paper_presets():
  voc = load_config('voc')
  assert (voc.data.name, voc.lpg.aux_data.name) == ('voc', 'coco')
  assert voc.lpg.aux_data.coco.class_set == 'non_voc'     # COCO-60
  assert (voc.model.backbone, voc.input.batch_size, voc.optim.lr,
          voc.train.num_steps) == ('vgg16_largefov', 30, 1e-3, 20000)
  assert voc.input.scales == (0.5, 0.75, 1.0, 1.25, 1.5)
  assert voc.eval.crf and voc.eval.crf_params.bilateral_sxy == 140.0
  generator = voc.lpg.generator
  assert (generator.width, generator.steps, generator.crop_size) == (
      1.0, 100000, 512)
  assert (generator.optim.name, generator.optim.lr,
          generator.optim.weight_decay) == ('adam', 1e-4, 5e-4)
  resnet = load_config('voc_resnet')
  assert (resnet.model.backbone, resnet.model.output_stride,
          resnet.input.batch_size, resnet.optim.lr,
          resnet.train.num_steps) == ('resnet101_deeplab', 8, 10, 2.5e-4,
                                      40000)
  assert resnet.eval.fusion == 'max_logits'
  assert resnet.eval.scales == (1.0, 0.5, 0.75)
  for config in (voc, resnet):
    objective.LPGOptions.from_config(config.lpg)


def test_options_name_the_bad_field_and_map_stages():
  config = load_config()
  config.lpg.fusion = 'last_come'
  with pytest.raises(ValueError, match='lpg.fusion'):
    objective.LPGOptions.from_config(config.lpg)
  options = objective.LPGOptions.from_config(load_config().lpg)
  assert [options.generator_stage(s) for s in (1, 2, 3)] == [1, 2, 3]
  fixed = objective.LPGOptions.from_config(load_config('fixed').lpg)
  assert [fixed.generator_stage(s) for s in (1, 2, 3)] == [3, 3, 3]
  code = objective.LPGOptions.from_config(load_config('official_code').lpg)
  assert not code.uses_segmentation(1) and code.uses_segmentation(2)


def _net(with_segmentation=True, num_classes=4, max_classes=3):
  segmenter = build.build_model(
      defaults.tiny_model().copy_and_resolve_references(), num_classes)
  # A two-level hourglass (input sides a multiple of 16) compiles in a
  # fraction of the five-level one's time.
  return lpg_model.LPGNet(segmenter=segmenter,
                          generator=HourglassNet(width=0.0625,
                                                 dims=(96, 96, 128),
                                                 blocks=(1, 1, 1)),
                          max_classes=max_classes,
                          with_segmentation=with_segmentation)


def _boxes():
  boxes = jnp.array([[[2, 2, 20, 20], [10, 10, 30, 40], [0, 0, 0, 0]],
                     [[0, 0, 8, 8], [0, 0, 0, 0], [0, 0, 0, 0]]],
                    jnp.float32)
  labels = jnp.array([[2, 3, -1], [1, -1, -1]], jnp.int32)
  return boxes, labels


def test_network_pads_to_the_hourglass_and_slots_every_class():
  net = _net()
  images = jnp.zeros((2, 40, 56, 3))
  boxes, labels = _boxes()
  # Compiled once, at XLA's lowest optimisation (an eager Flax init/apply
  # compiles every layer on its own).
  variables = state_lib.random_variables(net, jax.random.PRNGKey(0),
                                         (2, 40, 56, 3))
  apply = jax.jit(lambda v, b, l: net.apply(v, images, boxes=b,
                                            box_labels=l)).lower(
      variables, boxes, labels).compile(
          compiler_options={'xla_backend_optimization_level': 0})
  out = apply(variables, boxes, labels)
  assert out['lpg_logits'].shape == (2, 3, 10, 14, 2)   # 48 x 64 padded
  np.testing.assert_array_equal(out['slot_classes'], [[2, 3, 0], [1, 0, 0]])
  assert out['seg_probs'].shape == (2, 40, 56, 4)
  assert np.isfinite(np.asarray(out['lpg_logits'])).all()
  # Without boxes (initialisation) no slot is valid.
  empty = jnp.full((2, 3), -1, jnp.int32)
  assert not apply(variables, boxes, empty)['slot_valid'].any()
  # The round-1 variant has no segmenter at all.
  bare = _net(with_segmentation=False)
  bare_vars = jax.eval_shape(lambda: bare.init(jax.random.PRNGKey(0),
                                               images))
  assert set(bare_vars['params']) == {'generator'}


def test_assembly_takes_each_part_from_its_file(tmp_path):
  net = _net()
  variables = jax.device_get(state_lib.random_variables(
      net, jax.random.PRNGKey(1), (1, 32, 32, 3)))
  flat = weights_lib.flatten_variables(variables)
  generator_file = str(tmp_path / 'g.npz')
  weights_lib.save_weights(generator_file, {
      k: np.full(v.shape, 2.0, np.float32) for k, v in flat.items()})
  segmenter_file = str(tmp_path / 'f.npz')
  segmenter_flat = {k.replace('/segmenter/', '/', 1): np.full(
      v.shape, 3.0, np.float32) for k, v in flat.items()
                    if '/segmenter/' in k}
  weights_lib.save_weights(segmenter_file, segmenter_flat)
  assembled = weights_lib.flatten_variables(generate.assemble_variables(
      generate.abstract_variables(net), generator_file, segmenter_file))
  assert set(assembled) == set(flat)
  for key, value in assembled.items():
    expected = 2.0 if '/generator/' in key else 3.0
    assert np.all(np.asarray(value) == expected), key
  # A file that lacks an entry is refused with its name.
  missing = dict(segmenter_flat)
  missing.pop(sorted(missing)[0])
  weights_lib.save_weights(segmenter_file, missing)
  with pytest.raises(weights_lib.WeightsError, match='segmenter'):
    generate.assemble_variables(generate.abstract_variables(net),
                                generator_file, segmenter_file)


def test_e_step_loss_ignores_padding_and_is_finite_without_classes():
  options = objective.LPGOptions.from_config(load_config().lpg)
  loss_fn = objective.e_step_loss(options)
  slots_valid = jnp.array([[True, False]])
  mask = np.zeros((1, 8, 8), np.uint8)
  mask[0, :4, :4] = 2
  valid = np.ones((1, 8, 8), bool)
  valid[0, :, 4:] = False                 # crop padding on the right
  batch = {schema.MASK: jnp.asarray(mask), schema.VALID: jnp.asarray(valid)}
  context = LossContext(jnp.asarray(0), jax.random.PRNGKey(0), None)

  def loss_of(scale, slot_valid=slots_valid):
    logits = jnp.zeros((1, 2, 2, 2, 2)).at[..., 1].set(scale)
    outputs = {'lpg_logits': logits, 'slot_valid': slot_valid,
               'slot_classes': jnp.array([[2, 0]])}
    return loss_fn(outputs, batch, context)[0]

  # Quarter grid: (0, 0) is class 2 (fg), (1, 0) background; the right
  # column is padding.  With fg logit s: CE = (log(1 + e^-s) +
  # log(1 + e^s)) / 2.
  s = 1.5
  expected = (np.log1p(np.exp(-s)) + np.log1p(np.exp(s))) / 2
  np.testing.assert_allclose(loss_of(s), expected, rtol=1e-5)
  none = jnp.array([[False, False]])
  assert float(loss_of(s, none)) == 0.0
  grad = jax.grad(lambda v: loss_of(v, none))(s)
  assert np.isfinite(grad)


def _pipeline(config):
  return build_pipeline('lpg', _FakeRuntime(config))


class _FakeDataset:
  def __init__(self, name, num_classes):
    self.name, self.num_classes = name, num_classes


class _FakeRuntime:
  """Enough of a Runtime to build the stage list (no dataset is read)."""

  def __init__(self, config, dataset=None):
    self.config = config
    self.dataset = dataset or _FakeDataset(config.data.name, 7)
    self.compute_dtype = jnp.float32
    self.normalization = 'imagenet'
    self.pad_color = (0, 0, 0)

  @property
  def num_classes(self):
    return self.dataset.num_classes

  def with_config(self, config):
    return _FakeRuntime(config, self.dataset)

  def with_data(self, data_config):
    config = self.config.copy_and_resolve_references()
    config.data = data_config
    return _FakeRuntime(config, _FakeDataset(data_config.name, 7))


def test_stage_names_and_what_the_fixed_schedule_reads():
  names = [s.name for s in _pipeline(load_config()).stages]
  assert names[:8] == ['aux/box_labels', 'aux/stage0/train',
                       'aux/stage1/generator', 'aux/stage1/labels',
                       'aux/stage1/train', 'aux/stage2/generator',
                       'aux/stage2/labels', 'aux/stage2/train']
  assert names[8:12] == ['aux/stage3/generator', 'box_labels', 'dense_crf',
                         'stage0/train']
  assert names[-3:] == ['stage3/labels', 'stage3/train', 'stage3/evaluate']
  stages = {s.name: s for s in _pipeline(load_config()).stages}
  # The auxiliary EM does not depend on the deployment's schedule.
  assert 'lpg.schedule' in stages['aux/stage2/generator'].ignores
  assert 'lpg.schedule' not in stages['stage1/labels'].ignores
  assert 'lpg.schedule' in stages['stage0/train'].ignores
  semi = [s.name for s in _pipeline(load_config('semi')).stages]
  assert 'semi_labels' in semi


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
  results = run.train_and_evaluate(load_config('tiny'), str(tmp_path))
  lpg = results['lpg']
  assert lpg['fusion'] == 'overlap_rate' and lpg['schedule'] == 'stagewise'
  assert [row['stage'] for row in lpg['stages']] == [1, 2]
  for row in lpg['stages']:
    assert 0 <= row['pseudo_miou'] <= 100 and 0 <= row['val_miou'] <= 100
    assert row['truncated_images'] == 0
  for name in ('box_fill', 'dense_crf'):
    assert 0 <= lpg['references'][name] <= 100
  assert results['val']['miou'] == lpg['stages'][-1]['val_miou']
  assert len(os.listdir(tmp_path / 'stage2' / 'labels' / 'labels')) == 8
  initialisation = results['training']['aux/stage2/generator'][
      'initialisation']
  assert initialisation['segmenter'].endswith(
      os.path.join('aux', 'stage1', 'train', 'model.npz'))
  # Run again: every stage is complete.
  again = run.train_and_evaluate(load_config('tiny'), str(tmp_path))
  assert {s['status'] for s in again['stages']} == {'skipped'}
  # The fixed schedule reuses the whole auxiliary EM.
  fixed = run.train_and_evaluate(load_config('fixed,tiny'), str(tmp_path))
  reran = {s['name'] for s in fixed['stages'] if s['status'] != 'skipped'}
  assert not any(name.startswith('aux/') for name in reran)
  assert not reran & {'box_labels', 'dense_crf', 'stage0/train'}
  assert fixed['lpg']['stages'][0]['generator'] == 2
  with open(tmp_path / 'results.json') as f:
    assert json.load(f)['lpg']['schedule'] == 'fixed'


def test_semi_loss_uses_ground_truth_only_on_labelled_images():
  # Image 0 is in the labelled share (its semi map is not all 255), image 1
  # is not: its pseudo-mask is used.  Logits favour class 1 everywhere.
  logits = jnp.zeros((2, 1, 1, 2)).at[..., 1].set(np.log(3.0))
  semi = np.full((2, 1, 1), 255, np.uint8)
  semi[0] = 0                                   # ground truth: background
  pseudo = np.ones((2, 1, 1), np.uint8)         # pseudo-mask: class 1
  batch = {objective.SEMI_KEY: jnp.asarray(semi),
           objective.PSEUDO_KEY: jnp.asarray(pseudo)}
  context = LossContext(jnp.asarray(0), jax.random.PRNGKey(0), None)
  loss, metrics = objective.semi_cross_entropy()({'logits': logits}, batch,
                                                 context)
  # p(class 1) = 3/4: CE log 4 on image 0 (truth 0), log(4/3) on image 1.
  np.testing.assert_allclose(loss, (np.log(4.0) + np.log(4.0 / 3.0)) / 2,
                             rtol=1e-5)
  assert float(metrics['labelled_share']) == 0.5
