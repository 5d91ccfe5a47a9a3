"""Reconstruction by partial diffusion: SGM and ESM (eq. 5) and variance-guided ESM^σ (eq. 11-13).

Each method is one `jax.lax.scan` over the steps (two for ESM^σ: forward, then reverse), jitted once
per (network, method, T_d) and, by jax.jit itself, once per batch shape. The equations are those of
docs/design.md "Equations in discrete form":

* sgm / esm: start at x_{T_d} = √ᾱ_{T_d} x_0 + √(1-ᾱ_{T_d}) z, then for i = T_d..1
  x_{i-1} = x_i + β_i (x_i/2 + score_i); sgm uses the DSM score (eq. 4), esm the ESM score (eq. 3)
  with σ²_θ clamped below at esm_min_var (σ²_min of section 4.2). NFE = T_d.
* esm_sigma: forward b_i = clip(σ²_θ(x_i), sigma_min_var, sigma_max_var) (σ²_min, σ²_max),
  x_{i+1} = √(1-b_i) x_i + √b_i z_i for i = 0..T_d-1; reverse
  x_{i-1} = x_i + s_i x_i/2 - √(1-ᾱ) ε_θ(x_i) with s_i = clip(σ²_θ(x_i)). sigma_floor='beta' (ours)
  floors b_i and s_i at the schedule's β of that step instead of the constant σ²_min, so that where
  σ²_θ is small the process adds the noise its literal time label assumes.
  NFE = 2 T_d. The time label is 'literal' (i; label 1 at i = 0, where the network is undefined) or
  'matched' (the label whose ᾱ is nearest the pixel mean of Π_{j<i}(1-b_j)); the reverse pass reuses
  the forward pass's label for each state x_i and that label's ᾱ.

Each method is registered in SAMPLERS (`register_sampler`) with its NFE and whether it needs the
variance stream; validation, evaluation and the report read the registry.

Evaluation should pass the EMA parameters (TrainState.ema_params) as `params`. Per-image noise comes
from per-image keys (`image_keys`) of a digest of each image's pixels (esm/preprocess.py), so a
result depends on the image alone: not on its position, its batch, padding or sharding.
"""

import dataclasses
import functools
from typing import Callable, Dict, NamedTuple, Optional, Tuple

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from esm.errors import UserError
from esm.models.dual_stream import NetOutput
from esm.sde import VPSDE, dsm_score, esm_score, per_example

SIGMA_TIMES = ('literal', 'matched')
SIGMA_FLOORS = ('constant', 'beta')
VAR_SOURCES = ('i1', 't_d', 'mean')
# Numerical floor of σ²_0 / σ²_in only; the detectors apply config.detect.var_floor themselves.
VAR_FLOOR = 1e-12


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """config.sampling, typed; every check of the section is here (T_d's upper bound needs T:
  check_t_d)."""
  method: str = 'esm'
  t_d: int = 100
  esm_min_var: float = 0.01
  sigma_min_var: float = 0.01
  sigma_max_var: float = 0.02
  sigma_time: str = 'literal'
  sigma_floor: str = 'constant'
  var_source: str = 't_d'
  snapshot_steps: Tuple[int, ...] = (200, 150, 100, 80, 50, 20, 0)
  # A dataset config's per-category T_d (esm/run.py picks t_d from it); not part of equality or
  # the hash, since it never changes a reconstruction.
  t_d_by_category: Dict[str, int] = dataclasses.field(default_factory=dict, compare=False)

  def __post_init__(self):
    if self.method not in SAMPLERS:
      raise UserError(f'sampling.method: expected one of {tuple(SAMPLERS)}, got {self.method!r}')
    if self.sigma_time not in SIGMA_TIMES:
      raise UserError(f'sampling.sigma_time: expected one of {SIGMA_TIMES}, got {self.sigma_time!r}')
    if self.sigma_floor not in SIGMA_FLOORS:
      raise UserError(f'sampling.sigma_floor: expected one of {SIGMA_FLOORS}, got '
                      f'{self.sigma_floor!r}')
    if self.var_source not in VAR_SOURCES:
      raise UserError(f'sampling.var_source: expected one of {VAR_SOURCES}, got {self.var_source!r}')
    if not 0.0 <= self.sigma_min_var <= self.sigma_max_var < 1.0:
      raise UserError(f'sampling.sigma_min_var/sigma_max_var: expected 0 <= sigma_min_var <= '
                      f'sigma_max_var < 1, got {self.sigma_min_var} and {self.sigma_max_var}')
    if not 0.0 <= self.esm_min_var < 1.0:
      raise UserError(f'sampling.esm_min_var: expected 0 <= esm_min_var < 1, got {self.esm_min_var}')
    if any(s < 0 for s in self.snapshot_steps):
      raise UserError(f'sampling.snapshot_steps: expected steps >= 0, got {self.snapshot_steps}')

  @property
  def sampler(self) -> 'Sampler':
    return SAMPLERS[self.method]


