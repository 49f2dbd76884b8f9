"""Procedural renderer of the embedded "shapes" benchmark (pure numpy).

A scene is a textured background (colour gradient, low-frequency noise and
amorphous distractor blobs) with 1..N objects painted back to front.  Each
foreground class is a shape family with a class-typical colour and texture.

Scene rules (the ones downstream code may rely on):

* All geometry is defined at `REFERENCE_SIZE` = 128 px and scales with the
  image size: objects are 15-60 px across at 128 px.
* Occlusion: later objects paint over earlier ones.  The mask, boxes and labels
  describe what is *visible*.  An object left with fewer than
  `MIN_VISIBLE_PIXELS` (scaled by area) visible pixels, or with no pixel
  outside the ignore band, is removed from the scene *before* the image is
  painted, so every pixel of the image is explained by the mask (no unlabelled
  objects, no labels for invisible ones).  Removing an object only uncovers
  pixels of the others, so one removal pass is enough.  If fewer than
  `min_objects` survive, the layout is re-sampled (up to `_MAX_ATTEMPTS`).
* Boxes are the tight visible extent of each object (schema edge convention,
  int32), listed in painting order (back to front).
* Ignore band (255): pixels whose (2r+1)^2 neighbourhood holds another
  instance (object or background), r = max(1, round(S / 256)); 2 px wide at
  128 px, like VOC's ~5 px band at ~500 px.  Same-class touching instances get
  a band too, as in VOC.
"""

from __future__ import annotations

import colorsys
import dataclasses
import functools

import numpy as np

from wsss_jax.data import schema
from wsss_jax.data.shapes import geometry

FAMILIES = ('main', 'aux', 'hard', 'pretrain')
SHAPES = {
    'main': ('ellipse', 'triangle', 'star', 'ring', 'cross', 'crescent'),
    'aux': ('polygon', 'heart', 'arrow', 'lshape', 'bowtie', 'wave'),
    # The benchmark's "ImageNet": classes of their own for pretraining the
    # backbone (wsss_jax.pretraining); shapes and textures shared with no
    # other family.
    'pretrain': ('diamond', 'trapezoid', 'tee', 'chevron', 'semicircle',
                 'capsule'),
}
SHAPES['hard'] = SHAPES['main']
MAX_CLASSES = 6
MAX_OBJECTS = 8
SPLITS = ('train', 'val')
REFERENCE_SIZE = 128
MIN_VISIBLE_PIXELS = 20
MIN_IMAGE_SIZE = 16
_SPLIT_CODES = {('main', 'train'): 0, ('main', 'val'): 1,
                ('aux', 'train'): 2, ('aux', 'val'): 3,
                ('hard', 'train'): 4, ('hard', 'val'): 5,
                ('pretrain', 'train'): 6, ('pretrain', 'val'): 7}
_MAX_ATTEMPTS = 20
_RADIUS_RANGE = (13.0, 42.0)       # half-size in px at 128 px (uniform)
_NOISE_SIGMA = 2.0                 # per-pixel sensor noise, grey levels
_CONTEXT_HALF_SIZE = (0.8, 0.95)   # support region / box half-sizes ('hard')

# shape -> (hue in degrees, texture kind, max |rotation| in degrees).  Limited
# rotations keep canonical poses (upright triangle, "+" not "x"), as real
# classes have; they also set the per-class fill rate of the visible extent.
_STYLE = {
    'ellipse': (5.0, 'radial', 12.0), 'triangle': (50.0, 'stripes', 40.0),
    'star': (115.0, 'dots', 180.0), 'ring': (185.0, 'speckle', 180.0),
    'cross': (235.0, 'checker', 15.0), 'crescent': (290.0, 'rings', 180.0),
    'polygon': (25.0, 'hatch', 180.0), 'heart': (340.0, 'outline', 20.0),
    'arrow': (80.0, 'grid', 180.0), 'lshape': (160.0, 'bands', 30.0),
    'bowtie': (210.0, 'zigzag', 40.0), 'wave': (265.0, 'blotch', 30.0),
    'diamond': (35.0, 'spiral', 20.0), 'trapezoid': (95.0, 'squares', 25.0),
    'tee': (150.0, 'waves', 20.0), 'chevron': (220.0, 'ramp', 180.0),
    'semicircle': (275.0, 'polka', 30.0), 'capsule': (320.0, 'hexweave', 180.0),
}


