"""Pixel AUROC and AUPRO of esm/metrics.py against scikit-learn and a numpy AUPRO reference.

Usage: python3 bench/metrics.py [--sizes 1e7,1e8] [--pro_reference_max 1e7] [--xla_sort_max 1e7]

A synthetic test split of 256x256 images (half of them with 1-3 elliptic defects, scores rounded to
1e-3 so that there are many ties) is written once to a temporary folder; every method then runs in
its own subprocess that loads it, so that each peak RSS (ru_maxrss, minus the RSS right after
loading the data) belongs to that method alone. tracemalloc cannot see XLA's buffers, hence RSS.
Prints one table.
"""

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np
import scipy.ndimage
import sklearn.metrics
from absl import app
from absl import flags

from bench import machine
from esm import metrics
# pylint: enable=g-import-not-at-top,wrong-import-position

_SIZES = flags.DEFINE_list('sizes', ['1e7', '1e8'], 'Pixels of each synthetic split.')
_PRO_REFERENCE_MAX = flags.DEFINE_float('pro_reference_max', 1e7,
                                        'Largest split the numpy AUPRO reference runs on.')
_XLA_SORT_MAX = flags.DEFINE_float('xla_sort_max', 1e7, 'Largest split jnp.sort is timed on.')
_WORKER = flags.DEFINE_string('worker', '', 'Internal: run this one method and print its JSON.')
_FOLDER = flags.DEFINE_string('folder', '', 'Internal: the worker\'s stored split.')

SIDE = 256


