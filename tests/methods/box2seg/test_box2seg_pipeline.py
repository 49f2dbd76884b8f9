"""Box2Seg pipeline: grid targets, variants, the two phases, end to end."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax import pretraining, run, segmentation
from wsss_jax.methods.box2seg import model as box2seg_model
from wsss_jax.methods.box2seg import objective as box2seg
from wsss_jax.models import weights
from wsss_jax.runtime import make_runtime
from wsss_jax.training.step import LossContext

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))))
HERE = os.path.join(REPO, 'tests')


def load_config(arg):
  return run.load_config_file(
      os.path.join(REPO, 'configs', 'box2seg.py'), arg)


def test_box_rasterisation_on_the_output_grid():
  # 16x16 input, 4x4 grid (stride 4): cell centres at 2, 6, 10, 14.
  boxes = jnp.asarray([[[0, 0, 8, 8],        # class 1: cells rows/cols 0-1
                        [4, 4, 10, 10],      # class 2, smaller: cell (1, 1)
                        [13, 1, 14, 2],      # class 3: no centre inside
                        [0, 0, 16, 16]]],    # padding row (label -1)
                      jnp.float32)
  labels = jnp.asarray([[1, 2, 3, -1]])
  grid = np.asarray(box2seg.box_labels_on_grid(boxes, labels, (4, 4),
                                               (16, 16)))[0]
  expected = np.asarray([[1, 1, 0, 3],
                         [1, 2, 0, 0],
                         [0, 0, 0, 0],
                         [0, 0, 0, 0]])
  np.testing.assert_array_equal(grid, expected)


def test_equal_area_overlap_goes_to_the_later_box():
  boxes = jnp.asarray([[[0, 0, 8, 8], [4, 4, 12, 12]]], jnp.float32)
  grid = np.asarray(box2seg.box_labels_on_grid(
      boxes, jnp.asarray([[1, 2]]), (4, 4), (16, 16)))[0]
  assert grid[1, 1] == 2 and grid[0, 0] == 1 and grid[2, 2] == 2


def _fake(num_classes=4, size=16, grid=4, batch=2):
  rng = np.random.default_rng(0)
  outputs = {
      'logits': jnp.asarray(rng.normal(size=(batch, grid, grid, num_classes)),
                            jnp.float32),
      'attention_logits': jnp.asarray(
          rng.normal(size=(batch, grid, grid, num_classes - 1)), jnp.float32),
      'embeddings': jnp.asarray(rng.normal(size=(batch, grid, grid, 3)),
                                jnp.float32)}
  boxes = np.zeros((batch, 3, 4), np.float32)
  boxes[:, 0] = (0, 0, 10, 10)
  labels = np.full((batch, 3), -1, np.int32)
  labels[:, 0] = 1
  mask = np.zeros((batch, size, size), np.uint8)
  mask[:, 2:8, 2:8] = 1
  batch_dict = {'image': jnp.zeros((batch, size, size, 3), jnp.uint8),
                'valid': jnp.ones((batch, size, size), bool),
                'boxes': jnp.asarray(boxes), 'box_labels': jnp.asarray(labels),
                'grabcut': jnp.asarray(mask), 'mask': jnp.asarray(mask)}
  return outputs, batch_dict


@pytest.mark.parametrize('variant, terms', [
    ('box', {'box'}),
    ('grabcut', {'grabcut'}),
    ('affinity', {'grabcut', 'affinity'}),
    ('aw_box', {'grabcut', 'aw', 'alpha'}),
    ('aw_fr', {'grabcut', 'aw', 'alpha'}),
    ('box2seg', {'grabcut', 'aw', 'alpha', 'affinity'}),
])
def test_each_table3_variant_has_exactly_its_terms(variant, terms):
  cfg = load_config(variant).box2seg
  outputs, batch = _fake()
  loss_fn = box2seg.train_loss(box2seg.Box2SegLossOptions.from_config(cfg), 4)
  # Past the λ_AW warm-up every term carries its full weight.
  step = jnp.asarray(cfg.aw_warmup_steps, jnp.int32)
  total, metrics = loss_fn(outputs, batch, LossContext(
      step, jax.random.PRNGKey(0), None))
  assert set(metrics) - {'attention_fill'} == terms
  weights = cfg.weights
  expected = sum(float(metrics[k]) * {'box': weights.box,
                                      'grabcut': weights.grabcut,
                                      'aw': weights.aw,
                                      'alpha': weights.alpha,
                                      'affinity': weights.affinity}[k]
                 for k in terms)
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  assert np.isfinite(float(total))
  if variant == 'aw_box':
    assert cfg.alpha_regularizer == 'bbox'
  if 'aw' in terms and cfg.aw_warmup_steps:
    # At step 0 the warm-up removes λ_AW·L_AW and nothing else.
    total0, m0 = loss_fn(outputs, batch, LossContext(
        jnp.zeros((), jnp.int32), jax.random.PRNGKey(0), None))
    np.testing.assert_allclose(
        float(total0), expected - weights.aw * float(m0['aw']), rtol=1e-5)


def test_pretrain_loss_is_the_affinity_on_grabcut_targets():
  options = box2seg.Box2SegLossOptions.from_config(load_config('').box2seg)
  outputs, batch = _fake()
  loss, metrics = box2seg.pretrain_loss(options, 4)(
      outputs, batch, LossContext(0, jax.random.PRNGKey(0), None))
  assert set(metrics) == {'affinity'} and float(loss) > 0
  # The y and α branches get no gradient in phase 1.
  grads = jax.grad(lambda o: box2seg.pretrain_loss(options, 4)(
      o, batch, LossContext(0, jax.random.PRNGKey(0), None))[0])(outputs)
  assert float(jnp.abs(grads['logits']).max()) == 0.0
  assert float(jnp.abs(grads['attention_logits']).max()) == 0.0
  assert float(jnp.abs(grads['embeddings']).max()) > 0.0


def test_sample_count_follows_the_pair_fraction():
  cfg = load_config('').box2seg
  # n_s = ceil(sqrt(0.1) * m): ~10 % of the m^2 pairs.
  assert box2seg.num_affinity_samples(cfg.affinity_pair_fraction, 576) == 183
  assert 183 ** 2 / 576 ** 2 == pytest.approx(0.1, abs=0.002)


@pytest.mark.slow
def test_two_phases_switch_and_freeze_the_right_branches(tmp_path):
  config = load_config('tiny')
  results = run.train_and_evaluate(config, str(tmp_path))
  assert [s['name'] for s in results['stages']] == [
      'box_labels', 'grabcut', 'pretrain', 'train', 'evaluate']
  assert results['training']['pretrain']['steps'] == 2
  assert results['training']['train']['steps'] == 2
  pretrained = str(tmp_path / 'pretrain' / segmentation.MODEL_FILE)
  assert results['training']['train']['initialisation']['init'] == (
      os.path.abspath(pretrained))
  # Phase 1 trains the encoder, decoder and embeddings only.
  rt = make_runtime(config, builtin_weights=pretraining.builtin_weights)
  model = box2seg_model.build_box2seg_model(config, rt.num_classes)
  initial, _ = segmentation.initial_variables(rt, model,
                                              jax.random.PRNGKey(config.seed))
  initial = weights.flatten_variables(initial)
  after = weights.read_weights(pretrained)
  for key in after:
    changed = not np.array_equal(np.asarray(initial[key]), after[key])
    if key.startswith(('params/head/', 'params/attention_head/')):
      assert not changed, key
  assert any(not np.array_equal(np.asarray(initial[k]), after[k])
             for k in after if k.startswith('params/embedding_head/'))
  assert 0 < results['box2seg']['box_miou'] < 100
  assert 0 < results['box2seg']['grabcut_miou'] <= 100
  assert results['pseudo']['miou'] == results['box2seg']['grabcut_miou']
  report = open(tmp_path / 'report.md').read()
  assert 'Attention' in report


@pytest.mark.slow
@pytest.mark.parametrize('variant', ['semi', 'supervised_awl'])
def test_table4_and_table5_variants_run(variant, tmp_path):
  results = run.train_and_evaluate(load_config(f'{variant},tiny'),
                                   str(tmp_path))
  names = [s['name'] for s in results['stages']]
  if variant == 'semi':
    assert names[-3:] == ['semi_labels', 'finetune', 'evaluate']
    assert results['training']['finetune']['initialisation']['init'].endswith(
        os.path.join('train', segmentation.MODEL_FILE))
  else:
    assert 'grabcut' not in names and results['pseudo'] is None
  assert np.isfinite(results['val']['miou'])


@pytest.mark.slow
def test_voc_variant_on_real_images_with_random_init(tmp_path):
  config = load_config('voc')
  config.data.update(data_dir=str(tmp_path / 'prepared'), train_split='train')
  config.data.voc.voc_root = os.path.join(HERE, 'data', 'voc_mini')
  config.model.update(width=0.0625, resnet_blocks=(1, 1, 1, 1))
  config.input.update(crop_size=64, batch_size=2, worker_count=0)
  config.train.update(num_steps=2, log_every=1, checkpoint_every=1,
                      eval_every=0)
  config.eval.update(batch_size=2, crf_workers=0, bucket_size=0)
  config.box2seg.update(pretrain_steps=1, decoder_channels=8,
                        branch_channels=8, embed_dim=4)
  config.report.num_examples = 1
  results = run.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['dataset']['num_classes'] == 21
  assert results['backbone']['name'] == 'resnet101_deeplab'
  assert results['val']['num_images'] == 3
  assert results['backbone']['initialisation']['init'] == 'scratch'


def test_aw_warmup_ramp():
  assert float(box2seg.aw_ramp(jnp.asarray(0), 150)) == 0.0
  assert float(box2seg.aw_ramp(jnp.asarray(75), 150)) == 0.5
  assert float(box2seg.aw_ramp(jnp.asarray(300), 150)) == 1.0
  assert float(box2seg.aw_ramp(jnp.asarray(0), 0)) == 1.0