@dataclasses.dataclass(frozen=True)
class Scene:
  """A rendered example plus its instance map (for tests and calibration).

  Attributes:
    image: uint8 (H, W, 3).
    mask: uint8 (H, W): 0 background, 1..K classes, 255 ignore band.
    instances: int32 (H, W): 0 background, i = the object of box row i-1
      (visible pixels before the ignore band is cut out).
    boxes: int32 (N, 4) visible extents, edge convention, painting order.
    box_labels: int32 (N,) class ids 1..K.
    image_labels: bool (K,).
  """
  image: np.ndarray
  mask: np.ndarray
  instances: np.ndarray
  boxes: np.ndarray
  box_labels: np.ndarray
  image_labels: np.ndarray

  def example(self) -> dict[str, np.ndarray]:
    """The decoded-example dict of `wsss_jax.data.schema` (no image_id)."""
    return {schema.IMAGE: self.image, schema.MASK: self.mask,
            schema.BOXES: self.boxes, schema.BOX_LABELS: self.box_labels,
            schema.IMAGE_LABELS: self.image_labels}


@dataclasses.dataclass
class _Object:
  class_id: int
  shape: str
  window: tuple[slice, slice]
  sd: np.ndarray       # float32 signed distance in px (< 0 inside), window
  u: np.ndarray        # float32 object-frame coordinates in px, window
  v: np.ndarray
  radius: float


def class_names(family: str, num_classes: int) -> tuple[str, ...]:
  """('background', shape_1, ..., shape_K) for a family and K in 1..6."""
  check_params(REFERENCE_SIZE, num_classes, 1, 1, family)
  return ('background',) + SHAPES[family][:num_classes]


def check_params(image_size: int, num_classes: int, min_objects: int,
                 max_objects: int, family: str) -> None:
  """Raises ValueError naming the offending `shapes.*` config field."""
  if family not in FAMILIES:
    raise ValueError(f'shapes family={family!r}: expected one of {FAMILIES}.')
  if not MIN_IMAGE_SIZE <= int(image_size):
    raise ValueError(f'shapes.image_size={image_size}: expected an integer '
                     f'>= {MIN_IMAGE_SIZE}.')
  if not 1 <= int(num_classes) <= MAX_CLASSES:
    raise ValueError(f'shapes.num_classes={num_classes}: expected 1..'
                     f'{MAX_CLASSES}.')
  if not 1 <= int(min_objects) <= int(max_objects) <= MAX_OBJECTS:
    raise ValueError(f'shapes.min_objects={min_objects}, shapes.max_objects='
                     f'{max_objects}: expected 1 <= min <= max <= '
                     f'{MAX_OBJECTS}.')


def example_rng(seed: int, family: str, split: str,
                index: int) -> np.random.Generator:
  """The generator of one example: default_rng([seed, split_code, index])."""
  if (family, split) not in _SPLIT_CODES:
    raise ValueError(f'No split code for family={family!r}, split={split!r}; '
                     f'splits are {SPLITS}.')
  return np.random.default_rng([int(seed), _SPLIT_CODES[family, split],
                                int(index)])


def image_id(family: str, split: str, index: int) -> str:
  """'shapes_train_000123' (main) or 'shapes_aux_train_000123' (aux)."""
  prefix = 'shapes' if family == 'main' else f'shapes_{family}'
  return f'{prefix}_{split}_{index:06d}'


def render_example(rng: np.random.Generator, image_size: int, num_classes: int,
                   min_objects: int, max_objects: int,
                   family: str = 'main') -> dict[str, np.ndarray]:
  """Renders one decoded example (schema layout, without image_id)."""
  return render_scene(rng, image_size, num_classes, min_objects, max_objects,
                      family).example()


