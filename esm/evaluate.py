"""The evaluation loop: reconstruct, detect, normalise on held-out good images, score, measure.

One jitted function per batch does reconstruction and the raw detector maps, with the batch split
over the device mesh. Per-image outputs are gathered from every process and put in example order,
so padding and multi-host sharding never drop or duplicate an example.
"""

import dataclasses
import os
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional

import jax
import numpy as np
from absl import logging

from esm import detector_state
from esm import detectors as det
from esm import metrics
from esm import parallel
from esm import preprocess
from esm import report
from esm import sampling
from esm.checkpoint import Checkpointer
from esm.errors import UserError
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


def restore_ema_params(config, workdir: str, mesh) -> EmaParams:
  """The EMA parameters of the newest readable checkpoint in workdir."""
  size = config.data.image_size
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), config.train.keep)
  abstract = mutils.abstract_state(config, mutils.build(config, size), size)
  state, step = checkpointer.restore_latest(
      parallel.with_sharding(abstract, parallel.replicated(mesh)))
  checkpointer.close()
  if state is None:
    raise UserError(f'{workdir}/checkpoints: no checkpoint to evaluate; run --mode=train first')
  logging.info('evaluating the EMA parameters of step %d', step)
  return EmaParams(jax.device_put(state.ema_params, parallel.replicated(mesh)), step)


def get_features(config, weights: Dict[str, float]) -> Optional[Callable]:
  """The feature extractor when a detector that needs one has a nonzero weight, else None."""
  if any(weights[n] != 0.0 and d.needs_features for n, d in det.DETECTORS.items()):
    from esm.features import get_feature_fn  # pylint: disable=g-import-not-at-top
    return get_feature_fn(config.features)
  return None


