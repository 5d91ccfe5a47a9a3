"""Each detector's generalisation gap: does it score the images the model trained on lower than
unseen clean ones? (docs/results.md, "Each detector's spread on unseen clean images").

  python3 experiments/generalisation.py --trained=DIR[,DIR...] [--jsonl=RESULTS.jsonl] [--test]
      [--nogap] [--pool=EARLIER.jsonl[,...]]

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
by the held-out images' mean and std of it; esm/detectors.py `standardised_mean`). The runs of one
category (those given and those of --pool's files) are then pooled: the paired difference of the
standardised mean to the config's image score, each resample drawing the same test images for
every run. --nogap skips the training slice (its columns stay empty).
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
_GAP = flags.DEFINE_bool('gap', True, 'Score the training slice (the gap); --nogap --test scores '
                         'the held-out images and the test split only.')
_POOL = flags.DEFINE_list('pool', [], '--jsonl files of earlier --test runs, pooled per category '
                          'with these.')
RESAMPLES = 2000
DEFAULT = 'default'  # the config's own image score (eq. 14 and 15, detect.image_detectors)
STANDARDISED = 'standardised'  # detect.image_score='standardised_mean' over every detector


def split_scores(config, workdir: str, test: bool = False, gap: bool = True):
  """{detector, DEFAULT or STANDARDISED: {'held_out': [N_val], 'train': [N_train]
  (, 'test': [N_test])}} image scores, and the test labels (None without test)."""
  gb = config.eval.batch_size
  splits = {name: pipeline.get_eval_data(config.data, name, global_batch_size=gb)
            for name in ('val',) + (('train',) if gap else ()) + (('test',) if test else ())}
  scorer = scoring.Scorer(config, workdir, feature_fn=scoring.get_features(
      config, config.detect.weights_by_name()))
  held_out = scorer.fit_normalisation(splits['val'])
  used = tuple(scorer.selection.used)
  standardised = det.get_score_fn(
      dataclasses.replace(scorer.detect_cfg, image_score='standardised_mean', image_detectors=()),
      scorer.image_size, used, scorer.stats)
  out, labels = {}, None
  for name, images in splits.items():
    split = held_out if name == 'val' else scorer.run_split(images, what=f'generalisation {name}')
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
  0 by construction): the held-out images' mean score and std; with the training slice also its
  mean, the ratio (training / held-out) and the AUROC held-out > training [estimate, lo, hi]."""
  scores = {k: s for k, s in scores.items() if k != STANDARDISED}
  rows = {}
  some = next(iter(scores.values()))  # every detector scores the same images
  if 'train' in some:
    labels = np.concatenate([np.ones(some['held_out'].size), np.zeros(some['train'].size)])
    weights = metrics.bootstrap_weights(labels, RESAMPLES)
  for key, s in scores.items():
    held = float(np.mean(s['held_out']))
    rows[key] = {'held_out_mean': held, 'held_out_std': float(np.std(s['held_out'], ddof=1)),
                 'held_out_images': int(s['held_out'].size)}
    if 'train' in s:
      auroc = metrics.weighted_auroc(np.concatenate([s['held_out'], s['train']]), labels, weights)
      train = float(np.mean(s['train']))
      rows[key].update(train_mean=train, ratio=train / held if held else float('nan'),
                       auroc=metrics.with_interval(auroc), train_images=int(s['train'].size))
  return rows


def pooled_rows(results):
  """Per category (dataset/category) of the results with test scores: the number of runs, the
  seed-mean test image AUROC of the config's image score and of the standardised mean, and their
  paired difference pooled over the runs [estimate, 95% interval] (each resample draws the same
  test images for every run)."""
  by_category = {}
  for r in results:
    if 'test_scores' in r:
      by_category.setdefault(f"{r['dataset']}/{r['category']}", []).append(r)
  rows = {}
  for category, runs in by_category.items():
    labels = np.asarray(runs[0]['test_labels'])
    if any(not np.array_equal(r['test_labels'], labels) for r in runs):
      raise SystemExit(f'{category}: the runs scored different test splits')
    default, standardised = (np.stack([r['test_scores'][k] for r in runs])
                             for k in (DEFAULT, STANDARDISED))
    d = metrics.paired_bootstrap_auroc_difference(standardised, default, labels,
                                                  num_resamples=RESAMPLES)
    rows[category] = {
        'runs': [r['workdir'] for r in runs],
        'default': float(np.mean([r['test_auroc'][DEFAULT] for r in runs])),
        'standardised': float(np.mean([r['test_auroc'][STANDARDISED] for r in runs])),
        'standardised_minus_default': [d['difference'], d['lo'], d['hi']]}
  return rows


