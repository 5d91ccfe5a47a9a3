"""A trained workdir as a detector: DIR/detector.json, content-keyed noise, the Python API and
predict mode (esm/detector_state.py, esm/detector.py, esm/predict.py).

One micro model is trained and evaluated once for the module; every test reads that workdir."""

import json
import logging
import os
import subprocess
import sys

from absl import logging as absl_logging
import numpy as np
import pytest
from PIL import Image

from esm import run
from esm.errors import UserError
from tests.helpers import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 4 steps, logged every 2, one checkpoint, the esm sampler.
OVERRIDES = {'train.log_every': 2, 'train.ckpt_every': 4, 'train.num_steps': 4,
             'sampling.method': 'esm'}


def micro_config(cache: str, **changes):
  return runs.config('micro', cache, {**OVERRIDES, **changes})


def _images(n: int, seed: int = 0):
  """Random RGB images of several sizes (the model sees them resized to 16²)."""
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 255, (20 + 4 * k, 24 + 2 * k, 3), np.uint8) for k in range(n)]


def test_predict_lists_any_image_mode_and_size_and_skips_the_rest(tmp_path):
  from esm import predict as predict_lib  # pylint: disable=g-import-not-at-top
  from esm.detector import to_rgb  # pylint: disable=g-import-not-at-top
  rgb = np.zeros((20, 30, 3), np.uint8)
  Image.fromarray(rgb).save(tmp_path / 'a.png')
  Image.fromarray(rgb).convert('L').save(tmp_path / 'b.png')
  Image.fromarray(rgb).convert('RGBA').save(tmp_path / 'c.png')
  Image.fromarray(np.zeros((7, 9), np.uint16)).save(tmp_path / 'd.png')
  Image.fromarray(rgb).save(tmp_path / 'e.jpg')
  (tmp_path / '.DS_Store').write_bytes(b'\0junk')
  (tmp_path / 'notes.txt').write_text('x')
  names, skipped = predict_lib.list_inputs(str(tmp_path))
  assert names == ['a.png', 'b.png', 'c.png', 'd.png', 'e.jpg'] and skipped == ['notes.txt']
  shapes = [to_rgb(str(tmp_path / n)).shape for n in names]
  assert shapes == [(20, 30, 3)] * 3 + [(7, 9, 3), (20, 30, 3)]
  assert to_rgb(np.zeros((5, 6), np.uint8)).shape == (5, 6, 3)
  assert to_rgb(np.zeros((5, 6, 4), np.uint8)).shape == (5, 6, 3)
  with pytest.raises(UserError, match='expected uint8 HxW'):
    to_rgb(np.zeros((5, 6), np.float32))
  (tmp_path / 'f.png').write_bytes(b'\x89PNG\r\n\x1a\n truncated')
  with pytest.raises(UserError, match='f.png: corrupt, truncated or unreadable image'):
    predict_lib.list_inputs(str(tmp_path))


_RUN_LOG = []  # the evaluated fixture's log lines


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory):
  """(cache, workdir, config) of a micro model trained 4 steps and evaluated."""
  base = tmp_path_factory.mktemp('detector')
  cache, workdir = str(base / 'cache'), str(base / 'wd')
  config = micro_config(cache)
  handler = logging.Handler(logging.INFO)
  handler.emit = lambda record: _RUN_LOG.append(record.getMessage())
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity('info')
  logging.getLogger('absl').addHandler(handler)
  try:
    run.run(config, workdir, 'train_eval')
  finally:
    logging.getLogger('absl').removeHandler(handler)
    absl_logging.set_verbosity(verbosity)
  return cache, workdir, config


@pytest.mark.slow
def test_training_logs_compilation_apart(evaluated):
  del evaluated  # run for its log
  messages = _RUN_LOG
  compiling = [k for k, m in enumerate(messages) if m.startswith('compiling the train step')]
  steps = [k for k, m in enumerate(messages) if m.startswith('step ') and 'ETA' in m]
  assert compiling and steps and compiling[0] < steps[0], messages[:20]


