"""Segmentation heads: 1x1 linear and cosine classifiers, the DeepLab-v2 ASPP.

Each head maps backbone features (B, h, w, D) to a dict with 'logits'
(B, h, w, num_classes) and, when the head has its own representation,
'features' (what a classifier reads; BANA's cosine classifier uses it).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from wsss_jax.models import layers


# τ of the cosine classifier, BANA supp. Eq. (3): the one source of
# `model.cosine_temperature` and `bana.temperature` (wsss_jax.defaults).
COSINE_TEMPERATURE = 20.0

class LinearHead(nn.Module):
  """1x1 conv classifier (DeepLab-LargeFOV fc8), module name `classifier`.

  Weights N(0, 0.01), bias 0 (docs/implementation_notes.md, "Networks and
  initialisation").

  Attributes:
    num_classes: output channels.
    use_bias: BANA's classifier has none, LPG's fc8 has one.
    dtype: computation dtype.
  """
  num_classes: int
  use_bias: bool = True
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> dict:
    """(B, h, w, D) -> {'logits': (B, h, w, num_classes) in `dtype`}."""
    del train
    logits = layers.conv2d(self.num_classes, 1, use_bias=self.use_bias,
                           dtype=self.dtype,
                           kernel_init=layers.CLASSIFIER_INIT,
                           name='classifier')(features)
    return {'logits': logits}


class _Kernel(nn.Module):
  """Holds a 1x1 classifier kernel (1, 1, D, C) under `<name>/kernel`, the
  layout of a 1x1 conv, so weight files and parameter groups treat it as one."""
  features: int
  num_classes: int

  @nn.compact
  def __call__(self) -> jax.Array:
    return self.param('kernel', layers.CLASSIFIER_INIT,
                      (1, 1, self.features, self.num_classes), jnp.float32)


class CosineHead(nn.Module):
  """BANA's classifier on features (supplement Sect. 4, Eqs. 2-3), no bias.

  Both forms also return the cosines cos(φ(p), W_c) (the noise-aware loss
  reads D_c = 1 + cos, BANA Eq. 11, whatever the classifier):

  * `kind='cosine'` (supp. Eq. 3): logits = τ·cos(φ, W_c), features and
    weights L2-normalised with eps 1e-12; τ = `temperature` (20).
  * `kind='dot'` (supp. Eq. 2, Table 5's alternative): logits = φ·W_c.

  Weights N(0, 0.01): the initial norm matters with cosines
  (docs/implementation_notes.md, "Networks and initialisation").

  Attributes:
    num_classes: output classes.
    kind: 'cosine' or 'dot'.
    temperature: τ of the cosine form.
    dtype: computation dtype of the input (the products run in float32).
  """
  num_classes: int
  kind: str = 'cosine'
  temperature: float = COSINE_TEMPERATURE
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> dict:
    """(B, h, w, D) -> {'logits', 'cosines'}, each (B, h, w, num_classes)
    float32."""
    del train
    if self.kind not in ('cosine', 'dot'):
      raise ValueError(f"CosineHead.kind={self.kind!r}: expected 'cosine' or "
                       "'dot'.")
    kernel = _Kernel(features.shape[-1], self.num_classes,
                     name='classifier')()[0, 0]
    phi = features.astype(jnp.float32)
    unit_phi = phi / jnp.maximum(
        jnp.linalg.norm(phi, axis=-1, keepdims=True), 1e-12)
    unit_w = kernel / jnp.maximum(
        jnp.linalg.norm(kernel, axis=0, keepdims=True), 1e-12)
    cosines = unit_phi @ unit_w
    logits = (self.temperature * cosines if self.kind == 'cosine'
              else phi @ kernel)
    return {'logits': logits, 'cosines': cosines}


class ASPPV2Head(nn.Module):
  """DeepLab-v2 atrous spatial pyramid pooling (Chen et al., TPAMI 2018).

  Standard form (`aspp_dim == 0`): branches `c0..c3` are 3x3 convs with
  dilation = padding = rate (6, 12, 18, 24) from the features straight to
  class logits, with bias, N(0, 0.01) weights; the branch outputs are summed.

  BANA's form (`aspp_dim > 0`, docs/implementation_notes.md, "Networks and
  initialisation"): the branches output `aspp_dim`
  channels without bias; their sum goes through a ReLU and becomes
  'features'; a 1x1 conv `classifier` (bias = `use_bias`, BANA: none) gives
  the logits, or with `classifier='cosine'`/`'dot'` a `CosineHead` (BANA's
  stage 3, which also returns 'cosines').

  Attributes:
    num_classes: output classes.
    rates: dilation rate of each branch.
    aspp_dim: 0 for the standard head, else the branch width.
    use_bias: bias of the standard branches, or of the 1x1 classifier.
    dtype: computation dtype.
  """
  num_classes: int
  rates: Sequence[int] = (6, 12, 18, 24)
  aspp_dim: int = 0
  use_bias: bool = True
  classifier: str = 'linear'
  temperature: float = COSINE_TEMPERATURE
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, train: bool = False) -> dict:
    """(B, h, w, D) -> {'logits': (B, h, w, num_classes)[, 'features':
    (B, h, w, aspp_dim)][, 'cosines']} in `dtype`."""
    del train
    if not self.rates:
      raise ValueError('aspp_rates must name at least one dilation rate')
    standard = self.aspp_dim <= 0
    out_channels = self.num_classes if standard else self.aspp_dim
    total = None
    for index, rate in enumerate(self.rates):
      branch = layers.conv2d(
          out_channels, 3, padding=rate, dilation=rate,
          use_bias=self.use_bias and standard, dtype=self.dtype,
          kernel_init=layers.CLASSIFIER_INIT, name=f'c{index}')(features)
      total = branch if total is None else total + branch
    if standard:
      return {'logits': total}
    aspp_features = nn.relu(total)
    if self.classifier != 'linear':
      out = CosineHead(self.num_classes, kind=self.classifier,
                       temperature=self.temperature, dtype=self.dtype,
                       name='cosine')(aspp_features)
      return dict(out, features=aspp_features)
    logits = layers.conv2d(self.num_classes, 1, use_bias=self.use_bias,
                           dtype=self.dtype,
                           kernel_init=layers.CLASSIFIER_INIT,
                           name='classifier')(aspp_features)
    return {'logits': logits, 'features': aspp_features}
