"""Box2Seg's training objectives: targets on the output grid and the loss
functions of the two phases, composed from the equations in `losses`.

The official code was never released: every choice the paper leaves open is a
field of `config.box2seg` (configs/box2seg.py, docs/box2seg.md).  Those fields
are read once, into `Box2SegLossOptions`, when the stages are built; the loss
functions close over the options and never see the config.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax import config_checks
from wsss_jax import losses
from wsss_jax.data import schema
from wsss_jax.methods.box2seg import losses as L
from wsss_jax.ops import boxes as box_ops
from wsss_jax.training.step import LossContext

GRABCUT_KEY = 'grabcut'
ALPHA_REGULARIZERS = ('fill_rate', 'bbox')


# ----------------------------------------------------------------------------
# Options: `config.box2seg` resolved once
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LossWeights:
  """The weights of Eq. (11) per term (0 = term off): `config.box2seg.weights`.

  box (L_box, Eq. 1), grabcut (L_GC, Eq. 2), aw (λ_AW, Eq. 5), alpha (λ_α),
  affinity (λ_A, Eq. 10).
  """
  box: float
  grabcut: float
  aw: float
  alpha: float
  affinity: float


@dataclasses.dataclass(frozen=True)
class Box2SegLossOptions:
  """Every field of `config.box2seg` the two phases' losses read, as plain
  Python values (docs/box2seg.md, "Choices the paper leaves open")."""
  weights: LossWeights
  alpha_regularizer: str           # 'fill_rate' (L_α^fr) or 'bbox' (Eq. 6)
  fill_rate_gamma: float           # γ
  fill_rate_reduction: str         # losses.FILL_RATE_REDUCTIONS
  fg_class_reduction: str          # losses.FG_CLASS_REDUCTIONS
  bbox_reg_reduction: str          # losses.BBOX_REG_REDUCTIONS
  affinity_pair_fraction: float    # f of n_s = ceil(√f · m)
  affinity_reduction: str          # losses.AFFINITY_REDUCTIONS
  affinity_stop_grad_y: bool
  aw_warmup_steps: int             # λ_AW ramp length (0: none)

  @classmethod
  def from_config(cls, cfg) -> Box2SegLossOptions:
    """From `config.box2seg`; a bad value raises ValueError naming its field."""
    check, choice = config_checks.number, config_checks.choice
    weights = LossWeights(**{
        name: check(f'box2seg.weights.{name}', cfg.weights[name], 0.0)
        for name in ('box', 'grabcut', 'aw', 'alpha', 'affinity')})
    return cls(
        weights=weights,
        alpha_regularizer=choice('box2seg.alpha_regularizer',
                                 cfg.alpha_regularizer, ALPHA_REGULARIZERS),
        fill_rate_gamma=check('box2seg.fill_rate_gamma', cfg.fill_rate_gamma,
                              0.0, 1.0),
        fill_rate_reduction=choice('box2seg.fill_rate_reduction',
                                   cfg.fill_rate_reduction,
                                   L.FILL_RATE_REDUCTIONS),
        fg_class_reduction=choice('box2seg.fg_class_reduction',
                                  cfg.fg_class_reduction,
                                  L.FG_CLASS_REDUCTIONS),
        bbox_reg_reduction=choice('box2seg.bbox_reg_reduction',
                                  cfg.bbox_reg_reduction,
                                  L.BBOX_REG_REDUCTIONS),
        affinity_pair_fraction=check('box2seg.affinity_pair_fraction',
                                     cfg.affinity_pair_fraction, 0.0, 1.0),
        affinity_reduction=choice('box2seg.affinity_reduction',
                                  cfg.affinity_reduction,
                                  L.AFFINITY_REDUCTIONS),
        affinity_stop_grad_y=bool(cfg.affinity_stop_grad_y),
        aw_warmup_steps=check('box2seg.aw_warmup_steps', cfg.aw_warmup_steps,
                              0, integer=True))


# ----------------------------------------------------------------------------
# Targets on the output grid
# ----------------------------------------------------------------------------
def box_labels_on_grid(boxes: jax.Array, box_labels: jax.Array,
                       grid: tuple[int, int], image_size: tuple[int, int]
                       ) -> jax.Array:
  """The box tensor B in index form on the output grid, (B, h, w) int32.

  Box2Seg Sect. 3.1 (smaller box in front) with the rasterisation of
  docs/box2seg.md ("Choices the paper leaves open", 13): a cell belongs to a box when its centre
  ((u + ½)·stride in input coordinates) is inside the half-open box; a box
  containing no centre gets the cell holding its own centre; boxes are
  painted in decreasing area, ties in annotation order (later on top).

  Args:
    boxes: (B, N, 4) float edge boxes in input pixels; box_labels (B, N),
      −1 on padded rows.
    grid: (h, w) output cells; image_size: (H, W) input pixels.
  """
  (h, w), (height, width) = grid, image_size
  x0, y0, x1, y1 = (boxes[..., k] for k in range(4))
  real = box_labels >= 1
  in_y, in_x = box_ops.centre_membership(boxes, box_labels, grid, image_size)
  cover = in_y[..., :, None] & in_x[..., None, :]                # (B, N, h, w)
  own_row = jnp.clip(jnp.floor((y0 + y1) / 2 * h / height), 0, h - 1)
  own_col = jnp.clip(jnp.floor((x0 + x1) / 2 * w / width), 0, w - 1)
  own = ((jnp.arange(h)[:, None] == own_row[..., None, None])
         & (jnp.arange(w)[None, :] == own_col[..., None, None]))
  empty = ~jnp.any(cover, axis=(-2, -1))
  cover = (cover | (own & empty[..., None, None])) & real[..., None, None]
  area = jnp.where(real, (x1 - x0) * (y1 - y0), -1.0)
  count = boxes.shape[1]
  order = jnp.lexsort((jnp.broadcast_to(jnp.arange(count), area.shape),
                       -area), axis=-1)
  rank = jnp.zeros_like(order).at[
      jnp.arange(order.shape[0])[:, None], order].set(
          jnp.broadcast_to(jnp.arange(count), order.shape))
  priority = jnp.where(cover, rank[..., None, None] + 1, 0)      # 0: none
  winner = jnp.argmax(priority, axis=1)                          # (B, h, w)
  label = jnp.take_along_axis(box_labels, winner.reshape(winner.shape[0], -1),
                              axis=1).reshape(winner.shape)
  return jnp.where(jnp.max(priority, axis=1) > 0, label, 0)


def grid_targets(outputs: dict, batch: dict, num_classes: int,
                 mask_key: str = GRABCUT_KEY) -> dict[str, jax.Array]:
  """B, M and validity at the logits' resolution (centre-sampling nearest).

  Returns {'valid' (B,h,w) bool, 'box' and 'mask' one-hot (B,h,w,C),
  'mask_labels' (B,h,w) int32 (255 = ignore)}; `mask_key` selects the
  batch's label map used as M (GrabCut; the ground truth for supervised_awl).
  """
  h, w = outputs['logits'].shape[1:3]
  height, width = batch[schema.IMAGE].shape[1:3]
  valid = losses.resize_labels_nearest(batch[schema.VALID], h, w)
  mask_labels = losses.resize_labels_nearest(batch[mask_key], h,
                                             w).astype(jnp.int32)
  valid_mask = valid & (mask_labels != schema.IGNORE_LABEL)
  box = box_labels_on_grid(batch[schema.BOXES], batch[schema.BOX_LABELS],
                           (h, w), (height, width))
  return {'valid': valid,
          'box': jax.nn.one_hot(box, num_classes) * valid[..., None],
          'mask': jax.nn.one_hot(jnp.where(valid_mask, mask_labels, 0),
                                 num_classes) * valid_mask[..., None],
          'mask_labels': jnp.where(valid_mask, mask_labels,
                                   schema.IGNORE_LABEL),
          'valid_mask': valid_mask}


def num_affinity_samples(pair_fraction: float, grid_cells: int) -> int:
  """n_s = ceil(√f · m): about a fraction f of the m² pixel pairs
  (docs/box2seg.md, "Choices the paper leaves open", 3–4)."""
  return max(2, int(np.ceil(np.sqrt(pair_fraction) * grid_cells)))


def _sampled_affinity(outputs, targets, pair_targets, pair_fraction: float,
                      reduction: str, rng) -> jax.Array:
  """L_A (Eq. 10) on class-balanced samples of the valid M cells."""
  batch, h, w, _ = outputs['embeddings'].shape
  labels = targets['mask_labels'].reshape(batch, -1)
  index, picked = L.class_balanced_sample(
      labels, targets['valid_mask'].reshape(batch, -1), rng,
      num_affinity_samples(pair_fraction, h * w))
  gather = lambda x: jnp.take_along_axis(
      x.reshape(batch, h * w, x.shape[-1]), index[..., None], axis=1)
  return L.affinity_loss(gather(outputs['embeddings']), gather(pair_targets),
                         picked, reduction)


# ----------------------------------------------------------------------------
# Loss functions of the two phases
# ----------------------------------------------------------------------------
def pretrain_loss(options: Box2SegLossOptions, num_classes: int):
  """Phase 1 (Sect. 4.1): Eq. (10) with M_i in place of y_i."""
  pair_fraction = options.affinity_pair_fraction
  reduction = options.affinity_reduction

  def loss_fn(outputs, batch, context: LossContext):
    targets = grid_targets(outputs, batch, num_classes)
    loss = _sampled_affinity(outputs, targets, targets['mask'], pair_fraction,
                             reduction, context.rng)
    return loss, {'affinity': loss}
  return loss_fn


def aw_ramp(step: jax.Array, warmup_steps: int) -> jax.Array:
  """λ_AW's factor at `step`: linear from 0 to 1 over `warmup_steps` (1 with
  no warm-up).  Not in the paper: from a randomly initialised y branch the
  early cross-entropy makes λ_AW·L_fg push every α to 0 within a few steps
  (docs/box2seg.md, "Attention collapse")."""
  if not warmup_steps:
    return jnp.ones((), jnp.float32)
  return jnp.minimum(1.0, step.astype(jnp.float32) / float(warmup_steps))


def train_loss(options: Box2SegLossOptions, num_classes: int,
               mask_key: str = GRABCUT_KEY, semi_key: str | None = None):
  """Phase 2: Eq. (11) with the terms weighted by `options.weights`.

  weights.box (Eq. 1), .grabcut (Eq. 2), .aw (λ_AW, Eq. 5), .alpha (λ_α, with
  `alpha_regularizer` 'fill_rate' or 'bbox'), .affinity (λ_A, Eq. 10); with
  `semi_key` a supervised CE on that ground truth (Tables 4–5): images that
  carry pixel labels get the supervised CE only and the others the weak
  terms.
  """
  weights = options.weights

  def loss_fn(outputs, batch, context: LossContext):
    t = grid_targets(outputs, batch, num_classes, mask_key)
    valid = t['valid']
    log_y = jax.nn.log_softmax(outputs['logits'])
    alpha = jax.nn.sigmoid(outputs['attention_logits'])
    terms = {}
    if semi_key is not None:
      h, w = log_y.shape[1:3]
      semi = losses.resize_labels_nearest(batch[semi_key], h, w)
      labelled = jnp.any(semi != schema.IGNORE_LABEL, axis=(1, 2))
      ce, ok = losses.softmax_cross_entropy(outputs['logits'], semi)
      terms['supervised'] = losses.safe_mean(ce, ok & valid)
      valid = valid & ~labelled[:, None, None]
      t = dict(t, box=t['box'] * valid[..., None],
               mask=t['mask'] * valid[..., None],
               valid_mask=t['valid_mask'] & valid)
    if weights.box:
      terms['box'] = L.box_loss(log_y, t['box'], valid)
    if weights.grabcut:
      terms['grabcut'] = L.grabcut_loss(log_y, t['mask'], t['valid_mask'])
    if weights.aw:
      terms['aw'] = L.attention_weighted_loss(log_y, alpha, t['box'], valid,
                                              options.fg_class_reduction)
    if weights.alpha:
      if options.alpha_regularizer == 'fill_rate':
        terms['alpha'] = L.fill_rate_loss(alpha, t['mask'], t['box'], valid,
                                          options.fill_rate_gamma,
                                          options.fill_rate_reduction)
      else:
        terms['alpha'] = L.bbox_attention_loss(alpha, t['box'], valid,
                                               options.bbox_reg_reduction)
    if weights.affinity:
      y = jnp.exp(log_y)
      if options.affinity_stop_grad_y:
        y = jax.lax.stop_gradient(y)
      terms['affinity'] = _sampled_affinity(
          outputs, t, y, options.affinity_pair_fraction,
          options.affinity_reduction, context.rng)
    zero = jnp.zeros((), jnp.float32)
    # Eq. (11) on the weak terms (an absent term is 0), plus the Table 3
    # `box` row's L_box and the Tables 4–5 supervised CE.
    total = L.total_loss(
        weights.grabcut * terms.get('grabcut', zero), terms.get('aw', zero),
        terms.get('alpha', zero), terms.get('affinity', zero),
        lambda_aw=weights.aw * aw_ramp(context.step, options.aw_warmup_steps),
        lambda_alpha=weights.alpha, lambda_affinity=weights.affinity)
    total = (total + weights.box * terms.get('box', zero)
             + terms.get('supervised', zero))
    # Monitoring only: the mean predicted fill rate η' (Eq. 8) of the boxes.
    eta_pred = L.predicted_fill_rates(alpha, t['box'], valid)
    present = jnp.sum(t['box'][..., 1:], axis=(1, 2)) > 0
    metrics = dict(terms, attention_fill=jax.lax.stop_gradient(
        losses.safe_mean(eta_pred, present)))
    return total, metrics
  return loss_fn