def check_t_d(t_d, num_steps: int, field: str = 'sampling.t_d') -> int:
  """T_d must be an integer in 1..T (sde.num_steps)."""
  if isinstance(t_d, bool) or not isinstance(t_d, (int, np.integer)) or not 1 <= t_d <= num_steps:
    raise UserError(f'{field}: expected an integer in 1..{num_steps} (sde.num_steps), got {t_d!r}')
  return int(t_d)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """A registered reconstruction method (score_sde's register_predictor, for whole samplers)."""
  name: str
  run: Callable  # (call, sde, cfg, t_d, x0, keys, slot_of, snap_buf) -> Reconstruction
  nfe: Callable[[int], int]  # T_d -> network evaluations per image of the sampler itself
  needs_variance: bool  # reads σ²_θ, so needs a dual-stream model; gives σ²_0, σ²_in (S_U, S_KL)
  # (var_source, T_d) -> image-forwards per image for σ²_0/σ²_in on top of the NFE
  extra_net_calls: Callable[[str, int], int]
  reads_sigma_floor: bool = False  # sampling.sigma_floor changes it (tune tries tune.sigma_floors)


SAMPLERS: Dict[str, Sampler] = {}


def register_sampler(name: str, *, nfe: Callable[[int], int], needs_variance: bool,
                     extra_net_calls: Callable[[str, int], int] = lambda var_source, t_d: 0,
                     reads_sigma_floor: bool = False):
  """Decorator: registers `run` as sampling.method=name. A new sampler is one function and this."""
  def register(run: Callable) -> Callable:
    if name in SAMPLERS:
      raise ValueError(f'sampler {name!r} is registered twice')
    SAMPLERS[name] = Sampler(name, run, nfe, needs_variance, extra_net_calls, reads_sigma_floor)
    return run
  return register


class Reconstruction(NamedTuple):
  """What `reconstruct` returns; N = T_d recorded reverse steps, S = kept snapshots."""
  x0_hat: jax.Array  # [B,H,W,C] the reconstruction x̂_0
  var0: Optional[jax.Array]  # [B,H,W,C] σ²_0 (per var_source, floored at VAR_FLOOR); None for sgm
  var_in: Optional[jax.Array]  # [B,H,W,C] σ²_in, the same for the input x_0; None for sgm
  steps: jax.Array  # [N] int32 step index i of each reverse step, T_d..1
  net_labels: jax.Array  # [N,B] int32 label fed to the network at that step
  var_range: jax.Array  # [N,B,2] (min, max) over pixels of the σ² the step used (sgm: 1-ᾱ_i)
  forward_var_range: Optional[jax.Array]  # [T_d,B,2] esm_sigma: (min, max) of b_i, i = 0..T_d-1
  forward_net_labels: Optional[jax.Array]  # [T_d,B] esm_sigma: forward labels, i = 0..T_d-1
  snapshots: jax.Array  # [S,B,H,W,C] x_i at snapshot_steps (0 is x̂_0)
  snapshot_steps: jax.Array  # [S] int32


def image_keys(seed: int, indices) -> jax.Array:
  """Per-image keys fold_in(key(seed), i) for uint32 i (a content digest or an index)."""
  base = jax.random.key(seed)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(indices, jnp.uint32))


