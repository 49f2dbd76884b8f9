"""LPG's options (`config.lpg`) and the E-step loss over `LPGNet`'s outputs."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from wsss_jax import config_checks
from wsss_jax import losses as shared_losses
from wsss_jax.data import schema
from wsss_jax.methods.lpg import fusion
from wsss_jax.methods.lpg import losses
from wsss_jax.training.step import LossContext

SCHEDULES = ('stagewise', 'fixed')          # Table 2: EM vs the final LPG
ROUND1_INPUTS = ('with_segmentation', 'box_image_only')
PSEUDO_KEY = 'pseudo'                        # batch key of the labels f learns
SEMI_KEY = 'semi_mask'                       # ground truth of the labelled share


@dataclasses.dataclass(frozen=True)
class LPGOptions:
  """`config.lpg`, checked (fields as documented in configs/lpg.py)."""
  stages: int
  schedule: str
  fusion: str
  round1_input: str
  padding_as_background: bool
  max_classes: int
  semi_fraction: float

  @classmethod
  def from_config(cls, cfg) -> LPGOptions:
    """From `config.lpg`; a bad value raises ValueError naming its field."""
    number, choice = config_checks.number, config_checks.choice
    return cls(
        stages=int(number('lpg.stages', cfg.stages, 1, integer=True)),
        schedule=choice('lpg.schedule', cfg.schedule, SCHEDULES),
        fusion=choice('lpg.fusion', cfg.fusion, fusion.FUSIONS),
        round1_input=choice('lpg.round1_input', cfg.round1_input,
                            ROUND1_INPUTS),
        padding_as_background=bool(cfg.padding_as_background),
        max_classes=int(number('lpg.max_classes', cfg.max_classes, 1,
                               integer=True)),
        semi_fraction=number('lpg.semi_fraction', cfg.semi_fraction, 0.0,
                             1.0),
    )

  def generator_stage(self, stage: int) -> int:
    """The generator that labels deployment stage `stage` (1-based): its
    own (stage-wise EM), or the last one at every stage (`fixed`)."""
    return self.stages if self.schedule == 'fixed' else stage

  def uses_segmentation(self, generator: int) -> bool:
    """Whether generator `generator` (1-based) reads f's probability."""
    return generator > 1 or self.round1_input == 'with_segmentation'


def e_step_loss(options: LPGOptions):
  """The upper problem of LPG Eq. (6) as a training loss: cross-entropy
  between g's logits at 1/4 resolution and every slot's binary ground truth
  (`losses.binary_targets`, top-left sampled by `losses.quarter_labels`).
  Needs the batch's ground-truth 'mask' and 'valid' (the auxiliary set has
  pixel labels)."""

  def loss_fn(outputs, batch, context: LossContext):
    del context
    logits = outputs['lpg_logits']                  # (B, M, h, w, 2)
    batch_size, slots = logits.shape[:2]
    targets = losses.binary_targets(
        batch[schema.MASK], batch[schema.VALID], outputs['slot_classes'],
        outputs['slot_valid'], options.padding_as_background)
    height, width = targets.shape[-2:]
    targets = losses.quarter_labels(
        targets.reshape(batch_size * slots, height, width))
    flat = logits.reshape((batch_size * slots,) + logits.shape[2:])
    loss = losses.e_step_loss(flat, targets)
    slots_used = jnp.mean(jnp.sum(outputs['slot_valid'], axis=-1))
    return loss, {'ce': loss, 'classes_per_image': slots_used}

  return loss_fn


def semi_cross_entropy():
  """f's loss in the semi-supervised setting (Tables 4-6 "Semi"): the
  ground truth on the images of the labelled share (`SEMI_KEY` not all
  ignore), the LPG masks on the others."""
  def loss_fn(outputs, batch, context: LossContext):
    del context
    semi = batch[SEMI_KEY]
    labelled = jnp.any(semi != schema.IGNORE_LABEL, axis=(1, 2))
    labels = jnp.where(labelled[:, None, None], semi, batch[PSEUDO_KEY])
    loss = shared_losses.segmentation_cross_entropy(outputs['logits'], labels)
    return loss, {'ce': loss,
                  'labelled_share': jnp.mean(labelled.astype(jnp.float32))}

  return loss_fn