@pytest.mark.slow
def test_eval_writes_the_detector_state(evaluated):
  _, workdir, _ = evaluated
  with open(os.path.join(workdir, 'detector.json')) as f:
    state = json.load(f)
  assert state['checkpoint_step'] == 4 and state['method'] == 'esm'
  assert state['fields']['sampling.t_d'] == 4 and state['fields']['data.image_size'] == 16
  assert state['detectors'] == ['u', 'kl', 're']
  assert set(state['normalisation']['mean']) == {'u', 'kl', 're'}
  assert np.isfinite(state['image_threshold']) and np.isfinite(state['pixel_threshold'])
  lo, hi = state['map_colour_range']
  assert lo < state['pixel_threshold'] < hi
  assert 'features.model' not in state['fields']  # S_Cos is off: the ViT is no part of the state


@pytest.mark.slow
def test_an_image_scores_the_same_alone_in_a_folder_and_at_any_batch_size(evaluated):
  from esm import Detector  # pylint: disable=g-import-not-at-top
  _, workdir, _ = evaluated
  images = _images(6)
  alone = Detector.load(workdir, batch_size=1).predict([images[3]])
  among = Detector.load(workdir, batch_size=8).predict(images)
  np.testing.assert_allclose(among.scores[3], alone.scores[0], rtol=1e-5)
  np.testing.assert_allclose(among.maps[3], alone.maps[0], rtol=1e-4, atol=1e-5)
  # The model-free baseline fitted by training scores each image alone too.
  assert set(among.baseline_scores) == {'zscore'} and among.baseline_scores['zscore'].shape == (6,)
  np.testing.assert_allclose(among.baseline_scores['zscore'][3], alone.baseline_scores['zscore'][0],
                             rtol=1e-5)
  assert alone.maps[0].shape == images[3].shape[:2]  # the map comes back at the input's size
  assert alone.decisions.dtype == bool and alone.masks[0].shape == images[3].shape[:2]


_TWO_DEVICES = r'''
import sys
import jax
assert jax.device_count() == 2, jax.devices()
import numpy as np
from esm import Detector
with np.load(sys.argv[2]) as saved:
  images = [saved[f'arr_{k}'] for k in range(len(saved.files))]
print('SCORES', Detector.load(sys.argv[1], batch_size=2).predict(images).scores[3])
'''


