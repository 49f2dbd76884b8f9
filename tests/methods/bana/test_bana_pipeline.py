"""BANA pipeline: configs, stage-1/3 loss wiring, the three stages end to end,
stage skipping and resume of the label stage."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax import run
from wsss_jax.data.label_png import LabelFolder
from wsss_jax.methods.bana import objective
from wsss_jax.methods.bana import pipeline as bana
from wsss_jax.training.step import LossContext

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))))
HERE = os.path.join(REPO, 'tests')


def load_config(arg):
  return run.load_config_file(os.path.join(REPO, 'configs', 'bana.py'), arg)


def test_variants_set_their_loss_classifier_and_pooling():
  assert load_config('').bana.loss == 'nal'
  assert load_config('ce_only').bana.loss == 'ce_only'
  assert load_config('dot').model.head == 'dot'
  assert load_config('').model.head == 'cosine'
  assert load_config('gap').bana.pooling == 'gap'
  voc = load_config('voc')
  assert voc.model.head == 'cosine' and voc.model.fc6_dilation == 12
  resnet = load_config('voc_resnet,dot')
  assert resnet.model.head == 'aspp_v2' and resnet.model.aspp_dim == 256
  assert resnet.model.aspp_classifier == 'dot'
  with pytest.raises(ValueError, match='at most one'):
    load_config('nal,ce_only')
  with pytest.raises(ValueError, match='at most one'):
    load_config('bogus')


def test_official_code_switches_and_stage1_learning_rates():
  paper = load_config('voc')
  code = load_config('voc,official_code')
  assert tuple(paper.bana.compat.bap_roi_grid) == (1, 1)
  assert paper.bana.compat.u_c_normalisation == 'per_class'
  compat = code.bana.compat
  assert tuple(compat.bap_roi_grid) == (2, 2)
  assert compat.bap_sampling == 'grid_sample_ac_false'
  assert compat.stage1_lr_preset == 'code'
  assert compat.u_c_normalisation == 'per_box'
  assert compat.stage2_map_resolution == 'upsample_features'
  assert compat.nal_sigma_gradient
  stage1_paper = objective.classifier_config(paper, 'bap')
  stage1_code = objective.classifier_config(code, 'bap')
  assert stage1_paper.optim.lr == pytest.approx(1e-4)
  assert stage1_code.optim.lr == pytest.approx(1e-3)
  assert stage1_code.train.num_steps == 8000
  for stage1 in (stage1_paper, stage1_code):
    assert stage1.model.fc6_dilation == 1
    assert stage1.model.head == 'linear' and not stage1.model.head_bias
    assert stage1.optim.schedule == 'step'
    assert stage1.optim.lr_mult.head_weight == 10.0
  # The DeepLab-v2 setting keeps a VGG16 Labeler.
  stage1_resnet = objective.classifier_config(load_config('voc_resnet'), 'bap')
  assert stage1_resnet.model.backbone == 'vgg16_largefov'


def _batch(size=32, num_classes=3):
  rng = np.random.default_rng(0)
  y_crf = rng.integers(0, num_classes, (2, size, size)).astype(np.uint8)
  y_ret = y_crf.copy()
  y_ret[:, :8] = (y_ret[:, :8] + 1) % num_classes
  return {'image': jnp.zeros((2, size, size, 3), jnp.uint8),
          'valid': jnp.ones((2, size, size), bool),
          bana.Y_CRF: jnp.asarray(y_crf), bana.Y_RET: jnp.asarray(y_ret)}


def test_stage3_loss_upsamples_to_the_crop_and_reports_nal_terms():
  options = objective.NoiseAwareOptions.from_config(load_config('').bana)
  rng = np.random.default_rng(1)
  cos = jnp.asarray(rng.uniform(-1, 1, (2, 4, 4, 3)), jnp.float32)
  outputs = {'logits': 20.0 * cos, 'cosines': cos}
  context = LossContext(jnp.asarray(0), jax.random.PRNGKey(0), None)
  loss, metrics = objective.segmentation_loss(options, 10)(
      outputs, _batch(), context)
  assert np.isfinite(float(loss))
  assert {'ce', 'wce', 'reliable_fraction'} <= set(metrics)
  assert 0 < float(metrics['reliable_fraction']) < 1
  # ce_only ignores the disagreement region entirely.
  ce_loss, _ = objective.segmentation_loss(
      objective.NoiseAwareOptions.from_config(load_config('ce_only').bana),
      10)(outputs, _batch(), context)
  assert float(ce_loss) == pytest.approx(float(metrics['ce']), rel=1e-5)


def test_semi_images_train_on_their_ground_truth():
  options = objective.NoiseAwareOptions.from_config(load_config('semi').bana)
  batch = _batch()
  truth = np.full((2, 32, 32), 255, np.uint8)
  truth[0] = 1                           # image 0 carries ground truth
  batch[bana.SEMI_KEY] = jnp.asarray(truth)
  cos = jnp.zeros((2, 4, 4, 3), jnp.float32).at[..., 1].set(0.9)
  outputs = {'logits': 20.0 * cos, 'cosines': cos}
  context = LossContext(jnp.asarray(0), jax.random.PRNGKey(0), None)
  _, metrics = objective.segmentation_loss(options, 10, bana.SEMI_KEY)(
      outputs, batch, context)
  _, plain = objective.segmentation_loss(options, 10)(outputs, _batch(),
                                                      context)
  # Image 0 is all-reliable class 1 now: more agreement than without it.
  assert float(metrics['reliable_fraction']) > float(
      plain['reliable_fraction'])


@pytest.mark.slow
def test_three_stages_end_to_end_skip_and_resume(tmp_path):
  config = load_config('tiny')
  config.bana.gap_label_images = 5       # of the 8 training images
  workdir = str(tmp_path / 'run')
  results = run.train_and_evaluate(config, workdir)
  names = [s['name'] for s in results['stages']]
  assert names == ['classifier', 'labels', 'gap_classifier', 'gap_labels',
                   'train', 'evaluate']
  assert results['training']['classifier']['steps'] == 2
  pseudo = results['bana']['pseudo_labels']
  for pooling in ('bap', 'gap', 'bap_on_gap_images'):
    for key in ('y_crf', 'y_ret', 'agreement'):
      assert 0 <= pseudo[pooling][key] <= 100
  assert pseudo['bap']['images'] == 8
  assert pseudo['gap']['images'] == pseudo['bap_on_gap_images']['images'] == 5
  assert len(LabelFolder(os.path.join(workdir, 'gap_labels', bana.Y_CRF))
             .existing_ids()) == 5
  generation = results['bana']['label_generation']
  assert generation['written'] == config.data.shapes.num_train
  assert np.isfinite(results['val']['miou'])
  assert 'val_miou_without_crf' in results['bana']
  report = open(os.path.join(workdir, 'report.md')).read()
  assert 'Pseudo-labels (BANA' in report and 'unreliable' in report
  assert 'Pseudo-label quality (BANA Table 1)' in report
  assert 'BAP (the GAP images) | 5 |' in report
  assert results['pseudo']['miou'] == pytest.approx(pseudo['bap']['y_crf'])
  # Every label stage is resumable: delete two files, rerun the pipeline
  # with the label stage's marker removed; only those two are rewritten.
  folder = LabelFolder(os.path.join(workdir, 'labels', bana.Y_CRF))
  ids = sorted(folder.existing_ids())[:2]
  before = {i: folder.read(i) for i in ids}
  for i in ids:
    os.remove(folder.path(i))
  os.remove(os.path.join(workdir, 'labels', 'stage.json'))
  again = run.train_and_evaluate(config, workdir)
  assert again['bana']['label_generation']['written'] == 2
  assert again['bana']['label_generation']['skipped'] == (
      config.data.shapes.num_train - 2)
  for i in ids:
    np.testing.assert_array_equal(folder.read(i), before[i])
  assert again['val']['miou'] == pytest.approx(results['val']['miou'])


@pytest.mark.slow
def test_semi_variant_adds_its_label_stage_and_runs(tmp_path):
  config = load_config('semi,tiny')
  config.bana.compare_gap = False
  results = run.train_and_evaluate(config, str(tmp_path))
  names = [s['name'] for s in results['stages']]
  assert names == ['classifier', 'labels', 'semi_labels', 'train', 'evaluate']
  assert np.isfinite(results['val']['miou'])
  assert results['training']['train']['steps'] == 2


@pytest.mark.slow
def test_official_code_switches_run_end_to_end(tmp_path):
  # ... with every CRF (stage 2's, the evaluation's) on the device.
  config = load_config('tiny,official_code')
  config.bana.compare_gap = False
  config.optim.name = 'adam'
  config.crf.backend = 'jax'
  results = run.train_and_evaluate(config, str(tmp_path))
  assert np.isfinite(results['val']['miou'])
  assert results['bana']['label_generation']['crf_workers'] == 0
  assert results['val']['protocol'].get('crf_backend', 'jax') == 'jax'


@pytest.mark.slow
def test_voc_setting_on_real_images_with_random_init(tmp_path):
  config = load_config('voc')
  config.data.update(data_dir=str(tmp_path / 'prepared'), train_split='train')
  config.data.voc.voc_root = os.path.join(HERE, 'data', 'voc_mini')
  config.model.update(width=0.0625, fc_dim=16)
  config.input.update(crop_size=64, batch_size=2, worker_count=0)
  config.train.update(num_steps=1, log_every=1, checkpoint_every=1,
                      eval_every=0)
  config.eval.update(batch_size=2, crf_workers=0, bucket_size=0,
                     scales=(1.0, 0.5))
  config.bana.update(classifier_steps=1, label_batch_size=2)
  config.report.num_examples = 1
  results = run.train_and_evaluate(config, str(tmp_path / 'run'))
  assert results['dataset']['num_classes'] == 21
  assert results['training']['classifier']['steps'] == 1
  assert results['bana']['label_generation']['written'] >= 1
  assert np.isfinite(results['val']['miou'])