def sgm_step(x, eps, beta, alpha_bar):
  """Eq. 5 with the DSM score (eq. 4): x_{i-1} = x_i + β_i (x_i/2 - ε_θ/√(1-ᾱ_i))."""
  return x + per_example(beta, x.ndim) * (x / 2 + dsm_score(eps, alpha_bar))


def esm_step(x, eps, var, beta, alpha_bar):
  """Eq. 5 with the ESM score (eq. 3): x_{i-1} = x_i + β_i (x_i/2 - √(1-ᾱ_i) ε_θ/σ²); var clamped."""
  return x + per_example(beta, x.ndim) * (x / 2 + esm_score(eps, var, alpha_bar))


def esm_sigma_forward_step(x, b, z):
  """Eq. 11 discretised, σ² in place of β: x_{i+1} = √(1-b_i) x_i + √b_i z_i."""
  return jnp.sqrt(1.0 - b) * x + jnp.sqrt(b) * z


def esm_sigma_reverse_step(x, eps, s, alpha_bar):
  """Eq. 13 discretised: x_{i-1} = x_i + s_i x_i/2 - √(1-ᾱ) ε_θ, σ² in the numerator."""
  return x + s * x / 2 - jnp.sqrt(1.0 - per_example(alpha_bar, x.ndim)) * eps


def _range(var):
  """Per-example (min, max) over pixels: [B,H,W,C] -> [B,2]."""
  flat = var.reshape(var.shape[0], -1)
  return jnp.stack([flat.min(axis=1), flat.max(axis=1)], axis=-1)


class ReconstructFn:
  """reconstruct(params, x0, keys) -> Reconstruction, jitted; carries the static facts of the run.

  `pure` is the same function unjitted, for callers that jit it themselves (e.g. with shardings).
  """

  def __init__(self, pure: Callable, sampler: Sampler, t_d: int, var_source: str,
               snapshot_steps: Tuple[int, ...]):
    self.pure = pure
    self.jitted = jax.jit(pure)
    self.sampler = sampler
    self.method = sampler.name
    self.t_d = t_d
    self.nfe = sampler.nfe(t_d)
    self.snapshot_steps = snapshot_steps
    # Image-forwards per image for σ²_0/σ²_in on top of NFE (0 for sgm and esm_sigma 'mean').
    self.extra_net_calls = sampler.extra_net_calls(var_source, t_d)

  def __call__(self, params, x0, keys) -> Reconstruction:
    return self.jitted(params, x0, keys)


def get_reconstruct_fn(net_fn: Callable, sde: VPSDE, sampling_cfg: SamplingConfig,
                       t_d: Optional[int] = None) -> ReconstructFn:
  """The reconstruction of sampling_cfg.method at depth t_d (default sampling_cfg.t_d).

  net_fn(params, x, i, *, train=False, rng=None) -> NetOutput(eps, log_var) with labels i in 1..T.
  Cached: the same (net_fn, sde, config, t_d) returns the same jitted function.
  """
  t_d = check_t_d(sampling_cfg.t_d if t_d is None else t_d, sde.num_steps)
  return _build(net_fn, sde, sampling_cfg, t_d)


@functools.lru_cache(maxsize=64)
def _build(net_fn, sde, cfg: SamplingConfig, t_d: int) -> ReconstructFn:
  snaps = tuple(sorted({s for s in cfg.snapshot_steps if s <= t_d}, reverse=True))
  # slot_of[i] is the snapshot slot of x_i, or -1.
  slot_of = np.full(t_d + 1, -1, np.int32)
  slot_of[list(snaps)] = np.arange(len(snaps), dtype=np.int32)
  sampler = cfg.sampler

  def reconstruct(params, x0, keys) -> Reconstruction:
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
      keys = jax.random.wrap_key_data(keys)  # raw uint32 [B,2] keys
    if x0.ndim != 4 or keys.shape != x0.shape[:1]:
      raise UserError(f'reconstruct: expected x0 [B,H,W,C] and keys [B], got {x0.shape} and {keys.shape}')
    x0 = x0.astype(jnp.float32)
    call = functools.partial(_call_net, net_fn, params, sampler)
    snap_buf = jnp.zeros((len(snaps),) + x0.shape, jnp.float32)
    rec = sampler.run(call, sde, cfg, t_d, x0, keys, jnp.asarray(slot_of), snap_buf)
    return rec._replace(snapshot_steps=jnp.asarray(snaps, jnp.int32))

  fn = ReconstructFn(reconstruct, sampler, t_d, cfg.var_source, snaps)
  logging.info('sampling: method=%s T_d=%d NFE=%d (+%d σ² calls per image) snapshots=%s',
               fn.method, t_d, fn.nfe, fn.extra_net_calls, snaps)
  return fn


