"""Full-image inference: multi-scale/flip fusion, buckets, CRF evaluation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax import defaults
from wsss_jax.data import registry
from wsss_jax.evaluation import inference
from wsss_jax.training import mesh as mesh_lib


class ColourModel(nn.Module):
  """Logits = the normalised RGB values, 2x2-average-pooled (stride 2).

  Non-overlapping pooling of an even-sized image commutes with a horizontal
  flip, so the model is flip-equivariant.
  """
  num_classes: int = 3

  @nn.compact
  def __call__(self, images, train=False):
    self.param('unused', nn.initializers.zeros, (1,))
    pooled = nn.avg_pool(images, (2, 2), strides=(2, 2))
    return {'logits': pooled[..., :self.num_classes]}


class ConstantModel(nn.Module):
  """Predicts class `label` everywhere."""
  label: int
  num_classes: int

  @nn.compact
  def __call__(self, images, train=False):
    self.param('unused', nn.initializers.zeros, (1,))
    b, h, w, _ = images.shape
    logits = jax.nn.one_hot(jnp.full((b, (h + 7) // 8, (w + 7) // 8),
                                     self.label), self.num_classes) * 10.0
    return {'logits': logits}


def _variables(model, size=16):
  return model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))


def test_flip_fusion_of_a_mirror_symmetric_model_is_exact():
  # The colour model is equivariant to flips: flipping the input and then the
  # logits back gives the same logits, so fused probabilities equal the
  # single pass.
  model = ColourModel()
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (2, 16, 16, 3)),
                       jnp.uint8)
  single = inference.make_predictor(model, 'imagenet', output='probs')
  flipped = inference.make_predictor(model, 'imagenet', flip=True,
                                     output='probs')
  variables = _variables(model)
  np.testing.assert_allclose(single(variables, images),
                             flipped(variables, images), atol=1e-5)


def test_fusion_modes_hand_computed():
  model = ColourModel()
  variables = _variables(model)
  images = jnp.full((1, 8, 8, 3), 128, jnp.uint8)   # constant image
  for fusion in inference.FUSIONS:
    probs = inference.make_predictor(model, 'imagenet', scales=(0.5, 1.0),
                                     flip=True, fusion=fusion,
                                     output='probs')(variables, images)
    # A constant image gives the same logits at every scale and flip, so
    # every fusion equals softmax of the normalised colour.
    x = (128 - np.asarray([0.485, 0.456, 0.406]) * 255) / (
        np.asarray([0.229, 0.224, 0.225]) * 255)
    expected = np.exp(x) / np.exp(x).sum()
    np.testing.assert_allclose(probs[0, 3, 3], expected, rtol=1e-5)


def test_labels_output_is_argmax_of_probs():
  model = ColourModel()
  variables = _variables(model)
  images = jnp.asarray(np.random.default_rng(1).integers(0, 255, (1, 16, 16, 3)),
                       jnp.uint8)
  probs = inference.make_predictor(model, 'imagenet', output='probs')(
      variables, images)
  labels = inference.make_predictor(model, 'imagenet')(variables, images)
  np.testing.assert_array_equal(labels, np.argmax(probs, -1))
  assert labels.dtype == jnp.uint8


def test_bad_fusion_and_scales_are_rejected():
  with pytest.raises(ValueError, match='fusion'):
    inference.make_predictor(ColourModel(), 'imagenet', fusion='median')
  with pytest.raises(ValueError, match='scales'):
    inference.make_predictor(ColourModel(), 'imagenet', scales=(0.0,))


def _tiny_dataset():
  config = defaults.shapes_data()
  config.shapes.update(image_size=32, num_train=8, num_val=5)
  return registry.open_dataset(config)


def test_bucket_too_small_names_an_image():
  dataset = _tiny_dataset()
  config = defaults.evaluation()
  config.bucket_size = 24
  with pytest.raises(ValueError, match='shapes_val_'):
    inference.bucket_size_for(config, dataset.index('val'))
  config.bucket_size = 0
  assert inference.bucket_size_for(config, dataset.index('val')) == 32


@pytest.mark.parametrize('crf', [False, True])
def test_evaluator_scores_a_constant_prediction_exactly(crf, tmp_path):
  dataset = _tiny_dataset()
  config = defaults.evaluation()
  config.update(batch_size=2, crf=crf, crf_workers=0)   # 5 images: padding
  model = ConstantModel(label=0, num_classes=dataset.num_classes)
  evaluator = inference.Evaluator(model, dataset, 'val', config, 'imagenet',
                                  mesh_lib.make_mesh())
  scores = evaluator(_variables(model, 32), out_dir=str(tmp_path))
  assert scores['num_images'] == 5
  # All background: IoU(background) = background pixels / labelled pixels,
  # every other present class has IoU 0.
  masks = [dataset.source('val')[i]['mask'] for i in range(5)]
  labelled = sum(int((m != 255).sum()) for m in masks)
  background = sum(int((m == 0).sum()) for m in masks)
  assert scores['per_class_iou']['background'] == pytest.approx(
      100 * background / labelled)
  present = {c for m in masks for c in np.unique(m) if c not in (0, 255)}
  expected_miou = 100 * background / labelled / (1 + len(present))
  assert scores['miou'] == pytest.approx(expected_miou)
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      f'shapes_val_{i:06d}.png' for i in range(5)]


def test_crf_evaluation_also_scores_its_input_like_a_plain_evaluation():
  dataset = _tiny_dataset()
  model = ColourModel()
  variables = _variables(model, 32)
  scores = {}
  for crf in (False, True):
    config = defaults.evaluation()
    config.update(batch_size=2, crf=crf, crf_workers=0, scales=(0.75, 1.0),
                  flip=True)
    scores[crf] = inference.Evaluator(
        model, dataset, 'val', config, 'imagenet', mesh_lib.make_mesh())(
            variables, progress=False)
  assert 'without_crf' not in scores[False]
  plain = scores[True]['without_crf']
  assert plain['miou'] == pytest.approx(scores[False]['miou'], abs=1e-9)
  names = sorted(plain['per_class_iou'])
  np.testing.assert_allclose(
      [plain['per_class_iou'][n] for n in names],
      [scores[False]['per_class_iou'][n] for n in names], atol=1e-9)
  # ... and the CRF's own scores are a different measurement.
  assert scores[True]['miou'] != pytest.approx(plain['miou'], abs=1e-9)


def test_the_jax_crf_backend_evaluates_like_pydensecrf():
  """`config.crf.backend='jax'`: the evaluator runs the device CRF in
  process (worker count ignored) and scores what pydensecrf scores."""
  dataset = _tiny_dataset()
  model = ColourModel()
  variables = _variables(model, 32)
  config = defaults.evaluation()
  config.update(batch_size=2, crf=True, crf_workers=2)
  scores = {}
  for backend in ('pydensecrf', 'jax'):
    evaluator = inference.Evaluator(model, dataset, 'val', config,
                                    'imagenet', mesh_lib.make_mesh(),
                                    crf_backend=backend)
    scores[backend] = evaluator(variables, progress=False)
    assert evaluator.describe()['crf_backend'] == backend
  assert scores['jax']['miou'] == pytest.approx(scores['pydensecrf']['miou'],
                                                abs=0.5)
  assert (scores['jax']['without_crf']['miou']
          == scores['pydensecrf']['without_crf']['miou'])
  from wsss_jax.crf import backend as crf_backend  # pylint: disable=g-import-not-at-top
  assert crf_backend.host_workers('jax', 2) == 0
  assert crf_backend.host_workers('pydensecrf', 2) == 2
  with pytest.raises(ValueError, match='Unknown CRF backend'):
    crf_backend.host_workers('gpu', 2)


# ---------------------------------------------------------------------------
# Sliding-window inference (mmseg's 'slide' mode)
# ---------------------------------------------------------------------------
class PixelModel(nn.Module):
  """Logits = a fixed linear map of each pixel's colour, full resolution."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, images, train=False):
    self.param('unused', nn.initializers.zeros, (1,))
    mix = jnp.asarray([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [-0.7, 0.1, 0.9]])
    return {'logits': images @ mix[:, :self.num_classes]}


