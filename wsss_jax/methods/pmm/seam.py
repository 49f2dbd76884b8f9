"""PMM's CAM network: SEAM (Wang et al., CVPR 2020) as PMM trains it.

PMM (Li et al., ICCV 2021) builds its classification stage on SEAM's
"self-supervised equivariant attention mechanism" network and infers with its
PCM-refined map `cam_rv` (docs/pmm.md):

    backbone -> 1×1 classifier without bias, C = K + 1 channels (background
                channel 0 included) -> `cam` (raw, may be negative)
    PCM      at the feature grid (h, w): the stop-gradient'ed CAM, ReLU'd
             and max-normalised per channel (`pcm_normalize`), is propagated
             by a cosine affinity of 1×1-conv features of two backbone levels
             and the resized image (`pcm_propagate`) -> `cam_rv`
    both maps are upsampled bilinearly (align_corners=True) to the input.

Two views in one training forward (SEAM's equivariance): the images and the
images resized bilinearly (align_corners=True) by `second_view_scale` (0.3),
output size floor(H·s) × floor(W·s) as PyTorch's `interpolate(scale_factor=s)`.
The losses are in `seam_losses`.

Parameter tree: `backbone`, `classifier` (the 1×1 kernel, (1, 1, D, C)),
`pcm` (`f8_3`, `f8_4`, `f9`, SEAM's names); ('classifier', 'pcm') is the
optimiser's new-layer group.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models import build, layers
from wsss_jax.models.segmenter import check_images
from wsss_jax.ops.resize import resize_bilinear

# SEAM's epsilons (PCM normalisation and the affinity's normalisations).
PCM_EPS = 1e-5
# SEAM's initialisers: classifier Xavier-uniform; f8_3, f8_4 Kaiming-normal
# (fan-in, gain √2); f9 Xavier-uniform with gain 4 (variance 16 · 2/(in + out)).
CLASSIFIER_INIT = nn.initializers.xavier_uniform()
F9_INIT = nn.initializers.variance_scaling(16.0, 'fan_avg', 'uniform')

DEFAULT_SECOND_VIEW_SCALE = 0.3
DEFAULT_PCM_LEVELS = ('c4', 'c5')
DEFAULT_PCM_CHANNELS = (64, 128)
PCM_DIM = 192


def pcm_normalize(cam: jax.Array) -> jax.Array:
  """SEAM's PCM input: the no-gradient, max-normalised, max-one-hot CAM.

  cam_d = ReLU(stop_gradient(cam)); per image and channel
  n = ReLU(cam_d − 1e-5) / (max_pixels(cam_d) + 1e-5); then channel 0 :=
  1 − max over the foreground channels, and each foreground channel is
  zeroed wherever it is strictly below the per-pixel foreground maximum
  (ties are all kept).  docs/pmm.md (SEAM's PCM, the CAM PMM infers with).

  Args:
    cam: (B, h, w, C) raw class map at the feature grid, C = K + 1 >= 2.
  Returns:
    (B, h, w, C) float32 in [0, 1], no gradient; finite for any finite input
    (an all-negative channel gives zeros).
  """
  if cam.ndim != 4 or cam.shape[-1] < 2:
    raise ValueError(f'cam must be (B, h, w, C) with C >= 2 (background '
                     f'included), got shape {tuple(cam.shape)}')
  cam_d = jax.nn.relu(jax.lax.stop_gradient(cam).astype(jnp.float32))
  peak = jnp.max(cam_d, axis=(1, 2), keepdims=True) + PCM_EPS
  norm = jax.nn.relu(cam_d - PCM_EPS) / peak
  fg = norm[..., 1:]
  fg_max = jnp.max(fg, axis=-1, keepdims=True)
  fg = jnp.where(fg < fg_max, 0.0, fg)
  return jnp.concatenate([1.0 - fg_max, fg], axis=-1)


def _safe_l2_norm(x: jax.Array) -> jax.Array:
  """‖x‖ along the last axis (keepdims), 0 with a zero gradient at x = 0."""
  squared = jnp.sum(x * x, axis=-1, keepdims=True)
  ok = squared > 0
  return jnp.where(ok, jnp.sqrt(jnp.where(ok, squared, 1.0)), 0.0)


def pcm_affinity(feats: jax.Array) -> jax.Array:
  """SEAM's PCM affinity, column-normalised.

  f̂_i = f_i / (‖f_i‖ + 1e-5) per pixel; A_ij = ReLU(f̂_i · f̂_j); returns
  A_ij / (Σ_i A_ij + 1e-5) (each column divided by its sum over the first
  index).  docs/pmm.md.

  Args:
    feats: (B, h, w, D) PCM features (f9's output).
  Returns:
    (B, hw, hw) float32, pixels in row-major (h, w) order; finite with
    finite gradients for all-zero feature vectors.
  """
  if feats.ndim != 4:
    raise ValueError(f'feats must be (B, h, w, D), got shape '
                     f'{tuple(feats.shape)}')
  batch, h, w, dim = feats.shape
  f = feats.astype(jnp.float32).reshape(batch, h * w, dim)
  f = f / (_safe_l2_norm(f) + PCM_EPS)
  aff = jax.nn.relu(jnp.einsum('bid,bjd->bij', f, f))
  return aff / (jnp.sum(aff, axis=1, keepdims=True) + PCM_EPS)


def pcm_propagate(cam_norm: jax.Array, feats: jax.Array) -> jax.Array:
  """SEAM's pixel correlation module: cam_rv = cam_norm @ A.

  cam_rv[c, j] = Σ_i cam_norm[c, i] · A_ij with A = `pcm_affinity(feats)`
  (SEAM's PCM, docs/pmm.md); gradients reach `feats` (and
  `cam_norm` if it carries any).

  Args:
    cam_norm: (B, h, w, C) normalised CAM (`pcm_normalize`).
    feats: (B, h, w, D) PCM features on the same grid.
  Returns:
    (B, h, w, C) float32.
  """
  if cam_norm.ndim != 4 or feats.ndim != 4 \
      or cam_norm.shape[:3] != feats.shape[:3]:
    raise ValueError(f'cam_norm (B, h, w, C) and feats (B, h, w, D) must '
                     f'share (B, h, w), got {tuple(cam_norm.shape)} and '
                     f'{tuple(feats.shape)}')
  batch, h, w, channels = cam_norm.shape
  aff = pcm_affinity(feats)
  cam = cam_norm.astype(jnp.float32).reshape(batch, h * w, channels)
  return jnp.einsum('bic,bij->bjc', cam, aff).reshape(batch, h, w, channels)


def second_view_size(height: int, width: int, scale: float
                     ) -> tuple[int, int]:
  """(floor(H·s), floor(W·s)): PyTorch `interpolate(scale_factor=s)`."""
  size = (int(math.floor(height * scale)), int(math.floor(width * scale)))
  if min(size) < 1:
    raise ValueError(f'second_view_scale={scale} maps a {height}x{width} '
                     f'input to {size[0]}x{size[1]}; use larger images or a '
                     f'larger scale')
  return size


class PCMFeatures(nn.Module):
  """SEAM's PCM feature branch: f8_3, f8_4 (1×1, no bias, ReLU) on the two
  stop-gradient'ed backbone levels, concatenated after the resized image,
  then f9 (1×1, no bias) to `dim` channels."""
  channels: Sequence[int] = DEFAULT_PCM_CHANNELS
  dim: int = PCM_DIM
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_small: jax.Array, level_a: jax.Array,
               level_b: jax.Array) -> jax.Array:
    """(B, h, w, 3), (B, h, w, Da), (B, h, w, Db) -> (B, h, w, dim) in
    `dtype`; the levels are stop-gradient'ed here."""
    conv = lambda features, init, name: layers.conv2d(
        features, 1, use_bias=False, dtype=self.dtype, kernel_init=init,
        name=name)
    a = nn.relu(conv(self.channels[0], layers.HE_NORMAL_FAN_IN, 'f8_3')(
        jax.lax.stop_gradient(level_a)))
    b = nn.relu(conv(self.channels[1], layers.HE_NORMAL_FAN_IN, 'f8_4')(
        jax.lax.stop_gradient(level_b)))
    f = jnp.concatenate([image_small.astype(self.dtype), a, b], axis=-1)
    return conv(self.dim, F9_INIT, 'f9')(f)


class SEAMNet(nn.Module):
  """SEAM's network (PMM's CAM classifier).

  Attributes:
    backbone: returns {'features', 'levels'} at output stride 8
      (`build.build_backbone`).
    num_classes: C = K + 1 (background included): the classifier's outputs.
    second_view_scale: s of the second training view (SEAM: 0.3).
    pcm_levels: the two backbone levels under PCM's f8_3 and f8_4 (SEAM's
      ResNet-38 conv4/conv5: ('c3', 'c4') of `resnet38_psa`; VGG LargeFOV:
      ('c4', 'c5')); resized bilinearly (align_corners=True) to the
      features' grid when theirs differs.
    pcm_channels: output channels of f8_3 and f8_4 (SEAM: 64, 128).
    pcm_dim: output channels of f9 (SEAM: 192).
    classifier_dropout: channel dropout (Dropout2d) of the features before
      the classifier in training (SEAM's code: 0.5; 0 = none).
    dtype: computation dtype; maps are returned in float32.
  """
  backbone: nn.Module
  num_classes: int
  second_view_scale: float = DEFAULT_SECOND_VIEW_SCALE
  pcm_levels: Sequence[str] = DEFAULT_PCM_LEVELS
  pcm_channels: Sequence[int] = DEFAULT_PCM_CHANNELS
  pcm_dim: int = PCM_DIM
  classifier_dropout: float = 0.0
  dtype: layers.Dtype = jnp.float32

  def setup(self):
    if int(self.num_classes) < 2:
      raise ValueError(f'num_classes must be >= 2 (background included), '
                       f'got {self.num_classes}')
    if len(self.pcm_levels) != 2:
      raise ValueError(f'pcm_levels must name two backbone levels, got '
                       f'{self.pcm_levels!r}')
    if len(self.pcm_channels) != 2 or min(self.pcm_channels) < 1:
      raise ValueError(f'pcm_channels must be two positive ints, got '
                       f'{self.pcm_channels!r}')
    if not self.second_view_scale > 0:
      raise ValueError(f'second_view_scale must be > 0, got '
                       f'{self.second_view_scale}')
    self.classifier = layers.conv2d(self.num_classes, 1, use_bias=False,
                                    dtype=self.dtype,
                                    kernel_init=CLASSIFIER_INIT,
                                    name='classifier')
    if not 0.0 <= self.classifier_dropout < 1.0:
      raise ValueError(f'classifier_dropout must be in [0, 1), got '
                       f'{self.classifier_dropout}')
    # Dropout2d: whole channels, the same mask over the spatial axes.
    self.dropout = nn.Dropout(float(self.classifier_dropout),
                              broadcast_dims=(1, 2))
    self.pcm = PCMFeatures(tuple(int(c) for c in self.pcm_channels),
                           int(self.pcm_dim), self.dtype, name='pcm')

  def _level(self, out: dict, index: int, grid: tuple[int, int]
             ) -> jax.Array:
    name = self.pcm_levels[index]
    levels = out.get('levels', {})
    if name not in levels:
      raise ValueError(f'pcm_levels: the backbone has no level {name!r}; it '
                       f'returns {sorted(levels)}')
    return resize_bilinear(levels[name], grid, align_corners=True)

  def view(self, images: jax.Array, train: bool = False
           ) -> tuple[jax.Array, jax.Array]:
    """One view: (cam, cam_rv), each (B, H, W, C) float32 at the input size.

    cam is the raw classifier map, cam_rv its PCM refinement; both upsampled
    bilinearly with align_corners=True from the feature grid.
    """
    height, width = images.shape[1:3]
    out = self.backbone(images, train=train)
    features = out['features']
    if self.classifier_dropout:
      features = self.dropout(features, deterministic=not train)
    cam = self.classifier(features).astype(jnp.float32)
    grid = cam.shape[1:3]
    feats = self.pcm(resize_bilinear(images, grid, align_corners=True),
                     self._level(out, 0, grid), self._level(out, 1, grid))
    cam_rv = pcm_propagate(pcm_normalize(cam), feats)
    up = lambda x: resize_bilinear(x, (height, width), align_corners=True)
    return up(cam), up(cam_rv)

  def inference_cam(self, images: jax.Array) -> jax.Array:
    """PMM's inference CAM: the foreground channels of cam_rv, (B, H, W, K)
    float32 at the input size, inference mode (train=False)."""
    check_images(images)
    return self.view(images, train=False)[1][..., 1:]

  def __call__(self, images: jax.Array, train: bool = False) -> dict:
    """Runs view 1 (and, when `train`, view 2 = the images resized by
    `second_view_scale`).

    Returns, for each computed view v, 'cam{v}' and 'cam_rv{v}' (B, H_v,
    W_v, C) and 'class_logits{v}' (B, K) = the spatial mean of cam{v}'s
    foreground channels (SEAM pools the upsampled map); plus 'logits' =
    cam_rv1 and 'class_logits' = class_logits1.  All float32.
    """
    check_images(images)
    views = [images]
    if train:
      size = second_view_size(images.shape[1], images.shape[2],
                              float(self.second_view_scale))
      views.append(resize_bilinear(images, size, align_corners=True))
    out = {}
    for index, x in enumerate(views, start=1):
      cam, cam_rv = self.view(x, train=train)
      out[f'cam{index}'] = cam
      out[f'cam_rv{index}'] = cam_rv
      out[f'class_logits{index}'] = jnp.mean(cam[..., 1:], axis=(1, 2))
    out['logits'] = out['cam_rv1']
    out['class_logits'] = out['class_logits1']
    return out


def _field(section: Any, name: str, default: Any) -> Any:
  """section[name], or `default` when the section or the field is absent."""
  if section is None:
    return default
  if isinstance(section, Mapping) or hasattr(section, 'get'):
    value = section.get(name, None)
    return default if value is None else value
  return getattr(section, name, default)


def build_seam_model(config, num_classes: int, dtype: Any = jnp.float32
                     ) -> SEAMNet:
  """The SEAM network of `config.model` (backbone) and `config.pmm`
  (`second_view_scale`, `pcm_levels`, `pcm_channels`, `classifier_dropout`;
  an absent field, or section, takes SEAM's value, except the dropout: 0)."""
  section = config.get('pmm', None) if hasattr(config, 'get') else getattr(
      config, 'pmm', None)
  levels = tuple(str(n) for n in _field(section, 'pcm_levels',
                                        DEFAULT_PCM_LEVELS))
  channels = tuple(int(c) for c in _field(section, 'pcm_channels',
                                          DEFAULT_PCM_CHANNELS))
  scale = float(_field(section, 'second_view_scale',
                       DEFAULT_SECOND_VIEW_SCALE))
  if len(levels) != 2:
    raise ValueError(f'pmm.pcm_levels must name two levels, got {levels!r}')
  if len(channels) != 2 or min(channels) < 1:
    raise ValueError(f'pmm.pcm_channels must be two positive ints, got '
                     f'{channels!r}')
  if not scale > 0:
    raise ValueError(f'pmm.second_view_scale must be > 0, got {scale}')
  if int(num_classes) < 2:
    raise ValueError(f'num_classes must be >= 2 (background included), got '
                     f'{num_classes}')
  dropout = float(_field(section, 'classifier_dropout', 0.0))
  return SEAMNet(backbone=build.build_backbone(config.model, dtype),
                 num_classes=int(num_classes), second_view_scale=scale,
                 pcm_levels=levels, pcm_channels=channels,
                 classifier_dropout=dropout,
                 dtype=build.compute_dtype(dtype))