def _call_net(net_fn, params, sampler: Sampler, x, labels):
  """(ε, σ² or None) in float32; σ² only for samplers that need the second stream."""
  out = net_fn(params, x, labels, train=False, rng=None)
  if not isinstance(out, NetOutput):
    out = NetOutput(*out)
  if not sampler.needs_variance:
    return out.eps.astype(jnp.float32), None
  if out.log_var is None:
    raise UserError(f"sampling.method: {sampler.name!r} needs a dual-stream model (loss.kind='esm'); "
                    'the network returned no log σ²')
  return out.eps.astype(jnp.float32), jnp.exp(out.log_var.astype(jnp.float32))


def _snapshot(buf, slot_of, step, x):
  """Write x_step into its snapshot slot (a one-slot in-place update; a no-op when not kept)."""
  if buf.shape[0] == 0:
    return buf
  slot = slot_of[step]
  keep = slot >= 0
  slot = jnp.maximum(slot, 0)
  return buf.at[slot].set(jnp.where(keep, x, buf[slot]))


def _labels(value, batch):
  return jnp.full((batch,), value, jnp.int32)


def _end_vars(call, x0_hat, x0, labels):
  """σ²_θ of x̂_0 and x_0 at the given [B] labels, in one call on the 2B batch."""
  _, var = call(jnp.concatenate([x0_hat, x0]), jnp.concatenate([labels, labels]))
  var = jnp.maximum(var, VAR_FLOOR)
  return var[:x0.shape[0]], var[x0.shape[0]:]


def _esm_extra_calls(var_source: str, t_d: int) -> int:
  return t_d if var_source == 'mean' else 2


@register_sampler('esm', nfe=lambda t_d: t_d, needs_variance=True, extra_net_calls=_esm_extra_calls)
@register_sampler('sgm', nfe=lambda t_d: t_d, needs_variance=False)
def _sgm_or_esm(call, sde, cfg, t_d, x0, keys, slot_of, snap_buf) -> Reconstruction:
  batch = x0.shape[0]
  z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), x0.shape[1:]))(keys)
  ab_td = sde.alpha_bar[t_d]
  x_start = jnp.sqrt(ab_td) * x0 + jnp.sqrt(1.0 - ab_td) * z
  is_esm = cfg.method == 'esm'
  # 'mean' for esm also needs σ² along the input's own path x_i = √ᾱ_i x_0 + √(1-ᾱ_i) z.
  fwd_path = is_esm and cfg.var_source == 'mean'

  def step(carry, i):
    x, buf, sums = carry
    labels = _labels(i, batch)
    beta, ab = sde.betas[i], sde.alpha_bar[i]
    if fwd_path:
      x_fwd = jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * z
      eps, var = call(jnp.concatenate([x, x_fwd]), jnp.concatenate([labels, labels]))
      eps, (var, var_fwd) = eps[:batch], (var[:batch], var[batch:])
      sums = (sums[0] + var, sums[1] + var_fwd)
    else:
      eps, var = call(x, labels)
    if is_esm:
      var_used = jnp.maximum(var, cfg.esm_min_var)
      x_next = esm_step(x, eps, var_used, beta, ab)
      vr = _range(var_used)
    else:
      x_next = sgm_step(x, eps, beta, ab)
      vr = jnp.broadcast_to(1.0 - ab, (batch, 2))
    buf = _snapshot(buf, slot_of, i - 1, x_next)
    return (x_next, buf, sums), (labels, vr)

  steps = jnp.arange(t_d, 0, -1, dtype=jnp.int32)
  buf = _snapshot(snap_buf, slot_of, t_d, x_start)
  zeros = jnp.zeros_like(x0)
  (x0_hat, buf, sums), (net_labels, var_range) = jax.lax.scan(
      step, (x_start, buf, (zeros, zeros)), steps)

  var0 = var_in = None
  if is_esm:
    if cfg.var_source == 'mean':
      var0, var_in = (jnp.maximum(s / t_d, VAR_FLOOR) for s in sums)
    else:
      label = 1 if cfg.var_source == 'i1' else t_d
      var0, var_in = _end_vars(call, x0_hat, x0, _labels(label, batch))
  return Reconstruction(x0_hat, var0, var_in, steps, net_labels, var_range, None, None, buf, None)


