"""The machine a benchmark ran on, as the first line of its output: the CPU model, the ISA
extensions that decide XLA:CPU's and PyTorch's kernels (AVX2, AVX-512 and its subsets, AMX), the
cores this process may use, and the XLA flags in effect. Figures without it cannot be compared."""

import os
import platform

# The ISA extensions that change which kernels a CPU runs, as /proc/cpuinfo names them.
ISA_FLAGS = ('avx2', 'fma', 'avx512f', 'avx512bw', 'avx512vl', 'avx512_vnni', 'avx512_bf16',
             'amx_tile', 'amx_bf16', 'amx_int8')


def _cpuinfo() -> dict:
  """model name and flags of the first CPU in /proc/cpuinfo ({} off Linux)."""
  try:
    with open('/proc/cpuinfo') as f:
      text = f.read()
  except OSError:
    return {}
  out = {}
  for line in text.splitlines():
    key, _, value = line.partition(':')
    key = key.strip()
    if key in ('model name', 'flags') and key not in out:
      out[key] = value.strip()
  return out


def header() -> str:
  """One markdown line: CPU, ISA extensions, usable cores, XLA_FLAGS."""
  info = _cpuinfo()
  flags = set(info.get('flags', '').split())
  isa = [f for f in ISA_FLAGS if f in flags]
  missing = [name for name, prefix in (('AVX-512', 'avx512f'), ('AMX', 'amx_tile'))
             if prefix not in flags]
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  cpu = info.get('model name') or platform.processor() or platform.machine()
  return (f'machine: {cpu}; ISA {" ".join(isa) or "unknown"}'
          f'{"; no " + ", no ".join(missing) if missing and flags else ""}; '
          f'{cores} of {os.cpu_count()} cores usable; '
          f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "") or "(none)"}')
