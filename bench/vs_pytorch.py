"""Train-step speed of our U-Net against diffusers' UNet2DModel (PyTorch) at the same shape, on CPU.

  python3 -m pip install -r requirements-bench.txt   # torch + diffusers, for this script only
  python3 bench/vs_pytorch.py [--cases=a,b] [--rounds=2] [--steps=10] [--threads=2] [--esm]
                              [--no_torch] [--xla_own]
  python3 bench/vs_pytorch.py --profile=a [--steps=5]
  python3 bench/vs_pytorch.py --compile_paper=1

Each measurement runs in its own subprocess (one framework per process, `--threads` threads), and
the frameworks alternate within each round, so machine noise hits both alike. A measurement is the
median of `--steps` timed train steps after warm-up. Both sides run the same step: DSM loss on a
noised batch (uniform integer time, linear β schedule), backward, global-norm clipping at 1, Adam,
and an EMA update of the parameters. Ours is the project's own train step (esm/train.py, state
donated and XLA options as in training; bench/jax_train_step.py); theirs is a plain PyTorch loop
around UNet2DModel (bench/diffusers_train_step.py). Our process is set up as main.py sets it up:
glibc's malloc keeps freed memory for reuse (esm/host_memory.py).

--xla_own adds ours compiled with XLA's own options, beside the train step's. --esm adds the
CPU-scale study step (configs/cpu/common.py model, 48², batch 16): the dual-stream ESM step against
the single-stream DSM step of the same U-Net, ours only. Prints one table; without torch the
diffusers columns are skipped with a message (exit 0). To compare with an older tree, check it out
and run that tree's own bench.
"""

import json
import os
import statistics
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags

from bench import jax_train_step
from bench import machine
from bench.train_step_cases import CASES
# pylint: enable=g-import-not-at-top,wrong-import-position

_CASES = flags.DEFINE_list('cases', ['a', 'b'], f'Cases to time, of {sorted(CASES)}.')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Rounds; the frameworks alternate within each.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps per measurement (median).')
_THREADS = flags.DEFINE_integer('threads', 2, 'Threads of each worker process.')
_ESM = flags.DEFINE_boolean('esm', False, 'Also the CPU-scale study step, dual against single '
                            'stream (ours only).')
_ESM_VMAP = flags.DEFINE_boolean('esm_vmap', False, 'with --esm: also the dual step with the '
                                 'streams as one vmapped U-Net')
_NO_TORCH = flags.DEFINE_boolean('no_torch', False, 'JAX rows only')
_XLA_OWN = flags.DEFINE_boolean('xla_own', False, "also ours compiled with XLA's own options "
                                'instead of the train step\'s (esm.train.step_compiler_options)')
_PIN = flags.DEFINE_string('pin', '', 'taskset CPU list for every worker, e.g. 1 (with '
                           '--threads=1): on a shared machine, compare CPU time per step instead '
                           'of wall')
_PROFILE = flags.DEFINE_string('profile', '', 'instead: per-part time of one case, ours vs theirs')
_COMPILE_PAPER = flags.DEFINE_integer('compile_paper', 0, 'instead: time lowering and compiling '
                                      'the paper-scale step at this batch')
_WORKER = flags.DEFINE_string('worker', '', 'Internal: run one measurement and print its RESULT.')
_CASE = flags.DEFINE_string('case', '', "Internal: the worker's case.")

ESM_LABELS = {'dsm48': 'single stream (DSM)', 'esm48': 'dual stream (ESM)',
              'esm48v': 'dual stream (ESM), streams vmapped (bench only)'}


def worker_result(kind: str, case: str, steps: int, threads: int) -> dict:
  """One measurement, in this process (a worker started by _run_worker)."""
  if kind in ('torch', 'torch_profile'):
    from bench import diffusers_train_step  # optional dependency: torch, diffusers
    run = (diffusers_train_step.torch_worker if kind == 'torch' else
           diffusers_train_step.torch_profile_worker)
    return run(case, steps, threads)
  if kind == 'jax_profile':
    return jax_train_step.jax_profile_worker(case, steps)
  if kind == 'compile':
    return jax_train_step.compile_worker(case)
  return jax_train_step.jax_worker(case, steps, xla_own=kind == 'jax_xla_own')


def _run_worker(kind: str, case: str, steps: int, threads: int) -> dict:
  env = dict(os.environ)
  # Thread counts of the child process only.
  env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={kind}', f'--case={case}',
         f'--steps={steps}', f'--threads={threads}']
  if _PIN.value:  # every worker on the same single core: CPU time per step is robust to other load
    cmd = ['taskset', '-c', _PIN.value] + cmd
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False, cwd=REPO)
  lines = [l for l in out.stdout.splitlines() if l.startswith('RESULT ')]
  if out.returncode or not lines:
    sys.stderr.write(out.stdout[-3000:] + out.stderr[-3000:])
    raise RuntimeError(f'{kind} worker for case {case} failed (exit {out.returncode})')
  return json.loads(lines[-1][len('RESULT '):])


