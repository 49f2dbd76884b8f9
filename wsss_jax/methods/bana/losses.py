"""BANA stage-3 losses (Oh, Kim, Ham, CVPR 2021), one function per equation.

Notation (paper Sect. 3.3): at every pixel p the network gives cosines
cos(φ(p), W_c) (B, H, W, C) of the cosine classifier and logits τ·cos
(supp. Eq. 3, τ = 20; the caller scales), C = L + 1 classes with background
0.  Y_crf and Y_ret (B, H, W) are the two pseudo labels of stage 2, 255 =
ignore (crop padding).  The caller brings logits, cosines and labels to one
resolution (the official code: cosines upsampled to the crop, labels never
downsampled; docs/bana.md, "Stage 3 at the crop resolution").

  S  = pixels where Y_crf and Y_ret agree (reliable),
  ~S = pixels where they differ (unreliable); Y_crf = 255 is in neither.

Every mean is over all pixels of the batch (one normaliser, as in the
official code), not per image.  Every loss is finite, with finite gradients,
when the region it averages over is empty (that term is 0); the official code
returns NaN for an empty ~S, which is not reproduced (docs/bana.md, "Bugs of
the released code not reproduced").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from wsss_jax.data import schema
from wsss_jax.losses import safe_mean, softmax_cross_entropy

# Below this max_c D_c(p) (all cosines ≈ −1) the ratio of Eq. (12) is 1.
_MIN_SCORE = 1e-6

LOSS_KINDS = ('nal', 'ce_only', 'entropy_reg', 'bootstrap', 'crf_only',
              'ret_only')


def regions(y_crf: jax.Array, y_ret: jax.Array,
            ignore_label: int = schema.IGNORE_LABEL
            ) -> tuple[jax.Array, jax.Array]:
  """The reliable region S and the unreliable region ~S (BANA Sect. 3.3).

  S = {p : Y_crf(p) = Y_ret(p) ≠ ignore}; ~S = {p : Y_crf(p) ≠ Y_ret(p),
  Y_crf(p) ≠ ignore}.  As in the official code (docs/bana.md, "Stage 3 at
  the crop resolution"):
  a pixel with Y_crf ≠ 255 and Y_ret = 255 is unreliable; one with
  Y_crf = 255 is in neither region.

  Args:
    y_crf, y_ret: (B, H, W) integer labels.
  Returns:
    (reliable (B, H, W) bool, unreliable (B, H, W) bool), disjoint.
  """
  labelled = y_crf != ignore_label
  agree = y_crf == y_ret
  return agree & labelled, ~agree & labelled


def cosine_scores(cosines: jax.Array) -> jax.Array:
  """D_c(p), BANA Eq. (11): 1 + cos(φ(p), W_c), in [0, 2].

  Args:
    cosines: (B, H, W, C).
  Returns:
    (B, H, W, C) float32.
  """
  return 1.0 + cosines.astype(jnp.float32)


def nal_confidence(cosines: jax.Array, y_crf: jax.Array, gamma: float,
                   ignore_label: int = schema.IGNORE_LABEL) -> jax.Array:
  """σ(p), BANA Eq. (12) / supp. Eq. (1): (D_{c*}(p) / max_c D_c(p))^γ.

  c* = Y_crf(p); γ ≥ 1 is the damping parameter (γ = 7 in the paper).
  Guards (not in the paper): where max_c D_c < 1e-6 (all cosines ≈ −1) the
  ratio is 1 (no class is preferred); the ratio is clamped at 0 from below
  (cosines a rounding error below −1); pixels whose Y_crf is `ignore_label`
  or outside 0..C−1 get σ = 0.  Finite, with finite gradients, everywhere.
  Gradients flow through σ; callers that want a constant weight wrap it in
  stop_gradient (see `weighted_cross_entropy`).

  Args:
    cosines: (B, H, W, C) cosines of the classifier.
    y_crf: (B, H, W) integer labels.
    gamma: damping exponent.
  Returns:
    (B, H, W) float32 in [0, 1].
  """
  scores = cosine_scores(cosines)
  num_classes = scores.shape[-1]
  labels = y_crf.astype(jnp.int32)
  valid = (labels != ignore_label) & (labels >= 0) & (labels < num_classes)
  safe_labels = jnp.where(valid, labels, 0)
  picked = jnp.take_along_axis(scores, safe_labels[..., None], axis=-1)[..., 0]
  best = jnp.max(scores, axis=-1)
  usable = best >= _MIN_SCORE
  ratio = jnp.where(usable, picked / jnp.where(usable, best, 1.0), 1.0)
  sigma = jnp.power(jnp.maximum(ratio, 0.0), gamma)
  return jnp.where(valid, sigma, 0.0)


def reliable_cross_entropy(logits: jax.Array, y_crf: jax.Array,
                           reliable: jax.Array) -> jax.Array:
  """L_ce, BANA Eq. (10): −(1/Σ_c|S_c|) Σ_c Σ_{p∈S_c} log H_c(p).

  H = softmax(logits); S_c are the pixels of S labelled c.  On S the two
  labels agree, so Y_crf is the target.  0 when S is empty.

  Args:
    logits: (B, H, W, C); y_crf: (B, H, W); reliable: (B, H, W) bool (S).
  Returns:
    Scalar.
  """
  ce, valid = softmax_cross_entropy(logits, y_crf)
  return safe_mean(ce, reliable & valid)


def weighted_cross_entropy(logits: jax.Array, cosines: jax.Array,
                           y_crf: jax.Array, unreliable: jax.Array,
                           gamma: float, sigma_gradient: bool) -> jax.Array:
  """L_wce, BANA Eq. (13): −Σ_{p∈~S} σ(p) log H_{c*}(p) / Σ_{p∈~S} σ(p).

  σ from Eq. (12), c* = Y_crf(p).  Normalised by Σσ, not by |~S| (paper and
  official code).  The normaliser is max(Σσ, 1e-12): the term is 0 (the
  official code: NaN) when ~S is empty or Σσ = 0.  `sigma_gradient=True`
  differentiates through σ, as the official code does (the paper is silent;
  docs/bana.md, "Defaults and switches"); False wraps σ in stop_gradient.

  Args:
    logits: (B, H, W, C); cosines: (B, H, W, C); y_crf: (B, H, W);
    unreliable: (B, H, W) bool (~S); gamma: damping exponent.
  Returns:
    Scalar.
  """
  sigma = nal_confidence(cosines, y_crf, gamma)
  if not sigma_gradient:
    sigma = jax.lax.stop_gradient(sigma)
  ce, valid = softmax_cross_entropy(logits, y_crf)
  weights = sigma * (unreliable & valid).astype(sigma.dtype)
  return safe_mean(ce, weights)


def noise_aware_loss(logits: jax.Array, cosines: jax.Array, y_crf: jax.Array,
                     y_ret: jax.Array, *, gamma: float, lam: float,
                     sigma_gradient: bool,
                     ignore_label: int = schema.IGNORE_LABEL
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The NAL, BANA Eq. (14): L = L_ce (Eq. 10) + λ L_wce (Eq. 13).

  The paper's γ = 7, λ = 0.1 (supp. Sect. 1) are `config.bana.gamma` and
  `config.bana.lam`; `sigma_gradient` is `bana.compat.nal_sigma_gradient`.

  Args:
    logits: (B, H, W, C) τ·cosines; cosines: (B, H, W, C);
    y_crf, y_ret: (B, H, W) integer labels.
  Returns:
    (loss scalar, metrics) with scalar metrics 'ce' (L_ce), 'wce' (L_wce),
    'reliable_fraction' (|S| / (|S| + |~S|), 0 if both are empty) and
    'sigma_mean' (mean σ over ~S, 0 if ~S is empty).
  """
  reliable, unreliable = regions(y_crf, y_ret, ignore_label)
  ce = reliable_cross_entropy(logits, y_crf, reliable)
  wce = weighted_cross_entropy(logits, cosines, y_crf, unreliable, gamma,
                               sigma_gradient)
  sigma = jax.lax.stop_gradient(nal_confidence(cosines, y_crf, gamma))
  metrics = {
      'ce': ce,
      'wce': wce,
      'reliable_fraction': _reliable_fraction(reliable, unreliable),
      'sigma_mean': safe_mean(sigma, unreliable),
  }
  return ce + lam * wce, metrics


def entropy_regularization(logits: jax.Array,
                           unreliable: jax.Array) -> jax.Array:
  """L_ER, BANA supp. Eq. (4): −(1/|~S|) Σ_{p∈~S} Σ_c H_c(p) log H_c(p).

  The mean entropy of H = softmax(logits) over ~S (log C for a uniform H);
  used as L_ce + 0.1·L_ER (supp. Eq. 5).  0 when ~S is empty.

  Args:
    logits: (B, H, W, C); unreliable: (B, H, W) bool (~S).
  Returns:
    Scalar.
  """
  log_h = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  entropy = -jnp.sum(jnp.exp(log_h) * log_h, axis=-1)
  return safe_mean(entropy, unreliable)


def bootstrapping_loss(logits: jax.Array, y_crf: jax.Array,
                       unreliable: jax.Array, beta: float | jax.Array,
                       target_gradient: bool = True) -> jax.Array:
  """L_BS, BANA supp. Eqs. (6)–(7): −(1/|~S|) Σ_{p∈~S} Σ_c T_c log H_c.

  Target T(p) = β y(p) + (1 − β) H(p), y the one-hot of Y_crf(p), H =
  softmax(logits).  The supplement does not say whether gradients flow
  through the H inside T.  Default (`target_gradient=True`): T is
  differentiated, so L_BS = β CE + (1 − β) entropy, the soft bootstrapping
  of Reed et al. (ICLR-W 2015), which they note is equivalent to
  minimum-entropy regularisation; at β = 0 it is BANA's entropy baseline.
  `target_gradient=False` treats T as a constant (H stop_gradient'ed): the
  (1 − β) part then has zero gradient (−Σ_c H_c ∇log H_c = 0), so ∇L_BS =
  β ∇CE(Y_crf) on ~S, a cross-entropy on ~S that fades out.  Pixels whose Y_crf is outside 0..C−1
  are dropped.  0 when ~S is empty.

  Args:
    logits: (B, H, W, C); y_crf: (B, H, W); unreliable: (B, H, W) bool;
    beta: scalar in [0, 1] (see `bootstrap_beta`).
  Returns:
    Scalar.
  """
  num_classes = logits.shape[-1]
  log_h = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  h = jnp.exp(log_h)
  if not target_gradient:
    h = jax.lax.stop_gradient(h)
  labels = y_crf.astype(jnp.int32)
  valid = (labels >= 0) & (labels < num_classes)
  onehot = jax.nn.one_hot(jnp.where(valid, labels, 0), num_classes,
                          dtype=jnp.float32)
  beta = jnp.asarray(beta, jnp.float32)
  target = beta * onehot + (1.0 - beta) * h
  per_pixel = -jnp.sum(target * log_h, axis=-1)
  return safe_mean(per_pixel, unreliable & valid)


def bootstrap_beta(step: int | jax.Array, total_steps: int | jax.Array,
                   power: float = 0.9) -> jax.Array:
  """β of BANA supp. Eqs. (7)–(8): poly decay from 1 to 0 over training.

  β = (1 − step/total_steps)^power with the base clipped to [0, 1] (β = 1 at
  step 0, 0 from `total_steps` on).  The supplement says only "from 1 to 0
  by using the poly schedule"; power 0.9 is the DeepLab learning-rate poly.

  Returns:
    float32 scalar (jit-friendly; step may be traced).
  """
  step = jnp.asarray(step, jnp.float32)
  total = jnp.maximum(jnp.asarray(total_steps, jnp.float32), 1.0)
  base = jnp.clip(1.0 - step / total, 0.0, 1.0)
  return jnp.power(base, power)


def baseline_loss(kind: str, logits: jax.Array, cosines: jax.Array,
                  y_crf: jax.Array, y_ret: jax.Array, *,
                  step: int | jax.Array, total_steps: int | jax.Array,
                  lam: float, gamma: float, sigma_gradient: bool,
                  ignore_label: int = schema.IGNORE_LABEL
                  ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The stage-3 loss of BANA Table 3 / Table 4 by name (`LOSS_KINDS`).

  kind:
    'nal': L_ce + λ L_wce (Eq. 14).
    'ce_only': L_ce over S (Eq. 10); ~S is ignored.
    'entropy_reg': L_ce + λ L_ER (supp. Eq. 5).
    'bootstrap': L_ce + λ L_BS (supp. Eq. 8), β = bootstrap_beta(step,
      total_steps).
    'crf_only': plain CE against Y_crf at every pixel where it is not
      ignore (Table 4 "w/ Y_crf").
    'ret_only': plain CE against Y_ret likewise (Table 4 "w/ Y_ret").
  λ = `lam` for all (0.1 in the paper and supplement); γ and
  `sigma_gradient` are used by 'nal' only.  `kind` is static (a Python
  string): pass it outside jit.

  Args:
    kind: one of LOSS_KINDS.
    logits: (B, H, W, C); cosines: (B, H, W, C) (used by 'nal' only);
    y_crf, y_ret: (B, H, W) integer labels.
    step, total_steps: for β of 'bootstrap' (may be traced).
  Returns:
    (loss, metrics): every kind gives scalar 'ce' (its cross-entropy term:
    L_ce, or the plain CE for 'crf_only'/'ret_only') and
    'reliable_fraction'; 'nal' adds 'wce' and 'sigma_mean', 'entropy_reg'
    adds 'entropy', 'bootstrap' adds 'bootstrap' and 'beta'.
  Raises:
    ValueError: unknown kind.
  """
  if kind not in LOSS_KINDS:
    raise ValueError(f'loss kind={kind!r}; expected one of {LOSS_KINDS}.')
  if kind == 'nal':
    return noise_aware_loss(logits, cosines, y_crf, y_ret, gamma=gamma,
                            lam=lam, sigma_gradient=sigma_gradient,
                            ignore_label=ignore_label)
  reliable, unreliable = regions(y_crf, y_ret, ignore_label)
  metrics = {'reliable_fraction': _reliable_fraction(reliable, unreliable)}
  if kind in ('crf_only', 'ret_only'):
    target = y_crf if kind == 'crf_only' else y_ret
    ce, valid = softmax_cross_entropy(logits, target, ignore_label)
    metrics['ce'] = safe_mean(ce, valid)
    return metrics['ce'], metrics
  ce = reliable_cross_entropy(logits, y_crf, reliable)
  metrics['ce'] = ce
  if kind == 'ce_only':
    return ce, metrics
  if kind == 'entropy_reg':
    metrics['entropy'] = entropy_regularization(logits, unreliable)
    return ce + lam * metrics['entropy'], metrics
  beta = bootstrap_beta(step, total_steps)
  metrics['beta'] = beta
  metrics['bootstrap'] = bootstrapping_loss(logits, y_crf, unreliable, beta)
  return ce + lam * metrics['bootstrap'], metrics


def _reliable_fraction(reliable: jax.Array, unreliable: jax.Array
                       ) -> jax.Array:
  """|S| / (|S| + |~S|), 0 when both are empty."""
  return safe_mean(reliable.astype(jnp.float32), reliable | unreliable)
