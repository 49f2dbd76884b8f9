"""BANA stage 2 over a whole split, run on `wsss_jax.pseudo.engine`.

BANA's parts of the label job (the engine batches, pools and writes):

  device pass 1   Labeler features -> unaries u_0, u_c -> CRF input
                  probabilities (`bana_labels.first_pass`)
  host            DenseCRF [4, 55, 3, 3, 3] over the image's own classes
                  (background and the classes with a box), foreground
                  channels zeroed outside their boxes, argmax -> Y_crf
                  (`crf_labels`)
  device pass 2   prototypes from Y_crf -> correlation maps -> Y_ret
                  (`bana_labels.second_pass`)
  label maps      Y_crf, Y_ret and the agreement map (Y_crf where the two
                  agree, 255 elsewhere), scored to report Table 1's
                  "Y_crf & Y_ret" row.

The engine overlaps the device passes of the next batch with the CRFs of the
previous ones, compiles once per image size, and skips images whose three
PNGs exist.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax.data import schema
from wsss_jax.data.label_png import LabelFolder
from wsss_jax.crf import backend as crf_backend_lib
from wsss_jax.host import crf as crf_lib
from wsss_jax.methods.bana import labels as bana_labels
from wsss_jax.ops import image as image_ops
from wsss_jax.pseudo import engine
from wsss_jax.pseudo import regions as pseudo_regions

log = logging.getLogger(__name__)

Y_CRF, Y_RET, AGREEMENT = 'y_crf', 'y_ret', 'agreement'


@dataclasses.dataclass(frozen=True)
class LabelOptions:
  """The stage-2 switches of `config.bana` (configs/bana.py)."""
  per: str                # 'class' or 'box' (u_c normalisation)
  resolution: str         # 'upsample_maps' or 'upsample_features'
  threshold: float        # background attention cut (0.99)
  batch_size: int
  max_boxes: int
  crf: crf_lib.CrfParams
  crf_backend: str = 'pydensecrf'     # config.crf.backend

  @classmethod
  def from_config(cls, config) -> 'LabelOptions':
    cfg, compat = config.bana, config.bana.compat
    per = {'per_class': 'class', 'per_box': 'box'}.get(
        compat.u_c_normalisation)
    if per is None:
      raise ValueError('bana.compat.u_c_normalisation='
                       f'{compat.u_c_normalisation!r}: expected '
                       "'per_class' or 'per_box'.")
    resolution = compat.stage2_map_resolution
    if resolution not in ('upsample_maps', 'upsample_features'):
      raise ValueError(f'bana.compat.stage2_map_resolution={resolution!r}: '
                       "expected 'upsample_maps' or 'upsample_features'.")
    return cls(per=per, resolution=resolution,
               threshold=float(cfg.background_threshold),
               batch_size=max(1, int(cfg.label_batch_size)),
               max_boxes=int(config.input.max_boxes),
               crf=crf_lib.CrfParams(**dict(cfg.label_crf)),
               crf_backend=str(config.crf.backend))


def make_passes(model, normalization: str, options: LabelOptions):
  """The two jitted device passes, on the engine's batches (one compilation
  per image size):

    first(variables, batch) -> {'probs' (B, H, W, C) float32, 'class_masks'
      (B, H, W, C) bool, 'present' (B, C) bool, 'no_background' (B,) bool}
    second(variables, batch, y_crf (B, H, W) int) -> Y_ret (B, H, W) int32

  `batch` as in `wsss_jax.pseudo.engine.LabelJob.first_pass`.
  """

  def features_and_kernel(variables, images):
    x = image_ops.normalize_images(images, normalization)
    out = model.apply(variables, x, train=False)
    kernel = variables['params']['head']['classifier']['kernel'][0, 0]
    return out['features'], kernel.astype(jnp.float32)

  @jax.jit
  def first(variables, batch):
    images = batch[schema.IMAGE]
    features, kernel = features_and_kernel(variables, images)
    out = bana_labels.first_pass(
        features, kernel, batch[schema.BOXES], batch[schema.BOX_LABELS],
        images.shape[1:3], per=options.per, resolution=options.resolution,
        threshold=options.threshold)
    return {key: out[key]
            for key in ('probs', 'class_masks', 'present', 'no_background')}

  @jax.jit
  def second(variables, batch, y_crf):
    images = batch[schema.IMAGE]
    features, kernel = features_and_kernel(variables, images)
    return bana_labels.second_pass(
        features, kernel, y_crf.astype(jnp.int32), batch[schema.BOXES],
        batch[schema.BOX_LABELS], images.shape[1:3],
        resolution=options.resolution)

  return first, second


def crf_labels(item: Mapping[str, Any], params: crf_lib.CrfParams,
               backend: str = 'pydensecrf') -> np.ndarray:
  """Worker body: Y_crf uint8 (H, W) of one image.

  DenseCRF over the image's own classes only (background and the classes
  with a box, `item['present']`), as the official BANA code does; the CRF's
  cost grows with the channels (2.2x faster at VOC's 21 with 3 present).
  The other channels have probability 0 and their marginals count as 0.
  Through the CRF they held a sliver of every pixel's mass (unary
  -log(1e-5)), so leaving them out can flip an almost-tied argmax: 2 of
  32.8M pixels on the benchmark (docs/fidelity.md).  Foreground channels
  are then zeroed outside their class boxes and the argmax taken (ties to
  the lowest class id).

  item: the engine's host item, with 'image' uint8 (H, W, 3), 'probs'
  float32 (H, W, C), 'class_masks' bool (H, W, C), 'present' bool (C,).
  """
  probs = np.asarray(item['probs'])
  channels = np.flatnonzero(np.asarray(item['present'], bool)
                            | (np.arange(probs.shape[-1]) == 0))
  marginals = crf_lib.get_backend(backend)(
      item[schema.IMAGE], np.transpose(probs[..., channels], (2, 0, 1)),
      params)
  q = np.zeros(probs.shape, np.float32)
  q[..., channels] = np.transpose(marginals, (1, 2, 0))
  return np.asarray(pseudo_regions.mask_marginals(
      q[None], np.asarray(item['class_masks'])[None]))[0].astype(np.uint8)


def label_maps(y_crf: np.ndarray, y_ret: np.ndarray) -> dict[str, np.ndarray]:
  """The three maps of an image from Y_crf (host) and Y_ret (pass 2)."""
  y_ret = np.asarray(y_ret).astype(np.uint8)
  return {Y_CRF: y_crf, Y_RET: y_ret,
          AGREEMENT: np.where(y_crf == y_ret, y_crf,
                              schema.IGNORE_LABEL).astype(np.uint8)}


def label_job(variables, passes, options: LabelOptions) -> engine.LabelJob:
  """BANA's stage 2 as an engine job (`passes` from `make_passes`)."""
  first, second = passes
  return engine.LabelJob(
      outputs=(Y_CRF, Y_RET, AGREEMENT),
      first_pass=functools.partial(first, variables),
      host_fn=functools.partial(crf_labels, params=options.crf,
                                backend=options.crf_backend),
      second_pass=functools.partial(second, variables),
      label_maps=label_maps, batch_size=options.batch_size,
      box_rows=options.max_boxes, counted=('no_background',),
      desc='bana labels')


def generate(source, image_ids, heights, widths, variables, passes,
             options: LabelOptions, folders: dict[str, LabelFolder],
             workers: int) -> dict[str, Any]:
  """Writes Y_crf, Y_ret and agreement PNGs for every image not done yet.

  Args:
    source: random-access decoded training split.
    image_ids, heights, widths: the split index (same order as `source`).
    variables: the trained Labeler's variables.
    passes: `make_passes(...)`.
    options: stage-2 options.
    folders: {Y_CRF, Y_RET, AGREEMENT: LabelFolder}.
    workers: CRF worker processes (0 = inline; always 0 with the 'jax'
      CRF backend).
  Returns:
    counts and throughput: images written/skipped, images with no
    background, images/s, device and host seconds.
  """
  workers = crf_backend_lib.host_workers(options.crf_backend, workers)
  counts = engine.run(label_job(variables, passes, options), source,
                      image_ids, folders, sizes=list(zip(heights, widths)),
                      workers=workers)
  return {'written': counts['written'], 'skipped': counts['skipped'],
          'no_background_images': counts['no_background'],
          'seconds': counts['seconds'],
          'device_seconds': counts['device_seconds'],
          'images_per_second': counts['images_per_second'],
          'crf_workers': workers}
