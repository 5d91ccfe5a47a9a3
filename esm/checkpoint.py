"""Orbax checkpoints in DIR/checkpoints: atomic save, restore of the newest readable one, resume.

Orbax writes each step into a temporary folder and renames it when complete, so a kill mid-save
leaves no half checkpoint that looks finished. A finished checkpoint that later fails to restore
(truncated or corrupted on disk) is moved aside to `<step>.corrupt-<n>` with a warning, and the
previous one is used; nothing is deleted, so the only good checkpoint can never be lost to it.
"""

import os
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from esm import parallel


def all_finite(tree) -> bool:
  """True when every floating-point leaf of the tree is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(jnp.all(jnp.array([jnp.isfinite(x).all() for x in leaves]))) if leaves else True


class Checkpointer:
  """Saves and restores a TrainState pytree under `directory`, keeping the last `keep`."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    self._keep = keep
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                           enable_async_checkpointing=True)
    return ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Starts an asynchronous save; the previous save is finished first."""
    return self._manager.save(int(step), args=ocp.args.StandardSave(state), force=force)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def restore_latest(self, abstract_state: Any) -> Tuple[Optional[Any], Optional[int]]:
    """(state, step) of the newest checkpoint that restores, or (None, None) when there is none."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        if not all_finite(state):
          raise ValueError('non-finite values in the restored state')
        return state, step
      except Exception as e:  # pylint: disable=broad-except
        path = os.path.join(self.directory, str(step))
        moved = self._move_aside(path)
        logging.warning('checkpoint %s is unreadable (%s: %s); moved to %s, trying the previous one',
                        path, type(e).__name__, str(e).splitlines()[0][:200] if str(e) else '', moved)
    return None, None

  def _move_aside(self, path: str) -> str:
    parallel.barrier('checkpoint: before moving aside')  # every process picks the same name
    n = 0
    while os.path.exists(f'{path}.corrupt-{n}'):
      n += 1
    target = f'{path}.corrupt-{n}'
    if jax.process_index() == 0:
      os.rename(path, target)
    parallel.barrier('checkpoint: moved aside')  # no process lists the old folder again
    # The manager caches its step list; a fresh one sees the folder without the moved step.
    self._manager.close()
    self._manager = self._new_manager()
    return target
