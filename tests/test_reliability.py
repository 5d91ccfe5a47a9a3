"""Fault injection: kills and preemption, corrupt checkpoints, NaNs, bad inputs, untrusted files.

Training here is a micro single-stream U-Net (the DSM baseline: 8 channels, one level, no
attention) on 16² synthetic images. Every restart of main.py pays imports, tracing, a compilation-
cache load and an orbax restore whose cost grows with the number of parameter arrays, while the
mechanisms under test (checkpointing, resuming, logging, skipping) do not depend on the model; the
dual-stream variance head has its own test. The uninterrupted baseline runs in this process first,
so the subprocesses find its compilation in the session's persistent cache, and the kill-and-resume
run then proceeds in a background thread while the other tests of this file run in this process.
"""

import glob
import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from esm import checkpoint as ckpt_lib
from esm import files
from esm.config import from_configdict
from esm import run
from esm import train as train_lib
from esm.models import utils as mutils
from esm.train_state import TrainState, make_optimiser
from esm.errors import UserError
from tests.helpers import runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 16
NAN_STEP, NAN_COUNT = 5, 2  # state.step 5 and 6, i.e. the steps logged as 6 and 7, get a NaN
# configs/test.py:micro changed to the DSM baseline with the demo's readings, logging and
# checkpointing every step, and NaNs injected.
OVERRIDES = {
    'loss.kind': 'dsm', 'sampling.method': 'sgm', 'detect.weights': (0, 0, 0, 1),
    'sampling.var_source': 'i1', 'detect.re_kind': 'squared',
    'train.num_steps': NUM_STEPS, 'train.ema_rate': 0.9, 'train.log_every': 1,
    'train.ckpt_every': 1, 'train.keep': 3, 'train.inject_nonfinite_step': NAN_STEP,
    'train.inject_nonfinite_count': NAN_COUNT, 'train.max_bad_steps': 3,
}


def micro_config(cache: str, **changes):
  return runs.config('micro', cache, {**OVERRIDES, **changes})


def _flag_value(value) -> str:
  if isinstance(value, tuple):
    return '(' + ','.join(map(str, value)) + (',)' if len(value) == 1 else ')')
  return str(value)


def train_command(cache: str, workdir: str):
  c = micro_config(cache)
  args = [f'--config.{k}={_flag_value(v)}' for k, v in OVERRIDES.items()]
  return [sys.executable, 'main.py', '--config=configs/test.py:micro', f'--workdir={workdir}',
          '--mode=train', *args, f'--config.data.root={c.data.root}',
          f'--config.data.tfds_dir={c.data.tfds_dir}']


def read_jsonl(path: str):
  with open(path) as f:
    return [json.loads(line) for line in f]


def abstract_state(config):
  config, size = from_configdict(config), config.data.image_size
  return mutils.abstract_state(config, mutils.build(config, size), size)


def restore(config, workdir: str, step=None):
  """The state of `step` (default: the newest) as saved, read without changing the folder."""
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, 'checkpoints'), 3)
  try:
    if step is None:
      state, step = checkpointer.restore_latest(abstract_state(config))
    else:
      import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
      state = checkpointer._manager.restore(  # pylint: disable=protected-access
          step, args=ocp.args.StandardRestore(abstract_state(config)))
  finally:
    checkpointer.close()
  return step, state