@pytest.mark.slow
def test_two_devices_give_the_scores_of_one(evaluated, tmp_path):
  from esm import Detector  # pylint: disable=g-import-not-at-top
  _, workdir, _ = evaluated
  images = _images(6)
  np.savez(tmp_path / 'images.npz', *images)  # of several sizes: arr_0 ... arr_5
  one = Detector.load(workdir, batch_size=4).predict([images[3]]).scores[0]
  flags = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=2'
  env = dict(os.environ, XLA_FLAGS=flags.strip(), JAX_PLATFORMS='cpu')
  out = subprocess.run([sys.executable, '-c', _TWO_DEVICES, workdir, str(tmp_path / 'images.npz')],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  two = float(out.stdout.split('SCORES')[1])  # in a folder of six, each batch split over 2 devices
  np.testing.assert_allclose(two, one, rtol=1e-5)


def _folder(path, images, extra_files=()):
  path.mkdir()
  for k, img in enumerate(images):
    Image.fromarray(img).save(path / f'img{k}.png')
  for name in extra_files:
    (path / name).write_text('not an image')
  return str(path)


@pytest.mark.slow
def test_predict_mode_reads_the_saved_state_and_writes_readable_outputs(evaluated, tmp_path):
  from esm import Detector  # pylint: disable=g-import-not-at-top
  cache, workdir, _ = evaluated
  images = _images(3, seed=1)
  folder = _folder(tmp_path / 'in', images, extra_files=('notes.txt',))
  # The training data flags are gone (root, dataset cache): predict needs only the workdir.
  config = micro_config(str(tmp_path / 'elsewhere'))
  for _ in range(2):
    run.run(config, workdir, 'predict', input_dir=folder)
  runs = sorted(os.listdir(os.path.join(workdir, 'predict')))
  assert runs == ['run_001', 'run_002']  # a new folder per run, the last one kept
  out = os.path.join(workdir, 'predict', 'run_002')
  with open(os.path.join(out, 'scores.csv')) as f:
    rows = [line.strip().split(',') for line in f][1:]
  assert [r[0] for r in rows] == ['img0.png', 'img1.png', 'img2.png']  # notes.txt skipped
  api = Detector.load(workdir).predict(images)
  np.testing.assert_allclose([float(r[1]) for r in rows], api.scores, rtol=1e-5)
  assert [r[3] == 'defect' for r in rows] == api.decisions.tolist()
  for k, img in enumerate(images):
    with Image.open(os.path.join(out, 'masks', f'img{k}.png')) as m:
      assert m.size == (img.shape[1], img.shape[0])
    with Image.open(os.path.join(out, 'overlays', f'img{k}.png')) as o:
      assert o.size[0] > img.shape[1] and o.size[1] >= img.shape[0]  # input plus its colour bar


@pytest.mark.slow
def test_predict_refuses_flags_that_contradict_the_saved_state(evaluated, tmp_path):
  cache, workdir, _ = evaluated
  folder = _folder(tmp_path / 'in', _images(1))
  config = micro_config(cache, **{'sampling.t_d': 3, 'data.category': 'texture'})
  with pytest.raises(UserError, match=r"data\.category \(saved 'object', given 'texture'\); "
                                      r'sampling\.t_d \(saved 4, given 3\) '
                                      r'.*--mode=eval again.*predict\.refit'):
    run.run(config, workdir, 'predict', input_dir=folder)
  with pytest.raises(UserError, match='no saved detector state; run --mode=eval'):
    run.run(config, str(tmp_path / 'untrained'), 'predict', input_dir=folder)


def _readme_blocks(language: str):
  """The code blocks of README.md's "Use a trained detector" section in `language`."""
  with open(os.path.join(REPO, 'README.md')) as f:
    text = f.read()
  section = text.split('## Use a trained detector')[1].split('\n## ')[0]
  return [b.split('\n', 1)[1] for b in section.split('```')[1::2] if b.startswith(language)]


@pytest.fixture(scope='module')
def readme_run(evaluated, tmp_path_factory):
  """Runs the README's commands on the evaluated workdir: (workdir, images folder)."""
  cache, workdir, _ = evaluated
  tmp = tmp_path_factory.mktemp('readme')
  folder = _folder(tmp / 'in', _images(2, seed=3))
  config_file = tmp / 'config.py'  # the test's micro config in place of configs/mvtec.py
  config_file.write_text('from tests.helpers import runs\n'
                         'def get_config(arg=None):\n'
                         f'  return runs.config("micro", {cache!r}, {OVERRIDES!r})\n')
  for line in _readme_blocks('bash')[0].splitlines():
    if line.startswith('python3 main.py'):
      args = line.replace('configs/mvtec.py', str(config_file)).replace('DIR', workdir).replace(
          'FOLDER', folder).split()
      out = subprocess.run([sys.executable, *args[1:]], cwd=REPO, capture_output=True, text=True,
                           timeout=600)
      assert out.returncode == 0, (line, out.stderr[-3000:])
  return workdir, folder


@pytest.mark.slow
def test_readme_commands_run(readme_run):
  workdir, folder = readme_run
  last = sorted(os.listdir(os.path.join(workdir, 'predict')))[-1]
  with open(os.path.join(workdir, 'predict', last, 'scores.csv')) as f:
    assert [line.split(',')[0] for line in f][1:] == ['img0.png', 'img1.png']
  assert os.path.exists(os.path.join(workdir, 'export', 'scoring.jaxexport'))
  code = _readme_blocks('python')[0].replace('DIR', workdir).replace('FOLDER', folder)
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  assert namespace['scores'].shape == (3,) and namespace['maps'].shape == (3, 16, 16)
  assert namespace['res'].maps[0].shape == (20, 24)


_LOAD_EXPORTED = r'''
import sys
import numpy as np
import esm.export
f = esm.export.load(sys.argv[1])
scores, maps = f(np.load(sys.argv[2]))
heavy = sorted(m for m in ('flax', 'orbax', 'tensorflow_datasets', 'grain', 'esm.models')
               if m in sys.modules)
assert not heavy, heavy
np.savez(sys.argv[3], scores=scores, maps=maps)
'''


@pytest.mark.slow
def test_exported_artifact_agrees_with_the_api_in_a_process_without_flax(readme_run, tmp_path):
  from esm import Detector  # pylint: disable=g-import-not-at-top
  workdir, _ = readme_run
  with open(os.path.join(workdir, 'export', 'detector.json')) as f:
    contract = json.load(f)
  assert contract['batch_size'] == 4 and contract['image_size'] == 16
  rng = np.random.default_rng(2)
  images = rng.integers(0, 255, (5, 16, 16, 3), np.uint8)  # 5: the loader pads to 8
  np.save(tmp_path / 'images.npy', images)
  out = subprocess.run([sys.executable, '-c', _LOAD_EXPORTED, os.path.join(workdir, 'export'),
                        str(tmp_path / 'images.npy'), str(tmp_path / 'out.npz')],
                       cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  exported = np.load(tmp_path / 'out.npz')
  api = Detector.load(workdir).predict(list(images))
  np.testing.assert_allclose(exported['scores'], api.scores, rtol=1e-4)
  np.testing.assert_allclose(exported['maps'], api.model_maps, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_refit_replaces_the_saved_state_with_the_given_flags(evaluated, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  cache, workdir, _ = evaluated
  copy = str(tmp_path / 'wd')  # a copy: the other tests keep the original state
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('predict', 'export'))
  folder = _folder(tmp_path / 'in', _images(1))
  with open(os.path.join(copy, 'detector.json')) as f:
    before = json.load(f)
  config = micro_config(cache, **{'detect.threshold_percentile': 50.0})
  with pytest.raises(UserError, match=r'detect\.threshold_percentile \(saved 99\.0, given 50\.0\)'):
    run.run(config, copy, 'predict', input_dir=folder)
  config.predict.refit = True
  run.run(config, copy, 'predict', input_dir=folder)
  with open(os.path.join(copy, 'detector.json')) as f:
    after = json.load(f)
  assert after['threshold_percentile'] == 50.0
  assert after['image_threshold'] < before['image_threshold']
  assert after['normalisation'] == before['normalisation']  # the same held-out images, same noise


@pytest.mark.slow
def test_a_state_of_an_older_checkpoint_is_refused(evaluated, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  from esm import Detector  # pylint: disable=g-import-not-at-top
  cache, workdir, _ = evaluated
  copy = str(tmp_path / 'wd')
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('predict', 'export'))
  run.run(micro_config(cache, **{'train.num_steps': 8}), copy, 'train')  # training went on
  with pytest.raises(UserError, match='belongs to checkpoint step 4 but the newest checkpoint is '
                                      'step 8; run --mode=eval again'):
    Detector.load(copy)


@pytest.mark.slow
def test_the_standardised_image_score_travels_through_the_state_predict_and_export(evaluated,
                                                                                   tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  import esm.export  # pylint: disable=g-import-not-at-top
  from esm import Detector  # pylint: disable=g-import-not-at-top
  cache, workdir, _ = evaluated
  copy = str(tmp_path / 'wd')
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns('predict', 'export'))
  config = micro_config(cache, **{'detect.image_score': 'standardised_mean'})
  config.predict.refit = True
  run.run(config, copy, 'export')  # re-fits DIR/detector.json with the flag, then exports
  with open(os.path.join(copy, 'detector.json')) as f:
    state = json.load(f)
  assert state['fields']['detect.image_score'] == 'standardised_mean'
  norm = state['normalisation']
  assert set(norm['score_mean']) == set(norm['score_std']) == {'u', 'kl', 're'}
  assert all(s > 0 for s in norm['score_std'].values())
  rng = np.random.default_rng(5)
  images = rng.integers(0, 255, (5, 16, 16, 3), np.uint8)
  api = Detector.load(copy).predict(list(images))
  paper = Detector.load(workdir).predict(list(images))
  np.testing.assert_allclose(api.model_maps, paper.model_maps, rtol=1e-4, atol=1e-5)
  assert not np.allclose(api.scores, paper.scores)  # the same maps, another image score
  scores, _ = esm.export.load(os.path.join(copy, 'export'))(images)
  np.testing.assert_allclose(scores, api.scores, rtol=1e-4, atol=1e-5)
