"""PMM's config variants, options, objectives and its pipeline end to end."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from wsss_jax import prediction, run
from wsss_jax.data import schema
from wsss_jax.methods import build_pipeline
from wsss_jax.methods.pmm import generate, objective
from wsss_jax.training.step import LossContext

REPO = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.dirname(os.path.abspath(__file__)))))


def load_config(arg=''):
  return run.load_config_file(os.path.join(REPO, 'configs', 'pmm.py'), arg)


def test_variants_set_table4_rows_and_official_switches():
  assert load_config().pmm.pus_mode == 'clamp'
  assert load_config('pus_pow').pmm.pus_mode == 'pow'
  assert load_config('pus_ignore').pmm.pus_mode == 'ignore'
  assert load_config('pus_none').pmm.pus_mode == 'none'
  assert load_config('pus_none,tiny').train.num_steps == 2
  official = load_config('official_code').pmm
  assert official.pus_switch_scope == 'per_device_batch_all_pixels'
  assert official.multicrop_layout == 'pmm_code'
  assert official.cam_normalisation == 'pmm_code'
  assert official.cvs_zero_below_t and official.pus_ignore_inclusive
  assert official.ppmg_crf_colour_order == 'bgr'
  assert official.rvmin_loss == 'both'
  # The final network is PSPNet; the CAM network has its own section.
  config = load_config()
  assert config.model.head == 'psp'
  assert config.pmm.cam_model.head == 'linear'
  with pytest.raises(ValueError, match='pmm.py'):
    load_config('pus_clip')


def test_paper_presets():
  voc = load_config('voc')
  assert voc.data.name == 'voc' and voc.data.train_split == 'train_aug'
  assert voc.pmm.cam_model.backbone == 'scalenet101'
  assert voc.model.backbone == 'resnet38_psa' and voc.model.head == 'psp'
  assert (voc.model.psp_channels, voc.model.psp_aux_channels) == (512, 256)
  assert voc.pmm.multicrop_train and voc.pmm.second_view_scale == 0.3
  assert voc.pmm.pcm_levels == ('c3', 'c4')
  assert voc.pmm.classifier_dropout == 0.5
  assert load_config().pmm.classifier_dropout == 0.0
  assert (voc.pmm.multicrop_window, voc.pmm.multicrop_stride) == (448, 300)
  assert voc.pmm.multicrop_scales == pytest.approx(
      [0.75 + 0.25 * i for i in range(10)])
  assert (voc.pmm.pus_beta, voc.pmm.pus_kappa, voc.pmm.cycles) == (0.5, 0.5,
                                                                    1)
  assert (voc.optim.name, voc.optim.lr, voc.train.num_steps,
          voc.input.batch_size, voc.input.crop_size) == ('sgd', 0.005, 20000,
                                                         16, 512)
  assert (voc.eval.window_size, voc.eval.window_stride) == (512, 480)
  assert len(voc.eval.scales) == 6 and voc.eval.flip and voc.eval.crf
  assert voc.pmm.relabel.scales == voc.eval.scales and voc.pmm.relabel.crf
  assert (voc.pmm.relabel.window_size, voc.pmm.relabel.window_stride) == (
      512, 480)
  # The multi-crop stage: 20 epochs of 10,582 images at batch 16.
  assert voc.pmm.multicrop_steps == 10582 // 16 * 20
  coco = load_config('coco')
  assert coco.data.name == 'coco' and coco.data.coco.train_images == (
      'train2014')
  assert (coco.pmm.pus_beta, coco.pmm.cycles) == (0.8, 0)
  assert (coco.input.batch_size, coco.optim.lr, coco.train.num_steps) == (
      64, 0.02, 40000)
  code = load_config('coco,official_code')
  assert (code.input.batch_size, code.optim.lr) == (32, 0.01)
  assert code.pmm.cyclic_checkpoint == 'best_val'
  for config in (voc, coco):
    objective.PMMOptions.from_config(config.pmm)
    stages = {s.name: s for s in _pipeline(config).stages}
    assert 'classify_multicrop' in stages


def test_best_val_relabels_with_the_best_validation():
  config = load_config('official_code')
  assert config.pmm.cyclic_checkpoint == 'best_val'
  assert config.train.eval_every == config.train.num_steps // 10
  stages = {s.name: s for s in _pipeline(config).stages}
  assert 'best_model.npz' in stages['round1/fsss'].outputs
  # The validations choose an output: their schedule reruns the stage.
  assert 'train.eval_every' not in stages['round1/fsss'].ignores
  assert 'eval' not in stages['round1/fsss'].ignores
  # The last round feeds no other.
  assert 'best_model.npz' not in stages['round2/fsss'].outputs
  config.train.eval_every = 0
  with pytest.raises(ValueError, match='train.eval_every'):
    _pipeline(config)
  config.pmm.cycles = 0            # nothing to relabel: no selection
  _pipeline(config)


def test_options_name_the_bad_field():
  config = load_config()
  config.pmm.pus_mode = 'clip'
  with pytest.raises(ValueError, match='pmm.pus_mode'):
    objective.PMMOptions.from_config(config.pmm)
  config = load_config()
  config.pmm.multicrop_scales = (1.0, -0.5)
  with pytest.raises(ValueError, match='pmm.multicrop_scales'):
    objective.PMMOptions.from_config(config.pmm)


def test_segmentation_loss_pus_on_both_heads_and_finite_on_all_ignore():
  options = objective.PMMOptions.from_config(load_config().pmm)
  logits = jnp.zeros((2, 2, 2, 3))
  labels = np.zeros((2, 4, 4), np.uint8)
  labels[1] = schema.IGNORE_LABEL             # an all-ignore crop
  batch = {objective.PSEUDO_KEY: jnp.asarray(labels)}
  context = LossContext(jnp.asarray(0), jax.random.PRNGKey(0), None)

  def loss_of(scale, use_pus):
    outputs = {'logits': logits * scale, 'aux_logits': logits * scale}
    return objective.segmentation_loss(options, use_pus=use_pus)(
        outputs, batch, context)

  # Uniform logits over 3 classes: CE = log 3 = 1.099 > beta = 0.5, so PUS
  # stays off and both heads give log 3: total (1 + 0.4) log 3.
  loss, metrics = loss_of(1.0, True)
  np.testing.assert_allclose(loss, 1.4 * np.log(3.0), rtol=1e-5)
  assert float(metrics['decode/active']) == 0.0
  # With PUS off (the cyclic round) the same value.
  np.testing.assert_allclose(loss_of(1.0, False)[0], loss, rtol=1e-6)
  grads = jax.grad(lambda s: loss_of(s, True)[0])(1.0)
  assert np.isfinite(grads)


def test_cam_sweep_picks_the_best_threshold():
  # Two thresholds; a 2-class problem (background, class 1); the second
  # threshold gets every pixel right.
  counts = {'cam/0/0/1': 5, 'cam/0/1/1': 5,
            'cam/1/0/0': 5, 'cam/1/1/1': 5}
  sweep = generate.cam_sweep(counts, (0.05, 0.10), 2)
  assert sweep['threshold'] == 0.10
  assert sweep['miou'] == pytest.approx(100.0)
  # threshold 0.05: bg IoU 0/5, class 1 IoU 5/10 -> 25 %.
  assert sweep['curve'][0]['miou'] == pytest.approx(25.0)


def test_cam_counts_use_the_present_classes_only():
  cam = np.zeros((1, 2, 2), np.float32)
  cam[0, 0] = [0.9, 0.95]      # pixel 0: class 2 stronger but absent
  cam[0, 1] = [0.01, 0.0]      # pixel 1: below every threshold
  mask = np.array([[1, 0]], np.uint8)
  counts = generate._cam_counts(cam, np.array([True, False]), mask,
                                (0.05,))
  assert counts == {'cam/0/1/1': 1, 'cam/0/0/0': 1}


def test_stage_names_follow_the_cycles():
  config = load_config('tiny')
  names = [s.name for s in _pipeline(config).stages]
  assert names == ['classify', 'base_mask', 'classify_multicrop',
                   'pseudo_masks', 'round1/fsss', 'round1/evaluate',
                   'round2/relabel', 'round2/fsss', 'round2/evaluate']
  config.pmm.cycles = 0
  config.pmm.multicrop_train = False
  names = [s.name for s in _pipeline(config).stages]
  assert names == ['classify', 'pseudo_masks', 'round1/fsss',
                   'round1/evaluate']


def test_label_stages_do_not_rerun_for_a_pus_variant():
  """Table 4's variants share every stage before the segmenter."""
  stages = {s.name: s for s in _pipeline(load_config('tiny')).stages}
  for name in ('classify', 'base_mask', 'classify_multicrop',
               'pseudo_masks'):
    for field in ('pmm.pus_mode', 'variant', 'model', 'pmm.cycles'):
      assert any(field == f or field.startswith(f + '.')
                 for f in stages[name].ignores), (name, field)
  assert 'pmm.pus_mode' not in stages['round1/fsss'].ignores
  # Table 5: a different cycle count reuses the rounds it shares.
  assert 'pmm.cycles' in stages['round1/fsss'].ignores
  assert 'pmm.relabel' in stages['round1/evaluate'].ignores
  assert 'pmm.relabel' not in stages['round2/relabel'].ignores


