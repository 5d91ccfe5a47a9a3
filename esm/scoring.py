"""Scoring images with a trained model: the inference core under evaluation, tuning, predict, the
Python API (esm/detector.py) and export.

A Scorer restores the EMA parameters of a workdir's newest checkpoint, jits reconstruct-and-detect
over the device mesh, fits or takes the normalisation of the raw detector maps, and combines them
into pixel maps and image scores (eq. 14, 15). Per-image outputs are gathered from every process
and put in example order, so padding and multi-host sharding never drop or duplicate an example.
No dataset code is imported: the caller hands in an ImageSet (esm/image_set.py).
"""

import collections
import dataclasses
import os
import time
from typing import Any, Callable, Dict, Iterator, NamedTuple, Optional

import jax
import numpy as np
from absl import logging

from esm import detectors as det
from esm import parallel
from esm import preprocess
from esm import sampling
from esm.checkpoint import Checkpointer
from esm.config import Config
from esm.errors import UserError
from esm.features import get_feature_fn
from esm.image_set import ImageSet
from esm.models import utils as mutils


@dataclasses.dataclass
class SplitOutputs:
  """Host-side per-image outputs of one split, in example order."""
  maps: Dict[str, np.ndarray]  # raw detector maps, name -> [N,H,W] float32
  labels: np.ndarray  # [N] int32
  masks: np.ndarray  # [N,H,W] uint8
  kept: Dict[int, Dict[str, np.ndarray]]  # example index -> images kept for the figures
  trajectory: Optional[Dict[str, np.ndarray]]  # snapshots and σ² ranges of one example
  seconds: float  # wall time of the jitted calls, compilation excluded


@dataclasses.dataclass
class AnalysedBatch:
  """One reconstructed and detected batch, still on the devices except the gathered index."""
  local: Dict[str, np.ndarray]  # this process's rows of the batch
  images: jax.Array  # the global input batch, sharded
  rec: sampling.Reconstruction
  maps: Dict[str, jax.Array]  # raw detector maps
  index: np.ndarray  # [global batch] example index of each row (padding rows too)
  real: np.ndarray  # positions of the rows that are real examples


class FigureKeeper:
  """Keeps, off the devices, the images the report's figures show: the examples in `keep` and the
  denoising trajectory of one example."""

  def __init__(self, keep, trajectory_index: Optional[int]):
    self.keep, self.trajectory_index = set(keep), trajectory_index
    self.kept: Dict[int, Dict[str, np.ndarray]] = {}
    self.trajectory: Optional[Dict[str, np.ndarray]] = None

  def add(self, b: AnalysedBatch) -> None:
    wanted = [j for j in b.real if b.index[j] in self.keep or b.index[j] == self.trajectory_index]
    if not wanted:
      return
    rec = b.rec
    host = parallel.gather({'input': b.images, 'x0_hat': rec.x0_hat,
                            'var0': rec.var0 if rec.var0 is not None else rec.x0_hat * np.nan,
                            'snapshots': rec.snapshots, 'var_range': rec.var_range})
    for j in wanted:
      if b.index[j] in self.keep:
        self.kept[int(b.index[j])] = {k: host[k][j] for k in ('input', 'x0_hat', 'var0')}
      if b.index[j] == self.trajectory_index:
        self.trajectory = {'snapshots': host['snapshots'][:, j], 'var_range': host['var_range'][:, j],
                           'steps': np.asarray(rec.steps),
                           'snapshot_steps': np.asarray(rec.snapshot_steps)}


class EmaParams(NamedTuple):
  params: Any  # the EMA parameters, replicated over the mesh
  step: int  # the checkpoint's step


