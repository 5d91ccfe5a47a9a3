"""TrainState: step, params, EMA params, optimiser state, and the counters that survive a resume.

The optimiser itself is a static field (as in flax.training.train_state): it is part of the jitted
step's structure, not of the checkpoint, which holds the array leaves only.
"""

from typing import Any, Dict, Sequence

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32: optimiser steps taken (skipped non-finite steps included)
  params: Any
  ema_params: Any  # the parameters used for evaluation
  opt_state: Any
  bad_steps: jax.Array  # int32: consecutive steps whose loss or gradients were non-finite
  skipped_steps: jax.Array  # int32: all skipped steps of the run
  metric_sums: Dict[str, jax.Array]  # loss terms summed since the last log line
  metric_count: jax.Array  # int32: steps in metric_sums
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False, default=None)

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation,
             metric_names: Sequence[str]) -> 'TrainState':
    # Separate buffers for every leaf: the train step donates the state, and XLA refuses aliases.
    zero = lambda: jnp.zeros((), jnp.int32)
    return cls(step=zero(), params=params, ema_params=jax.tree.map(lambda p: p + 0, params),
               opt_state=tx.init(params), bad_steps=zero(), skipped_steps=zero(),
               metric_sums={k: jnp.zeros((), jnp.float32) for k in metric_names},
               metric_count=zero(), tx=tx)

  def apply_gradients(self, grads, ema_rate: float) -> 'TrainState':
    """One optimiser step and the EMA update; the counters are the train step's business."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema = jax.tree.map(lambda e, p: ema_rate * e + (1.0 - ema_rate) * p, self.ema_params, params)
    return self.replace(params=params, ema_params=ema, opt_state=opt_state)

  def reset_metrics(self) -> 'TrainState':
    return self.replace(metric_sums=jax.tree.map(jnp.zeros_like, self.metric_sums),
                        metric_count=jnp.zeros_like(self.metric_count))


def make_optimiser(lr: float, warmup_steps: int, grad_clip: float) -> optax.GradientTransformation:
  """Adam (paper: lr 2e-5) with linear warm-up and optional global-norm clipping."""
  schedule = optax.linear_schedule(0.0, lr, max(int(warmup_steps), 1)) if warmup_steps else lr
  parts = [optax.clip_by_global_norm(grad_clip)] if grad_clip > 0 else []
  return optax.chain(*parts, optax.adam(schedule))
