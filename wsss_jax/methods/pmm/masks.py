"""PMM pseudo-masks on the host: Eqs. (1)–(9) and Algorithm 1 of Li et al.,
"Pseudo-mask Matters in Weakly-supervised Semantic Segmentation" (ICCV
2021), plus the multi-crop training label rule of its Sec. 4.1.

    X^(n) = norm(X)                                   Eq. (1)
    bg(X^(n)) = (1 − max_c X^(n)_c)^α                 Eq. (2)
    X^(u) = concat(bg(X^(n)), X^(n))                  Eq. (3)
    Y = argmax crf(I, X^(u))                          Eq. (4)
    cv_c = std(X^(f)_c) / mean(X^(f)_c)               Eq. (5), X^(f): > t
    X^(s)_c = (X^(n)_c)^(1 − s·cv_c)                  Eq. (6)
    X^(m)_c = fg(crf(I, bg(X^(s)_c)))                 Eq. (7)
    P_c = X^(n)_c / (1 + Σ X^(n)_c · X^(m)_c)         Eq. (8) (+1: code)
    Y = argmax(X^(m) · P)                             Eq. (9)

Plain numpy, one image at a time: these functions run in the worker
processes of `wsss_jax.host.pool`, so they are module-level (picklable) and
this module imports no jax.  Conventions: `image` uint8 (H, W, 3) RGB;
`cam` float (H, W, K) channel-last, foreground channel k is class k + 1;
`present` bool (K,) the image labels.  Outputs are float32 maps or uint8
label maps (0 background, k + 1 for channel k; PPMG masks carry no ignore
label).  What the paper leaves open follows the official code and is
listed in docs/pmm.md; the code's deviations are opt-in switches.
"""

from __future__ import annotations

import numpy as np

from wsss_jax.host import crf as crf_lib

# The official code's epsilon in its CAM normalisations.
_CODE_EPS = 1e-5

NORMALISATION_MODES = ('eq1', 'pmm_code_multiscale', 'pmm_code_multicrop')
COLOUR_ORDERS = ('rgb', 'bgr')


# ----------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------
def _check_cam(cam: np.ndarray, present: np.ndarray | None = None,
               name: str = 'cam') -> tuple[np.ndarray, np.ndarray | None]:
  """Validates a (H, W, K) float map and its (K,) `present` vector."""
  cam = np.asarray(cam)
  if cam.ndim != 3 or not np.issubdtype(cam.dtype, np.floating):
    raise ValueError(f'{name} must be a float (H, W, K) channel-last array, '
                     f'got {cam.dtype} {cam.shape}.')
  if cam.shape[0] < 1 or cam.shape[1] < 1:
    raise ValueError(f'{name} has an empty spatial size {cam.shape[:2]}.')
  if not np.isfinite(cam).all():
    raise ValueError(f'{name} contains NaN or infinite values.')
  if present is None:
    return cam, None
  present = np.asarray(present)
  if present.shape != (cam.shape[-1],):
    raise ValueError(f'present must have shape (K,) = ({cam.shape[-1]},) to '
                     f'match {name} {cam.shape}, got {present.shape}.')
  return cam, present.astype(bool)