def restore_ema_params(config: Config, workdir: str, mesh) -> EmaParams:
  """The EMA parameters of the newest readable checkpoint in workdir."""
  size = config.data.image_size
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'))
  abstract = mutils.abstract_state(config, mutils.build(config, size), size)
  state, step = checkpointer.restore_latest(
      parallel.with_sharding(abstract, parallel.replicated(mesh)))
  checkpointer.close()
  if state is None:
    raise UserError(f'{workdir}/checkpoints: no checkpoint to evaluate; run --mode=train first')
  logging.info('evaluating the EMA parameters of step %d', step)
  return EmaParams(jax.device_put(state.ema_params, parallel.replicated(mesh)), step)


def get_features(config: Config, weights: Dict[str, float]) -> Optional[Callable]:
  """The feature extractor when a detector that needs one has a nonzero weight, else None."""
  if any(weights[n] != 0.0 and d.needs_features for n, d in det.DETECTORS.items()):
    return get_feature_fn(config.features)
  return None


# Compiled reconstruct-and-detect programs of this process, by everything that shapes them, so the
# scorers of one model (tuning's candidates and its evaluation, repeated Detectors) share them.
_PROGRAMS: 'collections.OrderedDict[Any, Any]' = collections.OrderedDict()
_MAX_PROGRAMS = 16