def assert_trees_equal(a, b, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def assert_records_equal(got, want):
  assert [r['step'] for r in got] == [r['step'] for r in want]
  for g, w in zip(got, want):
    assert set(g) == set(w), (g, w)
    for k in w:
      assert g[k] == pytest.approx(w[k], rel=1e-6, abs=1e-7), (g['step'], k, g[k], w[k])


def step_dirs(workdir: str):
  return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


@pytest.fixture(scope='module')
def baseline(tmp_path_factory):
  """The uninterrupted run, in this process: (cache folder, workdir, config)."""
  base = tmp_path_factory.mktemp('reliability')
  cache = str(base / 'cache')
  config = micro_config(cache, **{'train.ckpt_every': 4})  # checkpoint cadence changes no number
  workdir = str(base / 'baseline')
  run.run(config, workdir, 'train')
  return cache, workdir, micro_config(cache)


# --- 1. Kill and resume: the driver (the test itself is the last of this file) -----------------

_TMP = '.orbax-checkpoint-tmp'
_STEP_LINE = re.compile(r'train\.py:\d+\] step (\d+)/')


def _finished_steps(workdir: str):
  folder = os.path.join(workdir, 'checkpoints')
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return [int(n) for n in names if n.isdigit()]


def _saving_steps(workdir: str):
  """Steps whose checkpoint is being written: orbax's `<step>.orbax-checkpoint-tmp*` folders."""
  folder = os.path.join(workdir, 'checkpoints')
  names = os.listdir(folder) if os.path.isdir(folder) else []
  return [int(n.split('.')[0]) for n in names if _TMP in n and n.split('.')[0].isdigit()]


def _logged_steps(log_path: str):
  """Steps this life has logged (its own stderr, so stale lines of earlier lives do not count)."""
  with open(log_path) as f:
    return [int(m.group(1)) for m in _STEP_LINE.finditer(f.read())]


class KillRun:
  """Runs the training command again and again, interrupting each life as `plan` says, in a thread.

  Interruptions: 'save' SIGKILL while the checkpoint of a step >= start+2 is being written; 'log'
  SIGKILL right after this life logs a step >= start+1 (its checkpoint not yet finished); 'time'
  SIGKILL at a random moment of the training loop; 'startup' SIGKILL at a random moment before
  the first step (imports, data, restore, tracing); 'sigterm' a preemption notice once the run
  has restored. Then one life runs to the end. Random choices come from a seeded generator.
  """

  def __init__(self, cmd, workdir: str, logs: str, seed: int):
    self.cmd, self.workdir, self.logs = cmd, workdir, logs
    self.rng = np.random.default_rng(seed)
    plan = ['save'] * 3 + ['log'] * 2 + ['time'] * 2 + ['sigterm']
    self.rng.shuffle(plan)
    plan.insert(int(self.rng.integers(1, len(plan) + 1)), 'startup')  # after a timed start-up
    self.plan = plan + ['none']
    self.events, self.error, self._proc, self._stop = [], None, None, False
    self._thread = threading.Thread(target=self._run, daemon=True)

  def start(self):
    self._thread.start()

  def result(self, timeout: float = 1200.0):
    self._thread.join(timeout)
    if self._thread.is_alive():
      self.stop()
      raise TimeoutError(f'kill-and-resume run unfinished after {timeout} s: {self.events}')
    if self.error is not None:
      raise self.error
    return self.events

  def stop(self):
    self._stop = True
    if self._proc is not None and self._proc.poll() is None:
      self._proc.kill()
    self._thread.join(60)

  def _run(self):
    try:
      startup = None
      for life, kind in enumerate(self.plan):
        if self._stop:
          return
        event = self._life(life, kind, startup)
        self.events.append(event)
        if kind != 'startup' and 'signal' in event:  # it was still starting up or later
          startup = min(startup or 1e9, event['at_seconds'])
    except BaseException as e:  # pylint: disable=broad-except
      self.error = e

  def _wait(self, predicate, timeout: float = 600.0) -> bool:
    """Polls every 5 ms until predicate() holds (True) or the process has exited (False)."""
    end = time.time() + timeout
    while time.time() < end and not self._stop:
      if predicate():
        return True
      if self._proc.poll() is not None:
        return False
      time.sleep(0.005)
    return False

  def _life(self, life: int, kind: str, startup) -> dict:
    start = max(_finished_steps(self.workdir), default=0)
    log_path = os.path.join(self.logs, f'life{life}.log')
    event = {'life': life, 'kind': kind, 'resumed_from': start}
    with open(log_path, 'w') as log:
      t0 = time.time()
      self._proc = subprocess.Popen(self.cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log)
      logged = lambda: _logged_steps(log_path)
      if kind == 'startup':
        time.sleep(self.rng.uniform(0.0, startup))
        hit = True
      elif kind == 'save':
        target = min(start + int(self.rng.integers(2, 4)), NUM_STEPS)
        hit = self._wait(lambda: any(s >= target for s in _saving_steps(self.workdir))
                         and target in logged())
      elif kind == 'log':
        target = min(start + int(self.rng.integers(1, 3)), NUM_STEPS)
        hit = self._wait(lambda: any(s >= target for s in logged()))
      elif kind == 'time':
        hit = self._wait(lambda: bool(logged()))
        time.sleep(self.rng.uniform(0.0, 3.0))
      elif kind == 'sigterm':
        hit = self._wait(lambda: re.search('training from scratch|resuming from step',
                                           open(log_path).read()) is not None)
      else:
        hit = False
      if hit and self._proc.poll() is None:
        sig = signal.SIGTERM if kind == 'sigterm' else signal.SIGKILL
        steps = logged()
        # Unfinished folders of steps this life logged are its own saves, not a killed life's.
        event.update(signal=sig.name, at_seconds=round(time.time() - t0, 2),
                     logged_this_life=max(steps, default=0),
                     finished=max(_finished_steps(self.workdir), default=0),
                     saving=sorted(s for s in _saving_steps(self.workdir) if s in steps))
        self._proc.send_signal(sig)
      event['rc'] = self._proc.wait(timeout=600)
      event['seconds'] = round(time.time() - t0, 2)
    steps = _logged_steps(log_path)
    with open(log_path) as f:
      event['log_tail'] = f.read()[-2000:]
    event['logged'] = [min(steps), max(steps)] if steps else []
    return event


@pytest.fixture(scope='module', autouse=True)
def kill_run(request, tmp_path_factory):
  """Starts the kill-and-resume run in the background when its test is selected."""
  if not any(item.name.startswith('test_sigkill') and item.module is request.module
             for item in request.session.items):
    yield None
    return
  cache, _, _ = request.getfixturevalue('baseline')
  base = tmp_path_factory.mktemp('killed')
  workdir = str(base / 'workdir')
  runner = KillRun(train_command(cache, workdir), workdir, str(base), seed=8)
  runner.start()
  yield runner, workdir
  runner.stop()


# --- 3. NaN and Inf ----------------------------------------------------------------------------

@pytest.mark.slow
def test_injected_nans_are_skipped_counted_and_kept_out_of_the_parameters(baseline):
  _, workdir, config = baseline
  records = read_jsonl(os.path.join(workdir, 'metrics.jsonl'))
  assert [r['step'] for r in records] == list(range(1, NUM_STEPS + 1))
  for r in records:
    skipped = r['step'] in (NAN_STEP + 1, NAN_STEP + 2)
    # A skipped step's line has no loss (there is no finite one to average), only the count.
    assert ('loss' not in r) == skipped, r
    assert r['skipped_steps'] == min(max(r['step'] - NAN_STEP, 0), NAN_COUNT), r
    assert skipped or np.isfinite(r['loss'])
  step, state = restore(config, workdir)
  assert step == NUM_STEPS and int(state.skipped_steps) == NAN_COUNT and int(state.bad_steps) == 0
  assert ckpt_lib.all_finite(state)


@pytest.mark.slow
def test_max_bad_steps_in_a_row_stops_with_one_line_naming_the_step(baseline, tmp_path):
  cache, _, _ = baseline
  config = micro_config(cache, **{'train.max_bad_steps': NAN_COUNT, 'train.ckpt_every': 3})
  with pytest.raises(UserError) as e:
    run.run(config, str(tmp_path), 'train')
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith(f'training stopped at step {NAN_STEP + NAN_COUNT}: {NAN_COUNT} '
                            'consecutive steps had a non-finite'), message
  # The checkpoint of step 6, a skipped step, holds the finite state of step 5.
  assert step_dirs(str(tmp_path)) == ['3', '6']
  step, state = restore(config, str(tmp_path))
  assert step == 6 and int(state.bad_steps) == 1 and ckpt_lib.all_finite(state)


def test_a_finite_gradient_whose_square_overflows_is_skipped_too():
  """Adam's second moment is g²: a gradient of 1e20 is finite, its square is not (float32)."""
  params = {'w': jnp.array([1.0, -2.0])}
  for scale, applied in ((1.0, True), (1e20, False)):

    def loss_fn(p, images, rng, scale=scale):
      del images, rng
      loss = scale * jnp.sum(p['w'])
      return loss, {'loss': loss}

    tx = make_optimiser(1e-2, 0, 0.0)  # no clipping, which would hide it
    state = TrainState.create(params, tx, ('loss',))
    new = jax.jit(train_lib.get_train_step_fn(loss_fn, 0.5))(state, None, jax.random.key(0))
    assert int(new.skipped_steps) == (0 if applied else 1)
    assert ckpt_lib.all_finite(new)
    assert bool(jnp.any(new.params['w'] != params['w'])) == applied


def test_a_non_finite_state_is_never_saved(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / 'checkpoints'), 3, owner=True)
  checkpointer.save(1, {'w': jnp.ones(3)}, force=True)
  checkpointer.wait()
  with pytest.raises(UserError, match=r'^step 2: the training state has non-finite values.*'
                     r'the newest checkpoint in .* is 1$'):
    checkpointer.save(2, {'w': jnp.array([1.0, jnp.inf, 0.0])}, force=True)
  checkpointer.close()
  assert step_dirs(str(tmp_path)) == ['1']