def _have_torch() -> bool:
  probe = subprocess.run([sys.executable, '-c', 'import torch, diffusers'], capture_output=True,
                         check=False)
  return probe.returncode == 0


# -------------------------------------------------------------------------- profile and compile --

def profile_table(case: str) -> None:
  """Per-part time of one case's step, ours against diffusers'."""
  kinds = [('ours', 'jax_profile')] + (
      [('diffusers', 'torch_profile')] if not _NO_TORCH.value and _have_torch() else [])
  res = {k: _run_worker(w, case, _STEPS.value, _THREADS.value) for k, w in kinds}
  cats = sorted({c for r in res.values() for c in r['ms']},
                key=lambda c: -max(r['ms'].get(c, 0) for r in res.values()))
  print(f'# where the time goes, case {case} ({" ".join(map(str, CASES[case]))}); '
        f'ms per step, {_STEPS.value} profiled steps; {time.strftime("%Y-%m-%d %H:%M")}')
  print('| part | ' + ' | '.join(f'{k} ms (share)' for k in res) + ' |')
  print('|---|' + '---|' * len(res))
  for c in cats:
    cells = []
    for r in res.values():
      v, tot = r['ms'].get(c), sum(r['ms'].values())
      cells.append(f'{v:.1f} ({v / tot:.0%})' if v else '')
    print(f'| {c} | ' + ' | '.join(cells) + ' |')
  print('| sum of op times | ' + ' | '.join(f"{sum(r['ms'].values()):.1f}" for r in res.values()) +
        ' |')
  print('| wall time per profiled step | ' +
        ' | '.join(f"{r['wall_ms']:.1f}" for r in res.values()) + ' |')


def compile_table(batch: int) -> None:
  """Lowering and compilation time of the paper-scale step."""
  res = _run_worker('compile', str(batch), 0, _THREADS.value)
  print(f'# ours: {res}', file=sys.stderr, flush=True)
  print(f'# paper-scale ESM train step (configs/default.py, 256², batch {batch}), '
        f'XLA:CPU; {time.strftime("%Y-%m-%d %H:%M")}')
  print('| tree | lowering (s) | compilation (s) | HLO instructions after optimisation |')
  print('|---|---|---|---|')
  print(f"| ours | {res['lower_s']:.1f} | {res['compile_s']:.1f} | {res['hlo_ops']} |")


# ------------------------------------------------------------------------------------ speed runs --

def run_rounds(jobs) -> dict:
  """{(case, kind): [one result per round]}, the jobs alternating in order between rounds."""
  results = {}
  for r in range(_ROUNDS.value):
    # Alternate the order between rounds as well: ours first in even rounds, theirs first in odd.
    order = jobs if r % 2 == 0 else list(reversed(jobs))
    for case, kind in order:
      worker = {'torch': 'torch', 'xla_own': 'jax_xla_own'}.get(kind, 'jax')
      res = _run_worker(worker, case, _STEPS.value, _THREADS.value)
      res['img_s'] = res['batch'] / statistics.median(res['times'])
      res['img_cpu_s'] = res['batch'] / statistics.median(res['cpu'])  # images per CPU second
      res['load'] = os.getloadavg()[0]  # the machine's 1-minute load average after the run
      results.setdefault((case, kind), []).append(res)
      print(f'# round {r}: {case} {kind}: {res["img_s"]:.2f} img/s (load {res["load"]:.1f})',
            file=sys.stderr, flush=True)
  return results


def _median(rs, key: str = 'img_s') -> float:
  return statistics.median([x[key] for x in rs])


def _per_round(rs) -> str:
  return ', '.join(f"{x['img_s']:.2f}" for x in rs)


def _case_name(case: str) -> str:
  size, batch, ch, mult, blocks, attn, groups = CASES[case]
  return (f'{size}², batch {batch}, ch {ch}, mult {mult}, {blocks} block(s), attention at '
          f'{attn}², groups {groups}')


