"""Anomaly maps from a reconstruction (section 3.5) and their combination into scores.

Four raw detectors, each a per-pixel map averaged over channels (inputs NHWC in [-1, 1]):
  S_RE  = (x_0 - x̂_0)² (or |x_0 - x̂_0|, detect.re_kind)                   s_re
  S_U   = (x_0 - x̂_0)² / σ²_0                                              s_u
  S_KL  = ½[log(σ²_0/σ²_in) + (σ²_in + (x_0-x̂_0)²)/σ²_0 - 1]               s_kl
  S_Cos = mean over feature layers of 1 - cos(F_l(x_0), F_l(x̂_0)), upsampled  s_cos
Then: normalise each map with mean/std of held-out train/good maps (NormAccumulator, normalise),
combine with eq. 14 (combine), blur (gaussian_blur) and take the image score of eq. 15
(image_score), by default of the same map; detect.image_detectors lets eq. 15 read the combination
of some of the detectors only (image_weights), the pixel map keeping all, and
detect.image_score='standardised_mean' averages the image detectors' own eq. 15 scores instead, each
standardised by the held-out images' mean and std of it (fit_stats, standardised_mean).
get_score_fn packages the last three; iter_ablation scores every detector subset.

Each detector is registered in DETECTORS (`register_detector`) with what it needs: S_U and S_KL a
predicted variance (none for an SGM model), S_Cos a feature extractor. select_detectors says which
are unavailable and why instead of failing.
"""

import dataclasses
import functools
import itertools
import math
from typing import Callable, Iterator, Mapping, NamedTuple, Optional, Sequence, Union

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from esm.errors import UserError

REFERENCE_SIDE = 256  # blur_sigma and top_n are given at 256 x 256
RE_KINDS = ('squared', 'absolute')
# The image score: eq. 15 of the combined map, or the mean of each image detector's eq. 15 score
# standardised by the held-out images' mean and std of it (docs/method.md, "Detectors and scores").
IMAGE_SCORES = ('map', 'standardised_mean')
NO_FEATURES = 'unavailable without a feature extractor (features.model is none)'
NO_VARIANCE = ('unavailable without a predicted variance (an SGM model, or a sampler that does '
               'not read σ²_θ such as sampling.method=sgm)')