def test_two_writers_of_one_file_at_once_both_finish_and_the_last_wins(tmp_path):
  # Two runs converting the same weights into one cache entry: neither may rename the other's file.
  path = tmp_path / 'cache' / 'weights.npz'
  path.parent.mkdir()
  with files.atomic_path(path) as first:
    np.savez(first, w=np.zeros(2))
    with files.atomic_path(path) as second:
      assert second != first
      np.savez(second, w=np.ones(2))
    np.testing.assert_array_equal(np.load(path)['w'], np.ones(2))
  np.testing.assert_array_equal(np.load(path)['w'], np.zeros(2))
  assert os.listdir(path.parent) == ['weights.npz']


def test_log_variance_is_bounded_by_construction():
  from esm.models import dual_stream  # pylint: disable=g-import-not-at-top
  raw = jnp.array([-jnp.inf, -1e30, -50.0, 0.0, 50.0, 1e30, jnp.inf]).reshape(7, 1, 1, 1)
  max_bound = dual_stream.MAX_LOG_VAR_BOUND
  # 1 - 1e-7: 1-ᾱ near the smallest a float32 ᾱ below 1 gives, the most negative log(1-ᾱ).
  for bound, alpha_bar in ((12.0, 0.5), (max_bound, 0.5), (max_bound, 1.0 - 1e-7)):
    for param in ('scaled', 'direct'):
      log_var = dual_stream.variance_from_raw(raw, jnp.full((7,), alpha_bar), param, bound)
      assert bool(jnp.all(jnp.isfinite(log_var)))
      assert bool(jnp.all(jnp.isfinite(jnp.exp(log_var)))) and bool(jnp.all(jnp.exp(log_var) > 0))
      assert bool(jnp.all(jnp.isfinite(jnp.exp(-log_var))))


