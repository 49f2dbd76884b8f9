"""The RRM network: one backbone, a classification branch and a segmentation
branch (Zhang et al., AAAI 2020, Sect. "Overview" and "Implementation").

    classification  Dropout2d → global average pooling → 1×1 classifier
                    without bias → class scores (multi-label soft margin);
                    CAM = ReLU(classifier on the un-dropped features), Eq. (1)
    segmentation    3×3 conv (dilation r) → ReLU → 3×3 conv (dilation r) →
                    logits; r = 12 in the paper, with bias, Xavier init

At training time the network also returns the multi-scale CAM of Eq. (2)
(`cam_scales`, averaged on the 1.0 scale's feature grid, as the official code
does), computed in inference mode (BN with running statistics, no dropout)
and without gradient: RRM's official network has frozen BN, so its no-grad
CAM passes equal an inference pass; a backbone with trained BN (the
benchmark's) gets the same semantics this way.  XLA drops these passes from
any step whose loss does not read them (the classification-only stage).

Parameter tree: `backbone`, `classifier` (the 1×1 kernel), `head` (the
segmentation branch); `classifier` and `head` are the optimiser's new-layer
group (configs/rrm.py).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models import build, layers
from wsss_jax.models.segmenter import check_images
from wsss_jax.pseudo import cam as cam_lib

XAVIER = nn.initializers.xavier_uniform()


class SegmentationBranch(nn.Module):
  """Two dilated 3×3 convolutions with bias (ReLU between them)."""
  num_classes: int
  hidden: int
  dilation: int
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda features, name: layers.conv2d(
        features, 3, padding=self.dilation, dilation=self.dilation,
        dtype=self.dtype, kernel_init=XAVIER, name=name)
    x = nn.relu(conv(self.hidden, 'conv1')(x))
    return conv(self.num_classes, 'conv2')(x).astype(jnp.float32)


class RRMNet(nn.Module):
  """Backbone + classification branch + segmentation branch.

  Attributes:
    backbone: returns {'features'} at output stride 8 (`build_backbone`).
    num_classes: K + 1 (background included); the classifier has K outputs.
    seg_channels: hidden width of the segmentation branch (512 in RRM).
    seg_dilation: dilation of its two convolutions (12 in RRM).
    class_dropout: Dropout2d rate before pooling (0.5 in RRM's code).
    cam_scales: the scales of Eq. (2) returned at training time (empty:
      none); the images are resized to int(s·H) × int(s·W).
  """
  backbone: nn.Module
  num_classes: int
  seg_channels: int = 512
  seg_dilation: int = 12
  class_dropout: float = 0.5
  cam_scales: Sequence[float] = (0.5, 1.0, 1.5, 2.0)
  dtype: layers.Dtype = jnp.float32

  def setup(self):
    self.classifier = layers.conv2d(self.num_classes - 1, 1, use_bias=False,
                                    dtype=self.dtype,
                                    kernel_init=layers.CLASSIFIER_INIT,
                                    name='classifier')
    self.head = SegmentationBranch(self.num_classes, self.seg_channels,
                                   self.seg_dilation, self.dtype, name='head')
    # PyTorch Dropout2d: one draw per (image, channel), as
    # `layers.channel_dropout`, with `deterministic` given per call.
    self.dropout = nn.Dropout(self.class_dropout, broadcast_dims=(1, 2))

  def class_activation_maps(self, images: jax.Array) -> jax.Array:
    """Eq. (1) before its resize: (B, h, w, K) ReLU'd maps, inference mode."""
    features = self.backbone(images, train=False)['features']
    return jax.nn.relu(self.classifier(features).astype(jnp.float32))

  def multiscale_cam(self, images: jax.Array) -> jax.Array:
    """Eq. (2): the mean of the `cam_scales` CAMs on the 1.0 scale's grid
    (B, h, w, K), inference mode.  The 1.0 scale's map gives the grid; XLA
    merges it with the same pass inside the aggregate."""
    grid = self.class_activation_maps(images).shape[1:3]
    return cam_lib.aggregate_multiscale(
        self.class_activation_maps, images, self.cam_scales, False, grid,
        align_corners=False, reduction='mean', rounding='floor')

  def __call__(self, images: jax.Array, train: bool = False) -> dict:
    """Returns {'logits' (B, h, w, K+1) segmentation, 'class_logits' (B, K),
    'cam' (B, h, w, K) single-scale CAM, 'features'} and, when `train` and
    `cam_scales` is set, 'multiscale_cam' (B, h, w, K), Eq. (2), without
    gradient; all float32, h × w the stride-8 grid."""
    check_images(images)
    out = {}
    if train and self.cam_scales:
      # Before the training pass, which updates the BN running statistics
      # that these inference-mode passes read.
      out['multiscale_cam'] = jax.lax.stop_gradient(
          self.multiscale_cam(jax.lax.stop_gradient(images)))
    features = self.backbone(images, train=train)['features']
    pooled = jnp.mean(self.dropout(features, deterministic=not train),
                      axis=(1, 2), keepdims=True)
    out.update({
        'logits': self.head(features),
        'class_logits': self.classifier(pooled)[:, 0, 0].astype(jnp.float32),
        'cam': jax.nn.relu(self.classifier(features).astype(jnp.float32)),
        'features': features.astype(jnp.float32),
    })
    return out


def build_rrm_model(config, num_classes: int, dtype=jnp.float32) -> RRMNet:
  """The network of `config.model` (backbone) and `config.rrm` (branches)."""
  cfg = config.rrm
  return RRMNet(
      backbone=build.build_backbone(config.model, dtype),
      num_classes=int(num_classes), seg_channels=int(cfg.seg_channels),
      seg_dilation=int(cfg.seg_dilation),
      class_dropout=float(cfg.class_dropout),
      cam_scales=tuple(float(s) for s in cfg.cam_scales), dtype=dtype)