class MeanColourModel(nn.Module):
  """Logits = the mean colour of the whole input, at every pixel (half
  resolution, so the window's logits are resized back)."""

  @nn.compact
  def __call__(self, images, train=False):
    self.param('unused', nn.initializers.zeros, (1,))
    b, h, w, c = images.shape
    mean = images.mean(axis=(1, 2), keepdims=True)
    return {'logits': jnp.broadcast_to(mean, (b, (h + 1) // 2, (w + 1) // 2,
                                              c))}


def test_window_starts_hand_computed():
  assert inference.window_starts(10, 4, 3) == [0, 3, 6]   # last: 6..10
  assert inference.window_starts(5, 8, 3) == [0]          # one window 0..5
  assert inference.window_starts(8, 8, 4) == [0]
  assert inference.window_starts(9, 8, 4) == [0, 1]       # last: 1..9
  assert inference.window_starts(13, 6, 6) == [0, 6, 7]
  assert inference.window_starts(12, 4, 4) == [0, 4, 8]   # no overlap


def test_sliding_windows_of_a_per_pixel_model_equal_the_whole_image():
  # 13 px, windows 6 every 4 (0..6, 4..10, 7..13): overlaps and a last
  # window moved back; at scale 0.75 the side is 10 (0..6, 4..10).
  model = PixelModel()
  variables = _variables(model)
  images = jnp.asarray(np.random.default_rng(2).integers(
      0, 255, (2, 13, 13, 3)), jnp.uint8)
  for fusion in ('mean_probs', 'max_logits'):
    kwargs = dict(scales=(0.75, 1.0), flip=True, fusion=fusion,
                  output='probs')
    whole = inference.make_predictor(model, 'imagenet', **kwargs)
    slide = inference.make_predictor(model, 'imagenet', window_size=6,
                                     window_stride=4, **kwargs)
    np.testing.assert_allclose(slide(variables, images),
                               whole(variables, images), atol=1e-5)


