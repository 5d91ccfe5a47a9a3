"""The train-step factory and the training loop."""

import json
import os
import signal
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax
from absl import logging

from esm import parallel
from esm.checkpoint import Checkpointer
from esm.errors import UserError
from esm.losses import get_loss_fn
from esm.metric_writer import MetricWriter
from esm.models.dual_stream import ScoreNet, create_model, get_net_fn, init_params
from esm.sde import get_sde
from esm.train_state import TrainState, create_train_state, make_optimizer


def metric_names(loss_kind: str):
  return ('loss', 'sq_term', 'log_var_term') if loss_kind == 'esm' else ('loss',)


def get_train_step_fn(loss_fn: Callable, tx: optax.GradientTransformation, ema_rate: float,
                      inject_nonfinite_step: int = -1, inject_nonfinite_count: int = 1) -> Callable:
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
    updated = state.apply_update(grads, tx, ema_rate)
    state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, state)
    sums = {k: state.metric_sums[k] + jnp.where(finite, terms[k], 0.0) for k in state.metric_sums}
    return state.replace(
        step=state.step + 1,
        bad_steps=jnp.where(finite, 0, state.bad_steps + 1),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32),
        metric_sums=sums,
        metric_count=state.metric_count + finite.astype(jnp.int32))

  return train_step


def reset_metrics(state: TrainState) -> TrainState:
  return state.replace(metric_sums=jax.tree.map(jnp.zeros_like, state.metric_sums),
                       metric_count=jnp.zeros_like(state.metric_count))


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


def build(config, image_size: int):
  """(sde, model, net_fn, loss_fn, tx) for a config: the pieces training and evaluation share."""
  sde = get_sde(config.sde)
  model = create_model(config, image_size)
  net_fn = get_net_fn(model, sde)
  loss_fn = get_loss_fn(net_fn, sde, config.loss.kind)
  tx = make_optimizer(config.train.lr, config.train.warmup_steps, config.train.grad_clip)
  return sde, model, net_fn, loss_fn, tx


def init_state(config, model: ScoreNet, tx, image_size: int) -> TrainState:
  params = init_params(model, jax.random.fold_in(jax.random.key(config.seed), 0), image_size)
  return create_train_state(params, tx, metric_names(config.loss.kind))


def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def train_and_checkpoint(config, workdir: str, train_iter_fn: Callable) -> Optional[TrainState]:
  """Trains to config.train.num_steps, resuming from the newest checkpoint in workdir.

  train_iter_fn(start_step) returns this process's iterator of {'image': [local_batch,H,W,3]}
  batches from start_step on. Returns the final state, or None after a SIGTERM (checkpoint saved).
  """
  # Installed before the restore and the compilation, so that a notice arriving then still ends
  # with a checkpoint and exit status 0 rather than the default termination.
  with _Preemption() as preemption:
    return _train_and_checkpoint(config, workdir, train_iter_fn, preemption)


def _train_and_checkpoint(config, workdir: str, train_iter_fn: Callable,
                          preemption: _Preemption) -> Optional[TrainState]:
  tc = config.train
  image_size = config.data.image_size
  parallel.check_batch_size(tc.batch_size)
  mesh = parallel.make_mesh()
  _, model, _, loss_fn, tx = build(config, image_size)

  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), tc.keep, owner=True)
  abstract = jax.eval_shape(lambda: init_state(config, model, tx, image_size))
  state, start = checkpointer.restore_latest(
      parallel.with_sharding(abstract, parallel.replicated(mesh)))
  if state is None:
    state, start = init_state(config, model, tx, image_size), 0
    logging.info('training from scratch: %d steps, global batch %d on %d device(s)',
                 tc.num_steps, tc.batch_size, jax.device_count())
  else:
    logging.info('resuming from step %d of %d (%s)', start, tc.num_steps, checkpointer.directory)
  state = jax.device_put(state, parallel.replicated(mesh))
  writer = MetricWriter(workdir)
  try:
    writer.truncate_after(start)
    step_fn = jax.jit(
        get_train_step_fn(loss_fn, tx, tc.ema_rate, tc.inject_nonfinite_step,
                          tc.inject_nonfinite_count),
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh), None),
        out_shardings=parallel.replicated(mesh), donate_argnums=(0,))
    reset_fn = jax.jit(reset_metrics, donate_argnums=(0,))
    base_rng = jax.random.fold_in(jax.random.key(config.seed), 1)
    if start >= tc.num_steps:
      return state
    batches = train_iter_fn(start)
    t_log, step_log = time.time(), start
    for step in range(start, tc.num_steps):
      images = parallel.shard_batch(mesh, next(batches)['image'])
      state = step_fn(state, images, base_rng)
      done = step + 1
      bad = int(state.bad_steps)  # one scalar per step: stop on the step that reaches the limit
      if bad >= tc.max_bad_steps:
        raise UserError(f'training stopped at step {done}: {bad} consecutive steps had a '
                        f'non-finite loss or gradient (train.max_bad_steps={tc.max_bad_steps})')
      if done % tc.log_every == 0 or done == tc.num_steps:
        sums, count = jax.device_get((state.metric_sums, state.metric_count))
        # Means over the finite steps only; none when every step since the last line was skipped.
        scalars = {k: float(v) / int(count) for k, v in sums.items()} if int(count) else {}
        scalars['skipped_steps'] = int(state.skipped_steps)
        writer.write(done, scalars)
        now = time.time()
        rate = (done - step_log) * tc.batch_size / max(now - t_log, 1e-9)
        eta = (tc.num_steps - done) * tc.batch_size / max(rate, 1e-9)
        writer.write_throughput(done, rate, now - t_log)
        logging.info('step %d/%d  %.1f img/s  ETA %s  %s', done, tc.num_steps, rate,
                     _format_eta(eta), '  '.join(f'{k}={v:.4g}' for k, v in scalars.items()))
        t_log, step_log = now, done
        state = reset_fn(state)
      preempted = parallel.any_process(preemption.requested)  # the save is collective
      if done % tc.ckpt_every == 0 or done == tc.num_steps or preempted:
        checkpointer.save(done, state, force=True)
      if preempted:
        checkpointer.wait()
        logging.warning('SIGTERM: saved the checkpoint of step %d; exiting', done)
        return None
    return state
  finally:  # also on the max_bad_steps error: finish a pending save, then release the files
    checkpointer.wait()
    checkpointer.close()
    writer.close()


def save_config(config, workdir: str) -> None:
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = os.path.join(workdir, 'config.json.tmp')
    with open(tmp, 'w') as f:
      f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, os.path.join(workdir, 'config.json'))


def load_saved_config(workdir: str) -> Optional[dict]:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)
