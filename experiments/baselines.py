"""The model-free baselines (esm/baselines.py) on real categories: the floor every table shows.

  python3 experiments/baselines.py --root=../shared/data --categories=bottle,pill,metal_plate \
      --image_size=48 [--methods=zscore,knn] [--out=/tmp/baselines.json]

Each baseline is fitted on the category's training images (train/good minus the held-out slice,
exactly what a model of configs/cpu/ trains on) and scored on the test split, at the given model
resolution, with evaluation's metrics. No diffusion model is trained or read. Prints one table.
"""

import importlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging

from configs.common import override
from configs.cpu.common import IMAGE_SIZE
from datasets import pipeline
from esm import baselines
from esm import config as config_lib
from esm import host_memory
from esm import metrics
from experiments.models import DATASETS, ROOT
# pylint: enable=g-import-not-at-top,wrong-import-position

_CATEGORIES = flags.DEFINE_list('categories', ['bottle', 'pill', 'metal_plate'], 'Categories.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', IMAGE_SIZE, 'Model resolution of the images.')
_METHODS = flags.DEFINE_list('methods', list(baselines.BASELINES), 'Baselines to measure.')
_OUT = flags.DEFINE_string('out', '', 'Optional JSON file of the rows.')
flags.mark_flag_as_required('root')


def category_config(category: str) -> config_lib.Config:
  """The category's configs/cpu/ config at --image_size with --methods."""
  c = importlib.import_module(f'configs.cpu.{category}').get_config()
  c = override(c, {'data.root': os.path.join(ROOT.value, DATASETS[category]),
                   'data.image_size': _IMAGE_SIZE.value,
                   'baselines.methods': tuple(_METHODS.value)})
  return config_lib.from_configdict(c)


def measure(category: str) -> list:
  config = category_config(category)
  gb = config.eval.batch_size
  train = pipeline.get_eval_data(config.data, 'train', global_batch_size=gb)
  test = pipeline.get_eval_data(config.data, 'test', global_batch_size=gb)
  context = baselines.make_context(config)
  images = baselines.images_of(train)
  masks = [test.load(i)['mask'] for i in range(test.num_examples)]
  labels = [r['label'] for r in test.records]
  pixel_labels = metrics.prepare_pixel_labels(masks) if test.has_masks else None
  rows = []
  for name in config.baselines.methods:
    start = time.time()
    state = baselines.BASELINES[name].fit(images, context)
    fit_s = time.time() - start
    start = time.time()
    maps, scores = baselines.score_image_set(name, state, test, context)
    score_s = (time.time() - start) / test.num_examples
    pixel = metrics.pixel_metrics(maps, pixel_labels) if pixel_labels is not None else {}
    rows.append({'category': category, 'baseline': name, 'image_size': _IMAGE_SIZE.value,
                 'train_images': len(images), 'test_images': test.num_examples,
                 'image_auroc': metrics.auroc(scores, labels),
                 'pixel_auroc': pixel.get('auroc', float('nan')),
                 'aupro': pixel.get('aupro', float('nan')), 'fit_seconds': fit_s,
                 'seconds_per_image': score_s})
    logging.info('%s %s: %s', category, name, rows[-1])
  return rows


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # as main.py, before XLA starts
  logging.set_verbosity(logging.INFO)
  rows = [r for category in _CATEGORIES.value for r in measure(category)]
  print(f'| category ({_IMAGE_SIZE.value}²) | baseline | image AUROC | pixel AUROC | AUPRO | '
        'fit (s) | s/image |')
  print('|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['category']} | {baselines.BASELINES[r['baseline']].label} | "
          f"{r['image_auroc']:.3f} | {r['pixel_auroc']:.3f} | {r['aupro']:.3f} | "
          f"{r['fit_seconds']:.1f} | {r['seconds_per_image']:.3f} |")
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(rows, f, indent=1)


if __name__ == '__main__':
  app.run(main)