class Scorer:
  """Everything evaluation and prediction share: the model's EMA parameters, the jitted
  reconstruct-and-detect function, the detector selection and the normalisation.

  `restored` and `feature_fn` let several scorers (the tuning candidates) share one restored
  checkpoint and one feature extractor."""

  def __init__(self, config, workdir: str, *, restored: Optional[EmaParams] = None,
               feature_fn: Optional[Callable] = None):
    self.config = config
    self.image_size = config.data.image_size
    self.mesh = parallel.make_mesh()
    built = mutils.build(config, self.image_size)
    self.num_params = mutils.count_params(built.model, self.image_size)
    restored = restored or restore_ema_params(config, workdir, self.mesh)
    self.params, self.checkpoint_step = restored
    self.recon = sampling.get_reconstruct_fn(
        built.net_fn, built.sde, sampling.SamplingConfig.from_config(config.sampling))
    self.detect_cfg = det.DetectConfig.from_config(config.detect)
    weights = self.detect_cfg.weights_by_name()
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
    self.stats: Optional[det.NormStats] = None

  def _analysed_batches(self, data, what: str, timing: Dict[str, float]) -> Iterator[AnalysedBatch]:
    """Reconstructs and detects `data` batch by batch; timing['seconds'] sums the jitted calls
    (compilation excluded)."""
    n, start, done = data.num_examples, time.time(), 0
    for local in data.batches():
      images = parallel.shard_batch(self.mesh, local['image'])
      keys = parallel.shard_batch(self.mesh, jax.random.key_data(
          sampling.image_keys(self.config.seed, preprocess.content_digests(local['image']))))
      if self._compiled is None:
        t = time.time()
        self._compiled = self._analyse.lower(self.params, images, keys).compile()
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

  def run_split(self, data, *, keep=(), trajectory_index: Optional[int] = None,
                what: str = 'test') -> SplitOutputs:
    """Reconstructs and detects every example of `data` (an EvalData): the maps, labels and masks
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

  def fit_normalisation(self, val_data) -> SplitOutputs:
    """Fits the statistics of each raw map over the reconstructed held-out train/good images;
    returns those images' outputs."""
    if val_data.num_examples == 0:
      raise UserError('data.val_fraction: the held-out train/good slice is empty; it is needed to '
                      'normalise the detector maps (raise data.val_fraction)')
    out = self.run_split(val_data, what='val')
    self.stats = det.fit_normaliser(out.maps)
    return out

  def normalise(self, raw_maps: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
    return det.normalise(raw_maps, self.stats)

  def score(self, normed: Dict[str, np.ndarray], batch_size: int = 32):
    """(pixel maps [N,H,W], image scores [N]) of the configured combination (eq. 14, 15) of
    normalised maps."""
    score_fn = det.get_score_fn(self.detect_cfg, self.image_size, self.selection.used)
    pixel, image = [], []
    n = next(iter(normed.values())).shape[0]
    for s in range(0, n, batch_size):
      p, i = jax.device_get(score_fn({k: v[s:s + batch_size] for k, v in normed.items()}))
      pixel.append(np.asarray(p, np.float32))
      image.append(np.asarray(i, np.float32))
    return np.concatenate(pixel), np.concatenate(image)


def _figure_indices(records: List[Dict[str, Any]], per_type: int) -> List[int]:
  by_type: Dict[str, List[int]] = {}
  for k, r in enumerate(records):
    by_type.setdefault(r['defect_type'], []).append(k)
  return sorted(i for idx in by_type.values() for i in idx[:per_type])


@dataclasses.dataclass
class Evaluation:
  """One evaluation: the result row plus the per-image outputs the report and figures use."""
  result: Dict[str, Any]
  records: List[Dict[str, Any]]  # test records, in example order
  outputs: SplitOutputs
  pixel_maps: np.ndarray  # [N,H,W] combined anomaly maps
  scores: np.ndarray  # [N] image scores
  state: Dict[str, Any]  # DIR/detector.json: what predict, the API and export read


def evaluate(config, workdir: str, report_dir: Optional[str] = None,
             settings_source: Optional[Dict[str, str]] = None,
             tuned: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """Evaluates the latest checkpoint on the test split and writes the report (default
  workdir/report/) and DIR/detector.json; returns the result row. settings_source says where T_d,
  the sampler and the weights came from; `tuned` (DIR/tuned.json) adds the development curve to
  the report and, with eval.sweep_t_d, the test AUROC of every tuning candidate beside it (for the
  reader only)."""
  ev = evaluate_outputs(config, workdir)
  ev.result['settings_source'] = dict(settings_source or {})
  if tuned is not None and config.eval.sweep_t_d:
    ev.result['t_d_sweep'] = sweep_tuning_candidates(config, workdir, tuned)
  if jax.process_index() == 0:
    detector_state.save_state(workdir, ev.state)
    report.write_category(ev.result, report_dir or os.path.join(workdir, 'report'), ev.records,
                          ev.outputs, ev.pixel_maps, ev.scores, tuned=tuned)
  return ev.result


def candidate_config(config, candidate: Dict[str, Any]):
  """config with the sampler, T_d, detector weights and (where the sampler reads it) ESM^σ's floor
  of a tuning candidate (a row of tuned.json's candidates)."""
  from configs.common import override  # pylint: disable=g-import-not-at-top
  return override(config, {'sampling.method': candidate['method'], 'sampling.t_d': candidate['t_d'],
                           'detect.weights': tuple(candidate['weights']),
                           'sampling.sigma_floor': candidate.get('sigma_floor',
                                                                 config.sampling.sigma_floor)})


def sweep_tuning_candidates(config, workdir: str, tuned: Dict[str, Any]) -> List[Dict[str, Any]]:
  """Test image and pixel AUROC of each (sampler, T_d) of the tuning grid, each with the detector
  weights that were best for it on the development set (at the sampler's chosen T_d, the chosen
  weights). Read by no choice: report only."""
  from datasets import pipeline  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh()
  restored = restore_ema_params(config, workdir, mesh)
  feature_fn = get_features(config, {n: 1.0 for n in det.DETECTOR_NAMES})
  gb = config.eval.batch_size
  val = pipeline.get_eval_data(config.data, 'val', global_batch_size=gb)
  test = pipeline.get_eval_data(config.data, 'test', global_batch_size=gb)
  pixel_labels = None
  rows = []
  for method in tuned['methods']:
    for t_d in tuned['t_d_grid']:
      mine = [c for c in tuned['candidates'] if c['method'] == method and c['t_d'] == t_d]
      best = max(mine, key=lambda c: c['score'])
      chosen = tuned['by_method'].get(method, {})
      if chosen.get('t_d') == t_d:  # the tie rule may have picked other weights at this T_d
        best = next(c for c in mine if c['weights'] == chosen['weights']
                    and c.get('sigma_floor') == chosen.get('sigma_floor'))
      cfg = candidate_config(config, best)
      scorer = Scorer(cfg, workdir, restored=restored, feature_fn=feature_fn)
      scorer.fit_normalisation(val)
      out = scorer.run_split(test, what=f'sweep {method} T_d={t_d}')
      pixel_maps, scores = scorer.score(scorer.normalise(out.maps))
      if pixel_labels is None and test.has_masks:
        pixel_labels = metrics.prepare_pixel_labels(out.masks)
      rows.append({'method': method, 't_d': t_d, 'detectors': best['detectors'],
                   'dev_score': best['score'], 'image_auroc': metrics.auroc(scores, out.labels),
                   'pixel_auroc': (metrics.pixel_metrics(pixel_maps, pixel_labels)['auroc']
                                   if pixel_labels is not None else float('nan'))})
  return rows


def evaluate_outputs(config, workdir: str) -> Evaluation:
  """Reconstructs and scores the held-out good images and the test split; measures."""
  from datasets import pipeline  # pylint: disable=g-import-not-at-top
  scorer = Scorer(config, workdir)
  gb = config.eval.batch_size
  val_out = scorer.fit_normalisation(pipeline.get_eval_data(config.data, 'val', global_batch_size=gb))
  state = detector_state.fit_state(config, workdir, scorer, val_out)
  test = pipeline.get_eval_data(config.data, 'test', global_batch_size=gb)
  keep = _figure_indices(test.records, config.eval.figures_per_type)
  defective = [k for k, r in enumerate(test.records) if r['label'] == 1]
  out = scorer.run_split(test, keep=keep, trajectory_index=defective[0] if defective else None)
  normed = scorer.normalise(out.maps)
  pixel_maps, scores = scorer.score(normed)

  image_m = metrics.ranking_metrics(scores, out.labels)
  pixel_labels = metrics.prepare_pixel_labels(out.masks) if test.has_masks else None
  pixel_m = metrics.pixel_metrics(pixel_maps, pixel_labels) if pixel_labels is not None else {}
  ablation = []
  for subset, p, s in det.iter_ablation(scorer.detect_cfg, scorer.image_size, normed,
                                        scorer.selection.used):
    row = {'detectors': list(subset), 'image_auroc': metrics.auroc(s, out.labels)}
    if pixel_labels is not None:
      row['pixel_auroc'] = metrics.pixel_metrics(p, pixel_labels)['auroc']
    ablation.append(row)

  result = {
      'category': config.data.category,
      'dataset': config.data.dataset,
      'method': scorer.recon.method,
      't_d': scorer.recon.t_d,
      'nfe': scorer.recon.nfe,
      'image_auroc': image_m['auroc'],
      'pixel_auroc': pixel_m.get('auroc', float('nan')),
      'aupro': pixel_m.get('aupro', float('nan')),
      'pixel_ap': pixel_m.get('average_precision', float('nan')),
      'image_f1_max': image_m['f1_max'],
      'image_ap': image_m['average_precision'],
      'seconds_per_image': out.seconds / max(test.num_examples, 1),
      'compile_seconds': scorer.compile_seconds,
      'params': scorer.num_params,
      'checkpoint_step': scorer.checkpoint_step,
      'num_test_images': test.num_examples,
      'weights': list(scorer.detect_cfg.weights),
      **({'sigma_floor': config.sampling.sigma_floor}
         if scorer.recon.sampler.reads_sigma_floor else {}),
      'detectors': list(scorer.selection.used),
      'unavailable_detectors': dict(scorer.selection.unavailable),
      'ablation': ablation,
  }
  logging.info('%s/%s: image AUROC %.4f, pixel AUROC %.4f (%s, T_d=%d, NFE=%d)', result['dataset'],
               result['category'], result['image_auroc'], result['pixel_auroc'], result['method'],
               result['t_d'], result['nfe'])
  return Evaluation(result, test.records, out, pixel_maps, scores, state)
