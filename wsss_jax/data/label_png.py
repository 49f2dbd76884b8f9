"""Label maps on disk: one PNG per image whose pixel values are class ids.

Pseudo-masks (GrabCut, box fills, CRF labels, ...) and predictions are stored
as 8-bit PNGs whose *pixel values* are the class ids 0..C-1 (255 = ignore).
By default the PNG is a palette ('P') image carrying the PASCAL VOC colour map,
the format of VOC's own `SegmentationClass` files, so the files look right in
any image viewer and are read back by VOC tools unchanged.  Mode 'L'
(greyscale) is available too; `read_label_png` returns class ids for both and
never colours.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from wsss_jax.atomic import write_atomic
from wsss_jax.data import schema

_SUFFIX = '.png'
_NUM_LISTED = 5


class LabelMapError(ValueError):
  """A label PNG is corrupt, has the wrong mode, or the wrong size."""


class MissingLabelsError(FileNotFoundError):
  """Some images of a split have no label PNG in a folder."""


def _check_label_map(label_map: np.ndarray, what: str) -> np.ndarray:
  """Validates a (H, W) integer label map with values 0..255, returns uint8."""
  label_map = np.asarray(label_map)
  if label_map.ndim != 2:
    raise LabelMapError(f'{what}: expected a (H, W) label map, got shape '
                        f'{label_map.shape}.')
  if label_map.dtype == np.uint8:
    return label_map
  if not (np.issubdtype(label_map.dtype, np.integer) or
          label_map.dtype == bool):
    raise LabelMapError(f'{what}: expected an integer label map, got dtype '
                        f'{label_map.dtype}.')
  if label_map.size and (label_map.min() < 0 or label_map.max() > 255):
    raise LabelMapError(
        f'{what}: label values must lie in 0..255, got range '
        f'[{label_map.min()}, {label_map.max()}].')
  return label_map.astype(np.uint8)


def write_label_png(path: str | os.PathLike, label_map: np.ndarray,
                    palette: bool = True) -> None:
  """Writes a label map as a PNG whose pixel values are the class ids.

  The write is atomic (a temporary file in the same folder, then
  `os.replace`), so an interrupted run never leaves a truncated PNG behind and
  a resumable stage can trust every file it finds.

  Args:
    path: destination file; its folder must exist.
    label_map: (H, W) integer array with values in 0..255 (stored as uint8).
    palette: True: a 'P'-mode PNG with the VOC palette (`schema.voc_palette`);
      False: a greyscale 'L'-mode PNG.  Both store the same values.
  """
  path = os.fspath(path)
  label_map = _check_label_map(label_map, path)
  image = Image.fromarray(np.ascontiguousarray(label_map))
  if palette:
    # On an 'L' image, putpalette switches the mode to 'P' keeping the values.
    image.putpalette(schema.voc_palette().reshape(-1).tolist())
  write_atomic(path, lambda f: image.save(f, format='PNG'))


def read_label_png(path: str | os.PathLike) -> np.ndarray:
  """Reads the class ids of a label PNG ('P' or 'L' mode) as uint8 (H, W).

  A palette PNG gives its palette *indices* (the class ids), not colours.

  Raises:
    FileNotFoundError: the file does not exist.
    LabelMapError: the file is not a readable PNG, or not single-channel 8-bit.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'Label map {path} does not exist.')
  try:
    with Image.open(path) as image:
      if image.format != 'PNG':
        raise LabelMapError(f'Label map {path}: expected a PNG file, got '
                            f'{image.format}.')
      if image.mode not in ('P', 'L'):
        raise LabelMapError(
            f'Label map {path}: expected a single-channel 8-bit PNG (mode '
            f"'P' or 'L'), got mode {image.mode!r}.")
      image.load()
      return np.array(image, dtype=np.uint8)
  except LabelMapError:
    raise
  except (OSError, SyntaxError, ValueError) as exc:
    raise LabelMapError(f'Label map {path} is corrupt or unreadable: '
                        f'{exc}') from exc


