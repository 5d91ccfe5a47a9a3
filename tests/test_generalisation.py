"""experiments/generalisation.py: the generalisation gap's rows and the standardised image score."""

import os
import sys

import numpy as np

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


def test_the_standardised_mean_keeps_a_detector_noisy_on_clean_images_from_dominating():
  # 'noisy' spreads ten times wider on clean images and carries no defect signal; 'signal' separates
  # the defective images. Their plain sum follows 'noisy'; the standardised mean follows 'signal'.
  rng = np.random.default_rng(1)
  labels = np.repeat([0, 1], 50)
  test = {'noisy': rng.normal(0.0, 10.0, 100), 'signal': rng.normal(0.0, 1.0, 100) + 3.0 * labels}
  held_out = {'noisy': rng.normal(0.0, 10.0, 20), 'signal': rng.normal(0.0, 1.0, 20)}
  auroc = lambda s: metrics.weighted_auroc(s, labels, np.ones((1, labels.size)))[0]
  assert auroc(test['noisy'] + test['signal']) < 0.75
  assert auroc(generalisation.standardised_mean(test, held_out)) > 0.9


def test_aurocs_on_test_names_each_detector_the_default_and_the_standardised_mean():
  rng = np.random.default_rng(2)
  labels = np.repeat([0, 1], 20)
  scores = {k: {'held_out': rng.normal(0.0, 1.0, 10), 'test': rng.normal(0.0, 1.0, 40) + labels}
            for k in ('re', 'u', generalisation.DEFAULT)}
  out, difference = generalisation.aurocs_on_test(scores, labels)
  assert set(out) == {'re', 'u', generalisation.DEFAULT, generalisation.STANDARDISED}
  assert all(0.5 < v <= 1.0 for v in out.values())
  estimate, low, high = difference
  assert estimate == out[generalisation.STANDARDISED] - out[generalisation.DEFAULT]
  assert low <= estimate <= high