def print_speed_tables(cases, results, torch_ok: bool) -> None:
  """Images per second per round and their ratio, then the same as images per CPU-second."""
  versions = next((rs[0]['versions'] for (_, k), rs in results.items() if k == 'torch'), '')
  loads = [x['load'] for rs in results.values() for x in rs]
  print(f'# train step, DSM loss + clip + Adam + EMA; {_THREADS.value} threads, '
        f'{os.cpu_count()} cores; {_ROUNDS.value} rounds x median of {_STEPS.value} steps; '
        f'{versions}; {time.strftime("%Y-%m-%d %H:%M")}; '
        f'load average {min(loads):.1f}-{max(loads):.1f}')
  head = '| case | params ours / theirs | ours img/s |'
  if torch_ok:
    head += ' diffusers img/s | ours / diffusers |'
  print(head)
  print('|' + '---|' * (head.count('|') - 1))
  for c in cases:
    ours, theirs = results[(c, 'ours')], results.get((c, 'torch'))
    their_params = f"{theirs[0]['params'] / 1e6:.2f} M" if theirs else '-'
    row = f"| {_case_name(c)} | {ours[0]['params'] / 1e6:.2f} M / {their_params} | {_per_round(ours)} |"
    if theirs:
      row += f' {_per_round(theirs)} | {_median(ours) / _median(theirs):.2f} |'
    print(row)
  print('\nThe same measurements as images per CPU-second of the process (less sensitive to other '
        'load):')
  print('| case | ours | diffusers | ours / diffusers |')
  print('|---|---|---|---|')
  for c in cases:
    ours, theirs = results[(c, 'ours')], results.get((c, 'torch'))
    cell = f"{_median(theirs, 'img_cpu_s'):.2f}" if theirs else ''
    ratio = (f"{_median(ours, 'img_cpu_s') / _median(theirs, 'img_cpu_s'):.2f}" if theirs else '')
    print(f"| {_case_name(c)} | {_median(ours, 'img_cpu_s'):.2f} | {cell} | {ratio} |")


def print_esm_table(esm_cases, results) -> None:
  """The CPU-scale study step: single against dual stream."""
  print('\n| CPU-scale study step (48², batch 16) | ours img/s |')
  print('|---|---|')
  for c in esm_cases:
    print(f'| {ESM_LABELS[c]} | {_per_round(results[(c, "ours")])} |')
  for c in esm_cases[1:]:
    ratio = _median(results[('dsm48', 'ours')]) / _median(results[(c, 'ours')])
    print(f'ours: {ESM_LABELS[c]} step time / single-stream step time = {ratio:.2f}')


def print_xla_own_table(cases, results) -> None:
  """Ours with the train step's XLA options against ours with XLA's own."""
  print("\nOurs with the train step's XLA options (esm.train.step_compiler_options) against XLA's "
        'own, images per CPU-second:')
  print("| case | XLA's own | train step's | train step's / XLA's own |")
  print('|---|---|---|---|')
  for c in cases:
    own = _median(results[(c, 'xla_own')], 'img_cpu_s')
    ours = _median(results[(c, 'ours')], 'img_cpu_s')
    print(f'| {c} | {own:.2f} | {ours:.2f} | {ours / own:.2f} |')


def print_fault_table(results) -> None:
  print('\nKernel time and minor page faults per timed step (median over rounds):')
  print('| case | tree | kernel ms per step | minor page faults per step |')
  print('|---|---|---|---|')
  for (c, kind), rs in results.items():
    print(f"| {c} | {'diffusers' if kind == 'torch' else kind} | "
          f"{statistics.median(x['sys_s'] for x in rs) * 1e3:.1f} | "
          f"{statistics.median(x['minflt'] for x in rs):.0f} |")


def speed_tables() -> None:
  torch_ok = not _NO_TORCH.value and _have_torch()
  if not torch_ok and not _NO_TORCH.value:
    print('torch and diffusers are not installed (pip install -r requirements-bench.txt): '
          'skipping the diffusers columns.')
  cases = _CASES.value
  jobs = [(c, 'ours') for c in cases] + ([(c, 'torch') for c in cases] if torch_ok else [])
  if _XLA_OWN.value:
    jobs += [(c, 'xla_own') for c in cases]
  esm_cases = ('dsm48', 'esm48') + (('esm48v',) if _ESM_VMAP.value else ())
  if _ESM.value:
    jobs += [(c, 'ours') for c in esm_cases]
  results = run_rounds(jobs)
  print_speed_tables(cases, results, torch_ok)
  if _ESM.value:
    print_esm_table(esm_cases, results)
  if _XLA_OWN.value:
    print_xla_own_table(cases, results)
  print_fault_table(results)


def main(argv):
  del argv
  if _WORKER.value:
    res = worker_result(_WORKER.value, _CASE.value, _STEPS.value, _THREADS.value)
    print('RESULT ' + json.dumps(res), flush=True)
    return
  print(machine.header(), flush=True)
  if _PROFILE.value:
    profile_table(_PROFILE.value)
  elif _COMPILE_PAPER.value:
    compile_table(_COMPILE_PAPER.value)
  else:
    speed_tables()


if __name__ == '__main__':
  app.run(main)
