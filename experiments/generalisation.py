"""Each detector's generalisation gap: does it score the images the model trained on lower than
unseen clean ones? (docs/results.md, "Each detector's spread on unseen clean images").

  python3 experiments/generalisation.py --trained=DIR[,DIR...] [--jsonl=RESULTS.jsonl] [--test]

For each trained workdir (run from the folder its config.json's data.root is relative to), at its
config's sampler and T_d with every available detector: the held-out slice of train/good
(data.val_fraction, never trained on) and the training slice are reconstructed, each detector's
map is normalised as evaluation does (fitted on the held-out images) and read by eq. 15 alone, and
so is the config's own image score. Per detector it prints both slices' mean image score, their
ratio, and the AUROC of the held-out against the training scores with a 95% stratified bootstrap
interval: 0.5 when the detector cannot tell an image the model trained on from an unseen one,
above it when it scores the trained-on images lower; and the spread (std) of the held-out
images' scores. No test image is read, unless --test: then the test split is scored too, and the
test image AUROC is given for each detector, for the config's image score, and for
detect.image_score='standardised_mean' (the mean of the detectors' image scores, each standardised
by the held-out images' mean and std of it; esm/detectors.py `standardised_mean`).
"""

import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
from absl import app
from absl import flags
from absl import logging

from datasets import pipeline
from esm import config as config_lib
from esm import detectors as det
from esm import host_memory
from esm import metrics
from esm import scoring
from esm import workdir as workdir_lib

_TRAINED = flags.DEFINE_list('trained', [], 'Trained workdirs.')
_JSONL = flags.DEFINE_string('jsonl', None, 'JSON lines file of the results (one line per workdir).')
_TEST = flags.DEFINE_bool('test', False, 'Also score the test split (reads its labels).')
RESAMPLES = 2000
DEFAULT = 'default'  # the config's own image score (eq. 14 and 15, detect.image_detectors)
STANDARDISED = 'standardised'  # detect.image_score='standardised_mean' over every detector


def split_scores(config, workdir: str, test: bool = False):
  """{detector, DEFAULT or STANDARDISED: {'held_out': [N_val], 'train': [N_train]
  (, 'test': [N_test])}} image scores, and the test labels (None without test)."""
  gb = config.eval.batch_size
  splits = {name: pipeline.get_eval_data(config.data, name, global_batch_size=gb)
            for name in ('val', 'train') + (('test',) if test else ())}
  scorer = scoring.Scorer(config, workdir, feature_fn=scoring.get_features(
      config, config.detect.weights_by_name()))
  scorer.fit_normalisation(splits['val'])
  used = tuple(scorer.selection.used)
  standardised = det.get_score_fn(
      dataclasses.replace(scorer.detect_cfg, image_score='standardised_mean', image_detectors=()),
      scorer.image_size, used, scorer.stats)
  out, labels = {}, None
  for name, images in splits.items():
    split = scorer.run_split(images, what=f'generalisation {name}')
    maps, part = scorer.normalise(split.maps), 'held_out' if name == 'val' else name
    for subset, _, scores in det.iter_ablation(scorer.detect_cfg, scorer.image_size, maps, used,
                                               stats=scorer.stats):
      if len(subset) == 1 or subset == used:
        out.setdefault(DEFAULT if subset == used else subset[0], {})[part] = np.asarray(scores)
    out.setdefault(STANDARDISED, {})[part] = np.asarray(standardised(maps)[1])
    if name == 'test':
      labels = split.labels
  return out, labels


def aurocs_on_test(scores, labels):
  """Test image AUROC of each entry of split_scores (each detector, the config's image score and
  the standardised mean), and the standardised mean's paired difference to the config's image
  score [estimate, 95% interval] (stratified bootstrap over the test images)."""
  weights = metrics.bootstrap_weights(labels, RESAMPLES)
  aurocs = {k: metrics.weighted_auroc(s['test'], labels, weights) for k, s in scores.items()}
  return ({k: float(a[0]) for k, a in aurocs.items()},
          metrics.with_interval(aurocs[STANDARDISED] - aurocs[DEFAULT]))


def gap_rows(scores):
  """Per detector and the config's image score (not the standardised mean, whose held-out mean is
  0 by construction): mean scores, their ratio (training / held-out) and AUROC [estimate, lo, hi]."""
  scores = {k: s for k, s in scores.items() if k != STANDARDISED}
  rows = {}
  some = next(iter(scores.values()))  # every detector scores the same images
  labels = np.concatenate([np.ones(some['held_out'].size), np.zeros(some['train'].size)])
  weights = metrics.bootstrap_weights(labels, RESAMPLES)
  for key, s in scores.items():
    auroc = metrics.weighted_auroc(np.concatenate([s['held_out'], s['train']]), labels, weights)
    held, train = float(np.mean(s['held_out'])), float(np.mean(s['train']))
    rows[key] = {'held_out_mean': held, 'train_mean': train,
                 'ratio': train / held if held else float('nan'),
                 'auroc': metrics.with_interval(auroc),
                 'held_out_std': float(np.std(s['held_out'], ddof=1)),
                 'held_out_images': int(s['held_out'].size), 'train_images': int(s['train'].size)}
  return rows


def markdown(results) -> str:
  lines = ['| workdir | sampler, T_d | detector | held-out / training images | mean score, '
           'held-out | mean score, training | training / held-out | AUROC, held-out > training '
           '[95% CI] | std, held-out | test image AUROC |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    test = r.get('test_auroc', {})
    for key, row in r['detectors'].items():
      a = row['auroc']
      lines.append(f"| {r['workdir']} | {r['method']} {r['t_d']} | {key} | "
                   f"{row['held_out_images']} / {row['train_images']} | "
                   f"{row['held_out_mean']:.3f} | {row['train_mean']:.3f} | {row['ratio']:.2f} | "
                   f"{a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}] | {row['held_out_std']:.3f} | "
                   f"{_fmt(test.get(key))} |")
    if STANDARDISED in test:
      d = r['standardised_minus_default']
      lines.append(f"| {r['workdir']} | {r['method']} {r['t_d']} | {STANDARDISED} | | | | | | | "
                   f"{_fmt(test[STANDARDISED])} ({d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}] against "
                   f"{DEFAULT}) |")
  return '\n'.join(lines)


def _fmt(value) -> str:
  return '' if value is None else f'{value:.3f}'


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # as main.py, before XLA starts
  logging.set_verbosity(logging.INFO)
  if not _TRAINED.value:
    raise SystemExit('--trained: give one or more trained workdirs')
  results = []
  for workdir in _TRAINED.value:
    saved = workdir_lib.load_saved_config(workdir)
    if saved is None:
      raise SystemExit(f'{workdir}: no config.json; train a model there first')
    config = config_lib.from_dict(saved)
    logging.info('generalisation: %s (%s, T_d %d)', workdir, config.sampling.method,
                 config.sampling.t_d)
    scores, labels = split_scores(config, workdir, _TEST.value)
    results.append({'workdir': workdir, 'method': config.sampling.method,
                    't_d': config.sampling.t_d, 'detectors': gap_rows(scores)})
    if labels is not None:
      results[-1]['test_auroc'], results[-1]['standardised_minus_default'] = aurocs_on_test(
          scores, labels)
    if _JSONL.value:
      with open(_JSONL.value, 'a') as f:
        f.write(json.dumps(results[-1]) + '\n')
  print(markdown(results))


if __name__ == '__main__':
  app.run(main)
