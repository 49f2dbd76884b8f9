"""Fully connected CRF (Krähenbühl & Koltun 2011) on the host via pydensecrf.

The DeepLab-style DenseCRF every method uses for pseudo-labels or test-time
refinement (BANA Y_crf, PMM, RRM, Box2Seg (C)): unary = -log(clip(p, 1e-5, 1))
(pydensecrf's `unary_from_softmax` rule), a Gaussian (smoothness) kernel and
a bilateral (appearance) kernel with Potts compatibility, diagonal kernels
and symmetric normalisation, `iterations` mean-field steps.

`pydensecrf` (PyPI package `pydensecrf2`, built from source at install time)
is imported inside the functions, so importing this module stays cheap.

Backends: `get_backend(name)` returns a `CrfBackend` (a name plus
`__call__(image, probs, params)`): 'pydensecrf', and 'jax' (the on-device
DenseCRF of `wsss_jax.crf`, registered when `wsss_jax.crf.backend` is
imported; run it without worker processes).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Iterable, Iterator, Mapping, Protocol, runtime_checkable

import numpy as np

from wsss_jax.host import pool

# pydensecrf's `unary_from_softmax` clips probabilities to this floor.
_PROB_FLOOR = 1e-5


@dataclasses.dataclass(frozen=True)
class CrfParams:
  """DenseCRF parameters, in pydensecrf's names.

  The defaults, DeepLab-v2's setting (bilateral w=4, sxy=67, srgb=3;
  Gaussian w=3, sxy=1; 10 iterations), are the one source of every CRF
  config section: `wsss_jax.defaults.crf_config(**overrides)` builds
  `eval.crf_params` and `bana.label_crf` from them.

  Attributes:
    iterations: mean-field iterations (>= 1).
    gauss_sxy: spatial std of the Gaussian kernel, in pixels (> 0).
    gauss_compat: weight of the Gaussian kernel (>= 0).
    bilateral_sxy: spatial std of the bilateral kernel, in pixels (> 0).
    bilateral_srgb: colour std of the bilateral kernel, in 0..255 units (> 0).
    bilateral_compat: weight of the bilateral kernel (>= 0).
  """
  iterations: int = 10
  gauss_sxy: float = 1.0
  gauss_compat: float = 3.0
  bilateral_sxy: float = 67.0
  bilateral_srgb: float = 3.0
  bilateral_compat: float = 4.0

  def __post_init__(self):
    if int(self.iterations) != self.iterations or self.iterations < 1:
      raise ValueError(f'CrfParams.iterations must be an integer >= 1, got '
                       f'{self.iterations!r}.')
    for name in ('gauss_sxy', 'bilateral_sxy', 'bilateral_srgb'):
      if not getattr(self, name) > 0:
        raise ValueError(f'CrfParams.{name} must be > 0, got '
                         f'{getattr(self, name)!r}.')
    for name in ('gauss_compat', 'bilateral_compat'):
      if not getattr(self, name) >= 0:
        raise ValueError(f'CrfParams.{name} must be >= 0, got '
                         f'{getattr(self, name)!r}.')

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> CrfParams:
    """Builds the parameters from a config section such as
    `config.eval.crf_params` (a ConfigDict or dict with the field names above;
    missing fields keep their defaults, unknown fields raise)."""
    values = dict(config.items())
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f'Unknown CRF parameter(s) {unknown}; expected a '
                       f'subset of {sorted(known)}.')
    return cls(**values)


def check_inputs(image: np.ndarray,
                 probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Validates the CRF inputs; returns (C-contiguous image, float32 probs)."""
  image = np.asarray(image)
  probs = np.asarray(probs)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(
        f'dense_crf: image must be uint8 (H, W, 3) RGB, got {image.dtype} '
        f'{image.shape} (convert a normalised float image back to 0..255 '
        f'explicitly; a plain uint8 cast wraps negative values).')
  if not np.issubdtype(probs.dtype, np.floating) or probs.ndim != 3:
    raise ValueError(f'dense_crf: probs must be a float (C, H, W) array, got '
                     f'{probs.dtype} {probs.shape}.')
  if probs.shape[1:] != image.shape[:2]:
    raise ValueError(
        f'dense_crf: probs (C, H, W) = {probs.shape} does not match the image '
        f'size (H, W) = {image.shape[:2]} (probs must be channel-first).')
  if probs.shape[0] < 1:
    raise ValueError('dense_crf: probs has no class channel.')
  if not np.isfinite(probs).all():
    raise ValueError('dense_crf: probs contains NaN or infinite values.')
  # pydensecrf keeps a writable memoryview of the image: a read-only array
  # (PIL, tfds, np.asarray of bytes) must be copied.
  image = np.ascontiguousarray(image)
  if not image.flags.writeable:
    image = image.copy()
  return image, probs.astype(np.float32, copy=False)