# --- 2. Corrupt checkpoints --------------------------------------------------------------------

class _Payload:
  """Unpickling this creates `marker`: proof that a pickle was executed."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def _truncate_files(step_dir: str):
  for path in glob.glob(os.path.join(step_dir, '**', 'd', '*'), recursive=True):
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)


def _garble_files(step_dir: str):
  for path in glob.glob(os.path.join(step_dir, '**', 'd', '*'), recursive=True):
    with open(path, 'r+b') as f:
      f.seek(os.path.getsize(path) // 3)
      f.write(b'\xa5' * 64)


def _empty(step_dir: str):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


def _plant_pickle(marker: str):
  def corrupt(step_dir: str):
    for path in glob.glob(os.path.join(step_dir, '**', '_METADATA'), recursive=True):
      with open(path, 'wb') as f:
        f.write(pickle.dumps(_Payload(marker)))
  return corrupt


@pytest.fixture(scope='module')
def toy_checkpoints(tmp_path_factory):
  """A folder with finished checkpoints of steps 1, 2 and 3 of a small tree; copied per test."""
  folder = str(tmp_path_factory.mktemp('toy') / 'checkpoints')
  tree = {'a': jnp.arange(300.0), 'b': {'c': jnp.ones((8, 8)), 'n': jnp.int32(0)}}
  checkpointer = ckpt_lib.Checkpointer(folder, 5, owner=True)
  for step in (1, 2, 3):
    checkpointer.save(step, jax.tree.map(lambda x, s=step: x + s, tree), force=True)
  checkpointer.wait()
  checkpointer.close()
  return folder, jax.eval_shape(lambda: tree)


# After a failed read, tensorstore can still post a callback to the event loop orbax has closed.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('how', ['truncated', 'garbled', 'emptied', 'pickle planted'])
def test_corrupt_latest_checkpoint_warns_falls_back_and_keeps_every_file(toy_checkpoints, tmp_path,
                                                                        how, caplog):
  source, abstract = toy_checkpoints
  folder = str(tmp_path / 'checkpoints')
  shutil.copytree(source, folder)
  marker = str(tmp_path / 'pwned')
  corrupt = {'truncated': _truncate_files, 'garbled': _garble_files, 'emptied': _empty,
             'pickle planted': _plant_pickle(marker)}[how]
  corrupt(os.path.join(folder, '3'))
  # A reader (evaluation) skips it and changes nothing.
  reader = ckpt_lib.Checkpointer(folder, 3)
  with caplog.at_level(logging.WARNING):
    state, step = reader.restore_latest(abstract)
  reader.close()
  assert step == 2 and float(state['a'][0]) == 2.0
  assert f'checkpoint {folder}/3 is unreadable' in caplog.text
  assert sorted(os.listdir(folder)) == ['1', '2', '3']
  # The training process falls back too, and moves the unreadable one aside; nothing is deleted.
  owner = ckpt_lib.Checkpointer(folder, 3, owner=True)
  state, step = owner.restore_latest(abstract)
  owner.close()
  assert step == 2 and sorted(os.listdir(folder)) == ['1', '2', '3.corrupt-0']
  assert not os.path.exists(marker)


@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_when_no_checkpoint_restores_nothing_is_moved_and_the_error_names_each(toy_checkpoints,
                                                                             tmp_path):
  source, abstract = toy_checkpoints
  folder = str(tmp_path / 'checkpoints')
  shutil.copytree(source, folder)
  for step in ('1', '2', '3'):
    _truncate_files(os.path.join(folder, step))
  owner = ckpt_lib.Checkpointer(folder, 3, owner=True)
  with pytest.raises(UserError, match=r'no checkpoint restores \(3: .*; 2: .*; 1: .*nothing was '
                     r'moved or deleted') as e:
    owner.restore_latest(abstract)
  owner.close()
  assert '\n' not in str(e.value)
  assert sorted(os.listdir(folder)) == ['1', '2', '3']


@pytest.mark.slow
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_rerun_after_the_latest_checkpoint_is_corrupted_resumes_from_the_previous_one(
    baseline, tmp_path, caplog):
  cache, base_dir, config = baseline
  workdir = str(tmp_path / 'run')
  shutil.copytree(base_dir, workdir)
  assert step_dirs(workdir) == ['12', '16', '8']
  _truncate_files(os.path.join(workdir, 'checkpoints', '16'))
  with caplog.at_level(logging.WARNING):
    run.run(micro_config(cache, **{'train.ckpt_every': 4}), workdir, 'train')
  assert f'checkpoint {workdir}/checkpoints/16 is unreadable' in caplog.text
  assert f'falling back to checkpoint {workdir}/checkpoints/12' in caplog.text
  assert step_dirs(workdir) == ['12', '16', '16.corrupt-0', '8']
  assert_records_equal(read_jsonl(os.path.join(workdir, 'metrics.jsonl')),
                       read_jsonl(os.path.join(base_dir, 'metrics.jsonl')))
  assert_trees_equal(restore(config, workdir)[1].params, restore(config, base_dir)[1].params)


# --- 5. Evaluation robustness ------------------------------------------------------------------

def _mixed_image(rng, k: int) -> Image.Image:
  """Images of different sizes and modes: RGB, grayscale, RGBA, 16-bit grayscale, palette."""
  h, w = (20, 24, 16, 18, 28)[k % 5], (24, 16, 16, 30, 20)[k % 5]
  rgb = rng.integers(0, 255, (h, w, 3), np.uint8)
  im = Image.fromarray(rgb)
  return [im, im.convert('L'), im.convert('RGBA'),
          Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)), im.convert('P')][k % 5]


def _folder_dataset(root: str, name: str, test_types: dict, masks: bool):
  """root/name/train/good (5 images), root/name/test/<type>/..., optional ground_truth masks."""
  rng = np.random.default_rng(len(name))
  for k in range(5):
    path = os.path.join(root, name, 'train', 'good', f'{k:03d}.png')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    _mixed_image(rng, k).save(path)
  for defect_type, n in test_types.items():
    for k in range(n):
      im = _mixed_image(rng, k + 1)
      path = os.path.join(root, name, 'test', defect_type, f'{k:03d}.png')
      os.makedirs(os.path.dirname(path), exist_ok=True)
      im.save(path)
      if masks and defect_type != 'good':
        mask = np.zeros((im.height, im.width), np.uint8)
        mask[2:8, 3:9] = 255
        path = os.path.join(root, name, 'ground_truth', defect_type, f'{k:03d}_mask.png')
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(mask).save(path)


@pytest.mark.slow
@pytest.mark.parametrize('name, test_types, masks', [
    ('only_good', {'good': 3}, False),
    ('only_defective', {'crack': 2, 'hole': 1}, True),
])
def test_a_test_split_with_one_class_gives_na_metrics(baseline, tmp_path, name, test_types, masks):
  from esm import evaluate  # pylint: disable=g-import-not-at-top
  cache, workdir, _ = baseline
  root = str(tmp_path / 'data')
  _folder_dataset(root, name, test_types, masks)
  config = micro_config(cache, **{'data.dataset': 'folder', 'data.category': name,
                                  'data.val_fraction': 0.4})
  config.data.root = root
  report_dir = str(tmp_path / 'report')
  result = evaluate.evaluate(from_configdict(config), workdir, report_dir=report_dir)
  assert result['num_test_images'] == sum(test_types.values())
  for key in ('image_auroc', 'image_ap', 'image_f1_max'):
    assert math.isnan(result[key]), (key, result[key])
  if masks:  # defect masks hold both pixel classes: pixel metrics are defined
    assert 0.0 <= result['pixel_auroc'] <= 1.0
  else:
    assert math.isnan(result['pixel_auroc'])
  with open(os.path.join(report_dir, 'report.md')) as f:
    assert 'n/a' in f.read()
  with open(os.path.join(report_dir, 'results.json')) as f:
    assert json.load(f)[name]['image_auroc'] is None


@pytest.mark.slow
def test_predict_skips_non_images_and_refuses_corrupt_ones_before_any_compute(baseline, tmp_path):
  cache, workdir, _ = baseline
  config = micro_config(cache)
  folder = tmp_path / 'in'
  folder.mkdir()
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(folder / 'a.png')
  (folder / 'b.png').write_text('not an image')
  with pytest.raises(UserError, match=r'b\.png: corrupt, truncated or unreadable image'):
    run.run(config, workdir, 'predict', input_dir=str(folder))
  (folder / 'b.png').unlink()
  (folder / 'notes.txt').write_text('hello')
  # notes.txt is skipped with a warning; the next check is the saved state of a workdir never
  # evaluated.
  with pytest.raises(UserError, match=r'detector\.json: no saved detector state; run --mode=eval'):
    run.run(config, str(tmp_path / 'never_evaluated'), 'predict', input_dir=str(folder))
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'notes.txt').write_text('hello')
  with pytest.raises(UserError, match='no images found'):
    run.run(config, workdir, 'predict', input_dir=str(empty))
  assert not os.path.exists(os.path.join(workdir, 'predict'))


# --- 4. Config validation: every case fails before any compute, with one line -----------------

BAD_CONFIGS = [
    # (what, overrides, mode, expected message start)
    ('unknown dataset', {'data.dataset': 'imagenet'}, 'train', 'data.dataset: expected one of'),
    ('unknown category', {'data.dataset': 'mvtec_ad', 'data.category': 'bottel',
                          'sampling.t_d_by_category': {'bottle': 100, 'wood': 20}}, 'train',
     "data.category: unknown mvtec_ad category 'bottel'"),
    ('T_d > T', {'sampling.t_d': 1001}, 'eval', 'sampling.t_d: expected an integer in 1..1000'),
    ('T_d < 1', {'sampling.t_d': 0}, 'eval', 'sampling.t_d: expected an integer in 1..1000'),
    ('image size vs U-Net downsampling', {'model.ch_mult': (1, 2, 2), 'data.image_size': 18},
     'train', 'data.image_size'),
    ('weights of the wrong length', {'detect.weights': (1.0, 1.0, 1.0)}, 'eval',
     'detect.weights: expected 4'),
    ('unknown sampling method', {'sampling.method': 'ddim'}, 'eval', 'sampling.method'),
    ('log-variance bound too large', {'model.log_var_bound': 100.0}, 'train',
     'model.log_var_bound: expected 0 < bound <= 60'),
    ('learning rate inf in float32', {'train.lr': 1e39}, 'train', 'train.lr: expected a positive'),
    ('fault injection count < 1', {'train.inject_nonfinite_count': 0}, 'train',
     'train.inject_nonfinite_count: expected a positive integer'),
]


@pytest.mark.parametrize('what, overrides, mode, expected', BAD_CONFIGS,
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_refused_before_any_compute(tmp_path, what, overrides, mode, expected):
  del what
  config = micro_config(str(tmp_path / 'cache'), **overrides)
  with pytest.raises(UserError) as e:
    run.run(config, str(tmp_path / 'workdir'), mode)
  assert str(e.value).startswith(expected), str(e.value)
  assert '\n' not in str(e.value)
  assert not os.listdir(tmp_path)  # nothing prepared, nothing written


def test_unknown_mode_and_indivisible_global_batch_are_refused_before_any_compute(tmp_path,
                                                                                  monkeypatch):
  config = micro_config(str(tmp_path / 'cache'))
  with pytest.raises(UserError, match=r"^--mode: expected one of .*, got 'fit'$"):
    run.run(config, str(tmp_path / 'workdir'), 'fit')
  monkeypatch.setattr(jax, 'device_count', lambda *a: 8)  # as on an 8-chip host
  config.train.batch_size = 12
  with pytest.raises(UserError, match=r'^train\.batch_size: global batch 12 must be a positive '
                     r'multiple of the 8 devices'):
    run.run(config, str(tmp_path / 'workdir'), 'train')
  assert not os.listdir(tmp_path)


@pytest.mark.slow
def test_checkpoint_of_a_different_model_is_refused_naming_the_fields(baseline, tmp_path):
  cache, base_dir, _ = baseline
  workdir = str(tmp_path / 'workdir')
  os.makedirs(workdir)
  shutil.copy(os.path.join(base_dir, 'config.json'), workdir)
  config = micro_config(cache, **{'model.ch': 16, 'model.num_res_blocks': 2})
  with pytest.raises(UserError, match=r'trained with a different model config \(differing '
                     r'fields: model\.ch, model\.num_res_blocks\)') as e:
    run.run(config, workdir, 'train')
  assert '\n' not in str(e.value)
  assert sorted(os.listdir(workdir)) == ['config.json']


# --- 6. Untrusted files: nothing is unpickled --------------------------------------------------

def test_a_malicious_pickle_is_refused_as_pth_safetensors_and_cached_weights(tmp_path):
  from esm.features import extractor, weights  # pylint: disable=g-import-not-at-top
  marker = str(tmp_path / 'pwned')
  payload = pickle.dumps({'cls_token': _Payload(marker)})
  for name, match in (('evil.pth', r'torch'), ('evil.pt', r'torch'),
                      ('evil.safetensors', r'not a safetensors file')):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(UserError, match=match):
      weights.read_state_dict(tmp_path / name)
  # A poisoned converted-weights cache entry: numpy refuses object arrays (allow_pickle=False).
  source = tmp_path / 'vit.safetensors'
  source.write_bytes(b'\0' * 8)
  digest = hashlib.sha256(source.read_bytes()).hexdigest()
  cache = tmp_path / 'cache'
  cache.mkdir()
  cached = cache / f'vit-dinov2_vits14-{extractor._CACHE_FORMAT}-{digest[:16]}.npz'  # pylint: disable=protected-access
  np.savez(cached, evil=np.array([_Payload(marker)], dtype=object))
  with pytest.raises(ValueError, match='allow_pickle=False'):
    extractor.load_params('dinov2_vits14', str(source), str(cache))
  assert not os.path.exists(marker)


def test_no_code_path_can_unpickle():
  """Source scan: no pickle-based loader anywhere in the project's code."""
  unsafe = re.compile(r'\b(import|from) (pickle|dill|cloudpickle|joblib|shelve)\b|pickle\.loads?\(|'
                      r'allow_pickle\s*=\s*True|read_pickle')
  found = []
  for folder in ('esm', 'datasets', 'configs', 'bench', '.'):
    pattern = '*.py' if folder == '.' else '**/*.py'
    for path in glob.glob(os.path.join(REPO, folder, pattern), recursive=True):
      with open(path) as f:
        for n, line in enumerate(f, 1):
          if unsafe.search(line) or ('torch.load(' in line and 'weights_only=True' not in line):
            found.append(f'{os.path.relpath(path, REPO)}:{n}: {line.strip()}')
  assert not found, found