def render_scene(rng: np.random.Generator, image_size: int, num_classes: int,
                 min_objects: int, max_objects: int,
                 family: str = 'main') -> Scene:
  """Renders one scene; see the module docstring for the rules."""
  check_params(image_size, num_classes, min_objects, max_objects, family)
  size = int(image_size)
  scale = size / REFERENCE_SIZE
  min_visible = max(4, int(round(MIN_VISIBLE_PIXELS * scale * scale)))
  band_radius = max(1, int(round(size / 256)))
  shapes = SHAPES[family][:num_classes]
  for _ in range(_MAX_ATTEMPTS):
    count = int(rng.integers(min_objects, max_objects + 1))
    objects = [_sample_object(rng, shapes, size, scale) for _ in range(count)]
    instances = _paint_instances(objects, size)
    band = _boundary(instances, band_radius)
    visible = np.bincount(instances.ravel(), minlength=count + 1)[1:]
    interior = np.bincount(instances[~band], minlength=count + 1)[1:]
    objects = [o for o, n, m in zip(objects, visible, interior)
               if n >= min_visible and m > 0]
    if len(objects) >= min_objects:
      break
  instances = _paint_instances(objects, size)
  band = _boundary(instances, band_radius)
  labels = np.asarray([0] + [o.class_id for o in objects], np.int32)
  mask = labels[instances].astype(np.uint8)
  mask[band] = schema.IGNORE_LABEL
  image = _background(rng, size, scale, shapes)
  boxes = _visible_boxes(instances, objects)
  if family == 'hard':
    _paint_context(rng, image, boxes, size, scale)
  for obj in objects:
    _paint_object(rng, image, obj, scale)
  image += _NOISE_SIGMA * rng.standard_normal(image.shape, np.float32)
  image = np.clip(np.round(image), 0, 255).astype(np.uint8)
  box_labels = labels[1:]
  return Scene(image=image, mask=mask, instances=instances, boxes=boxes,
               box_labels=box_labels,
               image_labels=schema.image_labels_from_ids(box_labels,
                                                         num_classes))


# ----------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------
def _sample_object(rng: np.random.Generator, shapes: tuple[str, ...],
                   size: int, scale: float) -> _Object:
  """Samples class, pose and shape parameters; evaluates the SDF on a window."""
  class_id = int(rng.integers(1, len(shapes) + 1))
  shape = shapes[class_id - 1]
  radius = rng.uniform(*_RADIUS_RANGE) * scale
  cx, cy = rng.uniform(0.1 * size, 0.9 * size, size=2)
  angle = np.deg2rad(rng.uniform(-1, 1) * _STYLE[shape][2])
  sdf, reach = geometry.shape_sdf(shape, rng)
  reach = reach * radius + 1.0
  r0, r1 = max(0, int(cy - reach)), min(size, int(np.ceil(cy + reach)))
  c0, c1 = max(0, int(cx - reach)), min(size, int(np.ceil(cx + reach)))
  dy = (np.arange(r0, r1, dtype=np.float32) + 0.5 - cy)[:, None]
  dx = (np.arange(c0, c1, dtype=np.float32) + 0.5 - cx)[None, :]
  cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
  u = dx * cos + dy * sin
  v = dy * cos - dx * sin
  sd = sdf(u / radius, v / radius) * radius
  return _Object(class_id, shape, (slice(r0, r1), slice(c0, c1)),
                 sd.astype(np.float32), u, v, radius)


def _paint_instances(objects: list[_Object], size: int) -> np.ndarray:
  """int32 (S, S) map: index (1-based) of the topmost object at each pixel."""
  instances = np.zeros((size, size), np.int32)
  for index, obj in enumerate(objects, start=1):
    instances[obj.window][obj.sd < 0] = index
  return instances


def _boundary(instances: np.ndarray, radius: int) -> np.ndarray:
  """bool (H, W): pixels with a different instance within `radius` (Chebyshev)."""
  height, width = instances.shape
  padded = np.pad(instances, radius, mode='edge')
  band = np.zeros(instances.shape, bool)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      band |= padded[dy:dy + height, dx:dx + width] != instances
  return band


