"""Preparing real datasets: shared raw-file checks, the prepare step, the CLI.

Command line (see `--help`):

  python -m wsss_jax.data.prepare voc --voc_root=.../VOCdevkit/VOC2012 \
      [--sbd_root=.../benchmark_RELEASE/dataset
       | --seg_aug_root=.../SegmentationClassAug]
  python -m wsss_jax.data.prepare coco --coco_root=... [--class_set=non_voc]
  python -m wsss_jax.data.prepare shapes [--family=main|aux|hard|pretrain]

Every form takes `--data_dir` (default: $WSSS_JAX_DATA_DIR or
~/.cache/wsss_jax/datasets).  Preparing is idempotent: a dataset already
prepared is left alone (say `--overwrite` to rebuild it, e.g. after adding SBD).
The raw roots are not part of a dataset's identity: once prepared, a dataset
opens without them.

The VOC and COCO builders share the helpers of this module: `features` (the
tfds feature spec of the schema), `read_image` (full decode check of a raw
image), `read_label_png` (palette/grayscale PNG to an index array) and
`prepare_builder` (the idempotent prepare step with its printed summary).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import importlib
import io
import logging
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from wsss_jax.data import registry
from wsss_jax.data import label_png, schema

log = logging.getLogger(__name__)

_REENCODE_QUALITY = 95


class BadFileError(Exception):
  """A raw file that cannot be used: its example is skipped and recorded.

  Attributes:
    path: the offending file ('' if the caller knows it better).
  """

  def __init__(self, reason: str, path: str = ''):
    super().__init__(reason)
    self.path = path


def features(num_foreground: int) -> tfds.features.FeaturesDict:
  """The tfds features of the example schema (`wsss_jax.data.schema`).

  `image` is fed encoded bytes (never an array: that needs TensorFlow); `mask`
  is fed a mode-'L' PIL image so that it decodes to class indices.
  """
  return tfds.features.FeaturesDict({
      schema.IMAGE: tfds.features.Image(shape=(None, None, 3),
                                        encoding_format='jpeg'),
      schema.MASK: tfds.features.Image(shape=(None, None, 1),
                                       encoding_format='png'),
      schema.BOXES: tfds.features.Tensor(shape=(None, 4), dtype=np.int32),
      schema.BOX_LABELS: tfds.features.Tensor(shape=(None,), dtype=np.int32),
      schema.IMAGE_LABELS: tfds.features.Tensor(shape=(num_foreground,),
                                                dtype=np.bool_),
      schema.IMAGE_ID: tfds.features.Text(),
  })


def dataset_info(builder: tfds.core.GeneratorBasedBuilder, description: str,
                 num_foreground: int, homepage: str) -> tfds.core.DatasetInfo:
  """The `_info()` of a real-data builder: the example schema's features,
  split order kept (no shuffling), no extra metadata."""
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=features(num_foreground),
      homepage=homepage,
      metadata=tfds.core.MetadataDict(),
      disable_shuffling=True,
  )


@dataclasses.dataclass(frozen=True)
class CheckedImage:
  """An image file that decoded completely.

  Attributes:
    data: bytes to store: the original file, or an RGB JPEG re-encoding
      (quality 95) when the file's mode was neither RGB nor L (e.g. CMYK).
    width: pixels.
    height: pixels.
    reencoded: whether `data` is a re-encoding.
  """
  data: bytes
  width: int
  height: int
  reencoded: bool


def read_image(path: str) -> CheckedImage:
  """Reads an image file and checks that it decodes completely.

  Raises:
    BadFileError: unreadable, truncated or corrupt file (PIL verify + load).
  """
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except OSError as e:
    raise BadFileError(f'unreadable image: {e}', path) from e
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
    with Image.open(io.BytesIO(data)) as image:
      image.load()
      width, height = image.size
      reencoded = image.mode not in ('RGB', 'L')
      if reencoded:
        buffer = io.BytesIO()
        image.convert('RGB').save(buffer, format='JPEG',
                                  quality=_REENCODE_QUALITY)
        data = buffer.getvalue()
  # PIL reports broken files through many exception types.
  except Exception as e:  # pylint: disable=broad-except
    raise BadFileError(f'corrupt image: {type(e).__name__}: {e}', path) from e
  return CheckedImage(data, width, height, reencoded)


def read_label_png(path: str) -> np.ndarray:
  """Reads a class-index PNG as (H, W) uint8 (`label_png.read_label_png`).

  Raises:
    BadFileError: unreadable/corrupt file or not a palette/grayscale PNG, so
      preparation skips and lists it.
  """
  try:
    return label_png.read_label_png(path)
  except label_png.LabelMapError as e:
    raise BadFileError(f'corrupt mask: {e}', path) from e


def mask_image(mask: np.ndarray) -> Image.Image:
  """(H, W) uint8 label map -> mode-'L' PIL image for the `mask` feature."""
  return Image.fromarray(np.ascontiguousarray(mask, np.uint8), mode='L')


class PrepStats:
  """Skipped files and per-split counters collected while generating."""

  def __init__(self):
    self.skipped: list[dict[str, str]] = []
    self.counts: dict[str, collections.Counter] = collections.defaultdict(
        collections.Counter)

  def skip(self, split: str, image_id: str, file: str, reason: str) -> None:
    self.skipped.append(dict(split=split, image_id=image_id, file=file,
                             reason=reason))
    log.warning('skipped %s/%s: %s (%s)', split, image_id, reason, file)

  def count(self, split: str, key: str, n: int = 1) -> None:
    if n:
      self.counts[split][key] += int(n)

  def counts_json(self) -> dict[str, dict[str, int]]:
    return {split: {k: int(v) for k, v in sorted(counter.items())}
            for split, counter in sorted(self.counts.items())}


def split_counts(builder) -> dict[str, int]:
  return {name: int(info.num_examples)
          for name, info in builder.info.splits.items()}


def prepare_builder(builder, overwrite: bool = False,
                    emit: Callable[[str], None] = print) -> bool:
  """Prepares a VOC/COCO builder unless already prepared; prints a summary.

  The builder provides `describe_inputs() -> (lines, buildable_splits)`
  (raises `registry.DatasetError` on missing inputs) and `summary_lines()`.

  Returns:
    True if data was written, False if it was already prepared.
  """
  where = os.fspath(builder.data_dir)
  if builder.is_prepared() and not overwrite:
    counts = split_counts(builder)
    emit(f'{builder.name}/{builder.builder_config.name}: already prepared in '
         f'{where} ({_format_counts(counts)}); nothing to do.')
    if builder.has_inputs():
      try:
        _, buildable = builder.describe_inputs()
      except registry.DatasetError as e:   # Not needed any more: only a note.
        emit(f'  note: the raw inputs given are not usable now: {e}')
        buildable = []
      missing = sorted(set(buildable) - set(counts))
      if missing:
        emit(f'  inputs for {missing} are now available but were not there '
             'when it was prepared: rerun with --overwrite to rebuild.')
    return False
  lines, _ = builder.describe_inputs()
  for line in lines:
    emit(line)
  start = time.time()
  mode = (tfds.download.GenerateMode.FORCE_REDOWNLOAD if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  was_active = getattr(tfds.core.utils.tqdm_utils, '_active', True)
  tfds.display_progress_bar(False)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(download_mode=mode))
  except AssertionError as e:
    # tfds refuses to write a split from which every example was skipped.
    raise registry.DatasetError(
        f'Preparing {builder.name} failed ({e}): a split had no usable '
        f'example. Skipped files: {builder.stats.skipped[:5]}') from e
  finally:
    tfds.display_progress_bar(was_active)
  counts = split_counts(builder)
  emit(f'{builder.name}/{builder.builder_config.name}: prepared in {where} in '
       f'{time.time() - start:.1f} s ({_format_counts(counts)}).')
  skipped = builder.stats.skipped
  if skipped:
    emit(f'  {len(skipped)} file(s) skipped (listed in metadata "skipped"):')
    for entry in skipped[:20]:
      emit(f'    {entry["split"]}/{entry["image_id"]}: {entry["reason"]}')
    if len(skipped) > 20:
      emit(f'    ... and {len(skipped) - 20} more')
  for line in builder.summary_lines():
    emit('  ' + line)
  return True


def _format_counts(counts: dict[str, int]) -> str:
  return ', '.join(f'{name}: {n}' for name, n in sorted(counts.items()))


# ----------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------
def _flag(parser, name: str, **kwargs):
  """`--name` in the underscore style of every wsss_jax command, with the
  dashed spelling (`--voc_root`) accepted too."""
  dashed = name.replace('_', '-')
  names = [f'--{name}'] + ([f'--{dashed}'] if dashed != name else [])
  return parser.add_argument(*names, dest=name, **kwargs)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='python -m wsss_jax.data.prepare',
      description='Prepare a dataset (tfds array_record) for wsss_jax.')
  sub = parser.add_subparsers(dest='dataset', required=True)

  voc = sub.add_parser('voc', help='PASCAL VOC 2012 (+ SBD).')
  _flag(voc, 'voc_root', required=True,
                   help='.../VOCdevkit/VOC2012')
  aug = voc.add_mutually_exclusive_group()
  _flag(aug, 'sbd_root', default='',
                   help='.../benchmark_RELEASE/dataset (cls/, inst/, '
                   'train.txt, val.txt)')
  _flag(aug, 'seg_aug_root', default='',
                   help='a ready SegmentationClassAug/ folder')

  coco = sub.add_parser('coco', help='MS-COCO instances.')
  _flag(coco, 'coco_root', required=True,
                    help='folder holding annotations/ and the image folders '
                    '(directly or under images/)')
  _flag(coco, 'class_set', default='all', choices=('all', 'non_voc'))
  for split in ('train', 'val'):
    _flag(coco, f'{split}_images', default=f'{split}2017')
    _flag(coco, f'{split}_annotations',
                      default=f'annotations/instances_{split}2017.json')

  shapes = sub.add_parser('shapes', help='the synthetic benchmark.')
  _flag(shapes, 'family', default='main',
                      choices=('main', 'aux', 'hard', 'pretrain'),
                      help="'aux': the auxiliary shape family (LPG); 'hard': "
                      'the main classes on GrabCut-hard scenes (Box2Seg); '
                      "'pretrain': the backbone pretraining classes")

  for p in (voc, coco, shapes):
    _flag(p, 'data_dir', default='',
                   help='output root (default: $WSSS_JAX_DATA_DIR or '
                   '~/.cache/wsss_jax/datasets)')
  for p in (voc, coco):
    _flag(p, 'overwrite', action='store_true',
                   help='rebuild even if already prepared')
  return parser


def _require_dir(path: str, flag: str, expected: str) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise registry.DatasetError(
        f'{flag}={path} is not a directory; expected {expected} there.')
  return path


def _config(args: argparse.Namespace) -> Any:
  from wsss_jax import defaults  # pylint: disable=g-import-not-at-top
  if args.dataset == 'voc':
    config = defaults.voc_data()
    config.voc.voc_root = _require_dir(
        args.voc_root, '--voc_root', 'JPEGImages/, SegmentationClass/, '
        'Annotations/ and ImageSets/Segmentation/')
    if args.sbd_root:
      config.voc.sbd_root = _require_dir(
          args.sbd_root, '--sbd_root', 'cls/, inst/, train.txt and val.txt')
    if args.seg_aug_root:
      config.voc.seg_aug_root = _require_dir(
          args.seg_aug_root, '--seg_aug_root', '<image id>.png class masks')
  elif args.dataset == 'coco':
    config = defaults.coco_data(args.class_set)
    config.coco.root = _require_dir(
        args.coco_root, '--coco_root', 'annotations/ and image folders')
    config.coco.train_images = args.train_images
    config.coco.val_images = args.val_images
    config.coco.train_annotations = args.train_annotations
    config.coco.val_annotations = args.val_annotations
  else:
    config = defaults.shapes_data(args.family)
  config.data_dir = os.path.abspath(os.path.expanduser(
      args.data_dir or registry.default_data_dir()))
  return config


def _prepare_shapes(config) -> None:
  try:
    dataset = registry.open_dataset(config, prepare=False)
    print(f'{config.name}: already prepared; nothing to do.')
  except registry.DatasetError:
    dataset = registry.open_dataset(config, prepare=True)
  counts = split_counts(dataset.builder)
  print(f'{config.name} in {os.fspath(dataset.builder.data_dir)}: '
        f'{_format_counts(counts)}; classes {list(dataset.class_names)}')


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point; returns the process exit status."""
  args = _parser().parse_args(argv)
  try:
    config = _config(args)
    if args.dataset == 'shapes':
      _prepare_shapes(config)
      return 0
    module = importlib.import_module(f'wsss_jax.data.{args.dataset}.builder')
    builder = module.make_builder(config, config.data_dir)
    module.prepare(builder, overwrite=args.overwrite)
  except registry.DatasetError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
