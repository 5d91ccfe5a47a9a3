"""--mode=train: the train-step factory, the training loop, and the mode that feeds it a dataset
and fits the model-free baselines beside the model."""

import os
import signal
import math
import time
from typing import Callable, Optional


import jax
import jax.numpy as jnp
import optax
from absl import logging

from datasets import pipeline
from esm import baselines
from esm import config as config_lib
from esm import parallel
from esm import validate
from esm import workdir as workdir_lib
from esm.checkpoint import Checkpointer
from esm.config import Config
from esm.errors import UserError
from esm.metric_writer import MetricWriter
from esm.models import utils as mutils
from esm.train_state import TrainState


def fit_baselines(config: Config, workdir: str) -> None:
  """Fits each model-free baseline that DIR/baselines/ lacks on the training images (read only
  when one is missing): --mode=train's work, done late for a run trained before it had one."""
  baselines.fit_missing(config, workdir, lambda: pipeline.get_eval_data(
      config.data, 'train', global_batch_size=config.eval.batch_size))


def get_train_step_fn(loss_fn: Callable, ema_rate: float, inject_nonfinite_step: int = -1,
                      inject_nonfinite_count: int = 1) -> Callable:
  """train_step(state, images, base_rng) -> state, pure and ready for jit over a mesh.

  The step's randomness is fold_in(base_rng, step), so a resumed run draws what an uninterrupted
  run would. A step whose loss, gradients or squared gradient norm are non-finite is skipped (state
  unchanged except the counters), which keeps NaNs out of the parameters and so out of every
  checkpoint (Checkpointer.save refuses a non-finite state as a last guard). Fault injection: the
  steps taken from state.step = inject_nonfinite_step on, inject_nonfinite_count of them, get a
  NaN loss and NaN gradients.
  """
  def train_step(state: TrainState, images, base_rng):
    rng = jax.random.fold_in(base_rng, state.step)
    (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, images, rng)
    if inject_nonfinite_step >= 0:  # fault injection for the reliability tests
      hit = (state.step >= inject_nonfinite_step) & (
          state.step < inject_nonfinite_step + inject_nonfinite_count)
      poison = jnp.where(hit, jnp.nan, 0.0)
      loss = loss + poison
      grads = jax.tree.map(lambda g: g + poison, grads)
    # Adam squares the gradients: a finite gradient whose square overflows would put inf into its
    # state, so the squared norm must be finite too. (Testing the updated state itself instead
    # makes XLA:CPU compile this step for minutes.)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm * grad_norm)
    updated = state.apply_gradients(grads, ema_rate)
    state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    sums = {k: state.metric_sums[k] + jnp.where(finite, terms[k], 0.0) for k in state.metric_sums}
    return state.replace(
        step=state.step + 1,
        bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        metric_sums=sums,
        metric_count=state.metric_count + finite.astype(jnp.int32))

  return train_step