def test_sliding_window_logits_average_the_windows_covering_a_pixel():
  # 10 px, windows 6 every 4: rows and columns 0..6 and 4..10, four windows.
  model = MeanColourModel()
  variables = _variables(model)
  image = np.random.default_rng(3).integers(0, 255, (1, 10, 10, 3))
  probs = inference.make_predictor(
      model, 'imagenet', fusion='mean_logits', output='probs', window_size=6,
      window_stride=4)(variables, jnp.asarray(image, jnp.uint8))
  x = (image[0] / 255.0 - np.asarray([0.485, 0.456, 0.406])) / np.asarray(
      [0.229, 0.224, 0.225])

  def softmax(logits):
    return np.exp(logits) / np.exp(logits).sum()

  # Pixel (5, 0): rows 0..6 and 4..10, columns 0..6 only: two windows.
  two = (x[0:6, 0:6].mean((0, 1)) + x[4:10, 0:6].mean((0, 1))) / 2
  np.testing.assert_allclose(probs[0, 5, 0], softmax(two), rtol=1e-5)
  # Pixel (1, 8): one window (rows 0..6, columns 4..10).
  np.testing.assert_allclose(probs[0, 1, 8],
                             softmax(x[0:6, 4:10].mean((0, 1))), rtol=1e-5)
  # Pixel (5, 5): all four windows.
  four = np.mean([x[y:y + 6, c:c + 6].mean((0, 1)) for y in (0, 4)
                  for c in (0, 4)], axis=0)
  np.testing.assert_allclose(probs[0, 5, 5], softmax(four), rtol=1e-5)


def test_windows_run_as_one_batched_call():
  calls = []

  class Recording(PixelModel):

    def __call__(self, images, train=False):
      calls.append(images.shape)
      return super().__call__(images, train)

  model = Recording()
  variables = _variables(model)
  calls.clear()
  inference.make_predictor(model, 'imagenet', window_size=6, window_stride=4)(
      variables, jnp.zeros((2, 13, 13, 3), jnp.uint8))
  assert calls == [(2 * 9, 6, 6, 3)]
  calls.clear()   # a side shorter than the window: one window of that side
  inference.make_predictor(model, 'imagenet', window_size=16,
                           window_stride=8)(
                               variables, jnp.zeros((2, 13, 13, 3), jnp.uint8))
  assert calls == [(2, 13, 13, 3)]


def test_window_size_zero_is_the_whole_image_path():
  model = ColourModel()
  variables = _variables(model)
  images = jnp.asarray(np.random.default_rng(4).integers(
      0, 255, (2, 16, 16, 3)), jnp.uint8)
  kwargs = dict(scales=(0.75, 1.0), flip=True, output='probs')
  old = inference.make_predictor(model, 'imagenet', **kwargs)
  new = inference.make_predictor(model, 'imagenet', window_size=0,
                                 window_stride=0, **kwargs)
  assert str(jax.make_jaxpr(old)(variables, images)) == str(
      jax.make_jaxpr(new)(variables, images))
  np.testing.assert_array_equal(old(variables, images), new(variables, images))


def test_bad_windows_are_rejected():
  with pytest.raises(ValueError, match='eval.window_size'):
    inference.make_predictor(ColourModel(), 'imagenet', window_size=-1)
  for stride in (0, -2, 9):
    with pytest.raises(ValueError, match='eval.window_stride'):
      inference.make_predictor(ColourModel(), 'imagenet', window_size=8,
                               window_stride=stride)
  from wsss_jax import config_checks  # pylint: disable=g-import-not-at-top
  config = defaults.base_config('supervised', method='supervised')
  config_checks.validate(config)
  config.eval.update(window_size=-4)
  with pytest.raises(config_checks.ConfigError, match='eval.window_size'):
    config_checks.validate(config)
  config.eval.update(window_size=8, window_stride=12)
  with pytest.raises(config_checks.ConfigError, match='eval.window_stride'):
    config_checks.validate(config)


def test_evaluator_slides_windows_from_the_eval_config():
  dataset = _tiny_dataset()
  model = PixelModel(num_classes=dataset.num_classes)
  variables = _variables(model, 32)
  config = defaults.evaluation()
  config.update(batch_size=2)
  whole = inference.Evaluator(model, dataset, 'val', config, 'imagenet',
                              mesh_lib.make_mesh())
  assert 'window_size' not in whole.describe()
  config.update(window_size=12, window_stride=8)
  slide = inference.Evaluator(model, dataset, 'val', config, 'imagenet',
                              mesh_lib.make_mesh())
  assert slide.describe()['window_size'] == 12
  assert slide.describe()['window_stride'] == 8
  # A per-pixel model scores the same either way.
  assert slide(variables, progress=False)['miou'] == pytest.approx(
      whole(variables, progress=False)['miou'], abs=1e-9)
  # A config saved before the fields existed evaluates the whole image.
  del config['window_size'], config['window_stride']
  assert 'window_size' not in inference.Evaluator(
      model, dataset, 'val', config, 'imagenet',
      mesh_lib.make_mesh()).describe()
