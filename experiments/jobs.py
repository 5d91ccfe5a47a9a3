"""A resumable queue of main.py commands, shared by the experiments (evidence.py, resolution.py).

A job whose `done` file exists is skipped, and a training resumes from its checkpoint, so rerunning
the same experiment continues where it stopped. Each finished job's wall and CPU seconds (of this
attempt; a resumed job adds to them) go to LOGS/times.json.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

from absl import logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Job(NamedTuple):
  name: str
  done: str  # this file exists once the job has finished
  args: Callable[[], List[str]]  # main.py arguments, built when the job starts (reads its inputs)
  deps: Sequence[str] = ()  # `done` files of the jobs that must finish first
  prepare: Optional[Callable[[], None]] = None


def copy_of_checkpoint(checkpoint: str, view: str) -> Callable[[], None]:
  """A job's prepare: the folder `view` gets a copy of the checkpoint folder `checkpoint` (step
  S -> view/checkpoints/S), so that a mode run there, which reads the newest checkpoint, sees it
  and writes its files apart from the training run."""
  def prepare():
    target = os.path.join(view, 'checkpoints', os.path.basename(checkpoint))
    if not os.path.exists(target):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.copytree(checkpoint, target + '.tmp')
      os.rename(target + '.tmp', target)
  return prepare


def xla_env(threads: int) -> Dict[str, str]:
  """The environment of a job on `threads` CPU threads."""
  multi = 'true' if threads > 1 else 'false'
  flags = (f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen={multi} "
           f'intra_op_parallelism_threads={threads}')
  return dict(os.environ, XLA_FLAGS=flags.strip())


def read_times(logs: str) -> Dict[str, Dict[str, float]]:
  """Job name -> {'wall_s', 'cpu_s'} summed over its attempts."""
  path = os.path.join(logs, 'times.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def _add_time(logs: str, name: str, wall: float, cpu: float) -> None:
  times = read_times(logs)
  entry = times.setdefault(name, {'wall_s': 0.0, 'cpu_s': 0.0})
  entry['wall_s'] += wall
  entry['cpu_s'] += cpu
  with open(os.path.join(logs, 'times.json.tmp'), 'w') as f:
    json.dump(times, f, indent=1)
  os.replace(os.path.join(logs, 'times.json.tmp'), os.path.join(logs, 'times.json'))


def _start(job: Job, logs: str, env) -> subprocess.Popen:
  if job.prepare:
    job.prepare()
  log = os.path.join(logs, job.name.replace(' ', '_').replace('/', '-') + '.log')
  logging.info('start %s (log %s)', job.name, log)
  with open(log, 'a') as out:
    return subprocess.Popen([sys.executable, 'main.py', *job.args()], stdout=out,
                            stderr=subprocess.STDOUT, env=env, cwd=REPO)


def _finished(proc: subprocess.Popen):
  """(exit code, CPU seconds) once the process has ended, else None; wait4 gives its own rusage."""
  pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
  if pid == 0:
    return None
  proc.returncode = os.waitstatus_to_exitcode(status)
  return proc.returncode, usage.ru_utime + usage.ru_stime


def run_jobs(jobs: List[Job], logs: str, workers: int, threads: int) -> None:
  """Runs the jobs in list order as their dependencies allow, `workers` at a time on `threads`
  threads each; a failed job's dependants are skipped (rerun after fixing the cause)."""
  env = xla_env(threads)
  os.makedirs(logs, exist_ok=True)
  pending = [j for j in jobs if not os.path.exists(j.done)]
  failed, running = [], {}
  logging.info('%d of %d jobs to run', len(pending), len(jobs))
  while pending or running:
    for job, (proc, started) in list(running.items()):
      ended = _finished(proc)
      if ended is None:
        continue
      del running[job]
      (code, cpu), wall = ended, time.time() - started
      _add_time(logs, job.name, wall, cpu)
      ok = code == 0 and os.path.exists(job.done)
      logging.info('%s %s after %.0f s (%.0f CPU s)', 'done' if ok else f'FAILED (rc {code})',
                   job.name, wall, cpu)
      if not ok:
        failed.append(job.done)
    blocked = [j for j in pending if any(d in failed for d in j.deps)]
    for job in blocked:
      logging.warning('skipping %s: a job it needs failed', job.name)
      failed.append(job.done)
    pending = [j for j in pending if j not in blocked]
    ready = [j for j in pending if all(os.path.exists(d) for d in j.deps)]
    while ready and len(running) < workers:
      job = ready.pop(0)
      pending.remove(job)
      running[job] = (_start(job, logs, env), time.time())
    if not ready and not running and pending:
      raise RuntimeError(f'{len(pending)} jobs wait for outputs no job makes: {pending[0].name}')
    time.sleep(2)
  if failed:
    raise SystemExit(f'{len(failed)} jobs failed or were skipped; see {logs}')