class Scorer:
  """Everything evaluation and prediction share: the model's EMA parameters, the jitted
  reconstruct-and-detect function, the detector selection and the normalisation.

  `restored` and `feature_fn` let several scorers (the tuning candidates) share one restored
  checkpoint and one feature extractor."""

  def __init__(self, config: Config, workdir: str, *, restored: Optional[EmaParams] = None,
               feature_fn: Optional[Callable] = None):
    self.config = config
    self.image_size = config.data.image_size
    self.mesh = parallel.make_mesh()
    built = mutils.build(config, self.image_size)
    self.num_params = mutils.count_params(built.model, self.image_size)
    restored = restored or restore_ema_params(config, workdir, self.mesh)
    self.params, self.checkpoint_step = restored
    self.recon = sampling.get_reconstruct_fn(built.net_fn, built.sde, config.sampling)
    self.detect_cfg = config.detect
    weights = self.detect_cfg.weights_by_name()
    given_features = feature_fn
    feature_fn = feature_fn or get_features(config, weights)
    self.selection = det.select_detectors(weights, variance=self.recon.sampler.needs_variance,
                                          features=feature_fn is not None)
    for name, reason in self.selection.unavailable.items():
      logging.warning('detector %s: %s', name, reason)

    cfg, recon_pure = self.detect_cfg, self.recon.pure

    def analyse(params, images, keys):
      rec = recon_pure(params, images, keys)
      maps = det.compute_maps(images, rec.x0_hat, rec.var0, rec.var_in, feature_fn,
                              re_kind=cfg.re_kind, var_floor=cfg.var_floor)
      return rec, maps

    self.analyse_fn = analyse  # unjitted (params, images, key data) -> (rec, raw maps): for export
    batch = parallel.batch_sharding(self.mesh)
    self._analyse = jax.jit(analyse, in_shardings=(parallel.replicated(self.mesh), batch, batch))
    self._compiled = None
    self.compile_seconds = 0.0
    # A given extractor by identity (the cache keeps it alive), one made here by its config.
    features_key = given_features or (config.features if feature_fn is not None else None)
    self._program_base = (config.model, config.loss, config.sde, config.sampling, cfg.re_kind,
                          cfg.var_floor, config.data.image_size, config.data.train_crop,
                          features_key, tuple(d.id for d in self.mesh.devices.flat))
    self.stats: Optional[det.NormStats] = None

  def _analysed_batches(self, data: ImageSet, what: str, timing: Dict[str, float]) -> Iterator[AnalysedBatch]:
    """Reconstructs and detects `data` batch by batch; timing['seconds'] sums the jitted calls
    (compilation excluded)."""
    n, start, done = data.num_examples, time.time(), 0
    for local in data.batches():
      images = parallel.shard_batch(self.mesh, local['image'])
      keys = parallel.shard_batch(self.mesh, jax.random.key_data(
          sampling.image_keys(self.config.seed, preprocess.content_digests(local['image']))))
      if self._compiled is None:
        t = time.time()
        self._compiled = self._program(images, keys)
        self.compile_seconds = time.time() - t
      t = time.time()
      rec, batch_maps = self._compiled(self.params, images, keys)
      jax.block_until_ready(batch_maps)
      timing['seconds'] += time.time() - t
      index, valid = parallel.gather((local['index'], local['valid']))
      batch = AnalysedBatch(local, images, rec, batch_maps, index, np.flatnonzero(valid))
      yield batch
      done += len(batch.real)
      logging.info('%s: %d/%d images  %.2f s/image  ETA %.0f s', what, done, n,
                   timing['seconds'] / max(done, 1), (time.time() - start) / done * (n - done))

  def _program(self, images: jax.Array, keys: jax.Array):
    """The compiled program for these inputs' shapes and shardings, from this process's cache."""
    args = (self.params, images, keys)
    key = (self._program_base, jax.tree.structure(args),
           tuple((x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(args)))
    if key in _PROGRAMS:
      _PROGRAMS.move_to_end(key)
    else:
      _PROGRAMS[key] = self._analyse.lower(*args).compile()
      if len(_PROGRAMS) > _MAX_PROGRAMS:
        _PROGRAMS.popitem(last=False)
    return _PROGRAMS[key]

  def run_split(self, data: ImageSet, *, keep=(), trajectory_index: Optional[int] = None,
                what: str = 'test') -> SplitOutputs:
    """Reconstructs and detects every example of `data` (an ImageSet): the maps, labels and masks
    of all, the figure images of `keep` and the trajectory of `trajectory_index`."""
    n, size = data.num_examples, self.image_size
    maps = {k: np.zeros((n, size, size), np.float32) for k in self.selection.used}
    labels = np.zeros((n,), np.int32)
    masks = np.zeros((n, size, size), np.uint8)
    figures = FigureKeeper(keep, trajectory_index)
    timing = {'seconds': 0.0}
    for b in self._analysed_batches(data, what, timing):
      idx = b.index[b.real]
      for k in self.selection.used:
        maps[k][idx] = parallel.gather(b.maps[k])[b.real]
      labels[idx] = parallel.gather(b.local['label'])[b.real]
      masks[idx] = parallel.gather(b.local['mask'])[b.real]
      figures.add(b)
    return SplitOutputs(maps, labels, masks, figures.kept, figures.trajectory, timing['seconds'])

  def fit_normalisation(self, val_data: ImageSet) -> SplitOutputs:
    """Fits the statistics of each raw map, and of each detector's image score, over the
    reconstructed held-out train/good images (detectors.fit_stats); returns those images'
    outputs."""
    if val_data.num_examples == 0:
      raise UserError('data.val_fraction: the held-out train/good slice is empty; it is needed to '
                      'normalise the detector maps (raise data.val_fraction)')
    out = self.run_split(val_data, what='val')
    self.stats = det.fit_stats(out.maps, self.detect_cfg, self.image_size)
    return out

  def normalise(self, raw_maps: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return det.normalise(raw_maps, self.stats)

  def score(self, normed: Dict[str, np.ndarray], batch_size: int = 32):
    """(pixel maps [N,H,W], image scores [N]) of the configured combination (eq. 14, 15) of
    normalised maps."""
    score_fn = det.get_score_fn(self.detect_cfg, self.image_size, self.selection.used, self.stats)
    pixel, image = [], []
    n = next(iter(normed.values())).shape[0]
    for s in range(0, n, batch_size):
      p, i = jax.device_get(score_fn({k: v[s:s + batch_size] for k, v in normed.items()}))
      pixel.append(np.asarray(p, np.float32))
      image.append(np.asarray(i, np.float32))
    return np.concatenate(pixel), np.concatenate(image)
