"""experiments/generalisation.py: the generalisation gap's rows and the test AUROCs."""

import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments'))
import generalisation  # pylint: disable=g-import-not-at-top,wrong-import-position
from esm import metrics  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_a_detector_that_scores_the_training_images_lower_shows_a_gap():
  rng = np.random.default_rng(0)
  scores = {'memorised': {'held_out': rng.normal(5.0, 1.0, 30), 'train': rng.normal(1.0, 1.0, 200)},
            'general': {'held_out': rng.normal(3.0, 1.0, 30), 'train': rng.normal(3.0, 1.0, 200)}}
  rows = generalisation.gap_rows(scores)
  memorised, general = rows['memorised'], rows['general']
  assert memorised['auroc'][1] > 0.9 and memorised['ratio'] < 0.4
  assert general['auroc'][1] < 0.5 < general['auroc'][2] and 0.8 < general['ratio'] < 1.2
  assert memorised['held_out_images'] == 30 and memorised['train_images'] == 200


def test_aurocs_on_test_names_each_detector_the_default_and_the_standardised_mean():
  rng = np.random.default_rng(2)
  labels = np.repeat([0, 1], 20)
  scores = {k: {'held_out': rng.normal(0.0, 1.0, 10), 'test': rng.normal(0.0, 1.0, 40) + labels}
            for k in ('re', 'u', generalisation.DEFAULT, generalisation.STANDARDISED)}
  out, difference = generalisation.aurocs_on_test(scores, labels)
  assert set(out) == {'re', 'u', generalisation.DEFAULT, generalisation.STANDARDISED}
  assert all(0.5 < v <= 1.0 for v in out.values())
  estimate, low, high = difference
  assert estimate == out[generalisation.STANDARDISED] - out[generalisation.DEFAULT]
  assert low <= estimate <= high


def test_runs_of_one_category_pool_into_one_paired_interval():
  rng = np.random.default_rng(3)
  labels = np.repeat([0, 1], 30)
  runs = []
  for seed in range(3):  # the standardised mean separates the classes, the default barely
    scores = {generalisation.DEFAULT: rng.normal(0.0, 1.0, 60) + 0.3 * labels,
              generalisation.STANDARDISED: rng.normal(0.0, 1.0, 60) + 2.0 * labels}
    runs.append({'workdir': f's{seed}', 'dataset': 'd', 'category': 'c', 'test_labels': labels,
                 'test_scores': scores,
                 'test_auroc': {k: metrics.auroc(v, labels) for k, v in scores.items()}})
  without_test = {'workdir': 'no test', 'dataset': 'd', 'category': 'c'}
  rows = generalisation.pooled_rows(runs + [without_test])
  row = rows['d/c']
  assert row['runs'] == ['s0', 's1', 's2']
  estimate, low, high = row['standardised_minus_default']
  assert estimate == pytest.approx(row['standardised'] - row['default'])
  assert 0.0 < low <= estimate <= high
  runs[1]['test_labels'] = labels[::-1]
  with pytest.raises(SystemExit, match='different test splits'):
    generalisation.pooled_rows(runs)