# --- 1. Kill and resume: the test --------------------------------------------------------------

@pytest.mark.slow
def test_sigkill_at_random_moments_and_sigterm_then_rerun_equals_an_uninterrupted_run(
    baseline, kill_run):
  _, base_dir, config = baseline
  runner, workdir = kill_run
  events = runner.result()
  summary = [{k: v for k, v in e.items() if k != 'log_tail'} for e in events]
  print('\n'.join(json.dumps(e) for e in summary))
  for e in events:
    tail = e['log_tail']
    assert 'Traceback' not in tail, tail
    if e['kind'] == 'sigterm':
      step = e['resumed_from'] + 1
      assert e['rc'] == 0 and f'SIGTERM: saved the checkpoint of step {step}; exiting' in tail, tail
    elif 'signal' in e:
      assert e['rc'] == -signal.SIGKILL, e
    else:  # not interrupted: it ran to the end
      assert e['rc'] == 0, tail
  kills = [e for e in events if e.get('signal') == 'SIGKILL']
  assert len(kills) >= 8, summary
  assert sum(bool(e['saving']) for e in kills) >= 3, summary  # killed while a checkpoint was written
  assert any(e['kind'] == 'sigterm' and e.get('signal') == 'SIGTERM' for e in events), summary
  assert events[-1]['kind'] == 'none' and events[-1]['rc'] == 0

  # The result equals the uninterrupted run, and every step is logged exactly once.
  assert_records_equal(read_jsonl(os.path.join(workdir, 'metrics.jsonl')),
                       read_jsonl(os.path.join(base_dir, 'metrics.jsonl')))
  throughput = [r['step'] for r in read_jsonl(os.path.join(workdir, 'throughput.jsonl'))]
  assert throughput == list(range(1, NUM_STEPS + 1))
  step_a, state_a = restore(config, base_dir)
  step_b, state_b = restore(config, workdir)
  assert step_a == step_b == NUM_STEPS
  assert_trees_equal((state_a.params, state_a.ema_params, state_a.opt_state),
                     (state_b.params, state_b.ema_params, state_b.opt_state))
  # Nothing left behind: no unfinished temporary folder, no checkpoint had to be moved aside.
  assert step_dirs(workdir) == [str(s) for s in range(NUM_STEPS - 2, NUM_STEPS + 1)]
