"""Orbax checkpoints in DIR/checkpoints: atomic save, restore of the newest readable one, resume.

Orbax writes each step into a temporary folder (`<step>.orbax-checkpoint-tmp*`) and renames it when
complete, so a kill mid-save leaves no half checkpoint that looks finished. The training process
owns the folder: on start it removes the temporary folders a killed run left behind (they would
otherwise fill the disk), and when the newest finished checkpoint fails to restore (truncated or
corrupted on disk, or non-finite) it falls back to the previous one and moves the unreadable ones
aside to `<step>.corrupt-<n>` with a warning. Apart from those temporary folders and orbax's rotation
to the newest `keep` steps, nothing is deleted, and nothing is moved unless an older checkpoint did
restore: when none restores, the folder is left as it is and
the run stops with an error, so the only good checkpoint cannot be lost to a misjudged failure.
Readers (evaluation) skip unreadable checkpoints and change nothing on disk.
"""

import os
from typing import Any, List, Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from absl import logging

from esm import parallel
from esm.errors import UserError


def all_finite(tree) -> bool:
  """True when every floating-point leaf of the tree is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return bool(jnp.all(jnp.array([jnp.isfinite(x).all() for x in leaves]))) if leaves else True


def _first_line(e: Exception) -> str:
  text = str(e).splitlines()[0][:200] if str(e) else ''
  return f'{type(e).__name__}: {text}' if text else type(e).__name__


class Checkpointer:
  """Saves and restores a TrainState pytree under `directory`; the owner keeps the last `keep`.

  owner=True for the training process (removes unfinished temporary folders, moves unreadable
  checkpoints aside); owner=False for readers such as evaluation, which may run while another
  process trains into the same folder.
  """

  def __init__(self, directory: str, keep: Optional[int] = None, *, owner: bool = False):
    if owner and not keep:
      raise ValueError('Checkpointer: the owner (the trainer) must say how many to keep')
    self.directory = os.path.abspath(directory)
    self._keep = keep
    self._owner = owner
    self._manager = self._new_manager()

  def _new_manager(self) -> ocp.CheckpointManager:
    if self._owner:
      options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True)
    else:  # never saves, so never deletes
      options = ocp.CheckpointManagerOptions(create=False)
    return ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> List[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Starts an asynchronous save; the previous save is finished first. A state with a non-finite
    value is refused (UserError), so no checkpoint ever holds one."""
    if not all_finite(state):
      raise UserError(f'step {step}: the training state has non-finite values although every '
                      f'applied step had a finite loss and gradient (is train.lr too large?); not '
                      f'saving it, the newest checkpoint in {self.directory} is '
                      f'{self._manager.latest_step()}')
    return self._manager.save(int(step), args=ocp.args.StandardSave(state), force=force)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def restore_latest(self, abstract_state: Any) -> Tuple[Optional[Any], Optional[int]]:
    """(state, step) of the newest checkpoint that restores, or (None, None) when there is none.

    Raises UserError when checkpoints exist but none of them restores.
    """
    failed: List[Tuple[int, str]] = []
    for step in sorted(self.all_steps(), reverse=True):
      path = os.path.join(self.directory, str(step))
      try:
        state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        if not all_finite(state):
          raise ValueError('non-finite values in the restored state')
      except Exception as e:  # pylint: disable=broad-except
        failed.append((step, _first_line(e)))
        logging.warning('checkpoint %s is unreadable (%s); trying the previous one', path,
                        failed[-1][1])
        self._reopen()  # a failed restore can leave the manager's cached view of the items wrong
        continue
      if failed:
        logging.warning('falling back to checkpoint %s: the newer ones are unreadable', path)
        if self._owner:
          self._move_aside([s for s, _ in failed])
      return state, step
    if failed:
      raise UserError(
          f'{self.directory}: no checkpoint restores ('
          + '; '.join(f'{s}: {why}' for s, why in failed)
          + '); nothing was moved or deleted: repair them, or move them away to start over')
    return None, None

  def _move_aside(self, steps: List[int]) -> None:
    """Renames unreadable step folders to `<step>.corrupt-<n>`, so new saves of those steps and
    orbax's max_to_keep never see them; the files stay for inspection."""
    if jax.process_index() == 0:
      for step in steps:
        path = os.path.join(self.directory, str(step))
        n = 0
        while os.path.exists(f'{path}.corrupt-{n}'):
          n += 1
        os.rename(path, f'{path}.corrupt-{n}')
        logging.warning('moved the unreadable checkpoint %s to %s', path, f'{path}.corrupt-{n}')
    parallel.barrier('checkpoint: moved aside')  # no process lists the old folders again
    self._reopen()  # the manager caches its step list; a fresh one sees the moved steps gone

  def _reopen(self) -> None:
    self._manager.close()
    self._manager = self._new_manager()