def _visible_boxes(instances: np.ndarray,
                   objects: list[_Object]) -> np.ndarray:
  """int32 (N, 4) tight edge boxes of each object's visible pixels."""
  boxes = np.zeros((len(objects), 4), np.int32)
  for index, obj in enumerate(objects, start=1):
    rows, cols = np.nonzero(instances[obj.window] == index)
    r0, c0 = obj.window[0].start, obj.window[1].start
    boxes[index - 1] = (c0 + cols.min(), r0 + rows.min(),
                        c0 + cols.max() + 1, r0 + rows.max() + 1)
  return boxes


# ----------------------------------------------------------------------------
# Appearance
# ----------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, height: int, width: int,
                  cells: int, channels: int = 1) -> np.ndarray:
  """float32 (H, W, C) smooth noise in [-1, 1]: a (cells+1)^2 random grid
  interpolated with smoothstep weights (separable matrix products)."""
  grid = rng.uniform(-1, 1, (channels, cells + 1, cells + 1))
  ay, ax = _interp_matrix(height, cells), _interp_matrix(width, cells)
  return np.stack([ay @ g @ ax.T for g in grid], -1).astype(np.float32)


@functools.lru_cache(maxsize=4096)
def _interp_matrix(length: int, cells: int) -> np.ndarray:
  """(length, cells+1) smoothstep interpolation weights (cached, read-only)."""
  t = (np.arange(length) + 0.5) / length * cells
  i0 = np.minimum(np.floor(t).astype(int), cells - 1)
  f = t - i0
  f = f * f * (3 - 2 * f)
  matrix = np.zeros((length, cells + 1))
  matrix[np.arange(length), i0] = 1 - f
  matrix[np.arange(length), i0 + 1] = f
  matrix.flags.writeable = False
  return matrix


def _colour(rng: np.random.Generator, hue: float, sat: tuple[float, float],
            val: tuple[float, float]) -> np.ndarray:
  """float32 (3,) RGB in 0..255 from a hue (degrees) and s/v ranges."""
  rgb = colorsys.hsv_to_rgb((hue / 360.0) % 1.0, rng.uniform(*sat),
                            rng.uniform(*val))
  return np.asarray(rgb, np.float32) * 255.0


def _object_colours(rng: np.random.Generator,
                    hue: float) -> tuple[np.ndarray, np.ndarray]:
  """Primary and secondary (texture) colours around a class hue.

  Hues spread by 20 degrees (class centres are ~60 apart) and 15 % of objects
  get an arbitrary hue, so colour alone never identifies the class.
  """
  if rng.uniform() < 0.1:
    hue = rng.uniform(0, 360)
  hue += rng.normal(0, 12)
  primary = _colour(rng, hue, (0.55, 0.95), (0.55, 0.95))
  secondary = _colour(rng, hue + rng.uniform(-25, 25), (0.3, 0.9),
                      (0.25, 0.6))
  return primary, secondary