def _check_image_id(image_id: str) -> str:
  image_id = str(image_id)
  if (not image_id or image_id in ('.', '..') or '/' in image_id or
      '\\' in image_id):
    raise ValueError(f'Invalid image id {image_id!r} for a label file name.')
  return image_id


class LabelFolder:
  """A folder holding one `<image_id>.png` label map per image.

  Attributes:
    root: the folder path (created on the first write).
    palette: whether `write` stores VOC-palette PNGs (else mode 'L').
  """

  def __init__(self, root: str | os.PathLike, palette: bool = True):
    self.root = os.fspath(root)
    self.palette = palette

  def __repr__(self) -> str:
    return f'LabelFolder({self.root!r})'

  def path(self, image_id: str) -> str:
    """The file path of `image_id`'s label map (it may not exist)."""
    return os.path.join(self.root, _check_image_id(image_id) + _SUFFIX)

  def exists(self, image_id: str) -> bool:
    return os.path.isfile(self.path(image_id))

  def existing_ids(self) -> set[str]:
    """Ids of every label PNG in the folder (one directory listing)."""
    if not os.path.isdir(self.root):
      return set()
    return {name[:-len(_SUFFIX)] for name in os.listdir(self.root)
            if name.endswith(_SUFFIX) and not name.startswith('.tmp-')}

  def read(self, image_id: str,
           expected_hw: Sequence[int] | None = None) -> np.ndarray:
    """Reads `image_id`'s label map, uint8 (H, W).

    Args:
      image_id: the image id.
      expected_hw: if given, (H, W) the map must have.

    Raises:
      FileNotFoundError, LabelMapError: missing, unreadable or wrong size.
    """
    path = self.path(image_id)
    label_map = read_label_png(path)
    if expected_hw is not None:
      expected = tuple(int(v) for v in expected_hw)
      if label_map.shape != expected:
        raise LabelMapError(
            f'Label map {path} has size (H, W) = {label_map.shape}, expected '
            f'{expected} (the size of image {image_id!r}).')
    return label_map

  def write(self, image_id: str, label_map: np.ndarray) -> str:
    """Writes `image_id`'s label map atomically; returns the file path."""
    os.makedirs(self.root, exist_ok=True)
    path = self.path(image_id)
    write_label_png(path, label_map, palette=self.palette)
    return path

  def missing(self, image_ids: Iterable[str]) -> list[str]:
    """The ids (in the given order) that have no label PNG in the folder."""
    existing = self.existing_ids()
    return [str(i) for i in image_ids if str(i) not in existing]

  def check_complete(self, image_ids: Iterable[str]) -> None:
    """Raises `MissingLabelsError` unless every id has a label PNG."""
    image_ids = list(image_ids)
    missing = self.missing(image_ids)
    if missing:
      raise MissingLabelsError(
          f'{len(missing)} of {len(image_ids)} label maps are missing in '
          f'{self.root} (first: {", ".join(missing[:_NUM_LISTED])}).')


def overlay(image: np.ndarray, label_map: np.ndarray,
            alpha: float = 0.5) -> np.ndarray:
  """Blends the VOC palette colours of a label map over an image.

  Every pixel is blended, background included (palette colour black), and
  ignore (255) shows the palette's 255 colour (224, 224, 192).

  Args:
    image: uint8 (H, W, 3) RGB.
    label_map: integer (H, W) with values in 0..255.
    alpha: weight of the label colour, in [0, 1].

  Returns:
    uint8 (H, W, 3): round((1 - alpha) * image + alpha * colour).
  """
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'overlay: expected a uint8 (H, W, 3) image, got '
                     f'{image.dtype} {image.shape}.')
  label_map = _check_label_map(label_map, 'overlay label_map')
  if label_map.shape != image.shape[:2]:
    raise ValueError(f'overlay: label map size {label_map.shape} differs from '
                     f'image size {image.shape[:2]}.')
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f'overlay: alpha must lie in [0, 1], got {alpha}.')
  colours = schema.voc_palette()[label_map].astype(np.float32)
  blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colours
  return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