def _check_image(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.shape != cam.shape[:2] + (3,):
    raise ValueError(f'image must be uint8 (H, W, 3) RGB with the size of '
                     f'cam {cam.shape[:2]}, got {image.dtype} {image.shape}.')
  return image


def _check_number(name: str, value: float, *, low: float | None = None,
                  strict: bool = False) -> float:
  """float(value), finite and >= low (> low when strict), else ValueError."""
  try:
    value = float(value)
  except (TypeError, ValueError):
    raise ValueError(f'{name} must be a number, got {value!r}.') from None
  if not np.isfinite(value):
    raise ValueError(f'{name} must be finite, got {value!r}.')
  if low is not None and (value <= low if strict else value < low):
    raise ValueError(f'{name} must be {">" if strict else ">="} {low}, got '
                     f'{value!r}.')
  return value


def _check_crf(crf_params: crf_lib.CrfParams, crf_backend: str
               ) -> crf_lib.CrfBackend:
  if not isinstance(crf_params, crf_lib.CrfParams):
    raise ValueError(f'crf_params must be a wsss_jax.host.crf.CrfParams, got '
                     f'{type(crf_params).__name__}.')
  if not isinstance(crf_backend, str):
    raise ValueError(f'crf_backend must be a backend name, got '
                     f'{crf_backend!r}.')
  return crf_lib.get_backend(crf_backend)


def _safe_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
  """num / den where den > 0, else 0 (no warning, no NaN)."""
  ok = den > 0
  return np.where(ok, num / np.where(ok, den, 1.0), 0.0)


# ----------------------------------------------------------------------------
# Eq. (1): min-max normalisation
# ----------------------------------------------------------------------------
def normalize_cam(cam: np.ndarray, present: np.ndarray, mode: str = 'eq1',
                  eps: float = 1e-5) -> np.ndarray:
  """Per-class min-max normalisation of a CAM, PMM Eq. (1).

  Min and max run over the spatial positions of each class's own map.

  Modes (the `cam_normalisation` switch of docs/pmm.md):
    'eq1': (x − min) / (max − min + eps).  eps = 1e-5 is the official
      code's; eps = 0 is Eq. (1) literally.  A constant map gives 0.
    'pmm_code_multiscale': the official multi-scale path: ReLU first (min and
      max of the ReLU'd map); pixels < min + 1e-5 set to 0; then
      (x − min − 1e-5) / (max − min + 1e-5).  The zeroed pixels end at
      −(min + 1e-5) / (max − min + 1e-5) < 0.
    'pmm_code_multicrop': the official multi-crop path: no ReLU; pixels
      < min + 1e-5 set to 0 first, then (x − min) / (max − min + 1e-5) on the
      modified map, so the former minimum pixels end at
      −min / (max − min + 1e-5) (not 0).
  The code modes use their fixed 1e-5 and ignore `eps`; their outputs may
  leave [0, 1] (that is the quirk they reproduce).

  Args:
    cam: float (H, W, K) raw class activation maps.
    present: bool (K,); absent classes come out 0.
    mode: one of `NORMALISATION_MODES`.
    eps: denominator epsilon of mode 'eq1' (>= 0).

  Returns:
    float32 (H, W, K); never NaN (a constant map gives 0 in mode 'eq1').
  """
  cam, present = _check_cam(cam, present)
  if mode not in NORMALISATION_MODES:
    raise ValueError(f'mode must be one of {NORMALISATION_MODES}, got '
                     f'{mode!r}.')
  eps = _check_number('eps', eps, low=0.0)
  x = cam.astype(np.float64)
  if mode == 'pmm_code_multiscale':
    x = np.maximum(x, 0.0)
  low = x.min(axis=(0, 1))
  high = x.max(axis=(0, 1))
  if mode == 'eq1':
    out = _safe_divide(x - low, high - low + eps)
  else:
    x = np.where(x < low + _CODE_EPS, 0.0, x)
    shift = low + _CODE_EPS if mode == 'pmm_code_multiscale' else low
    out = (x - shift) / (high - low + _CODE_EPS)
  return np.where(present, out, 0.0).astype(np.float32)


# ----------------------------------------------------------------------------
# Eqs. (5)–(6): coefficient of variation smoothing (CVS)
# ----------------------------------------------------------------------------
def coefficient_of_variation(cam: np.ndarray, present: np.ndarray,
                             t: float = 0.05) -> np.ndarray:
  """cv_c = std(X^(f)_c) / mean(X^(f)_c), PMM Eq. (5).

  X^(f)_c are the pixels of class c's normalised map strictly above `t`
  (compared in the map's own dtype); std is the population std (ddof 0).
  Unlike the official code, the scale s is not folded in: this is the
  plain cv (`cv_smoothing` applies s).

  Args:
    cam: float (H, W, K) normalised CAM (Eq. 1).
    present: bool (K,).
    t: foreground threshold (0.05 in the paper).

  Returns:
    float64 (K,) >= 0; 0 for an absent class and for a class with no pixel
    above `t`.
  """
  cam, present = _check_cam(cam, present)
  t = _check_number('t', t)
  above = (cam > cam.dtype.type(t)) & present
  x = cam.astype(np.float64)
  count = above.sum(axis=(0, 1)).astype(np.float64)
  mean = _safe_divide(np.where(above, x, 0.0).sum(axis=(0, 1)), count)
  var = _safe_divide(np.where(above, (x - mean) ** 2, 0.0).sum(axis=(0, 1)),
                     count)
  return _safe_divide(np.sqrt(var), np.where(count > 0, mean, 0.0))


def cv_smoothing(cam: np.ndarray, cv: np.ndarray, s: float = 0.3,
                 zero_below_t: bool = False, t: float = 0.05,
                 min_exponent: float = 0.05) -> np.ndarray:
  """CVS, PMM Eq. (6): X^(s)_c = X_c^max(1 − s·cv_c, min_exponent).

  The exponent is clamped to >= `min_exponent` (> 0): a class with
  cv >= 1/s would otherwise get a power <= 0, which maps zero pixels to 1
  (0^0) or to infinity.  Negative inputs (possible after the code-mode
  normalisations) are taken as 0 before the power, where a fractional power
  would be NaN.

  Args:
    cam: float (H, W, K) normalised CAM (Eq. 1), values in [0, 1].
    cv: (K,) plain coefficients of variation (`coefficient_of_variation`).
    s: the scale factor s (0.3 in the paper).
    zero_below_t: the official code's `cvs_zero_below_t`: pixels strictly
      below `t` are set to 0 before the power (the paper applies Eq. (6) to
      every pixel: False).
    t: threshold of `zero_below_t`.
    min_exponent: lower clamp of the exponent (> 0).

  Returns:
    float32 (H, W, K) in [0, 1] for inputs in [0, 1].
  """
  cam, _ = _check_cam(cam)
  cv = np.asarray(cv, np.float64)
  if cv.shape != (cam.shape[-1],) or not np.isfinite(cv).all():
    raise ValueError(f'cv must be a finite (K,) = ({cam.shape[-1]},) array, '
                     f'got shape {cv.shape}.')
  s = _check_number('s', s, low=0.0)
  t = _check_number('t', t)
  min_exponent = _check_number('min_exponent', min_exponent, low=0.0,
                               strict=True)
  if zero_below_t:
    cam = np.where(cam < cam.dtype.type(t), 0, cam)
  exponent = np.maximum(1.0 - s * cv, min_exponent)
  x = np.maximum(cam.astype(np.float64), 0.0)
  return np.power(x, exponent).astype(np.float32)


# ----------------------------------------------------------------------------
# Eqs. (2)–(4): background by the power rule and the CRF pseudo-mask
# ----------------------------------------------------------------------------
def background_unary(cam: np.ndarray, alpha: float) -> np.ndarray:
  """X^(u) = concat((1 − max_k X_k)^α, X), PMM Eqs. (2)–(3).

  Args:
    cam: float (H, W, K) normalised foreground maps (K may be 0: the
      background is then 1 everywhere).
    alpha: the background power α (>= 0; 24 for the base mask, 11 per class
      in PPMG).

  Returns:
    float32 (H, W, K + 1), channel 0 the background.  The base 1 − max is
    clipped at 0 (maps above 1 would make a fractional power NaN).
  """
  cam, _ = _check_cam(cam)
  alpha = _check_number('alpha', alpha, low=0.0)
  x = cam.astype(np.float64)
  peak = x.max(axis=-1) if x.shape[-1] else np.zeros(x.shape[:2])
  bg = np.power(np.maximum(1.0 - peak, 0.0), alpha)
  return np.concatenate([bg[..., None], x], axis=-1).astype(np.float32)


def crf_marginals(image: np.ndarray, cam: np.ndarray, present: np.ndarray,
                  *, alpha: float = 24.0, crf_params: crf_lib.CrfParams,
                  crf_backend: str = 'pydensecrf') -> np.ndarray:
  """crf(I, X^(u)) of PMM Eqs. (3)–(4): the CRF marginals (PMM's base mask
  with α = 24, Sec. 3.5 / 4.1).

  Only the PRESENT classes enter the CRF (the background uses their max, and
  an absent channel would otherwise keep probability mass through the
  unary's 1e-5 floor); their marginals are scattered back to the full class
  axis and absent channels are 0.

  Args:
    image: uint8 (H, W, 3) RGB.
    cam: float (H, W, K) normalised CAM (Eq. 1).
    present: bool (K,).
    alpha: background power α.
    crf_params: DenseCRF parameters.
    crf_backend: a `wsss_jax.host.crf.get_backend` name.

  Returns:
    float32 (H, W, K + 1): channel 0 background, channel k + 1 class k; each
    pixel sums to 1.  No present class: background 1 everywhere (no CRF
    call).
  """
  cam, present = _check_cam(cam, present)
  image = _check_image(image, cam)
  backend = _check_crf(crf_params, crf_backend)
  alpha = _check_number('alpha', alpha, low=0.0)
  height, width, num_fg = cam.shape
  out = np.zeros((height, width, num_fg + 1), np.float32)
  index = np.flatnonzero(present)
  if index.size == 0:
    out[..., 0] = 1.0
    return out
  unary = background_unary(cam[..., index], alpha)
  marginals = backend(image, np.ascontiguousarray(unary.transpose(2, 0, 1)),
                      crf_params)
  marginals = np.asarray(marginals, np.float32).transpose(1, 2, 0)
  out[..., 0] = marginals[..., 0]
  out[..., index + 1] = marginals[..., 1:]
  return out


def crf_label(image: np.ndarray, cam: np.ndarray, present: np.ndarray, *,
              alpha: float = 24.0, crf_params: crf_lib.CrfParams,
              crf_backend: str = 'pydensecrf') -> np.ndarray:
  """Y = argmax crf(I, X^(u)), PMM Eq. (4) (the "CRF" rows of Table 2).

  The argmax runs over `crf_marginals`, whose absent channels are 0 and
  come after the background channel: with ties going to the lower index an
  absent class can never win (the CRF itself only sees present classes).

  Args:
    image: uint8 (H, W, 3) RGB.
    cam: float (H, W, K) normalised CAM (Eq. 1).
    present: bool (K,).
    alpha: background power α.
    crf_params: DenseCRF parameters.
    crf_backend: a `wsss_jax.host.crf.get_backend` name.

  Returns:
    uint8 (H, W): 0 background, k + 1 for channel k.
  """
  marginals = crf_marginals(image, cam, present, alpha=alpha,
                            crf_params=crf_params, crf_backend=crf_backend)
  return marginals.argmax(axis=-1).astype(np.uint8)


# ----------------------------------------------------------------------------
# Eqs. (7)–(9), Algorithm 1: proportional pseudo-mask generation (PPMG)
# ----------------------------------------------------------------------------
def proportional_label(cam: np.ndarray, foreground: np.ndarray) -> np.ndarray:
  """Y = argmax(X^(m) · P), PMM Eqs. (8)–(9).

  P_k = X_k / (1 + Σ_pixels X_k · X^(m)_k) on the un-smoothed normalised
  CAM (the "+1", from the official code, keeps an empty mask finite and is
  negligible for realistic masses).  The background channel is the
  indicator of "no class mask covers the pixel".  Ties go to the lower
  index: to the background, then to the lower class (a pixel inside some
  mask where every covering class has X = 0 becomes background).

  Args:
    cam: float (H, W, K) normalised CAM (Eq. 1).
    foreground: bool (H, W, K) binary class masks X^(m) (Eq. 7); all False
      for absent classes.

  Returns:
    uint8 (H, W): 0 background, k + 1 for channel k.
  """
  cam, _ = _check_cam(cam)
  foreground = np.asarray(foreground, bool)
  if foreground.shape != cam.shape:
    raise ValueError(f'foreground must have the shape of cam {cam.shape}, '
                     f'got {foreground.shape}.')
  x = cam.astype(np.float64)
  mass = np.where(foreground, x, 0.0).sum(axis=(0, 1))
  scores = np.where(foreground, x / (1.0 + mass), 0.0)
  background = ~foreground.any(axis=-1)
  stacked = np.concatenate([background[..., None].astype(np.float64), scores],
                           axis=-1)
  return stacked.argmax(axis=-1).astype(np.uint8)


def ppmg_parts(image: np.ndarray, cam: np.ndarray, present: np.ndarray, *,
               alpha: float = 11.0, t: float = 0.05, s: float = 0.3,
               use_cvs: bool = True, cvs_zero_below_t: bool = False,
               min_exponent: float = 0.05, fg_threshold: float = 0.5,
               crf_params: crf_lib.CrfParams,
               crf_backend: str = 'pydensecrf',
               colour_order: str = 'rgb') -> dict[str, np.ndarray]:
  """PPMG pseudo-mask, PMM Algorithm 1 / Eqs. (5)–(9), with its parts.

  1. cv = `coefficient_of_variation`(X, t) (Eq. 5);
  2. X^(s) = `cv_smoothing`(X, cv, s) (Eq. 6); with `use_cvs=False` the
     exponent is 1 (X^(s) = X: the "PPMG without CVS" row of Table 2);
  3. per PRESENT class k (one 2-label CRF each, a host loop over the
     image's present classes): X^(m)_k = [marginal of label 1 of
     crf(I, [(1 − X^(s)_k)^α, X^(s)_k]) > fg_threshold] (Eq. 7; the
     threshold is on the CRF marginal, strict, as in the official code);
  4. Y = `proportional_label`(X, X^(m)) (Eqs. 8–9, un-smoothed X).

  Args:
    image: uint8 (H, W, 3) RGB.
    cam: float (H, W, K) normalised CAM (Eq. 1), in [0, 1].
    present: bool (K,).
    alpha: class-specific background power α (11 in the paper).
    t: CoV threshold t (0.05).
    s: CVS scale s (0.3).
    use_cvs: apply CVS (Eq. 6).
    cvs_zero_below_t: the official code's zeroing of pixels < t before the
      power (see `cv_smoothing`; also applies with `use_cvs=False`).
    min_exponent: floor of Eq. (6)'s exponent (`cv_smoothing`).
    fg_threshold: threshold on the class marginal (0.5).
    crf_params: DenseCRF parameters (the code's PPMG CRF: Gaussian sxy 3
      compat 10, bilateral sxy 80 srgb 13 compat 10, 10 iterations).
    crf_backend: a `wsss_jax.host.crf.get_backend` name.
    colour_order: 'rgb' (default) or 'bgr': the official code reads the
      image with OpenCV, so its CRF sees BGR (`ppmg_crf_colour_order`).

  Returns:
    {'smoothed': float32 (H, W, K) X^(s), 'foreground': bool (H, W, K)
    X^(m) (False for absent classes), 'label': uint8 (H, W) Y, 0
    background, k + 1 for channel k; all 0 without a present class}.
  """
  cam, present = _check_cam(cam, present)
  image = _check_image(image, cam)
  backend = _check_crf(crf_params, crf_backend)
  alpha = _check_number('alpha', alpha, low=0.0)
  fg_threshold = _check_number('fg_threshold', fg_threshold)
  if colour_order not in COLOUR_ORDERS:
    raise ValueError(f'colour_order must be one of {COLOUR_ORDERS}, got '
                     f'{colour_order!r}.')
  if colour_order == 'bgr':
    image = np.ascontiguousarray(image[..., ::-1])
  if use_cvs:
    cv = coefficient_of_variation(cam, present, t)
  else:
    cv = np.zeros(cam.shape[-1])
  smoothed = cv_smoothing(cam, cv, s, zero_below_t=cvs_zero_below_t, t=t,
                          min_exponent=min_exponent)
  foreground = np.zeros(cam.shape, bool)
  for k in np.flatnonzero(present):
    unary = background_unary(smoothed[..., k:k + 1], alpha)
    marginals = backend(image, np.ascontiguousarray(unary.transpose(2, 0, 1)),
                        crf_params)
    foreground[..., k] = np.asarray(marginals)[1] > fg_threshold
  label = proportional_label(np.where(present, cam, 0.0), foreground)
  return {'smoothed': smoothed, 'foreground': foreground, 'label': label}


def ppmg_label(image: np.ndarray, cam: np.ndarray, present: np.ndarray,
               **kwargs) -> np.ndarray:
  """The PPMG pseudo-mask Y, uint8 (H, W) (`ppmg_parts`' 'label'; the same
  arguments)."""
  return ppmg_parts(image, cam, present, **kwargs)['label']