FeatureFn = Callable[[jax.Array], Sequence[jax.Array]]  # images [-1,1] NHWC -> list of [B,h,w,C]
ImageSize = Union[int, tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class DetectConfig:
  """config.detect, typed. weights are (u, v, w, r) of S_Cos, S_U, S_KL, S_RE (eq. 14)."""
  weights: tuple[float, float, float, float] = (1.0, 1.0, 1.0, 1.0)
  blur_sigma: float = 4.0
  top_n: int = 250
  re_kind: str = 'absolute'
  var_floor: float = 1e-8
  threshold_percentile: float = 99.0  # predict's decision threshold over held-out good scores
  image_detectors: tuple[str, ...] = ()  # eq. 15 reads these of the map's detectors; () = all
  image_score: str = 'map'  # one of IMAGE_SCORES

  def __post_init__(self):
    weights = self.weights
    if len(weights) != 4 or not all(math.isfinite(float(x)) for x in weights):
      raise UserError(f'detect.weights: expected 4 finite numbers (u, v, w, r), '
                      f'got {weights!r}')
    if not self.blur_sigma >= 0.0:
      raise UserError(f'detect.blur_sigma: expected a number >= 0, got {self.blur_sigma!r}')
    if int(self.top_n) != self.top_n or self.top_n < 1:
      raise UserError(f'detect.top_n: expected an integer >= 1, got {self.top_n!r}')
    if self.re_kind not in RE_KINDS:
      raise UserError(f'detect.re_kind: expected one of {RE_KINDS}, got {self.re_kind!r}')
    if not self.var_floor > 0.0:
      raise UserError(f'detect.var_floor: expected a number > 0, got {self.var_floor!r}')
    unknown = [n for n in self.image_detectors if n not in DETECTOR_NAMES]
    if unknown or isinstance(self.image_detectors, str):
      raise UserError(f'detect.image_detectors: expected a tuple of names from {DETECTOR_NAMES}, '
                      f'got {self.image_detectors!r}')
    if self.image_score not in IMAGE_SCORES:
      raise UserError(f'detect.image_score: expected one of {IMAGE_SCORES}, got '
                      f'{self.image_score!r}')
    if not 0.0 <= self.threshold_percentile <= 100.0:
      raise UserError(f'detect.threshold_percentile: expected a percentile in [0, 100], got '
                      f'{self.threshold_percentile!r}')

  def weights_by_name(self) -> dict[str, float]:
    return dict(zip(DETECTOR_NAMES, self.weights))


def _hw(image_size: ImageSize) -> tuple[int, int]:
  return (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)


def scaled_blur_sigma(cfg: DetectConfig, image_size: ImageSize) -> float:
  """σ of the blur in pixels: blur_sigma at 256², scaled with the image side."""
  h, w = _hw(image_size)
  return cfg.blur_sigma * math.sqrt(h * w) / REFERENCE_SIDE


def scaled_top_n(cfg: DetectConfig, image_size: ImageSize) -> int:
  """N_a of eq. 15: top_n at 256², scaled with the image area, at least 1 and at most H*W."""
  h, w = _hw(image_size)
  return int(min(max(1, math.floor(cfg.top_n * h * w / REFERENCE_SIDE**2 + 0.5)), h * w))


# --- raw maps -------------------------------------------------------------------------------------
def s_re(x0: jax.Array, x0_hat: jax.Array, kind: str = 'squared') -> jax.Array:
  """S_RE [B,H,W]: squared (or absolute) reconstruction error, averaged over channels."""
  diff = x0 - x0_hat
  err = jnp.square(diff) if kind == 'squared' else jnp.abs(diff)
  return jnp.mean(err, axis=-1)


def s_u(x0: jax.Array, x0_hat: jax.Array, var0: jax.Array, floor: float = 1e-8) -> jax.Array:
  """S_U [B,H,W] = (x_0 - x̂_0)² / σ²_0, averaged over channels."""
  return jnp.mean(jnp.square(x0 - x0_hat) / jnp.maximum(var0, floor), axis=-1)


def s_kl(x0: jax.Array, x0_hat: jax.Array, var0: jax.Array, var_in: jax.Array,
         floor: float = 1e-8) -> jax.Array:
  """S_KL [B,H,W] = KL(N(x_0, σ²_in) || N(x̂_0, σ²_0)), averaged over channels."""
  var0 = jnp.maximum(var0, floor)
  var_in = jnp.maximum(var_in, floor)
  kl = 0.5 * (jnp.log(var0 / var_in) + (var_in + jnp.square(x0 - x0_hat)) / var0 - 1.0)
  return jnp.mean(kl, axis=-1)


def s_cos(feats_in: Sequence[jax.Array], feats_rec: Sequence[jax.Array],
          out_size: tuple[int, int]) -> jax.Array:
  """S_Cos [B,H,W]: mean over layers of 1 - cosine per patch, each bilinearly upsampled to H x W."""
  maps = []
  for f_in, f_rec in zip(feats_in, feats_rec, strict=True):
    f_in = f_in.astype(jnp.float32)
    f_rec = f_rec.astype(jnp.float32)
    norms = jnp.linalg.norm(f_in, axis=-1) * jnp.linalg.norm(f_rec, axis=-1)
    cos = jnp.sum(f_in * f_rec, axis=-1) / jnp.maximum(norms, 1e-12)
    dist = 1.0 - cos
    maps.append(jax.image.resize(dist, (dist.shape[0], *out_size), method='bilinear'))
  return jnp.mean(jnp.stack(maps), axis=0)


class MapInputs(NamedTuple):
  """What the detectors read; var0/var_in are None without a predicted variance."""
  x0: jax.Array  # [B,H,W,C] float32 input
  x0_hat: jax.Array  # [B,H,W,C] float32 reconstruction
  var0: Optional[jax.Array]
  var_in: Optional[jax.Array]
  feature_fn: Optional[FeatureFn]
  re_kind: str
  var_floor: float


@dataclasses.dataclass(frozen=True)
class RegisteredDetector:
  """A registered detector: its eq. 14 weight slot is its position in DETECTORS."""
  name: str
  label: str  # as the paper writes it
  map_fn: Callable[[MapInputs], jax.Array]  # -> raw map [B,H,W]
  needs_variance: bool  # σ²_0 (and σ²_in) from a sampler that reads the variance stream
  needs_features: bool  # a feature extractor (config.features)

  def unavailable_reason(self, variance: bool, features: bool) -> Optional[str]:
    if self.needs_variance and not variance:
      return NO_VARIANCE
    if self.needs_features and not features:
      return NO_FEATURES
    return None


DETECTORS: dict[str, RegisteredDetector] = {}  # in the order of the eq. 14 weights (u, v, w, r)


def register_detector(name: str, label: str, *, needs_variance: bool = False,
                      needs_features: bool = False):
  """Decorator: registers map_fn(MapInputs) -> [B,H,W] as the next detector."""
  def register(map_fn):
    DETECTORS[name] = RegisteredDetector(name, label, map_fn, needs_variance, needs_features)
    return map_fn
  return register


register_detector('cos', 'S_Cos', needs_features=True)(
    lambda a: s_cos(a.feature_fn(a.x0), a.feature_fn(a.x0_hat), a.x0.shape[1:3]))
register_detector('u', 'S_U', needs_variance=True)(
    lambda a: s_u(a.x0, a.x0_hat, a.var0, a.var_floor))
register_detector('kl', 'S_KL', needs_variance=True)(
    lambda a: s_kl(a.x0, a.x0_hat, a.var0, a.var_in, a.var_floor))
register_detector('re', 'S_RE')(lambda a: s_re(a.x0, a.x0_hat, a.re_kind))
DETECTOR_NAMES = tuple(DETECTORS)


def compute_maps(x0: jax.Array, x0_hat: jax.Array, var0: Optional[jax.Array] = None,
                 var_in: Optional[jax.Array] = None, feature_fn: Optional[FeatureFn] = None, *,
                 re_kind: str = 'squared', var_floor: float = 1e-8) -> dict[str, jax.Array]:
  """Every raw map the inputs allow, name -> float32 [B,H,W], in DETECTORS order.

  The variance detectors need var0 and var_in (both None for an SGM model); 'cos' needs a
  feature_fn. Arrays are NHWC float32, images in [-1, 1].
  """
  inputs = MapInputs(x0.astype(jnp.float32), x0_hat.astype(jnp.float32), var0, var_in, feature_fn,
                     re_kind, var_floor)
  has_variance = var0 is not None and var_in is not None
  return {name: d.map_fn(inputs) for name, d in DETECTORS.items()
          if d.unavailable_reason(has_variance, feature_fn is not None) is None}


# --- which detectors are used ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DetectorSelection:
  """used: weighted and available, in DETECTOR_NAMES order; unavailable: name -> reason;
  disabled: zero weight."""
  used: tuple[str, ...]
  unavailable: dict[str, str]
  disabled: tuple[str, ...]


def select_detectors(weights: Union[Mapping[str, float], Sequence[float]], *, variance: bool,
                     features: bool) -> DetectorSelection:
  """Splits the detectors into used / unavailable (with the reason) / disabled (weight 0), given
  whether a predicted variance and a feature extractor exist. None used is a UserError."""
  if not isinstance(weights, Mapping):
    weights = dict(zip(DETECTOR_NAMES, weights))
  used, unavailable, disabled = [], {}, []
  for name, d in DETECTORS.items():
    reason = d.unavailable_reason(variance, features)
    if weights.get(name, 0.0) == 0.0:
      disabled.append(name)
    elif reason is not None:
      unavailable[name] = reason
    else:
      used.append(name)
  if not used:
    raise UserError(f'detect.weights={tuple(weights.values())}: no available detector has a nonzero '
                    f'weight (unavailable: {unavailable})')
  return DetectorSelection(tuple(used), unavailable, tuple(disabled))


# --- normalisation --------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NormStats:
  """Per detector, held out: the mean and std over all pixels of its raw map and the pixel count
  behind them; and the mean and std over the images of its own image score (eq. 15 of its
  normalised, blurred map), which detect.image_score='standardised_mean' reads (fit_stats)."""
  mean: dict[str, float]
  std: dict[str, float]
  count: dict[str, int]
  score_mean: dict[str, float] = dataclasses.field(default_factory=dict)
  score_std: dict[str, float] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping) -> 'NormStats':
    # A state saved before the image-score statistics existed has none; 'map' does not read them.
    return cls(dict(d['mean']), dict(d['std']), dict(d['count']), dict(d.get('score_mean', {})),
               dict(d.get('score_std', {})))