def dense_crf(image: np.ndarray, probs: np.ndarray,
              params: CrfParams = CrfParams()) -> np.ndarray:
  """Mean-field DenseCRF inference (Krähenbühl & Koltun, NIPS 2011).

  Args:
    image: uint8 (H, W, 3) **RGB** image at the resolution of `probs`.
    probs: float (C, H, W) class probabilities (channel-first, the layout of
      pydensecrf's Q).  They need not sum to 1: the unary is
      -log(clip(p, 1e-5, 1)) and a per-pixel factor only shifts a pixel's
      unaries by a constant, which mean field ignores (exactly, as long as
      clipping does not engage).
    params: kernel parameters.

  Returns:
    float32 (C, H, W) marginals Q; every pixel sums to 1.
  """
  import pydensecrf.densecrf as dcrf  # pylint: disable=g-import-not-at-top

  image, probs = check_inputs(image, probs)
  num_classes, height, width = probs.shape
  unary = -np.log(np.clip(probs, _PROB_FLOOR, 1.0))
  unary = np.ascontiguousarray(unary.reshape(num_classes, -1),
                               dtype=np.float32)
  crf = dcrf.DenseCRF2D(width, height, num_classes)
  crf.setUnaryEnergy(unary)
  crf.addPairwiseGaussian(sxy=float(params.gauss_sxy),
                          compat=float(params.gauss_compat),
                          kernel=dcrf.DIAG_KERNEL,
                          normalization=dcrf.NORMALIZE_SYMMETRIC)
  crf.addPairwiseBilateral(sxy=float(params.bilateral_sxy),
                           srgb=float(params.bilateral_srgb), rgbim=image,
                           compat=float(params.bilateral_compat),
                           kernel=dcrf.DIAG_KERNEL,
                           normalization=dcrf.NORMALIZE_SYMMETRIC)
  marginals = crf.inference(int(params.iterations))
  return np.asarray(marginals, np.float32).reshape(num_classes, height, width)


@runtime_checkable
class CrfBackend(Protocol):
  """A DenseCRF implementation: `backend(image, probs, params) -> (C, H, W)`
  float32 marginals, with the inputs and output of `dense_crf`."""

  name: str

  def __call__(self, image: np.ndarray, probs: np.ndarray,
               params: CrfParams) -> np.ndarray:
    ...


@dataclasses.dataclass(frozen=True)
class PydensecrfBackend:
  """The host (CPU) DenseCRF of `dense_crf`."""
  name: str = 'pydensecrf'

  def __call__(self, image: np.ndarray, probs: np.ndarray,
               params: CrfParams) -> np.ndarray:
    return dense_crf(image, probs, params)


_BACKENDS: dict[str, CrfBackend] = {'pydensecrf': PydensecrfBackend()}


def register_backend(backend: CrfBackend) -> None:
  """Makes `backend` available to `get_backend(backend.name)`."""
  if not isinstance(backend, CrfBackend):
    raise TypeError(f'{backend!r} is not a CrfBackend (needs a name and '
                    f'__call__(image, probs, params)).')
  _BACKENDS[backend.name] = backend


def get_backend(name: str = 'pydensecrf') -> CrfBackend:
  """The registered CRF backend called `name`."""
  if name not in _BACKENDS:
    raise ValueError(f'Unknown CRF backend {name!r}; available: '
                     f'{sorted(_BACKENDS)} (importing wsss_jax.crf.backend '
                     "adds 'jax').")
  return _BACKENDS[name]


def crf_item(item: tuple[np.ndarray, np.ndarray], params: CrfParams,
             argmax: bool, backend: str = 'pydensecrf') -> np.ndarray:
  """One (image, probs (C, H, W)) pair through the CRF backend: marginals,
  or uint8 labels with `argmax` (module level, so process pools can pickle
  it; used by `dense_crf_batch` and the evaluator)."""
  image, probs = item
  marginals = get_backend(backend)(image, probs, params)
  if argmax:
    return marginals.argmax(axis=0).astype(np.uint8)
  return marginals


def dense_crf_batch(images: Iterable[np.ndarray],
                    probs_list: Iterable[np.ndarray],
                    params: CrfParams = CrfParams(), workers: int = 0, *,
                    argmax: bool = False, max_in_flight: int | None = None,
                    progress: bool = True) -> Iterator[np.ndarray]:
  """`dense_crf` over many images in a `wsss_jax.host.pool` process pool.

  Args:
    images: uint8 (H_i, W_i, 3) RGB images.
    probs_list: matching float (C, H_i, W_i) probabilities (same length).
    params: kernel parameters.
    workers: worker processes (`config.eval.crf_workers`); 0 = inline.
    argmax: return uint8 (H_i, W_i) labels (argmax of Q) instead of the
      marginals, which sends C*4 times less data back from the workers.
    max_in_flight: bound on outstanding images (default 2 per worker).
    progress: show a progress bar.

  Yields:
    float32 (C, H_i, W_i) marginals (or uint8 labels), in input order.

  Raises:
    ValueError: `images` and `probs_list` have different lengths.
    pool.WorkerError: an image failed (its index is in the message).
  """
  sentinel = object()
  pairs = _strict_zip(images, probs_list, sentinel)
  fn = functools.partial(crf_item, params=params, argmax=argmax)
  total = len(images) if hasattr(images, '__len__') else None
  yield from pool.pool_map(fn, pairs, workers, max_in_flight=max_in_flight,
                           desc='dense_crf', total=total, progress=progress)


def _strict_zip(first: Iterable[Any], second: Iterable[Any],
                sentinel: object) -> Iterator[tuple[Any, Any]]:
  """zip() that raises when the two iterables have different lengths."""
  first, second = iter(first), iter(second)
  index = 0
  while True:
    a, b = next(first, sentinel), next(second, sentinel)
    if a is sentinel and b is sentinel:
      return
    if a is sentinel or b is sentinel:
      raise ValueError(f'dense_crf_batch: images and probs_list have '
                       f'different lengths (one ends at index {index}).')
    yield a, b
    index += 1