class _Preemption:
  """Turns SIGTERM (a preemption notice) into a flag the loop checks after each step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, preemption ends the process as usual
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def restore_or_init(config, built: mutils.Built, checkpointer: Checkpointer, mesh):
  """(state, start step): the newest readable checkpoint, or a fresh state at step 0."""
  image_size = config.data.image_size
  state, start = None, None
  if checkpointer.all_steps():  # tracing the abstract state costs about an init: only to restore
    abstract = mutils.abstract_state(config, built, image_size)
    state, start = checkpointer.restore_latest(
        parallel.with_sharding(abstract, parallel.replicated(mesh)))
  if state is None:
    state, start = mutils.init_state(config, built, image_size), 0
    logging.info('training from scratch: %d steps, global batch %d on %d device(s)',
                 config.train.num_steps, config.train.batch_size, jax.device_count())
  else:
    logging.info('resuming from step %d of %d (%s)', start, config.train.num_steps,
                 checkpointer.directory)
  return jax.device_put(state, parallel.replicated(mesh)), start


class ProgressLog:
  """Every log_every steps: the mean loss terms to metrics.jsonl and TensorBoard, the speed to
  throughput.jsonl, and one progress line with the ETA."""

  def __init__(self, writer: MetricWriter, tc, start: int):
    self.writer, self.tc = writer, tc
    self.t_log, self.step_log = time.time(), start

  def restart_clock(self) -> None:
    """Speed and ETA count from now (called after compilation)."""
    self.t_log = time.time()

  def due(self, done: int) -> bool:
    return done % self.tc.log_every == 0 or done == self.tc.num_steps

  def write(self, done: int, state: TrainState) -> None:
    tc = self.tc
    sums, count = jax.device_get((state.metric_sums, state.metric_count))
    # Means over the finite steps only; none when every step since the last line was skipped.
    scalars = {k: float(v) / int(count) for k, v in sums.items()} if int(count) else {}
    scalars['skipped_steps'] = int(state.skipped_steps)
    self.writer.write(done, scalars)
    now = time.time()
    rate = (done - self.step_log) * tc.batch_size / max(now - self.t_log, 1e-9)
    eta = (tc.num_steps - done) * tc.batch_size / max(rate, 1e-9)
    self.writer.write_throughput(done, rate, now - self.t_log)
    logging.info('step %d/%d  %.1f img/s  ETA %s  %s', done, tc.num_steps, rate,
                 _format_eta(eta), '  '.join(f'{k}={v:.4g}' for k, v in scalars.items()))
    self.t_log, self.step_log = now, done


def train_and_checkpoint(config, workdir: str, train_iter_fn: Callable) -> Optional[TrainState]:
  """Trains to config.train.num_steps, resuming from the newest checkpoint in workdir.

  train_iter_fn(start_step) returns this process's iterator of {'image': [local_batch,H,W,3]}
  batches from start_step on. Returns the final state, or None after a SIGTERM (checkpoint saved).
  """
  # Installed before the restore and the compilation, so that a notice arriving then still ends
  # with a checkpoint and exit status 0 rather than the default termination.
  with _Preemption() as preemption:
    tc = config.train
    mesh = parallel.make_mesh()
    built = mutils.build(config, config.data.image_size)
    checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), tc.keep, owner=True)
    writer = MetricWriter(workdir)
    try:
      state, start = restore_or_init(config, built, checkpointer, mesh)
      writer.truncate_after(start)
      if start >= tc.num_steps:
        return state
      return _train_loop(config, built, state, start, train_iter_fn(start), mesh, checkpointer,
                         ProgressLog(writer, tc, start), preemption)
    finally:  # also on the max_bad_steps error: finish a pending save, then release the files
      checkpointer.wait()
      checkpointer.close()
      writer.close()


# XLA:CPU hands convolutions, dots and reductions to YNNPACK. Its weight-gradient convolution (a
# window the size of the feature map) runs 8x slower than XLA's own (docs/benchmarks.md), so on CPU
# the train step gives YNNPACK the dots and reductions only.
CPU_STEP_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                    'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE'}


def step_compiler_options(options=None, platform: Optional[str] = None) -> dict:
  """The XLA options the train step compiles with: the platform's (CPU_STEP_OPTIONS on CPU), then
  `options` (train.compiler_options), which win."""
  platform = platform or jax.default_backend()
  return {**(CPU_STEP_OPTIONS if platform == 'cpu' else {}), **dict(options or {})}


def compile_step(step_fn, state, images, base_rng, compiler_options=None):
  """step_fn (jitted) lowered and compiled for these arguments with step_compiler_options."""
  return step_fn.lower(state, images, base_rng).compile(
      step_compiler_options(compiler_options) or None)


def _compile_step(step_fn, state, images, base_rng, compiler_options=None):
  logging.info('compiling the train step (XLA; a rerun reads it from the compilation cache) ...')
  t = time.time()
  compiled = compile_step(step_fn, state, images, base_rng, compiler_options)
  logging.info('compiled the train step in %.1f s', time.time() - t)
  return compiled


def _train_loop(config, built: mutils.Built, state: TrainState, start: int, batches, mesh,
                checkpointer: Checkpointer, progress: ProgressLog,
                preemption: _Preemption) -> Optional[TrainState]:
  tc = config.train
  step_fn = jax.jit(
      get_train_step_fn(built.loss_fn, tc.ema_rate, tc.inject_nonfinite_step,
                        tc.inject_nonfinite_count),
      in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh), None),
      out_shardings=parallel.replicated(mesh), donate_argnums=(0,))
  reset_fn = jax.jit(TrainState.reset_metrics, donate_argnums=(0,))
  base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
  compiled = None
  for step in range(start, tc.num_steps):
    images = parallel.shard_batch(mesh, next(batches)['image'])
    if compiled is None:  # compiled ahead of the first step, so that no ETA includes it
      compiled = _compile_step(step_fn, state, images, base_rng, dict(tc.compiler_options))
      progress.restart_clock()
    state = compiled(state, images, base_rng)
    done = step + 1
    bad = int(state.bad_steps)  # one scalar per step: stop on the step that reaches the limit
    if bad >= tc.max_bad_steps:
      raise UserError(f'training stopped at step {done}: {bad} consecutive steps had a '
                      f'non-finite loss or gradient (train.max_bad_steps={tc.max_bad_steps})')
    if progress.due(done):
      progress.write(done, state)
      state = reset_fn(state)
    preempted = parallel.any_process(preemption.requested)  # the save is collective
    if done % tc.ckpt_every == 0 or done == tc.num_steps or preempted:
      checkpointer.save(done, state, force=True)
    if preempted:
      checkpointer.wait()
      logging.warning('SIGTERM: saved the checkpoint of step %d; exiting', done)
      return None
  return state


def resolve_num_steps(config: Config, num_train: int) -> Config:
  """config with train.num_steps from train.num_epochs when that is > 0 (the size of the
  training split sets it)."""
  tc = config.train
  if tc.num_epochs <= 0:
    return config
  num_steps = max(1, math.ceil(tc.num_epochs * num_train / tc.batch_size))
  logging.info('%d epochs of %d images at batch %d = %d steps', tc.num_epochs, num_train,
               tc.batch_size, num_steps)
  return config_lib.with_fields(config, {'train.num_steps': num_steps})


def train(config: Config, workdir: str) -> Optional[TrainState]:
  """--mode=train on config's dataset: the final state, or None after a SIGTERM."""
  # The data are listed, checked and prepared first: a bad dataset leaves no workdir behind.
  num_train = pipeline.num_train_examples(config.data)
  if num_train < 1:
    raise UserError(f'data.val_fraction={config.data.val_fraction}: no training image is left '
                    f'in {config.data.dataset}/{config.data.category} after the held-out slice')
  with workdir_lib.training_lock(workdir):
    validate.check_checkpoint_compatible(workdir_lib.load_saved_config(workdir), config, workdir)
    config = resolve_num_steps(config, num_train)
    workdir_lib.save_config(config, workdir)  # after every check: a failed start writes nothing

    def train_iter(start_step):
      return pipeline.get_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                         seed=config.seed, start_step=start_step)

    state = train_and_checkpoint(config, workdir, train_iter)
    if state is not None:  # the model-free baselines beside the model, once per workdir
      fit_baselines(config, workdir)
    return state