def make_split(n_pixels: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """maps float32 [N,256,256] and masks bool [N,256,256] with about n_pixels pixels."""
  rng = np.random.default_rng(seed)
  num = max(2, round(n_pixels / SIDE**2))
  masks = np.zeros((num, SIDE, SIDE), bool)
  yy, xx = np.mgrid[:SIDE, :SIDE].astype(np.float32)
  for i in range(0, num, 2):  # every other image is defective
    for _ in range(rng.integers(1, 4)):
      cy, cx = rng.uniform(20, SIDE - 20, 2)
      ry, rx = rng.uniform(3, 25, 2)
      masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
  maps = rng.random(masks.shape, dtype=np.float32)
  maps += masks * rng.random(masks.shape, dtype=np.float32) * np.float32(0.6)
  np.round(maps, 3, out=maps)
  return maps, masks


def reference_aupro(maps: np.ndarray, masks: np.ndarray, fpr_limit: float) -> float:
  """The MVTec AD way, in numpy float64: sort all pixels, cumulative FPR/PRO, trapezoid."""
  structure = np.zeros((3, 3, 3), bool)
  structure[1] = True
  regions, k = scipy.ndimage.label(masks, structure=structure)
  regions = regions.ravel()
  area = np.bincount(regions, minlength=k + 1).astype(np.float64)
  pro_step = np.where(regions > 0, 1.0 / (k * area[regions]), 0.0)
  good = ~masks.ravel()
  fpr_step = good / good.sum()
  scores = maps.ravel()
  order = np.argsort(scores, kind='stable')[::-1]
  scores, fpr_step, pro_step = scores[order], fpr_step[order], pro_step[order]
  last_of_tie = np.append(np.diff(scores) != 0, True)
  fpr = np.concatenate([[0.0], np.cumsum(fpr_step)[last_of_tie]])
  pro = np.concatenate([[0.0], np.cumsum(pro_step)[last_of_tie]])
  keep = fpr <= fpr_limit
  area_under = np.trapezoid(pro[keep], fpr[keep])
  last = np.flatnonzero(keep)[-1]
  if fpr[last] < fpr_limit and last + 1 < fpr.size:
    y_limit = pro[last] + (pro[last + 1] - pro[last]) * (fpr_limit - fpr[last]) / (
        fpr[last + 1] - fpr[last])
    area_under += (fpr_limit - fpr[last]) * (pro[last] + y_limit) / 2
  return float(area_under / fpr_limit)


def _rss_mb() -> float:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmRSS:'):
        return int(line.split()[1]) / 1024
  return float('nan')


def worker(method: str, folder: str) -> dict:
  """Runs one method on the stored split; returns seconds, values and memory."""
  # The libraries are imported and the data loaded first: the baseline RSS holds them, not the method.
  maps = np.load(os.path.join(folder, 'maps.npy'))
  masks = np.load(os.path.join(folder, 'masks.npy'))
  base = _rss_mb()
  out = {}
  if method == 'ours':
    start = time.perf_counter()
    labels = metrics.prepare_pixel_labels(masks)
    out['label_s'] = time.perf_counter() - start
    for run in ('cold', 'warm'):  # cold includes the one-off XLA compilation
      start = time.perf_counter()
      values = metrics.pixel_metrics(maps, labels, fpr_limit=0.3)
      out[f'{run}_s'] = time.perf_counter() - start
    out.update(values)
    start = time.perf_counter()
    np.sort(maps.ravel())
    out['sort_s'] = time.perf_counter() - start  # the host sort that pixel_metrics relies on
  elif method == 'sklearn':
    start = time.perf_counter()
    out['auroc'] = float(sklearn.metrics.roc_auc_score(masks.ravel(), maps.ravel()))
    out['warm_s'] = time.perf_counter() - start
  elif method == 'numpy_aupro':
    start = time.perf_counter()
    out['aupro'] = reference_aupro(maps, masks, 0.3)
    out['warm_s'] = time.perf_counter() - start
  elif method == 'xla_sort':
    sort = jax.jit(jax.numpy.sort)
    x = jax.device_put(maps.ravel())
    jax.block_until_ready(sort(x))  # compile
    start = time.perf_counter()
    jax.block_until_ready(sort(x))
    out['warm_s'] = time.perf_counter() - start
  out['peak_extra_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
  out['data_mb'] = base
  return out


def _run(method: str, folder: str) -> dict:
  proc = subprocess.run([sys.executable, __file__, f'--worker={method}', f'--folder={folder}'],
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f'{method} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _WORKER.value:
    print(json.dumps(worker(_WORKER.value, _FOLDER.value)))
    return
  print(machine.header(), flush=True)
  rows = []
  for size in [float(s) for s in _SIZES.value]:
    with tempfile.TemporaryDirectory(prefix='bench_metrics_') as folder:
      maps, masks = make_split(int(size))
      np.save(os.path.join(folder, 'maps.npy'), maps)
      np.save(os.path.join(folder, 'masks.npy'), masks)
      n, pos = maps.size, int(masks.sum())
      del maps, masks
      ours = _run('ours', folder)
      sk = _run('sklearn', folder)
      rows.append((n, pos, 'pixel AUROC', ours, sk, 'sklearn roc_auc_score', 'auroc'))
      if size <= _PRO_REFERENCE_MAX.value:
        ref = _run('numpy_aupro', folder)
        rows.append((n, pos, 'AUPRO@0.3', ours, ref, 'numpy MVTec-style (float64)', 'aupro'))
      else:
        rows.append((n, pos, 'AUPRO@0.3', ours, None, 'reference not run', 'aupro'))
      if size <= _XLA_SORT_MAX.value:
        xla = _run('xla_sort', folder)
        rows.append((n, pos, 'sort all scores', {'cold_s': ours['sort_s'], 'warm_s': ours['sort_s'],
                                                  'peak_extra_mb': float('nan')}, xla,
                     'numpy np.sort (ours) vs jnp.sort (XLA:CPU)', None))
  print('| pixels | defect px | metric | ours value | ref value | abs diff | ours s (cold / warm) '
        '| ref s | speed-up | ours peak MB | ref peak MB | reference |')
  print('|---|---|---|---|---|---|---|---|---|---|---|---|')
  for n, pos, name, ours, ref, ref_name, key in rows:
    value = f'{ours[key]:.7f}' if key else ''
    ref_value = f'{ref[key]:.7f}' if key and ref else ''
    diff = f'{abs(ours[key] - ref[key]):.1e}' if key and ref else ''
    ref_s = f'{ref["warm_s"]:.2f}' if ref else ''
    speedup = f'{ref["warm_s"] / ours["warm_s"]:.1f}x' if ref else ''
    ref_mb = f'{ref["peak_extra_mb"]:.0f}' if ref else ''
    ours_mb = '' if np.isnan(ours['peak_extra_mb']) else f'{ours["peak_extra_mb"]:.0f}'
    print(f'| {n:.2e} | {pos:.2e} | {name} | {value} | {ref_value} | {diff} | '
          f'{ours["cold_s"]:.2f} / {ours["warm_s"]:.2f} | {ref_s} | {speedup} | '
          f'{ours_mb} | {ref_mb} | {ref_name} |')
  print('ours = esm.metrics.pixel_metrics: AUROC, AUPRO, AP and F1-max together from one sort per '
        'class; speed-up = ref s / ours warm s;')
  print('peak MB = ru_maxrss minus RSS after importing the libraries and loading the data.')


if __name__ == '__main__':
  app.run(main)