def markdown(results) -> str:
  lines = ['| workdir | sampler, T_d | detector | held-out / training images | mean score, '
           'held-out | mean score, training | training / held-out | AUROC, held-out > training '
           '[95% CI] | std, held-out | test image AUROC |', '|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    test = r.get('test_auroc', {})
    for key, row in r['detectors'].items():
      gap = ''
      if 'train_mean' in row:
        a = row['auroc']
        gap = (f"{row['train_mean']:.3f} | {row['ratio']:.2f} | "
               f"{a[0]:.3f} [{a[1]:.3f}, {a[2]:.3f}]")
      lines.append(f"| {r['workdir']} | {r['method']} {r['t_d']} | {key} | "
                   f"{row['held_out_images']} / {row.get('train_images', '')} | "
                   f"{row['held_out_mean']:.3f} | {gap or ' | | '} | {row['held_out_std']:.3f} | "
                   f"{_fmt(test.get(key))} |")
    if STANDARDISED in test:
      lines.append(f"| {r['workdir']} | {r['method']} {r['t_d']} | {STANDARDISED} | | | | | | | "
                   f"{_fmt(test[STANDARDISED])} ({_diff(r['standardised_minus_default'])} "
                   f"against {DEFAULT}) |")
  pooled = pooled_rows(results)
  if pooled:
    lines += ['', f'| category | runs | {DEFAULT}, test image AUROC (mean over runs) | '
              f'{STANDARDISED} | {STANDARDISED} − {DEFAULT}, pooled [95% CI] |',
              '|---|---|---|---|---|']
    lines += [f"| {c} | {len(p['runs'])} | {p['default']:.3f} | {p['standardised']:.3f} | "
              f"{_diff(p['standardised_minus_default'])} |" for c, p in pooled.items()]
  return '\n'.join(lines)


def _diff(d) -> str:
  return f'{d[0]:+.3f} [{d[1]:+.3f}, {d[2]:+.3f}]'


def _fmt(value) -> str:
  return '' if value is None else f'{value:.3f}'


def main(argv):
  del argv
  host_memory.reuse_freed_memory()  # as main.py, before XLA starts
  logging.set_verbosity(logging.INFO)
  if not _TRAINED.value and not _POOL.value:
    raise SystemExit('--trained: give one or more trained workdirs (or --pool)')
  results = []
  for path in _POOL.value:
    with open(path) as f:
      results += [json.loads(line) for line in f if line.strip()]
  for workdir in _TRAINED.value:
    saved = workdir_lib.load_saved_config(workdir)
    if saved is None:
      raise SystemExit(f'{workdir}: no config.json; train a model there first')
    config = config_lib.from_dict(saved)
    logging.info('generalisation: %s (%s, T_d %d)', workdir, config.sampling.method,
                 config.sampling.t_d)
    scores, labels = split_scores(config, workdir, _TEST.value, _GAP.value)
    results.append({'workdir': workdir, 'dataset': config.data.dataset,
                    'category': config.data.category, 'seed': config.seed,
                    'method': config.sampling.method, 't_d': config.sampling.t_d,
                    'detectors': gap_rows(scores)})
    if labels is not None:
      results[-1]['test_auroc'], results[-1]['standardised_minus_default'] = aurocs_on_test(
          scores, labels)
      results[-1].update(test_labels=labels.tolist(), test_scores={
          k: scores[k]['test'].tolist() for k in (DEFAULT, STANDARDISED)})
    if _JSONL.value:
      with open(_JSONL.value, 'a') as f:
        f.write(json.dumps(results[-1]) + '\n')
  print(markdown(results))


if __name__ == '__main__':
  app.run(main)