def _texture(kind: str, rng: np.random.Generator, u: np.ndarray,
             v: np.ndarray, sd: np.ndarray, radius: float,
             scale: float) -> np.ndarray:
  """Texture field in [-1, 1] on object-frame px coordinates (u, v)."""
  period = rng.uniform(4.0, 7.0) * scale
  k = 2 * np.pi / period
  if kind == 'radial':
    field = 1 - 2 * np.clip((u * u + v * v) / radius ** 2, 0, 1)
  elif kind == 'stripes':
    field = np.sin(k * u)
  elif kind == 'dots':
    field = np.clip(2.5 * (0.8 - np.cos(k * u) - np.cos(k * v)), -1, 1)
  elif kind == 'speckle':
    field = rng.uniform(-1, 1, u.shape)
  elif kind == 'checker':
    field = np.tanh(4 * np.sin(k * u) * np.sin(k * v))
  elif kind == 'rings':
    field = np.cos(k * np.hypot(u, v))
  elif kind == 'hatch':
    lines = np.maximum(np.sin(k * (u + v)), np.sin(k * (u - v)))
    field = np.where(lines > 0.75, -1.0, 1.0)
  elif kind == 'outline':
    field = np.clip(-sd - 2.0 * scale, -1, 1)
  elif kind == 'grid':
    lines = np.minimum(np.abs(np.sin(k * u / 2)), np.abs(np.sin(k * v / 2)))
    field = np.where(lines < 0.3, -1.0, 1.0)
  elif kind == 'bands':
    field = np.sin(k * v / 2.5)
  elif kind == 'zigzag':
    field = np.sin(k * (u + 0.6 * period * np.abs((v / period) % 2 - 1)))
  elif kind == 'blotch':
    field = np.clip(2 * _smooth_noise(rng, *u.shape, 3)[..., 0], -1, 1)
  elif kind == 'spiral':
    field = np.cos(k * np.hypot(u, v) + 3 * np.arctan2(v, u))
  elif kind == 'squares':
    field = np.cos(k * np.maximum(np.abs(u), np.abs(v)))
  elif kind == 'waves':
    field = np.sin(k * v + 2 * np.sin(k * u / 2))
  elif kind == 'ramp':
    field = np.clip(u / radius, -1, 1)
  elif kind == 'polka':
    field = np.clip(3 * (np.cos(k * u / 2) + np.cos(k * v / 2) - 1.2), -1, 1)
  elif kind == 'hexweave':
    field = np.clip((np.cos(k * u) + np.cos(k * (0.866 * v - 0.5 * u))
                     + np.cos(k * (-0.866 * v - 0.5 * u))) / 1.5, -1, 1)
  else:
    raise ValueError(f'Unknown texture {kind!r}.')
  return field.astype(np.float32)


def _paint_object(rng: np.random.Generator, image: np.ndarray, obj: _Object,
                  scale: float) -> None:
  """Alpha-composites a textured object (antialiased edge) into `image`."""
  hue, kind, _ = _STYLE[obj.shape]
  primary, secondary = _object_colours(rng, hue)
  field = _texture(kind, rng, obj.u, obj.v, obj.sd, obj.radius, scale)
  weight = (1 - field[..., None]) * (0.5 * rng.uniform(0.55, 0.9))
  colour = primary + (secondary - primary) * weight
  alpha = np.clip(0.5 - obj.sd, 0, 1)[..., None]
  region = image[obj.window]
  region += (colour - region) * alpha


def _background(rng: np.random.Generator, size: int, scale: float,
                shapes: tuple[str, ...]) -> np.ndarray:
  """float32 (S, S, 3): gradient + low-frequency noise + distractor blobs.

  Colours partly reuse the class hues, so colour alone (or a CRF alone) does
  not separate objects from background.
  """
  hues = [_STYLE[s][0] for s in shapes]

  def hue() -> float:
    return hues[rng.integers(len(hues))] if rng.uniform() < 0.4 else \
        rng.uniform(0, 360)

  start = _colour(rng, hue(), (0.05, 0.5), (0.25, 0.85))
  end = _colour(rng, hue(), (0.05, 0.5), (0.25, 0.85))
  theta = rng.uniform(0, 2 * np.pi)
  coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
  # Python floats keep the arithmetic in float32 (numpy scalars would not).
  ramp = (coords[None, :] * float(np.cos(theta))
          + coords[:, None] * float(np.sin(theta)))
  ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
  image = start + (end - start) * ramp[..., None]
  image += 22.0 * _smooth_noise(rng, size, size, int(rng.integers(3, 7)), 3)
  for _ in range(int(rng.integers(1, 4))):
    _paint_blob(rng, image, size, scale, hue())
  return image


