"""Calibrates the "shapes" benchmark against PASCAL VOC's weak-label statistics.

Prepares the dataset (fresh, in a temporary directory unless --data_dir is
given, so the preparation time is always measured), then on the train split:

* mIoU of box-filled masks (`wsss_jax.data.boxes.fill_boxes`) against the
  ground truth, labels 0..K, 255 ignored (VOC: 62-65);
* per-class fill rates = visible object pixels / box area (mean, p10, p90);
* objects per image, fraction of ignore pixels, fraction of background pixels.

Writes a JSON file and prints a markdown table.  Usage:

  python experiments/calibrate_shapes.py [--family=aux] [--num_train=500]
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from wsss_jax import defaults
from wsss_jax.data import boxes as box_lib
from wsss_jax.data import registry
from wsss_jax.data import schema
from wsss_jax.data.shapes import builder as shapes_builder
from wsss_jax.data.shapes import render
from wsss_jax.evaluation import metrics

_DEFAULTS = defaults.shapes_data().shapes
_FAMILY = flags.DEFINE_enum('family', 'main', list(render.FAMILIES),
                            'Shape family to calibrate.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', _DEFAULTS.image_size, '')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', _DEFAULTS.num_classes, '')
_NUM_TRAIN = flags.DEFINE_integer('num_train', _DEFAULTS.num_train, '')
_NUM_VAL = flags.DEFINE_integer('num_val', _DEFAULTS.num_val, '')
_MIN_OBJECTS = flags.DEFINE_integer('min_objects', _DEFAULTS.min_objects, '')
_MAX_OBJECTS = flags.DEFINE_integer('max_objects', _DEFAULTS.max_objects, '')
_SEED = flags.DEFINE_integer('seed', _DEFAULTS.seed, '')
_DATA_DIR = flags.DEFINE_string(
    'data_dir', '', 'tfds data dir; empty: a fresh temporary directory.')
_OUTPUT = flags.DEFINE_string(
    'output', 'experiments/out/calibrate_shapes_{family}.json',
    'JSON output path ({family} is substituted).')


def calibrate(data_config) -> dict:
  """Prepares (timed) and measures the train split of `data_config`."""
  start_wall, start_cpu = time.perf_counter(), time.process_time()
  dataset = registry.open_dataset(data_config)
  prepare_wall = time.perf_counter() - start_wall
  prepare_cpu = time.process_time() - start_cpu
  config = dataset.builder.builder_config
  num_labels = len(dataset.class_names)
  source = dataset.source('train')
  confusion = np.zeros((num_labels, num_labels), np.int64)
  fills = [[] for _ in range(num_labels)]
  objects, ignored, background, pixels = [], 0, 0, 0
  for index in range(len(source)):
    example = source[index]
    mask = example[schema.MASK]
    height, width = mask.shape
    filled = box_lib.fill_boxes(example[schema.BOXES],
                                example[schema.BOX_LABELS], height, width)
    confusion += metrics.confusion_matrix(mask, filled, num_labels)
    objects.append(len(example[schema.BOXES]))
    ignored += int(np.count_nonzero(mask == schema.IGNORE_LABEL))
    background += int(np.count_nonzero(mask == 0))
    pixels += mask.size
    # Visible pixels per object need the instance map: regenerate the scene
    # (deterministic) and check it is the stored example.
    scene = render.render_scene(
        render.example_rng(config.seed, config.family, 'train', index),
        config.image_size, config.num_classes, config.min_objects,
        config.max_objects, config.family)
    if not np.array_equal(scene.mask, mask):
      raise RuntimeError(f'Stored train example {index} differs from its '
                         'regenerated scene: stale cache or non-determinism.')
    areas = box_lib.box_areas(scene.boxes)
    visible = np.bincount(scene.instances.ravel(),
                          minlength=len(scene.boxes) + 1)[1:]
    for label, count, area in zip(scene.box_labels, visible, areas):
      fills[label].append(count / area)
  box_scores = metrics.scores(confusion, dataset.class_names)
  per_class = {}
  for class_id, name in enumerate(dataset.class_names):
    iou = box_scores['per_class_iou'][name]
    entry = {'iou_box_filled': round(float(iou), 2)}
    if class_id > 0:
      values = np.asarray(fills[class_id])
      entry.update(num_objects=len(values),
                   fill_mean=round(float(values.mean()), 3),
                   fill_p10=round(float(np.percentile(values, 10)), 3),
                   fill_p90=round(float(np.percentile(values, 90)), 3))
    per_class[name] = entry
  return {
      'config': config.name,
      'num_images': len(source),
      'prepare_seconds_wall': round(prepare_wall, 2),
      'prepare_seconds_cpu': round(prepare_cpu, 2),
      'box_filled_miou': round(float(box_scores['miou']), 2),
      'objects_per_image': round(float(np.mean(objects)), 3),
      'objects_histogram': np.bincount(objects).tolist(),
      'ignore_fraction': round(ignored / pixels, 4),
      'background_fraction': round(background / pixels, 4),
      'per_class': per_class,
  }


def markdown(result: dict) -> str:
  """The result as a markdown table plus a summary line."""
  lines = [f"### {result['config']} (train, {result['num_images']} images)",
           '',
           '| class | box-filled IoU | objects | fill mean | fill p10 | '
           'fill p90 |',
           '| --- | --- | --- | --- | --- | --- |']
  for name, entry in result['per_class'].items():
    lines.append(
        f"| {name} | {entry['iou_box_filled']:.1f} | "
        f"{entry.get('num_objects', '')} | {entry.get('fill_mean', '')} | "
        f"{entry.get('fill_p10', '')} | {entry.get('fill_p90', '')} |")
  lines += ['',
            f"box-filled mIoU {result['box_filled_miou']:.1f} (VOC 62-65); "
            f"objects/image {result['objects_per_image']:.2f}; "
            f"ignore {100 * result['ignore_fraction']:.1f} %; "
            f"background {100 * result['background_fraction']:.1f} %; "
            f"prepared in {result['prepare_seconds_wall']:.1f} s wall / "
            f"{result['prepare_seconds_cpu']:.1f} s CPU"]
  return '\n'.join(lines)


def main(argv) -> None:
  del argv
  data_config = defaults.shapes_data(_FAMILY.value)
  data_config.shapes.update(
      image_size=_IMAGE_SIZE.value, num_classes=_NUM_CLASSES.value,
      num_train=_NUM_TRAIN.value, num_val=_NUM_VAL.value,
      min_objects=_MIN_OBJECTS.value, max_objects=_MAX_OBJECTS.value,
      seed=_SEED.value)
  with tempfile.TemporaryDirectory(prefix='shapes_calibration_') as tmp:
    data_config.data_dir = _DATA_DIR.value or tmp
    result = calibrate(data_config)
  result['command'] = ' '.join(['python'] + sys.argv)
  result['generator_version'] = str(shapes_builder.WsssShapes.VERSION)
  output = _OUTPUT.value.format(family=_FAMILY.value)
  os.makedirs(os.path.dirname(output) or '.', exist_ok=True)
  with open(output, 'w') as f:
    json.dump(result, f, indent=2)
  print(markdown(result))
  print(f'Wrote {output}')


if __name__ == '__main__':
  app.run(main)