def _pipeline(config):
  return build_pipeline('pmm', _FakeRuntime(config))


class _FakeRuntime:
  """Enough of a Runtime to build the stage list (no dataset is read)."""

  def __init__(self, config):
    self.config = config
    self.num_classes = 7
    self.compute_dtype = jnp.float32
    self.normalization = 'torchvision'
    self.pad_color = (0, 0, 0)

  def with_config(self, config):
    return _FakeRuntime(config)


@pytest.mark.slow
def test_tiny_run_end_to_end(tmp_path):
  results = run.train_and_evaluate(load_config('tiny'), str(tmp_path))
  assert [s['name'] for s in results['stages']] == [
      'classify', 'base_mask', 'classify_multicrop', 'pseudo_masks',
      'round1/fsss', 'round1/evaluate', 'round2/relabel', 'round2/fsss',
      'round2/evaluate']
  pmm = results['pmm']
  assert 0 <= pmm['cam_miou'] <= 100
  assert pmm['cam_threshold'] in load_config('tiny').pmm.cam_thresholds
  assert 0 <= pmm['cam_empty_pct'] <= 100
  assert set(pmm['pseudo_masks']) >= {'crf', 'crf_cvs', 'ppmg_no_cvs',
                                      'ppmg'}
  for name in ('crf', 'crf_cvs', 'ppmg_no_cvs', 'ppmg'):
    assert 0 <= pmm['pseudo_masks'][name] <= 100
  assert [row['round'] for row in pmm['rounds']] == [1, 2]
  assert pmm['rounds'][0]['pus'] and not pmm['rounds'][1]['pus']
  for row in pmm['rounds']:
    assert 0 <= row['val_miou'] <= 100
    assert 0 <= row['val_miou_without_crf'] <= 100
  assert results['val']['miou'] == pmm['rounds'][-1]['val_miou']
  # PPMG labels every training image, with no ignore label.
  folder = tmp_path / 'pseudo_masks' / 'ppmg'
  assert len(os.listdir(folder)) == 8
  for name in os.listdir(folder):
    assert np.asarray(Image.open(folder / name)).max() < 255
  # The segmenter of round 2 starts from the initial weights, not round 1's.
  assert results['training']['round2/fsss']['initialisation']['init'] == (
      'builtin:shapes_pretrain')
  report = (tmp_path / 'report.md').read_text()
  assert '## PMM' in report
  for column in ('CAM', 'CVS-CAM', 'CRF-masks', 'PPMG', 'truth'):
    assert (tmp_path / 'pseudo_masks' / 'figures' /
            f'pmm_shapes_train_000000_{column}.png').exists()
  # predict loads the final PSPNet.
  _, network, _ = prediction.load_run(str(tmp_path), None)
  assert network.stage == 'round2/fsss'
  # A PUS variant reuses every stage before the segmenter.
  config = load_config('pus_none,tiny')
  again = run.train_and_evaluate(config, str(tmp_path))
  reran = {s['name'] for s in again['stages'] if s['status'] != 'skipped'}
  assert 'pseudo_masks' not in reran and 'classify' not in reran
  assert 'round1/fsss' in reran
  # The official best-val selection: round 2 learns from the labels of
  # round 1's best periodic validation, recorded with its protocol.
  config = load_config('tiny')
  config.pmm.cyclic_checkpoint = 'best_val'
  config.train.eval_every = 1
  again = run.train_and_evaluate(config, str(tmp_path))
  reran = {s['name'] for s in again['stages'] if s['status'] != 'skipped'}
  assert {'round1/fsss', 'round2/relabel'} <= reran
  assert 'pseudo_masks' not in reran
  selected = again['pmm']['rounds'][0]['selected_checkpoint']
  assert selected['step'] in (1, 2) and selected['split'] == 'val'
  assert selected['protocol']['crf'] is True
  assert again['pmm']['cyclic_checkpoint'] == 'best_val'
  assert (tmp_path / 'round1' / 'fsss' / 'best_model.npz').exists()