def _paint_blob(rng: np.random.Generator, image: np.ndarray, size: int,
                scale: float, hue: float) -> None:
  """An amorphous "stuff" distractor: a noisy disc with mottled shading.

  Its shading is irregular smooth noise, never one of the regular class
  textures, so a blob is not a mislabelled object; only its colour and
  roundness overlap with the classes.
  """
  radius = rng.uniform(*_RADIUS_RANGE) * scale
  cx, cy = rng.uniform(0, size, size=2)
  reach = 1.6 * radius + 1.0
  r0, r1 = max(0, int(cy - reach)), min(size, int(np.ceil(cy + reach)))
  c0, c1 = max(0, int(cx - reach)), min(size, int(np.ceil(cx + reach)))
  if r1 <= r0 or c1 <= c0:
    return
  v = (np.arange(r0, r1, dtype=np.float32) + 0.5 - cy)[:, None]
  u = (np.arange(c0, c1, dtype=np.float32) + 0.5 - cx)[None, :]
  level = 1 - (u * u + v * v) / radius ** 2
  level = level + 0.8 * _smooth_noise(rng, r1 - r0, c1 - c0, 3)[..., 0]
  # level changes by ~2/radius per px at the rim: this gives a ~1 px soft edge.
  alpha = np.clip(0.5 + 0.5 * radius * level, 0, 1)[..., None]
  cells = max(2, int(round(2 * reach / (8 * scale))))
  _shade_stuff(rng, image[r0:r1, c0:c1], alpha, hue, ((0.2, 0.6), (0.15, 0.6)),
               cells)


def _shade_stuff(rng: np.random.Generator, region: np.ndarray,
                 alpha: np.ndarray, hue: float,
                 saturations: tuple[tuple[float, float], tuple[float, float]],
                 cells: int) -> None:
  """Composites mottled "stuff" shading into `region` (a view) by `alpha`:
  two colours around `hue` (saturation ranges of the primary and secondary)
  mixed by smooth noise of `cells` cells, never a regular class texture."""
  primary = _colour(rng, hue + rng.normal(0, 12), saturations[0], (0.35, 0.85))
  secondary = _colour(rng, hue + rng.uniform(-25, 25), saturations[1],
                      (0.3, 0.85))
  mottle = _smooth_noise(rng, *region.shape[:2], cells)
  colour = primary + (secondary - primary) * (mottle + 1) * rng.uniform(0.1,
                                                                        0.35)
  region += (colour - region) * alpha


def _paint_context(rng: np.random.Generator, image: np.ndarray,
                   boxes: np.ndarray, size: int, scale: float) -> None:
  """Paints a "support" stuff region behind every object (family 'hard').

  A rounded rectangle (superellipse, exponent 4) of 80-95 % of the box's
  half-sizes, centred on the box, with a noisy rim and the mottled shading of
  the distractor blobs (so, across the data set, it looks like background
  stuff), in an arbitrary hue unrelated to the rest of the image: a sofa under
  the cat.  It fills the box corners the object leaves free and rarely crosses
  the box edge, so GrabCut, whose background colour model only sees pixels
  outside the box, takes it for foreground -- the in-box background error
  Box2Seg's attention is meant to correct.  Painted before the objects: it is
  background in the mask.
  """
  for x0, y0, x1, y1 in boxes.astype(np.float64):
    half_x = 0.5 * (x1 - x0) * rng.uniform(*_CONTEXT_HALF_SIZE)
    half_y = 0.5 * (y1 - y0) * rng.uniform(*_CONTEXT_HALF_SIZE)
    cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
    r0, r1 = max(0, int(cy - 1.3 * half_y)), min(
        size, int(np.ceil(cy + 1.3 * half_y)))
    c0, c1 = max(0, int(cx - 1.3 * half_x)), min(
        size, int(np.ceil(cx + 1.3 * half_x)))
    if r1 <= r0 or c1 <= c0:
      continue
    v = (np.arange(r0, r1, dtype=np.float32) + 0.5 - cy)[:, None] / half_y
    u = (np.arange(c0, c1, dtype=np.float32) + 0.5 - cx)[None, :] / half_x
    level = 1 - (u ** 4 + v ** 4) ** 0.25
    level = level + 0.15 * _smooth_noise(rng, r1 - r0, c1 - c0, 3)[..., 0]
    alpha = np.clip(0.5 + 0.5 * min(half_x, half_y) * level, 0, 1)[..., None]
    cells = max(2, int(round(2 * max(half_x, half_y) / (8 * scale))))
    _shade_stuff(rng, image[r0:r1, c0:c1], alpha, rng.uniform(0, 360),
                 ((0.3, 0.8), (0.3, 0.8)), cells)
