"""Tests of wsss_jax.pseudo.engine (the label-generation engine) and of
BANA's present-class CRF worker (`methods.bana.generate.crf_labels`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder
from wsss_jax.host import crf as crf_lib
from wsss_jax.host import pool
from wsss_jax.methods.bana import generate as bana_generate
from wsss_jax.pseudo import engine
from wsss_jax.pseudo import regions

SIZES = [(8, 10), (6, 7), (8, 10), (8, 10), (6, 7)]
IDS = [f'img{i}' for i in range(len(SIZES))]


def _source():
  rng = np.random.default_rng(0)
  examples = []
  for i, (h, w) in enumerate(SIZES):
    count = 1 + i % 3
    boxes = np.array([[j, 1, w - j, h - 1] for j in range(count)], np.int32)
    examples.append({
        schema.IMAGE: rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        schema.BOXES: boxes,
        schema.BOX_LABELS: np.arange(1, count + 1, dtype=np.int32),
        schema.IMAGE_ID: IDS[i]})
  return examples


def _passes(traces):
  """A fake first and second pass counting their traces (compilations)."""

  @jax.jit
  def first(batch):
    traces['first'] += 1
    image = batch[schema.IMAGE].astype(jnp.int32)
    boxes = jnp.sum(batch[schema.BOX_LABELS] >= 1, axis=1)
    return {'score': image[..., 0] + boxes[:, None, None],
            'many_boxes': boxes >= 2}

  @jax.jit
  def second(batch, values):
    traces['second'] += 1
    return {'shifted': values.astype(jnp.int32) + batch[schema.IMAGE][..., 1]
            % 2}

  return first, second


def _threshold(item):
  """Host function: a picklable per-image label map plus counts."""
  label_map = (item['score'] > 128).astype(np.uint8)
  return label_map, {'foreground': int(label_map.sum())}


def _maps(value, second):
  return {'a': value, 'b': second['shifted'].astype(np.uint8)}


def _expected(example):
  score = example[schema.IMAGE][..., 0].astype(np.int32) + len(
      example[schema.BOX_LABELS])
  a = (score > 128).astype(np.uint8)
  return a, (a + example[schema.IMAGE][..., 1] % 2).astype(np.uint8)


def _job(passes, batch_size, box_rows=3, host_fn=_threshold):
  first, second = passes
  return engine.LabelJob(outputs=('a', 'b'), first_pass=first,
                         host_fn=host_fn, second_pass=second,
                         label_maps=_maps, batch_size=batch_size,
                         box_rows=box_rows, counted=('many_boxes',))


def _folders(root):
  return {name: LabelFolder(root / name) for name in ('a', 'b')}


def test_device_job_batches_pads_and_resumes(tmp_path):
  source, traces = _source(), {'first': 0, 'second': 0}
  passes = _passes(traces)
  folders = _folders(tmp_path / 'b2')
  counts = engine.run(_job(passes, 2), source, IDS, folders, sizes=SIZES,
                      progress=False)
  # Two image sizes: one compilation of each pass per size.
  assert traces == {'first': 2, 'second': 2}
  assert counts['total'] == 5 and counts['written'] == 5
  assert counts['skipped'] == 0 and counts['host_workers'] == 0
  assert counts['many_boxes'] == 3       # images 1, 2 and 4 (padding dropped)
  assert counts['foreground'] == sum(int(_expected(e)[0].sum())
                                     for e in source)
  for example in source:
    a, b = _expected(example)
    np.testing.assert_array_equal(folders['a'].read(example[schema.IMAGE_ID]),
                                  a)
    np.testing.assert_array_equal(folders['b'].read(example[schema.IMAGE_ID]),
                                  b)
  # Padding the last batch of a size changes nothing: batch size 1 agrees.
  single = _folders(tmp_path / 'b1')
  engine.run(_job(passes, 1), source, IDS, single, sizes=SIZES,
             progress=False)
  for name in ('a', 'b'):
    for image_id in IDS:
      np.testing.assert_array_equal(single[name].read(image_id),
                                    folders[name].read(image_id))
  # Resumable: nothing left to do; one missing output redoes its image only.
  traces.update(first=0, second=0)
  again = engine.run(_job(passes, 2), source, IDS, folders, sizes=SIZES,
                     progress=False)
  assert again['written'] == 0 and again['skipped'] == 5
  assert again['images_per_second'] is None and traces['first'] == 0
  (tmp_path / 'b2' / 'b' / 'img3.png').unlink()
  resumed = engine.run(_job(passes, 2), source, IDS, folders, sizes=SIZES,
                       progress=False)
  assert resumed['written'] == 1 and resumed['skipped'] == 4
  assert resumed['many_boxes'] == 0
  folders['b'].check_complete(IDS)


def test_device_job_with_a_worker_process(tmp_path):
  source = _source()[:2]
  folders = _folders(tmp_path)
  counts = engine.run(_job(_passes({'first': 0, 'second': 0}), 2), source,
                      IDS[:2], folders, sizes=SIZES[:2], workers=1,
                      progress=False)
  assert counts['written'] == 2 and counts['host_workers'] == 1
  for example in source:
    np.testing.assert_array_equal(
        folders['b'].read(example[schema.IMAGE_ID]), _expected(example)[1])


def _fill_first_box(example):
  h, w = example[schema.IMAGE].shape[:2]
  x0, y0, x1, y1 = example[schema.BOXES][0]
  out = np.zeros((h, w), np.uint8)
  out[y0:y1, x0:x1] = example[schema.BOX_LABELS][0]
  return out, {'boxes': len(example[schema.BOXES])}


def test_host_only_job(tmp_path):
  source = _source()
  folder = LabelFolder(tmp_path)
  job = engine.LabelJob(outputs=('fill',), host_fn=_fill_first_box)
  counts = engine.run(job, source, IDS, {'fill': folder}, progress=False)
  assert counts['written'] == 5 and counts['device_seconds'] == 0.0
  assert counts['boxes'] == 1 + 2 + 3 + 1 + 2
  for example in source:
    np.testing.assert_array_equal(folder.read(example[schema.IMAGE_ID]),
                                  _fill_first_box(example)[0])
  again = engine.run(job, source, IDS, {'fill': folder}, progress=False)
  assert again['written'] == 0 and again['skipped'] == 5
  assert 'boxes' not in again


def _fails_on_img3(item):
  if item[schema.IMAGE_ID] == 'img3':
    raise ZeroDivisionError('no luck')
  return _threshold(item)


def test_worker_error_names_the_image(tmp_path):
  job = _job(_passes({'first': 0, 'second': 0}), 2, host_fn=_fails_on_img3)
  with pytest.raises(pool.WorkerError,
                     match=r"item \d.*'img3'.*ZeroDivisionError: no luck"):
    engine.run(job, _source(), IDS, _folders(tmp_path), sizes=SIZES,
               progress=False)


def test_job_checks():
  with pytest.raises(ValueError, match='label_maps is required'):
    engine.LabelJob(outputs=('a', 'b'), host_fn=_threshold)
  job = engine.LabelJob(outputs=('a',), host_fn=_threshold,
                        first_pass=lambda batch: {})
  with pytest.raises(ValueError, match='no folder'):
    engine.run(job, [], [], {})
  with pytest.raises(ValueError, match='image sizes'):
    engine.run(job, [], [], {'a': None})


# ----------------------------------------------------------------------------
# BANA: DenseCRF over the image's own classes
# ----------------------------------------------------------------------------
def _crf_item():
  """4 channels, class 2 absent (probability 0 everywhere), classes 1 and 3
  each in one box; softmax over the present channels inside the boxes,
  [1, 0, 0, 0] outside (the layout of BANA's first pass)."""
  rng = np.random.default_rng(1)
  h, w, c = 12, 16, 4
  masks = np.zeros((h, w, c), bool)
  masks[2:9, 1:9, 1] = True
  masks[5:11, 6:15, 3] = True
  masks[..., 0] = ~masks[..., 1:].any(-1)
  present = np.array([True, True, False, True])
  logits = np.where(present, rng.normal(size=(h, w, c)), -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  probs = np.where(masks[..., :1], np.eye(c)[0], probs).astype(np.float32)
  image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
  return {schema.IMAGE: image, 'probs': probs, 'class_masks': masks,
          'present': present}


def test_crf_labels_runs_the_present_classes_only(monkeypatch):
  item = _crf_item()
  params = crf_lib.CrfParams(iterations=5)
  # All channels through the CRF (the previous behaviour).
  q_all = crf_lib.dense_crf(item[schema.IMAGE],
                            np.transpose(item['probs'], (2, 0, 1)), params)
  expected = np.asarray(regions.mask_marginals(
      np.transpose(q_all, (1, 2, 0))[None], item['class_masks'][None]))[0]
  channels = []
  real = crf_lib.dense_crf

  def spy(image, probs, params):
    channels.append(probs.shape[0])
    return real(image, probs, params)

  monkeypatch.setattr(crf_lib, 'dense_crf', spy)
  y_crf = bana_generate.crf_labels(item, params)
  assert channels == [3]
  assert y_crf.dtype == np.uint8 and y_crf.shape == (12, 16)
  np.testing.assert_array_equal(y_crf, expected)
  assert set(np.unique(y_crf)) == {0, 1, 3}
  np.testing.assert_array_equal(y_crf[item['class_masks'][..., 0]], 0)


def test_crf_labels_keeps_the_background_channel():
  item = _crf_item()
  item['present'] = np.array([False, True, False, True])
  y_crf = bana_generate.crf_labels(item, crf_lib.CrfParams(iterations=2))
  np.testing.assert_array_equal(y_crf[item['class_masks'][..., 0]], 0)


def test_bana_label_maps():
  y_crf = np.array([[0, 1, 2]], np.uint8)
  maps = bana_generate.label_maps(y_crf, np.array([[0, 2, 2]], np.int32))
  np.testing.assert_array_equal(maps[bana_generate.AGREEMENT], [[0, 255, 2]])
  assert all(m.dtype == np.uint8 for m in maps.values())
