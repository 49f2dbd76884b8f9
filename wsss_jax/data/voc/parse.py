"""Readers for the raw PASCAL VOC 2012 and SBD files (pure, no tfds).

Conventions: class ids follow `schema.VOC_CLASSES` (0 = background, 1..20,
255 = ignore); boxes are int32 half-open edge boxes (schema.py).
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree

import numpy as np
import scipy.io

from wsss_jax.data import schema
from wsss_jax.data.prepare import BadFileError
from wsss_jax.data.registry import DatasetError

NUM_FOREGROUND = len(schema.VOC_CLASSES) - 1
_CLASS_IDS = {name: index for index, name in enumerate(schema.VOC_CLASSES)}


def read_id_list(path: str) -> list[str]:
  """Image ids of a split list, in file order, duplicates removed.

  Accepts plain id lists (`2007_000032`) and the two-column lists of the
  DeepLab/SegmentationClassAug packs (`/JPEGImages/2007_000032.jpg
  /SegmentationClassAug/2007_000032.png`): the first column's file stem is the
  id.

  Raises:
    DatasetError: the file does not exist.
  """
  if not os.path.isfile(path):
    raise DatasetError(f'Split list {path} does not exist; expected one image '
                       'id per line (e.g. 2007_000032).')
  ids, seen = [], set()
  with open(path) as f:
    for line in f:
      fields = line.split()
      if not fields:
        continue
      image_id = os.path.splitext(os.path.basename(fields[0]))[0]
      if image_id not in seen:
        seen.add(image_id)
        ids.append(image_id)
  return ids


def parse_voc_xml(path: str) -> tuple[np.ndarray, np.ndarray]:
  """Boxes and class ids of every `<object>` of a VOC annotation XML.

  All objects are kept, difficult and truncated ones included.  VOC boxes are
  1-based inclusive (xmin..xmax); the edge box is [xmin - 1, ymin - 1, xmax,
  ymax].  Non-integer coordinates (a few VOC2012 files) are rounded first.
  Person-layout `<part>` boxes are ignored (only an object's own `<bndbox>`).

  Returns:
    boxes int32 (N, 4), labels int32 (N,) in 1..20, not yet clipped.

  Raises:
    DatasetError: an object's class name is not a VOC class (names the file).
    BadFileError: malformed XML or an object without a complete `<bndbox>`.
  """
  try:
    root = ElementTree.parse(path).getroot()
  except (ElementTree.ParseError, OSError) as e:
    raise BadFileError(f'unreadable XML: {e}', path) from e
  boxes, labels = [], []
  for index, obj in enumerate(root.findall('object')):
    name = (obj.findtext('name') or '').strip()
    if name not in _CLASS_IDS or name == 'background':
      raise DatasetError(
          f'{path}: object {index} has class name {name!r}, which is not one '
          f'of the 20 VOC classes {list(schema.VOC_CLASSES[1:])}.')
    box = obj.find('bndbox')
    try:
      xmin, ymin, xmax, ymax = (
          int(round(float(box.findtext(tag))))
          for tag in ('xmin', 'ymin', 'xmax', 'ymax'))
    except (AttributeError, TypeError, ValueError) as e:
      raise BadFileError(
          f'object {index} ({name}) has no complete numeric <bndbox>',
          path) from e
    boxes.append((xmin - 1, ymin - 1, xmax, ymax))
    labels.append(_CLASS_IDS[name])
  return (np.asarray(boxes, np.int32).reshape(-1, 4),
          np.asarray(labels, np.int32).reshape(-1))


def _mat_struct_field(path: str, variable: str, field: str) -> np.ndarray:
  """`loadmat(path)[variable][field]` of a MATLAB 1x1 struct, as an array."""
  try:
    data = scipy.io.loadmat(path)
  except Exception as e:  # pylint: disable=broad-except
    raise BadFileError(f'unreadable .mat: {type(e).__name__}: {e}',
                       path) from e
  try:
    return np.asarray(data[variable][0, 0][field])
  except (KeyError, IndexError, ValueError) as e:
    raise BadFileError(
        f'.mat without the 1x1 struct {variable!r} with field {field!r} '
        '(the SBD layout)', path) from e


def read_sbd_class_mat(path: str) -> np.ndarray:
  """SBD `cls/<id>.mat`: `GTcls.Segmentation`, (H, W) uint8 class ids 0..20.

  SBD masks have no 255 boundary band.
  """
  return _mat_struct_field(path, 'GTcls', 'Segmentation').astype(np.uint8)


def read_sbd_instance_mat(path: str) -> np.ndarray:
  """SBD `inst/<id>.mat`: `GTinst.Segmentation`, (H, W) uint8 instance ids.

  0 is background; instance k (1-based) has class `GTinst.Categories[k-1]`.
  """
  return _mat_struct_field(path, 'GTinst', 'Segmentation').astype(np.uint8)


def check_mask_values(mask: np.ndarray, path: str = '') -> None:
  """Raises BadFileError (naming `path`) unless every value is 0..20 or 255."""
  values = np.unique(mask)
  bad = values[(values > NUM_FOREGROUND) & (values != schema.IGNORE_LABEL)]
  if bad.size:
    raise BadFileError(
        f'mask values {bad.tolist()} are not VOC class ids (0..20, 255)', path)


def mask_classes(mask: np.ndarray) -> np.ndarray:
  """Foreground class ids (1..20) present in a label map, int32 ascending."""
  values = np.unique(mask).astype(np.int32)
  return values[(values >= 1) & (values <= NUM_FOREGROUND)]