@register_sampler('esm_sigma', nfe=lambda t_d: 2 * t_d, needs_variance=True,
                  extra_net_calls=lambda var_source, t_d: 0 if var_source == 'mean' else 2,
                  reads_sigma_floor=True)
def _esm_sigma(call, sde, cfg, t_d, x0, keys, slot_of, snap_buf) -> Reconstruction:
  batch = x0.shape[0]
  matched = cfg.sigma_time == 'matched'

  def clip(v, step):
    """σ²_θ as the variance of the step that adds noise to x_{step-1} (σ²_min, σ²_max)."""
    if cfg.sigma_floor == 'beta':  # floor β_step: never less noise than the schedule's own step
      beta = sde.betas[step]
      return jnp.clip(v, beta, jnp.maximum(beta, cfg.sigma_max_var))
    return jnp.clip(v, cfg.sigma_min_var, cfg.sigma_max_var)

  def label_of(i, log_acc):
    """Network label of the state x_i: i (at least 1), or matched to the pixel-mean Π(1-b_j)."""
    if matched:
      acc = jnp.mean(jnp.exp(log_acc).reshape(batch, -1), axis=1)
      return sde.matched_step(acc).astype(jnp.int32)
    return _labels(jnp.maximum(i, 1), batch)

  def forward(carry, i):
    x, log_acc, labels, var_sum = carry
    _, var = call(x, labels)
    b = clip(var, i + 1)
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i + 1), x.shape[1:]))(keys)
    x_next = esm_sigma_forward_step(x, b, z)
    log_acc = log_acc + jnp.log1p(-b)
    next_labels = label_of(i + 1, log_acc)
    return (x_next, log_acc, next_labels, var_sum + var), (labels, _range(b), next_labels)

  zeros = jnp.zeros_like(x0)
  init = (x0, zeros, label_of(jnp.int32(0), zeros), zeros)
  (x_td, _, _, var_sum_fwd), (fwd_labels, fwd_range, state_labels) = jax.lax.scan(
      forward, init, jnp.arange(t_d, dtype=jnp.int32))
  # state_labels[i-1] is the label of the forward state x_i, i = 1..T_d; the reverse pass reuses it.
  rev_labels = state_labels[::-1]
  steps = jnp.arange(t_d, 0, -1, dtype=jnp.int32)

  def reverse(carry, inputs):
    x, buf, var_sum = carry
    i, labels = inputs
    eps, var = call(x, labels)
    s = clip(var, i)
    x_next = esm_sigma_reverse_step(x, eps, s, sde.alpha_bar[labels])
    buf = _snapshot(buf, slot_of, i - 1, x_next)
    return (x_next, buf, var_sum + var), _range(s)

  buf = _snapshot(snap_buf, slot_of, t_d, x_td)
  (x0_hat, buf, var_sum_rev), var_range = jax.lax.scan(reverse, (x_td, buf, zeros), (steps, rev_labels))

  if cfg.var_source == 'mean':
    var0 = jnp.maximum(var_sum_rev / t_d, VAR_FLOOR)
    var_in = jnp.maximum(var_sum_fwd / t_d, VAR_FLOOR)
  else:
    end_labels = _labels(1, batch) if cfg.var_source == 'i1' else rev_labels[0]
    var0, var_in = _end_vars(call, x0_hat, x0, end_labels)
  return Reconstruction(x0_hat, var0, var_in, steps, rev_labels, var_range, fwd_range, fwd_labels,
                        buf, None)