@jax.jit
def _batch_moments(x: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(pixel count, mean, sum of squared deviations) of the valid images of x [B,H,W]."""
  w = jnp.broadcast_to(valid[:, None, None], x.shape).astype(jnp.float32)
  count = jnp.sum(w)
  mean = jnp.sum(w * x) / jnp.maximum(count, 1.0)
  return count, mean, jnp.sum(w * jnp.square(x - mean))


class NormAccumulator:
  """Streams val maps batch by batch into per-detector mean/std (Chan's parallel update, merged in
  float64 on the host; each batch is reduced on the device in float32)."""

  def __init__(self):
    self._count: dict[str, int] = {}
    self._mean: dict[str, float] = {}
    self._m2: dict[str, float] = {}

  def update(self, maps: Mapping[str, jax.Array], valid: Optional[jax.Array] = None) -> None:
    """Adds a batch of maps name -> [B,H,W]; valid [B] bool marks real (not padding) images."""
    for name, x in maps.items():
      x = jnp.asarray(x, jnp.float32)
      v = jnp.ones(x.shape[:1], bool) if valid is None else jnp.asarray(valid, bool)
      nb, mb, m2b = (float(a) for a in jax.device_get(_batch_moments(x, v)))
      nb = int(round(nb))
      if nb == 0:
        continue
      na, ma, m2a = self._count.get(name, 0), self._mean.get(name, 0.0), self._m2.get(name, 0.0)
      n = na + nb
      delta = mb - ma
      self._count[name] = n
      self._mean[name] = ma + delta * nb / n
      self._m2[name] = m2a + m2b + delta * delta * na * nb / n

  def stats(self) -> NormStats:
    std = {k: math.sqrt(max(self._m2[k], 0.0) / self._count[k]) for k in self._count}
    return NormStats(dict(self._mean), std, dict(self._count))


def fit_normaliser(maps_on_val: Mapping[str, jax.Array]) -> NormStats:
  """Mean and std per detector over all pixels of val maps name -> [N,H,W]."""
  acc = NormAccumulator()
  acc.update(maps_on_val)
  return acc.stats()


def _scale(std: float, mean: float, what: str) -> float:
  """std, or 1 when the held-out values are (numerically) constant so that dividing cannot blow
  up."""
  if std > 1e-6 * abs(mean) and std > 1e-30:
    return std
  logging.warning('detectors: %s is constant on the held-out set (std %g); not scaled', what, std)
  return 1.0


def normalise(maps: Mapping[str, jax.Array], stats: NormStats) -> dict[str, jax.Array]:
  """(map - mean) / std per detector, with the held-out stats."""
  missing = set(maps) - set(stats.mean)
  if missing:
    raise ValueError(f'no normalisation statistics for {sorted(missing)}')
  return {k: (x - stats.mean[k]) / _scale(stats.std[k], stats.mean[k], f'{k} map')
          for k, x in maps.items()}


# --- combination and scores -----------------------------------------------------------------------
def combine(maps: Mapping[str, jax.Array], weights: Mapping[str, float]) -> jax.Array:
  """Eq. 14: S = u S_Cos + v S_U + w S_KL + r S_RE over the detectors named in weights."""
  return sum(weights[k] * maps[k] for k in weights)


def gaussian_blur(maps: jax.Array, sigma: float, truncate: float = 4.0) -> jax.Array:
  """Separable Gaussian blur of maps [B,H,W] per image; the edge is mirrored ('reflect' as in
  scipy.ndimage, edge pixel repeated) and the kernel radius is int(truncate*σ + 0.5)."""
  if sigma <= 0:
    return maps
  radius = int(truncate * sigma + 0.5)
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = jnp.asarray(taps / taps.sum(), maps.dtype)
  x = jnp.pad(maps, ((0, 0), (radius, radius), (radius, radius)), mode='symmetric')[..., None]
  dn = ('NHWC', 'HWIO', 'NHWC')
  x = jax.lax.conv_general_dilated(x, taps.reshape(-1, 1, 1, 1), (1, 1), 'VALID',
                                   dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST)
  x = jax.lax.conv_general_dilated(x, taps.reshape(1, -1, 1, 1), (1, 1), 'VALID',
                                   dimension_numbers=dn, precision=jax.lax.Precision.HIGHEST)
  return x[..., 0]


def image_score(maps: jax.Array, top_n: int) -> jax.Array:
  """Eq. 15: S_a [B] = mean of the top_n largest pixels of each map [B,H,W]."""
  flat = maps.reshape(maps.shape[0], -1)
  return jnp.mean(jax.lax.top_k(flat, min(top_n, flat.shape[1]))[0], axis=-1)


def image_weights(weights: Mapping[str, float], image_detectors: Sequence[str]) -> dict:
  """The eq. 14 weights of the map eq. 15 reads: those of image_detectors, the others 0; the map's
  own weights when image_detectors is empty or names no detector the map combines."""
  kept = {k: (w if k in image_detectors else 0.0) for k, w in weights.items()}
  return kept if any(float(w) != 0.0 for w in kept.values()) else dict(weights)


def standardised_mean(scores: Mapping[str, jax.Array], mean: Mapping[str, jax.Array],
                      scale: Mapping[str, jax.Array], read: Mapping[str, jax.Array]) -> jax.Array:
  """The image score of detect.image_score='standardised_mean': the mean, over the detectors k
  that read[k] marks (1 or 0), of (scores[k] - mean[k]) / scale[k], each detector's own image score
  standardised by the held-out images' mean and std of it."""
  total = sum(read[k] * (scores[k] - mean[k]) / scale[k] for k in scores)
  return total / sum(read[k] for k in scores)


@functools.lru_cache(maxsize=None)
def _own_scores_fn(sigma: float, top_n: int) -> Callable:
  """Compiled normalised maps {name: [B,H,W]} -> {name: [B]}: eq. 15 of each blurred map alone."""
  return jax.jit(lambda maps: {k: image_score(gaussian_blur(m, sigma), top_n)
                               for k, m in maps.items()})


@functools.lru_cache(maxsize=None)
def _weighted_score_fn(sigma: float, top_n: int, image_from: str) -> Callable:
  """One compiled (maps, weights, image weights, score moments) -> (pixel maps, image scores),
  everything but the maps' shapes passed at run time. image_from: 'map' scores the pixel map;
  'own_map' the combination of the image weights (image_weights); 'standardised' the
  standardised_mean of the detectors with a nonzero image weight, whose held-out (mean, scale)
  the moments give. The moments are read by 'standardised' alone, the image weights not by 'map'."""

  @jax.jit
  def score(maps, weights, weights_of_image, moments):
    pixel = gaussian_blur(combine(maps, weights), sigma)
    if image_from == 'standardised':
      read = {k: jnp.where(w != 0, 1.0, 0.0) for k, w in weights_of_image.items()}
      return pixel, standardised_mean(_own_scores_fn(sigma, top_n)(maps), *moments, read)
    own_map = image_from == 'own_map'
    scored = gaussian_blur(combine(maps, weights_of_image), sigma) if own_map else pixel
    return pixel, image_score(scored, top_n)

  return score


def _image_from(cfg: DetectConfig, weights: Mapping[str, float]) -> str:
  """_weighted_score_fn's image_from for cfg over a map of these weights."""
  if cfg.image_score == 'standardised_mean':
    return 'standardised'
  return 'own_map' if image_weights(weights, cfg.image_detectors) != dict(weights) else 'map'


def _score_moments(cfg: DetectConfig, stats: Optional[NormStats], detectors: Sequence[str]):
  """The (mean, scale) of each detector's held-out image score that cfg's image score reads, as
  run-time inputs; None when it reads none."""
  if cfg.image_score != 'standardised_mean':
    return None
  missing = [k for k in detectors if stats is None or k not in stats.score_mean]
  if missing:
    raise UserError(f'detect.image_score=standardised_mean: no held-out image-score statistics for '
                    f'{missing}; fit them again (run --mode=eval)')
  return ({k: jnp.float32(stats.score_mean[k]) for k in detectors},
          {k: jnp.float32(_scale(stats.score_std[k], stats.score_mean[k], f'{k} image score'))
           for k in detectors})


def fit_stats(raw_maps: Mapping[str, np.ndarray], cfg: DetectConfig, image_size: ImageSize,
              batch_size: int = 32) -> NormStats:
  """The held-out statistics of raw maps name -> [N,H,W]: each map's pixel mean and std
  (fit_normaliser), then the mean and std (ddof 1; 0 for one image) over the N images of each
  detector's own image score on the maps so normalised."""
  pixel = fit_normaliser(raw_maps)
  own = _own_scores_fn(scaled_blur_sigma(cfg, image_size), scaled_top_n(cfg, image_size))
  normed = normalise(raw_maps, pixel)
  scores = {k: [] for k in normed}
  for batch, real in _padded_batches(normed, batch_size):
    for k, v in jax.device_get(own(batch)).items():
      scores[k].append(np.asarray(v[:real], np.float64))
  scores = {k: np.concatenate(v) for k, v in scores.items()}
  return dataclasses.replace(
      pixel, score_mean={k: float(np.mean(v)) for k, v in scores.items()},
      score_std={k: float(np.std(v, ddof=1)) if v.size > 1 else 0.0 for k, v in scores.items()})


def _padded_batches(maps: Mapping[str, np.ndarray],
                    batch_size: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
  """(batch, number of real images) of maps name -> [N,H,W], the last batch zero-padded so that
  every compiled call sees one shape."""
  num = int(np.shape(next(iter(maps.values())))[0])
  for start in range(0, num, batch_size):
    batch = {k: np.asarray(v[start:start + batch_size], np.float32) for k, v in maps.items()}
    real = next(iter(batch.values())).shape[0]
    if real < batch_size:
      batch = {k: np.pad(v, ((0, batch_size - real), (0, 0), (0, 0))) for k, v in batch.items()}
    yield batch, real


def get_score_fn(cfg: DetectConfig, image_size: ImageSize, detectors: Sequence[str],
                 stats: Optional[NormStats] = None) -> Callable[[Mapping[str, jax.Array]], tuple]:
  """Jitted normalised maps {name: [B,H,W]} -> (blurred combined map [B,H,W], image score [B])
  over `detectors` with cfg's weights, image detectors, image score, blur σ and N_a scaled to
  image_size; stats (the held-out image-score statistics) is read by
  image_score='standardised_mean' alone."""
  detectors = tuple(detectors)
  unknown = set(detectors) - set(DETECTOR_NAMES)
  if unknown:
    raise ValueError(f'unknown detectors {sorted(unknown)}; expected names from {DETECTOR_NAMES}')
  weights = {k: cfg.weights_by_name()[k] for k in detectors}
  of_image = image_weights(weights, cfg.image_detectors)
  moments = _score_moments(cfg, stats, detectors)
  core = _weighted_score_fn(scaled_blur_sigma(cfg, image_size), scaled_top_n(cfg, image_size),
                            _image_from(cfg, weights))
  return jax.jit(lambda maps: core({k: maps[k] for k in detectors}, weights, of_image, moments))


def subset_weights(weights: Sequence[float], subset: Sequence[str]) -> tuple[float, ...]:
  """(u, v, w, r) of a detector subset: each member keeps its configured weight (1 where the
  config gives it 0, so that a subset can still hold it), the others 0."""
  return tuple((float(w) or 1.0) if n in subset else 0.0 for n, w in zip(DETECTOR_NAMES, weights))


def ablation_subsets(detectors: Sequence[str]) -> list[tuple[str, ...]]:
  """Every non-empty subset (2^k - 1 of them), by size, names in the given order."""
  detectors = tuple(detectors)
  return [s for r in range(1, len(detectors) + 1) for s in itertools.combinations(detectors, r)]


def iter_ablation(cfg: DetectConfig, image_size: ImageSize,
                  maps_norm: Mapping[str, np.ndarray], detectors: Optional[Sequence[str]] = None,
                  batch_size: int = 32, stats: Optional[NormStats] = None
                  ) -> Iterator[tuple[tuple[str, ...], np.ndarray, np.ndarray]]:
  """Yields (subset, pixel maps [N,H,W], image scores [N]) for every subset, one at a time.

  All subsets share one compiled function (weights are run-time inputs; a left-out detector gets
  weight 0), and only one subset's maps are alive at a time, so the caller can compute pixel
  metrics subset by subset. detectors defaults to the used detectors among maps_norm's keys; stats
  is read by image_score='standardised_mean' alone (get_score_fn).
  """
  if detectors is None:
    detectors = [k for k in DETECTOR_NAMES if k in maps_norm and cfg.weights_by_name()[k] != 0.0]
  detectors = tuple(detectors)
  weight_of = cfg.weights_by_name()
  moments = _score_moments(cfg, stats, detectors)
  # A subset is scored from its own map when it holds no image detector: 'own_map' serves both.
  image_from = 'standardised' if moments is not None else (
      'own_map' if cfg.image_detectors else 'map')
  core = _weighted_score_fn(scaled_blur_sigma(cfg, image_size), scaled_top_n(cfg, image_size),
                            image_from)
  maps = {k: maps_norm[k] for k in detectors}
  for subset in ablation_subsets(detectors):
    own = {k: weight_of[k] if k in subset else 0.0 for k in detectors}
    weights = {k: jnp.float32(w) for k, w in own.items()}
    of_image = {k: jnp.float32(w) for k, w in image_weights(own, cfg.image_detectors).items()}
    pixel, score = [], []
    for batch, real in _padded_batches(maps, batch_size):
      p, s = jax.device_get(core(batch, weights, of_image, moments))
      pixel.append(p[:real])
      score.append(s[:real])
    yield subset, np.concatenate(pixel), np.concatenate(score)
