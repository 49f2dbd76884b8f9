"""RRM's training objectives: L = L_class + L_ce + λ·L_energy (Eqs. 8–14),
with the reliable labels of Eqs. 3–7 made inside the step.

`config.rrm` is read once, into `RRMOptions`, when the stages are built; the
loss functions close over the options and never see the config.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from wsss_jax import config_checks
from wsss_jax import losses
from wsss_jax.crf import traced
from wsss_jax.data import schema
from wsss_jax.host.crf import CrfParams
from wsss_jax.methods.rrm import energy as energy_lib
from wsss_jax.methods.rrm import labels as labels_lib
from wsss_jax.ops.resize import resize_bilinear
from wsss_jax.pseudo import cam as cam_lib
from wsss_jax.training.step import LossContext

LABEL_SOURCES = ('rrm', 'cam')   # I_final (Eq. 7) or I_cam alone (Table 2)
LABEL_RULES = ('paper', 'official')
IGNORE = schema.IGNORE_LABEL


@dataclasses.dataclass(frozen=True)
class RRMOptions:
  """Every field of `config.rrm` the losses read, as plain Python values
  (docs/rrm.md, "Defaults and switches")."""
  gamma: float                     # γ of Eq. (4)
  cam_eps: float                   # Eq. (3)'s max + eps
  reliable_ratio: float            # Eq. (6) share per class
  fg_floor: float                  # Eq. (6) foreground candidate floor
  label_source: str                # LABEL_SOURCES
  reliable_label_rule: str         # LABEL_RULES
  official_bg_exponent: float      # 'official': the second exponent (32)
  official_bg_threshold: float     # 'official': sure background score
  official_confidence: float       # 'official': CRF confidence
  label_crf: CrfParams             # Eq. (5)
  energy_weight: float             # λ (0: CE only, Table 2 "+ CE")
  energy_sigma_xy: float           # at full resolution
  energy_sigma_rgb: float
  energy_scale: float              # the energy's grid (0.5: half)
  energy_kernel: str
  energy_backward: str
  energy_sigma_assignment: str
  energy_downsample_interp: str

  @classmethod
  def from_config(cls, cfg) -> RRMOptions:
    """From `config.rrm`; a bad value raises ValueError naming its field."""
    check, choice = config_checks.number, config_checks.choice
    return cls(
        gamma=check('rrm.gamma', cfg.gamma, 0.0),
        cam_eps=check('rrm.cam_eps', cfg.cam_eps, 0.0),
        reliable_ratio=check('rrm.reliable_ratio', cfg.reliable_ratio,
                             1e-6, 1.0),
        fg_floor=check('rrm.fg_floor', cfg.fg_floor, 0.0, 1.0),
        label_source=choice('rrm.label_source', cfg.label_source,
                            LABEL_SOURCES),
        reliable_label_rule=choice('rrm.reliable_label_rule',
                                   cfg.reliable_label_rule, LABEL_RULES),
        official_bg_exponent=check('rrm.official_bg_exponent',
                                   cfg.official_bg_exponent, 0.0),
        official_bg_threshold=check('rrm.official_bg_threshold',
                                    cfg.official_bg_threshold, 0.0, 1.0),
        official_confidence=check('rrm.official_confidence',
                                  cfg.official_confidence, 0.0, 1.0),
        label_crf=CrfParams.from_config(cfg.label_crf),
        energy_weight=check('rrm.energy_weight', cfg.energy_weight, 0.0),
        energy_sigma_xy=check('rrm.energy_sigma_xy', cfg.energy_sigma_xy,
                              1e-6),
        energy_sigma_rgb=check('rrm.energy_sigma_rgb', cfg.energy_sigma_rgb,
                               1e-6),
        energy_scale=float(choice('rrm.energy_scale', cfg.energy_scale,
                                  energy_lib.SCALES)),
        energy_kernel=choice('rrm.energy_kernel', cfg.energy_kernel,
                             energy_lib.KERNELS),
        energy_backward=choice('rrm.energy_backward', cfg.energy_backward,
                               energy_lib.BACKWARDS),
        energy_sigma_assignment=choice(
            'rrm.energy_sigma_assignment', cfg.energy_sigma_assignment,
            energy_lib.SIGMA_ASSIGNMENTS),
        energy_downsample_interp=choice(
            'rrm.energy_downsample_interp', cfg.energy_downsample_interp,
            energy_lib.DOWNSAMPLE_INTERPS))


# ----------------------------------------------------------------------------
# Eq. (9)
# ----------------------------------------------------------------------------
def separate_cross_entropy(logits: jax.Array, labels: jax.Array
                           ) -> tuple[jax.Array, jax.Array]:
  """L_ce, RRM Eq. (9), "computed for background and foreground
  individually": (mean CE over the labelled background pixels, mean CE over
  the labelled foreground pixels) of the batch.  An empty set gives 0 (the
  official code's NaN is a bug, docs/rrm.md).

  Args:
    logits: (B, H, W, C) at the labels' resolution.
    labels: (B, H, W) int, 255 unlabelled.
  """
  ce, labelled = losses.softmax_cross_entropy(logits, labels)
  background = labelled & (labels == 0)
  foreground = labelled & (labels > 0)
  return losses.safe_mean(ce, background), losses.safe_mean(ce, foreground)


# ----------------------------------------------------------------------------
# Loss functions of the stages
# ----------------------------------------------------------------------------
def classification_loss():
  """L_class alone: the classification network RRM starts from (the
  official code's `res38_cls.pth`, trained like PSA's classifier)."""
  def loss_fn(outputs, batch, context: LossContext):
    del context
    loss = losses.multilabel_soft_margin(outputs['class_logits'],
                                         batch[schema.IMAGE_LABELS])
    return loss, {'cls': loss}
  return loss_fn


def online_labels(outputs: dict, batch: dict, options: RRMOptions,
                  crf_backend: str, crf_capacity: Sequence[int] | None,
                  crf_workers: int = 0) -> dict[str, jax.Array]:
  """Algorithm 1, lines 3–7: P_fg,bg, I_cam, I_crf and I_final at the
  crop's resolution, without gradient.

  Returns {'probs' (B, H, W, C), 'i_cam', 'i_crf', 'labels' (B, H, W) int32,
  'crf_overflow' ()}; 'labels' is I_final (by `reliable_label_rule`: the
  paper's Eqs. 6–7, or the official code's two-CRF rule), or I_cam with
  `label_source='cam'` (then no CRF runs).
  """
  images = batch[schema.IMAGE]
  height, width = images.shape[1:3]
  valid = batch[schema.VALID]
  present = batch[schema.IMAGE_LABELS] > 0
  cam = resize_bilinear(outputs['multiscale_cam'], (height, width))
  probs = jax.lax.stop_gradient(labels_lib.foreground_background_probs(
      cam, present, options.gamma, options.cam_eps))
  i_cam = labels_lib.top_ratio_labels(probs, valid, options.reliable_ratio,
                                      options.fg_floor)
  out = {'probs': probs, 'i_cam': i_cam,
         'crf_overflow': jnp.zeros((), bool)}
  if options.label_source == 'cam':
    out.update(i_crf=i_cam, labels=jnp.where(valid, i_cam, IGNORE))
    return out
  crf = lambda p: traced.traced_dense_crf(images, p, options.label_crf,
                                          crf_backend, crf_capacity,
                                          crf_workers)
  q, overflowed = crf(probs)
  if options.reliable_label_rule == 'paper':
    i_crf = jnp.argmax(q, axis=-1).astype(jnp.int32)
    out.update(i_crf=i_crf, crf_overflow=overflowed,
               labels=labels_lib.reliable_labels(i_cam, i_crf, valid))
    return out
  # The official rule: a second CRF with the high background exponent.
  p_fg = probs[..., 1:]
  q_high, high_overflowed = crf(jnp.concatenate([cam_lib.power_background(
      p_fg, options.official_bg_exponent)[..., None], p_fg], axis=-1))
  out.update(
      i_crf=labels_lib.official_crf_label(q, q_high),
      crf_overflow=overflowed | high_overflowed,
      labels=labels_lib.official_reliable_labels(
          p_fg, q, q_high, valid, bg_exponent=options.official_bg_exponent,
          ratio=options.reliable_ratio, fg_floor=options.fg_floor,
          bg_threshold=options.official_bg_threshold,
          confidence=options.official_confidence))
  return out


def _label_metrics(labels, batch, num_classes) -> dict[str, jax.Array]:
  """Reliable-label quality against the ground truth, when the batch has
  it: totals for the log line, per-class counts under 'labels/' (history
  and TensorBoard only) for the last-epoch summary in results.json."""
  valid = batch[schema.VALID]
  if schema.MASK not in batch:
    labelled = jnp.sum(valid & (labels != IGNORE))
    return {'labelled_pct': 100.0 * labelled / jnp.maximum(
        jnp.sum(valid), 1)}
  stats = labels_lib.label_statistics(labels, batch[schema.MASK], valid,
                                      num_classes)
  metrics = {
      'labelled_pct': 100.0 * jnp.sum(stats['labelled']) / jnp.maximum(
          stats['valid'], 1.0),
      'label_precision': 100.0 * jnp.sum(stats['correct']) / jnp.maximum(
          jnp.sum(stats['judged']), 1.0),
      'labels/valid': stats['valid'],
  }
  for name in ('labelled', 'judged', 'correct'):
    for c in range(num_classes):
      metrics[f'labels/{name}_{c}'] = stats[name][c]
  return metrics


def rrm_loss(options: RRMOptions, num_classes: int, crf_backend: str,
             crf_capacity: Sequence[int] | None = None, crf_workers: int = 0):
  """Eq. (8) plus L_class: multi-label soft margin + L_ce (Eq. 9) +
  λ·L_energy (Eqs. 10–14) on the online reliable labels.  The CRF runs on
  `crf_backend` (`crf.traced.traced_dense_crf`, with `crf_capacity` on
  'jax' and `crf_workers` host processes otherwise)."""

  def loss_fn(outputs, batch, context: LossContext):
    del context
    images = batch[schema.IMAGE]
    height, width = images.shape[1:3]
    made = online_labels(outputs, batch, options, crf_backend, crf_capacity,
                         crf_workers)
    labels = made['labels']
    l_class = losses.multilabel_soft_margin(outputs['class_logits'],
                                            batch[schema.IMAGE_LABELS])
    logits = resize_bilinear(outputs['logits'], (height, width))
    ce_bg, ce_fg = separate_cross_entropy(logits, labels)
    metrics = {'cls': l_class, 'ce_bg': ce_bg, 'ce_fg': ce_fg,
               'crf_overflow': made['crf_overflow'].astype(jnp.float32)}
    total = l_class + ce_bg + ce_fg
    if options.energy_weight:
      energy = energy_lib.dense_energy_loss(
          images.astype(jnp.float32), jax.nn.softmax(logits, axis=-1),
          batch[schema.VALID], labels, sigma_xy=options.energy_sigma_xy,
          sigma_rgb=options.energy_sigma_rgb, scale=options.energy_scale,
          kernel=options.energy_kernel, backward=options.energy_backward,
          sigma_assignment=options.energy_sigma_assignment,
          downsample_interp=options.energy_downsample_interp)
      metrics['energy'] = options.energy_weight * energy
      total = total + options.energy_weight * energy
    metrics.update(_label_metrics(labels, batch, num_classes))
    return total, metrics
  return loss_fn
