"""Box2Seg's training objectives: targets on the output grid and the loss
functions of the two phases, composed from the equations in `losses`.

The official code was never released: every choice the paper leaves open is a
field of `config.box2seg` (configs/box2seg.py, docs/box2seg.md).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from wsss_jax import losses
from wsss_jax.data import schema
from wsss_jax.methods.box2seg import losses as L
from wsss_jax.ops import boxes as box_ops
from wsss_jax.training.step import LossContext

GRABCUT_KEY = 'grabcut'


# ----------------------------------------------------------------------------
# Targets on the output grid
# ----------------------------------------------------------------------------
def box_labels_on_grid(boxes: jax.Array, box_labels: jax.Array,
                       grid: tuple[int, int], image_size: tuple[int, int]
                       ) -> jax.Array:
  """The box tensor B in index form on the output grid, (B, h, w) int32.

  Box2Seg Sect. 3.1 (smaller box in front) with the rasterisation of
  reference/box2seg.md §7 item 13: a cell belongs to a box when its centre
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


def num_affinity_samples(cfg, grid_cells: int) -> int:
  """n_s = ceil(√f · m): about a fraction f of the m² pixel pairs (§7 item 4)."""
  return max(2, int(np.ceil(np.sqrt(cfg.affinity_pair_fraction) * grid_cells)))


def _sampled_affinity(outputs, targets, pair_targets, cfg, rng) -> jax.Array:
  """L_A (Eq. 10) on class-balanced samples of the valid M cells."""
  batch, h, w, _ = outputs['embeddings'].shape
  labels = targets['mask_labels'].reshape(batch, -1)
  index, picked = L.class_balanced_sample(
      labels, targets['valid_mask'].reshape(batch, -1), rng,
      num_affinity_samples(cfg, h * w))
  gather = lambda x: jnp.take_along_axis(
      x.reshape(batch, h * w, x.shape[-1]), index[..., None], axis=1)
  return L.affinity_loss(gather(outputs['embeddings']), gather(pair_targets),
                         picked, cfg.affinity_reduction)


# ----------------------------------------------------------------------------
# Loss functions of the two phases
# ----------------------------------------------------------------------------
def pretrain_loss(cfg, num_classes: int):
  """Phase 1 (Sect. 4.1): Eq. (10) with M_i in place of y_i."""
  def loss_fn(outputs, batch, context: LossContext):
    targets = grid_targets(outputs, batch, num_classes)
    loss = _sampled_affinity(outputs, targets, targets['mask'], cfg,
                             context.rng)
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


def train_loss(cfg, num_classes: int, mask_key: str = GRABCUT_KEY,
               semi_key: str | None = None):
  """Phase 2: Eq. (11) with the terms weighted by `config.box2seg.weights`.

  weights.box (Eq. 1), .grabcut (Eq. 2), .aw (λ_AW, Eq. 5), .alpha (λ_α, with
  `alpha_regularizer` 'fill_rate' or 'bbox'), .affinity (λ_A, Eq. 10) and
  .supervised (CE on `semi_key` ground truth: Tables 4–5).  With `semi_key`,
  images that carry pixel labels get the supervised CE only and the others
  the weak terms.
  """
  weights = cfg.weights

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
                                              cfg.fg_class_reduction)
    if weights.alpha:
      if cfg.alpha_regularizer == 'fill_rate':
        terms['alpha'] = L.fill_rate_loss(alpha, t['mask'], t['box'], valid,
                                          cfg.fill_rate_gamma,
                                          cfg.fill_rate_reduction)
      else:
        terms['alpha'] = L.bbox_attention_loss(alpha, t['box'], valid,
                                               cfg.bbox_reg_reduction)
    if weights.affinity:
      y = jnp.exp(log_y)
      if cfg.affinity_stop_grad_y:
        y = jax.lax.stop_gradient(y)
      terms['affinity'] = _sampled_affinity(outputs, t, y, cfg, context.rng)
    zero = jnp.zeros((), jnp.float32)
    # Eq. (11) on the weak terms (an absent term is 0), plus the Table 3
    # `box` row's L_box and the Tables 4–5 supervised CE.
    total = L.total_loss(
        weights.grabcut * terms.get('grabcut', zero), terms.get('aw', zero),
        terms.get('alpha', zero), terms.get('affinity', zero),
        lambda_aw=weights.aw * aw_ramp(context.step, cfg.aw_warmup_steps),
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
