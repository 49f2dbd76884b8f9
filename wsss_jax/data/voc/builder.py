"""tfds builder for PASCAL VOC 2012 segmentation (+ SBD).

Splits `train`, `train_aug` and `val`.

Inputs (local files only; see `wsss_jax.defaults.voc_data`):

* `voc_root` = .../VOCdevkit/VOC2012 with JPEGImages/, SegmentationClass/,
  Annotations/, ImageSets/Segmentation/{train,val}.txt (required), and
  optionally SegmentationObject/ and ImageSets/Segmentation/train_aug.txt.
* `sbd_root` = .../benchmark_RELEASE/dataset with cls/, inst/, train.txt,
  val.txt (optional), and/or `seg_aug_root` = a SegmentationClassAug/ folder.

Splits: `train` (1,464) and `val` (1,449) from the VOC lists; `train_aug`
(10,582) from ImageSets/Segmentation/train_aug.txt if present, else VOC train
U SBD train U SBD val minus VOC val, else (SegmentationClassAug only) every
mask in that folder plus VOC train minus VOC val.  A split whose inputs are
missing is not built (the prepare step says why).

Per image: the image is JPEGImages/<id>.jpg (else SBD img/<id>.jpg); the
mask comes from SegmentationClass/<id>.png, else
SegmentationClassAug/<id>.png, else SBD cls/<id>.mat (first that exists).
Boxes come from Annotations/<id>.xml (every object, difficult and truncated
included; clipped to the image, boxes left without a pixel dropped); without
an XML they are derived, in order of preference, from
SegmentationObject/<id>.png or SBD inst/<id>.mat (one box per instance) or the
8-connected components of each class of the mask (the 255 band excluded, so
such boxes are slightly tighter than XML boxes), and counted in metadata
`box_source_counts`.  Image labels
are the classes of the boxes (plus the mask's classes when boxes were derived).
Corrupt images/masks and size mismatches are skipped and listed in metadata
`skipped`.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import numpy as np
import tensorflow_datasets as tfds

from wsss_jax.data import boxes as box_utils
from wsss_jax.data import prepare as prep
from wsss_jax.data import schema
from wsss_jax.data.registry import DatasetError
from wsss_jax.data.voc import parse

_SEG_LISTS = 'ImageSets/Segmentation'
_BOX_SOURCES = ('xml', 'segmentation_object', 'sbd_inst', 'mask_components')


@dataclasses.dataclass(frozen=True)
class Item:
  """Raw files of one example ('' when absent)."""
  image_id: str
  image: str
  mask: str
  xml: str
  instances: str


@dataclasses.dataclass(frozen=True)
class Plan:
  """What `discover` found: the items of each buildable split and a report."""
  splits: dict[str, list[Item]]
  lines: list[str]


def _file(*parts: str) -> str:
  path = os.path.join(*parts)
  return path if os.path.isfile(path) else ''


class Sources:
  """Finds the raw files of an image id (VOC, SBD, SegmentationClassAug)."""

  def __init__(self, voc_root: str, sbd_root: str = '', seg_aug_root: str = ''):
    self.voc_root, self.sbd_root, self.seg_aug_root = (
        voc_root, sbd_root, seg_aug_root)

  def item(self, image_id: str) -> Item:
    voc, sbd, aug = self.voc_root, self.sbd_root, self.seg_aug_root
    mask = (_file(voc, 'SegmentationClass', f'{image_id}.png')
            or (aug and _file(aug, f'{image_id}.png'))
            or (sbd and _file(sbd, 'cls', f'{image_id}.mat')) or '')
    instances = (_file(voc, 'SegmentationObject', f'{image_id}.png')
                 or (sbd and _file(sbd, 'inst', f'{image_id}.mat')) or '')
    image = os.path.join(voc, 'JPEGImages', f'{image_id}.jpg')
    if sbd and not os.path.isfile(image):
      image = _file(sbd, 'img', f'{image_id}.jpg') or image
    return Item(image_id, image, mask,
                _file(voc, 'Annotations', f'{image_id}.xml'), instances)


def discover(voc_root: str, sbd_root: str = '', seg_aug_root: str = '') -> Plan:
  """Checks the raw roots and lists the items of every buildable split.

  Raises:
    DatasetError: a missing root, folder or required split list (named).
  """
  if not voc_root:
    raise DatasetError(
        'config.data.voc.voc_root is empty; set it to .../VOCdevkit/VOC2012 or '
        'run `python -m wsss_jax.data.prepare voc --voc_root=...`.')
  for name in ('JPEGImages', _SEG_LISTS):
    if not os.path.isdir(os.path.join(voc_root, name)):
      raise DatasetError(f'{os.path.join(voc_root, name)} does not exist; '
                         f'expected a VOCdevkit/VOC2012 folder at {voc_root} '
                         '(JPEGImages/, SegmentationClass/, Annotations/, '
                         'ImageSets/Segmentation/{train,val}.txt).')
  for root, what in ((sbd_root, 'SBD root (cls/, inst/, train.txt, val.txt)'),
                     (seg_aug_root, 'SegmentationClassAug folder')):
    if root and not os.path.isdir(root):
      raise DatasetError(f'{root} does not exist; expected the {what}.')
  lists = os.path.join(voc_root, _SEG_LISTS)
  train = parse.read_id_list(os.path.join(lists, 'train.txt'))
  val = parse.read_id_list(os.path.join(lists, 'val.txt'))
  has_class_masks = os.path.isdir(os.path.join(voc_root, 'SegmentationClass'))
  if not (has_class_masks or seg_aug_root or sbd_root):
    raise DatasetError(f'{voc_root}/SegmentationClass does not exist and no '
                       'SBD or SegmentationClassAug root was given: no masks.')
  lines = [f'voc: VOC2012 at {voc_root}: train {len(train)}, val {len(val)} ids'
           + ('' if has_class_masks else ' (no SegmentationClass/)')]
  aug_ids, aug_line = _train_aug_ids(lists, train, val, sbd_root, seg_aug_root)
  lines.append(aug_line)
  for name in ('Annotations', 'SegmentationObject'):
    if not os.path.isdir(os.path.join(voc_root, name)):
      lines.append(f'voc: no {name}/ (boxes will be derived from masks)'
                   if name == 'Annotations' else f'voc: no {name}/')
  sources = Sources(voc_root, sbd_root, seg_aug_root)
  splits = {'train': train, 'val': val}
  if aug_ids:
    splits['train_aug'] = aug_ids
  return Plan({name: [sources.item(i) for i in ids]
               for name, ids in splits.items()}, lines)


def _train_aug_ids(lists: str, train: list[str], val: list[str], sbd_root: str,
                   seg_aug_root: str) -> tuple[list[str], str]:
  """The train_aug ids (empty if not buildable) and a line saying where from."""
  listed = os.path.join(lists, 'train_aug.txt')
  if not (sbd_root or seg_aug_root):
    why = ('train_aug.txt found but no SBD or SegmentationClassAug for its '
           'masks' if os.path.isfile(listed) else
           'no SBD and no SegmentationClassAug')
    return [], f'train_aug: skipped, {why}'
  if os.path.isfile(listed):
    ids = parse.read_id_list(listed)
    return ids, f'train_aug: {len(ids)} ids from {listed}'
  excluded = set(val)
  if sbd_root:
    extra = (parse.read_id_list(os.path.join(sbd_root, 'train.txt'))
             + parse.read_id_list(os.path.join(sbd_root, 'val.txt')))
    source = f'VOC train + SBD train/val ({sbd_root}) - VOC val'
  else:
    extra = [os.path.splitext(os.path.basename(p))[0]
             for p in glob.glob(os.path.join(seg_aug_root, '*.png'))]
    source = f'VOC train + masks in {seg_aug_root} - VOC val'
  ids = sorted(set(train + extra) - excluded)
  return ids, f'train_aug: {len(ids)} ids = {source}'


def read_mask(path: str) -> np.ndarray:
  """(H, W) uint8 class ids from a VOC/SegAug PNG or an SBD cls .mat."""
  if not path:
    raise prep.BadFileError('no mask (SegmentationClass, SegmentationClassAug '
                            'or SBD cls)')
  if path.endswith('.mat'):
    return parse.read_sbd_class_mat(path)
  return prep.read_label_png(path)


def make_example(item: Item, split: str, stats: prep.PrepStats) -> dict:
  """Reads, checks and converts one item into a feature dict.

  Raises:
    prep.BadFileError: the example must be skipped (reason in the message).
    DatasetError: an XML names an unknown class.
  """
  image = prep.read_image(item.image)
  mask = read_mask(item.mask)
  if mask.shape != (image.height, image.width):
    raise prep.BadFileError(
        f'mask size {mask.shape[1]}x{mask.shape[0]} != image size '
        f'{image.width}x{image.height}', item.mask)
  parse.check_mask_values(mask, item.mask)
  height, width = mask.shape
  if item.xml:
    raw_boxes, raw_labels = parse.parse_voc_xml(item.xml)
    # Clipping row indices instead of labels tells which boxes survived.
    boxes, kept, dropped = box_utils.clip_boxes(
        raw_boxes, np.arange(len(raw_boxes)), height, width)
    labels = raw_labels[kept]
    stats.count(split, 'boxes_clipped',
                int((raw_boxes[kept] != boxes).any(axis=1).sum()))
    stats.count(split, 'boxes_dropped', dropped)
    source, class_ids = 'xml', labels
  else:
    boxes, labels, source = _boxes_from_masks(item, mask)
    class_ids = np.concatenate([labels, parse.mask_classes(mask)])
  stats.count(split, f'box_source_{source}')
  stats.count(split, 'images_reencoded', int(image.reencoded))
  return {
      schema.IMAGE: image.data,
      schema.MASK: prep.mask_image(mask),
      schema.BOXES: boxes.astype(np.int32).reshape(-1, 4),
      schema.BOX_LABELS: labels.astype(np.int32).reshape(-1),
      schema.IMAGE_LABELS: schema.image_labels_from_ids(
          class_ids, parse.NUM_FOREGROUND),
      schema.IMAGE_ID: item.image_id,
  }


def _boxes_from_masks(item: Item, mask: np.ndarray):
  """Boxes of an image without XML: per instance if possible, else per
  connected component.  Returns (boxes, labels, box source name)."""
  if item.instances:
    if item.instances.endswith('.mat'):
      instances = parse.read_sbd_instance_mat(item.instances)
      source = 'sbd_inst'
    else:
      instances = prep.read_label_png(item.instances)
      source = 'segmentation_object'
    if instances.shape != mask.shape:
      raise prep.BadFileError(
          f'instance mask size {instances.shape[::-1]} != mask size '
          f'{mask.shape[::-1]}', item.instances)
    boxes, labels = box_utils.boxes_from_instances(instances, mask)
    return boxes, labels, source
  boxes, labels = box_utils.boxes_from_label_map(mask)
  return boxes, labels, 'mask_components'


class WsssVoc(tfds.core.GeneratorBasedBuilder):
  """PASCAL VOC 2012 (+ SBD) in the wsss_jax example schema.

  The raw roots are constructor arguments, not part of the dataset's identity
  (config `voc2012`): a prepared dataset opens without them.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version.'}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(
      name='voc2012', description='VOC 2012 segmentation train/val (+ SBD '
      'train_aug); boxes from Annotations XML.')]

  def __init__(self, *, voc_root: str = '', sbd_root: str = '',
               seg_aug_root: str = '', **kwargs):
    self._roots = (voc_root, sbd_root, seg_aug_root)
    self.stats = prep.PrepStats()
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return prep.dataset_info(self, __doc__, parse.NUM_FOREGROUND,
                             'http://host.robots.ox.ac.uk/pascal/VOC/voc2012/')

  def has_inputs(self) -> bool:
    return bool(self._roots[0])

  def describe_inputs(self) -> tuple[list[str], list[str]]:
    plan = discover(*self._roots)
    return plan.lines, sorted(plan.splits)

  def summary_lines(self) -> list[str]:
    counts = self.info.metadata.get('box_source_counts', {})
    derived = {split: {k: n for k, n in c.items() if k != 'xml' and n}
               for split, c in counts.items()}
    lines = [f'{split}: {n} image(s) without XML, boxes from masks ({c})'
             for split, c in sorted(derived.items())
             if (n := sum(c.values()))]
    for split, c in sorted(self.info.metadata.get('counts', {}).items()):
      if c.get('boxes_clipped') or c.get('boxes_dropped'):
        lines.append(f'{split}: {c.get("boxes_clipped", 0)} box(es) clipped, '
                     f'{c.get("boxes_dropped", 0)} dropped (no pixel left)')
    return lines

  def _split_generators(self, dl_manager):
    del dl_manager  # Local files only.
    plan = discover(*self._roots)
    self.stats = prep.PrepStats()
    metadata = self.info.metadata
    metadata.clear()
    metadata.update(
        class_names=list(schema.VOC_CLASSES), skipped=self.stats.skipped,
        box_source_counts={}, counts={},
        inputs=dict(zip(('voc_root', 'sbd_root', 'seg_aug_root'),
                        self._roots)),
        discovery=plan.lines)
    return {split: self._generate_examples(split=split, items=items)
            for split, items in plan.splits.items()}

  def _generate_examples(self, split: str, items: list[Item]):
    for item in items:
      try:
        example = make_example(item, split, self.stats)
      except prep.BadFileError as e:
        self.stats.skip(split, item.image_id, e.path or item.image, str(e))
        continue
      yield item.image_id, example
    self._record_counts()

  def _record_counts(self) -> None:
    """Copies the counters into the metadata (written after generation)."""
    counts = self.stats.counts_json()
    self.info.metadata['counts'] = counts
    self.info.metadata['box_source_counts'] = {
        split: {source: c.get(f'box_source_{source}', 0)
                for source in _BOX_SOURCES}
        for split, c in counts.items()}


def make_builder(data_config, data_dir: str) -> WsssVoc:
  """The VOC builder for `config.data` (`wsss_jax.defaults.voc_data()`)."""
  voc = data_config.voc

  def _abs(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else ''

  return WsssVoc(voc_root=_abs(voc.voc_root), sbd_root=_abs(voc.sbd_root),
                 seg_aug_root=_abs(voc.seg_aug_root), data_dir=data_dir,
                 config='voc2012', file_format='array_record')


def prepare(builder: WsssVoc, overwrite: bool = False) -> bool:
  """Prepares the dataset unless already prepared (prints a summary)."""
  return prep.prepare_builder(builder, overwrite=overwrite)
