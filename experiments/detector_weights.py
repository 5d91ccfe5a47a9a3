"""Test AUROC of trained CPU-scale runs over a grid of S_Cos weights (docs/results.md, "S_Cos at half
weight"): what chose configs/cpu's detect.weights.

  python3 experiments/detector_weights.py --root=../shared/data --runs=RUNS --seeds=3

Each run (RUNS/<dataset>_<category>/<model>_s<seed>, as experiments/regret.py lays them out, with a
checkpoint) is reconstructed once at its config's operating point, the held-out good images
normalising the maps; every S_Cos weight of --cos_weights then combines the same maps (eq. 14,
S_RE at 1). One table: each run's test image and pixel AUROC at every weight, and per category,
each weight minus the first, averaged over the seeds, with a paired bootstrap 95% interval over
the test images (esm/resample.py); also RUNS/detector_weights.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from absl import app
from absl import flags

from configs.common import override
from configs.cpu.common import cpu_config
from datasets import pipeline
from esm import config as config_lib
from esm import detectors as det
from esm import resample
from esm import scoring
from experiments.models import MODELS, ROOT

_RUNS = flags.DEFINE_string('runs', None, 'Folder of the trained runs (experiments/regret.py).')
_CATEGORIES = flags.DEFINE_list('categories', ['mvtec_ad/bottle', 'mvtec_ad/pill'],
                                'dataset/category list.')
_MODEL = flags.DEFINE_string('model', 'sgm', 'Model of experiments/models.py MODELS.')
_SEEDS = flags.DEFINE_list('seeds', ['3'], 'Seeds (config.seed).')
_COS_WEIGHTS = flags.DEFINE_list('cos_weights', ['1', '0.75', '0.5', '0.25'],
                                 'S_Cos weights u of eq. 14 to score (S_RE keeps 1).')
flags.mark_flags_as_required(['root', 'runs'])


def run_config(dataset: str, category: str, seed: int) -> config_lib.Config:
  c = override(cpu_config(dataset, category), {
      **MODELS[_MODEL.value], 'seed': seed, 'data.root': os.path.join(ROOT.value, dataset),
      'data.tfds_dir': os.path.join(_RUNS.value, 'tfds')})
  return config_lib.from_configdict(c)


RESAMPLES = 2000


def weight_evidence(config: config_lib.Config, workdir: str, cos_weights) -> list:
  """The test evidence (image scores, pixel pairs, labels) of every S_Cos weight, from one
  reconstruction of val and test."""
  gb = config.eval.batch_size
  scorer = scoring.Scorer(config_lib.with_fields(config, {'detect.weights': (1.0,) * 4}), workdir)
  scorer.fit_normalisation(pipeline.get_eval_data(config.data, 'val', global_batch_size=gb))
  out = scorer.run_split(pipeline.get_eval_data(config.data, 'test', global_batch_size=gb))
  normed = scorer.normalise(out.maps)
  evidence = []
  for u in cos_weights:
    cfg = config_lib.with_fields(config, {'detect.weights': (u,) + tuple(config.detect.weights[1:])})
    score_fn = det.get_score_fn(cfg.detect, scorer.image_size, scorer.selection.used,
                                scorer.stats)
    pixel, image = (np.asarray(a) for a in score_fn(normed))
    evidence.append((image, resample.pixel_pairs(pixel, out.masks), out.labels))
  return evidence


def _aurocs(entry) -> tuple:
  return tuple(resample.pooled_aurocs([entry], np.ones((1, entry[2].size)))[:, 0])


def _interval(d) -> str:
  return f'{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]'.replace('-', '−')


def main(argv):
  del argv
  weights = [float(w) for w in _COS_WEIGHTS.value]
  lines = ['| run | ' + ' | '.join(f'S_Cos at {u:g}: image / pixel' for u in weights) + ' |',
           '|---|' + '---|' * len(weights)]
  table = {}
  for spec in _CATEGORIES.value:
    dataset, category = spec.split('/')
    by_seed = []
    for seed in _SEEDS.value:
      workdir = os.path.join(_RUNS.value, f'{dataset}_{category}', f'{_MODEL.value}_s{seed}')
      by_seed.append(weight_evidence(run_config(dataset, category, int(seed)), workdir, weights))
      name = f'{category} {_MODEL.value} s{seed}'
      table[name] = [dict(zip(('cos_weight', 'image_auroc', 'pixel_auroc'), (u, *_aurocs(e))))
                     for u, e in zip(weights, by_seed[-1])]
      lines.append(f'| {name} | ' + ' | '.join(
          f"{r['image_auroc']:.3f} / {r['pixel_auroc']:.3f}" for r in table[name]) + ' |')
    diffs = [resample.paired_difference([s[k] for s in by_seed], [s[0] for s in by_seed], RESAMPLES)
             for k in range(len(weights))]
    table[f'{category} {_MODEL.value} minus S_Cos at {weights[0]:g}'] = [d.tolist() for d in diffs]
    lines.append(f'| {category}, − S_Cos at {weights[0]:g} over seeds {",".join(_SEEDS.value)} | ' +
                 ' | '.join('' if k == 0 else f'{_interval(d[0])} / {_interval(d[1])}'
                            for k, d in enumerate(diffs)) + ' |')
  print('\n'.join(lines))
  with open(os.path.join(_RUNS.value, 'detector_weights.json'), 'w') as f:
    json.dump(table, f, indent=1)


if __name__ == '__main__':
  app.run(main)
