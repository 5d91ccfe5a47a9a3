"""End to end through esm.run and main.py: training, train_eval reports, predict, errors.

Resume equality across processes is tested with kills in tests/test_reliability.py; bf16 in
tests/test_train.py."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from configs import common
from configs.default import get_default_config
from esm import evaluate
from esm import metrics
from esm import parallel
from esm import plotting
from esm import resample
from esm import run
from esm import scoring
from esm.config import from_configdict
from esm.errors import UserError
from tests.helpers import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [(r['step'], r['loss']) for r in map(json.loads, f)]


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """Thirty steps in one go, in this process."""
  base = tmp_path_factory.mktemp('run')
  cfg = runs.config('micro', str(base / 'cache'), {'train.num_steps': 30})
  assert run.run(cfg, str(base / 'straight'), 'train') is True
  return base, cfg


@pytest.mark.slow
def test_loss_falls_on_the_synthetic_data(straight):
  base, _ = straight
  losses = [loss for _, loss in _losses(str(base / 'straight'))]
  assert len(losses) == 30
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses


@pytest.mark.slow
def test_train_eval_writes_every_report_file(straight):
  base, cfg = straight
  workdir = str(base / 'straight')
  run.run(cfg, workdir, 'train_eval')  # training is finished, so this only evaluates
  report = os.path.join(workdir, 'report')
  for name in ('results.json', 'results.csv', 'report.md', 'figures/examples.png',
               'figures/trajectory.png', 'figures/roc.png'):
    assert os.path.exists(os.path.join(report, name)), name
  with Image.open(os.path.join(report, 'figures', 'roc.png')) as roc:
    assert roc.size == (480, 520)
  result = json.load(open(os.path.join(report, 'results.json')))['object']
  for key in ('image_auroc', 'pixel_auroc', 'aupro', 'pixel_ap', 'image_f1_max'):
    assert 0.0 <= result[key] <= 1.0, (key, result[key])
  assert result['nfe'] == 8 and result['method'] == 'esm_sigma' and result['t_d'] == 4
  assert len(result['ablation']) == 7  # S_U, S_KL, S_RE: 2^3 - 1 subsets
  assert result['seconds_per_image'] > 0 and result['params'] > 0
  # the bootstrap's evidence reproduces the reported AUROCs of the method and of each baseline
  evidence = resample.load_evidence(os.path.join(report, evaluate.EVIDENCE_FILE))
  rows = {evaluate.METHOD_ENTRY: result, **result['baselines']}
  assert sorted(evidence) == sorted((n,) for n in rows)
  for (name,), (scores, pairs, labels) in evidence.items():
    one = np.ones((1, labels.size))
    np.testing.assert_allclose(metrics.weighted_auroc(scores, labels, one), rows[name]['image_auroc'])
    np.testing.assert_allclose(resample.pixel_auroc(pairs, one), rows[name]['pixel_auroc'], rtol=1e-5)


@pytest.mark.slow
def test_scorers_of_one_model_share_a_compiled_program(straight):
  """A second Scorer of the same model and fields takes the first one's program from the process
  cache; another T_d compiles its own."""
  base, cfg = straight
  workdir, size = str(base / 'straight'), cfg.data.image_size
  first = scoring.Scorer(from_configdict(cfg), workdir)
  images = parallel.shard_batch(first.mesh, np.zeros((4, size, size, 3), np.float32))
  keys = parallel.shard_batch(first.mesh, np.asarray(jax.random.key_data(
      jax.random.split(jax.random.key(0), 4))))
  program = first._program(images, keys)  # pylint: disable=protected-access
  again = scoring.Scorer(from_configdict(cfg), workdir)
  assert again._program(images, keys) is program  # pylint: disable=protected-access
  other = scoring.Scorer(from_configdict(common.override(cfg, {'sampling.t_d': 3})), workdir)
  assert other._program(images, keys) is not program  # pylint: disable=protected-access
  rec, _ = program(again.params, images, keys)
  assert rec.x0_hat.shape == (4, size, size, 3)


def test_bad_config_is_one_line_error_without_traceback(tmp_path):
  out = subprocess.run([sys.executable, 'main.py', '--config=configs/demo.py',
                        f'--workdir={tmp_path}', '--config.sampling.t_d=1001', '--mode=eval'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines()[-1].startswith('error: sampling.t_d')
  assert 'Traceback' not in out.stderr


@pytest.mark.slow
def test_predict_scores_a_folder_of_new_images(straight, tmp_path):
  base, cfg = straight
  folder = tmp_path / 'new'
  folder.mkdir()
  rng = np.random.default_rng(0)
  # Mixed sizes and modes: RGB, grayscale and RGBA.
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(folder / 'a.png')
  Image.fromarray(rng.integers(0, 255, (20, 24), np.uint8)).save(folder / 'b.png')
  Image.fromarray(rng.integers(0, 255, (16, 16, 4), np.uint8), 'RGBA').save(folder / 'c.png')
  workdir = str(base / 'straight')  # evaluated by test_train_eval_writes_every_report_file
  out = str(tmp_path / 'out')
  run.run(cfg, workdir, 'predict', input_dir=str(folder), output_dir=out)
  with open(os.path.join(out, 'scores.csv')) as f:
    header, *rows = [line.strip().split(',') for line in f]
  assert sorted(r[0] for r in rows) == ['a.png', 'b.png', 'c.png']
  assert all(r[3] in ('good', 'defect') and np.isfinite(float(r[1])) for r in rows)
  # The z-score baseline fitted by training scores the same images (its own scale).
  assert header == ['filename', 'score', 'threshold', 'decision', 'zscore_score']
  assert all(float(r[4]) > 0 for r in rows)
  assert len(os.listdir(os.path.join(out, 'overlays'))) == 3
  assert len(os.listdir(os.path.join(out, 'masks'))) == 3


@pytest.mark.slow
def test_predict_on_an_empty_folder_is_a_clear_error(straight, tmp_path):
  base, cfg = straight
  with pytest.raises(UserError, match='empty|no image'):
    run.run(cfg, str(base / 'straight'), 'predict', input_dir=str(tmp_path))


@pytest.mark.slow
def test_sgm_sampler_on_an_esm_model_reads_eps_through_eq4(straight, tmp_path):
  """sampling.method=sgm on a dual-stream checkpoint: S_U and S_KL are unavailable (the sampler
  does not read σ²_θ) and are reported so; S_RE is evaluated."""
  base, cfg = straight
  cfg = common.override(cfg, {'sampling.method': 'sgm', 'detect.weights': (0, 1, 1, 1)})
  result = evaluate.evaluate(from_configdict(cfg), str(base / 'straight'),
                             report_dir=str(tmp_path))
  assert result['method'] == 'sgm' and result['detectors'] == ['re']
  assert set(result['unavailable_detectors']) == {'u', 'kl'}
  assert 0.0 <= result['image_auroc'] <= 1.0
  # The examples leave out the σ²_0 panel (and its colour bar) that esm_sigma's show.
  with Image.open(tmp_path / 'figures' / 'examples.png') as sgm, Image.open(
      base / 'straight' / 'report' / 'figures' / 'examples.png') as esm:
    assert esm.width - sgm.width == 16 * 8 + plotting.BAR_PX + plotting.GAP_PX


def test_a_preempted_training_makes_run_return_false(straight, monkeypatch):
  base, cfg = straight
  monkeypatch.setitem(run.MODES, 'train', lambda config, workdir: None)  # as after a SIGTERM
  assert run.run(cfg, str(base / 'preempted'), 'train_eval') is False
  assert not os.path.exists(os.path.join(base, 'preempted', 'report'))  # eval did not run


def test_an_empty_dataset_is_one_line_before_the_model_and_leaves_no_workdir(tmp_path):
  root = tmp_path / 'data'
  (root / 'parts' / 'train' / 'good').mkdir(parents=True)
  (root / 'parts' / 'test' / 'good').mkdir(parents=True)
  workdir = tmp_path / 'wd'
  out = subprocess.run([sys.executable, 'main.py', '--config=configs/default.py', f'--workdir={workdir}',
                        '--mode=train', '--config.data.dataset=folder', f'--config.data.root={root}',
                        '--config.data.category=parts', f'--config.data.tfds_dir={tmp_path / "tfds"}'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and 'train' in last and 'Traceback' not in out.stderr, last
  assert not workdir.exists()


def test_category_all_names_the_missing_categories_up_front(tmp_path):
  (tmp_path / 'bottle').mkdir()
  config = common.override(get_default_config(), {'data.dataset': 'mvtec_ad',
                                                  'data.category': 'all', 'data.root': str(tmp_path)})
  with pytest.raises(UserError, match=r"data.category='all': 14 of the 15 mvtec_ad categories are "
                                      r'missing under .*: cable, capsule, '):
    run.categories(config)
  config.data.root = str(tmp_path / 'nowhere')
  with pytest.raises(UserError, match='data.root='):
    run.categories(config)


def test_compilation_cache_is_on_by_default_with_an_off_switch(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from configs.default import default_cache_dir  # pylint: disable=g-import-not-at-top
  assert get_default_config().compilation_cache_dir == os.path.join(default_cache_dir(), 'jax')
  before = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update('jax_compilation_cache_dir', None)
    run.enable_compilation_cache('')  # off
    assert jax.config.jax_compilation_cache_dir is None
    run.enable_compilation_cache(str(tmp_path / 'a'))
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'a')
    run.enable_compilation_cache(str(tmp_path / 'b'))  # a folder already set is kept
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / 'a')
  finally:
    jax.config.update('jax_compilation_cache_dir', before)


@pytest.mark.slow
def test_a_model_trained_on_crops_evaluates_whole_images(tmp_path):
  """data.train_crop: training sees random 8² windows, evaluation the whole 16² images, with
  attention at the crop's 4² level (8² on the whole image)."""
  cfg = runs.config('tiny', str(tmp_path / 'cache'), {
      'train.num_steps': 4, 'data.train_crop': 8, 'model.attn_resolutions': (4,),
      'sampling.method': 'esm'})
  workdir = str(tmp_path / 'crop')
  run.run(cfg, workdir, 'train_eval')
  result = json.load(open(os.path.join(workdir, 'report', 'results.json')))['object']
  assert 0.0 <= result['image_auroc'] <= 1.0 and 0.0 <= result['pixel_auroc'] <= 1.0
  assert result['baselines']['zscore']['image_auroc'] >= 0.0
