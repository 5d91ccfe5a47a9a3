"""Data-layer benchmark: prepare time, synthetic generation, decode cost, loader throughput.

  python3 bench/data_pipeline.py [--data=/work/shared/data] [--batch=16] [--images=640]

Prints one markdown table. Everything is written into a temporary folder that is removed at the
end. Throughput is measured twice per size: with the decoded-image cache off (every image decoded
from its PNG record, as in the first epoch) and on (after the first epoch).
"""

import io
import os
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import machine  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs.default import get_default_config  # pylint: disable=g-import-not-at-top
from datasets import builder
from datasets import mvtec_ad
from datasets import pipeline
from datasets import synthetic

_DATA = flags.DEFINE_string('data', '/work/shared/data', 'folder holding mvtec_ad/bottle')
_BATCH = flags.DEFINE_integer('batch', 16, 'global batch size of the train stream')
_IMAGES = flags.DEFINE_integer('images', 640, 'images timed per throughput measurement')
_TARGET = 250.0  # img/s that keeps a 2-core CPU training step at 64 px fed 5x over


def _time(fn, repeats=1):
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn()
  return (time.perf_counter() - start) / repeats, out


def _throughput(cfg, size, cache_mb):
  cfg = cfg.copy_and_resolve_references()
  cfg.image_size, cfg.hflip = size, True
  cfg.cache_mb = cache_mb
  it = pipeline.get_train_iterator(cfg, global_batch_size=_BATCH.value, seed=0)
  steps = max(1, _IMAGES.value // _BATCH.value)
  if cache_mb:  # warm the cache with one pass over the data first
    for _ in range(200 // _BATCH.value + 2):
      next(it)
  else:
    next(it)
  cpu = time.process_time()
  seconds, _ = _time(lambda: [next(it) for _ in range(steps)])
  cpu = time.process_time() - cpu  # all threads of this process: robust to a busy machine
  return steps * _BATCH.value / seconds, steps * _BATCH.value / cpu


def main(argv):
  del argv
  print(machine.header(), flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    root = os.path.join(_DATA.value, 'mvtec_ad')
    seconds, built = _time(lambda: builder.prepare(mvtec_ad.MvtecAd, root, 'bottle',
                                                   os.path.join(tmp, 'tfds')))
    n = sum(s.num_examples for s in built.info.splits.values())
    rows.append(('prepare mvtec_ad/bottle (256 px PNG)', f'{seconds:.2f} s',
                 f'{n} images, {n / seconds:.0f} img/s'))
    reuse, _ = _time(lambda: builder.prepare(mvtec_ad.MvtecAd, root, 'bottle',
                                             os.path.join(tmp, 'tfds')))
    rows.append(('reuse prepared bottle (fingerprint check)', f'{reuse * 1e3:.0f} ms', ''))

    for size in (256, 64):
      seconds, _ = _time(lambda size=size: synthetic.ensure_synthetic(
          os.path.join(tmp, 'syn'), size=size, num_train=60, num_test=30))
      rows.append((f'generate synthetic {size} px (2 x 90 images)', f'{seconds:.2f} s', ''))

    record = built.as_data_source(split='train', decoders=pipeline._RAW)[0]['image']
    rgb = np.asarray(Image.open(io.BytesIO(record)))
    raw = rgb.tobytes()
    png_s, _ = _time(lambda: np.asarray(Image.open(io.BytesIO(record)).convert('RGB')), 100)
    raw_s, _ = _time(lambda: np.frombuffer(raw, np.uint8).reshape(rgb.shape).copy(), 100)
    rows.append(('decode one 256 px record: PNG', f'{png_s * 1e3:.2f} ms',
                 f'{len(record) / 1024:.0f} KiB stored'))
    rows.append(('decode one 256 px record: raw array', f'{raw_s * 1e3:.3f} ms',
                 f'{len(raw) / 1024:.0f} KiB stored; PNG/raw time {png_s / raw_s:.0f}x'))

    cfg = get_default_config().data
    cfg.dataset, cfg.root, cfg.category = 'mvtec_ad', root, 'bottle'
    cfg.tfds_dir = os.path.join(tmp, 'tfds')
    for size in (256, 64):
      cold, cold_cpu = _throughput(cfg, size, 0)
      warm, warm_cpu = _throughput(cfg, size, 1024)
      rows.append((f'train stream {size} px, batch {_BATCH.value}, decode every image',
                   f'{cold:.0f} img/s', f'{cold / _TARGET:.1f}x the {_TARGET:.0f} img/s target; '
                   f'{cold_cpu:.0f} img per CPU-second'))
      rows.append((f'train stream {size} px, batch {_BATCH.value}, cached decode',
                   f'{warm:.0f} img/s',
                   f'{warm / cold:.1f}x uncached; {warm / _TARGET:.1f}x target; '
                   f'{warm_cpu:.0f} img per CPU-second'))

    cfg.image_size = 64
    data = pipeline.get_eval_data(cfg, 'test', global_batch_size=_BATCH.value)
    seconds, _ = _time(lambda: list(data.batches()))
    rows.append(('eval stream 64 px (bottle test, images + masks)',
                 f'{data.num_examples / seconds:.0f} img/s', f'{data.num_examples} images'))

  load = os.getloadavg()[0]
  rows.append(('machine load average (1 min) at the end', f'{load:.1f}',
               f'{os.cpu_count()} CPUs; above {os.cpu_count()} means shared cores'))
  print('| measurement | result | note |')
  print('|---|---|---|')
  for row in rows:
    print('| ' + ' | '.join(row) + ' |')


if __name__ == '__main__':
  app.run(main)
