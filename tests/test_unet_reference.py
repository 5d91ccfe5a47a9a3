"""The U-Net is a fixed function: parameter tree, initialisation and outputs against stored values.

tests/data/unet_reference.npz was written by the U-Net of commit dd5c0b8, before its CPU speed work
(`python3 tests/test_unet_reference.py --write`, commit 'tests: stored U-Net reference'). Every
later rewrite of esm/models/layers.py or unet.py must reproduce it: the same parameter names and
shapes (old checkpoints load), the same initial values, and outputs equal to 1e-5 on fixed
parameters and inputs. The parameters are regenerated from a seed, not stored: every leaf is a
deterministic normal draw (the initialised model is the zero function, its output convs are zero).
"""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if __name__ == '__main__' and len(sys.argv) > 2 and sys.argv[2].startswith('--src='):
  sys.path.insert(0, sys.argv[2][len('--src='):])

from esm.models.unet import UNet, UNetConfig  # pylint: disable=wrong-import-position

GRAD_CASES = ('tiny', 'cpu48')
PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'unet_reference.npz')

TINY = UNetConfig(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), num_groups=8,
                  dropout=0.1)
# name: (config, image size, batch). The two ddpm cases cover the separate Upsample/Downsample
# modules in the forward pass; gradients are checked on the biggan cases (tiny, cpu48), whose
# blocks resample with the same functions.
CASES = {
    'tiny': (TINY, 16, 2),
    'tiny_ddpm_conv': (dataclasses.replace(TINY, resblock_type='ddpm'), 16, 2),
    'tiny_ddpm_pool': (dataclasses.replace(TINY, resblock_type='ddpm', resamp_with_conv=False,
                                           num_groups=32, ch=12), 16, 2),
    # configs/cpu/common.py: the CPU-scale study model
    'cpu48': (UNetConfig(ch=16, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(12,),
                         num_groups=8, dropout=0.0), 48, 2),
}


def _paths(tree):
  return ['/'.join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _random_params(shapes, seed: int):
  """Every leaf drawn from a normal: kernels scaled by 1/sqrt(fan-in), GroupNorm scales around 1."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  out = []
  for i, (path, s) in enumerate(leaves):
    name = path[-1].key
    z = np.random.default_rng([seed, i]).standard_normal(s.shape).astype(np.float32)
    if name == 'kernel':
      out.append(z / np.sqrt(np.prod(s.shape[:-1])))
    elif name == 'scale':
      out.append(1.0 + 0.2 * z)
    else:
      out.append(0.2 * z)
  return jax.tree_util.tree_unflatten(treedef, out)


def _inputs(size: int, batch: int):
  x = np.random.default_rng(11).standard_normal((batch, size, size, 3)).astype(np.float32)
  t = np.linspace(0.05, 0.95, batch, dtype=np.float32)
  return x, t


def compute(name):
  """{key: array} for one case, from the U-Net as the code now defines it."""
  cfg, size, batch = CASES[name]
  model = UNet(cfg)
  x, t = _inputs(size, batch)
  init = jax.jit(lambda r: model.init({'params': r}, x[:1], t[:1], False)['params'])
  shapes = jax.eval_shape(init, jax.random.key(0))
  out = {f'{name}/paths': np.array(_paths(shapes)),
         f'{name}/shapes': np.array([str(tuple(s.shape)) for s in jax.tree.leaves(shapes)])}
  if name == 'tiny':  # the initial values, by leaf (cheap at this size)
    init_params = init(jax.random.key(0))
    out[f'{name}/init_sums'] = np.array([np.sum(np.asarray(p), dtype=np.float64) for p in jax.tree.leaves(init_params)])
    out[f'{name}/init_abs'] = np.array([np.sum(np.abs(np.asarray(p)), dtype=np.float64)
                                        for p in jax.tree.leaves(init_params)])
  params = _random_params(shapes, seed=5)
  # One compilation: the eval-mode output, the train-mode output and, for the gradients, a fixed
  # linear function of the train-mode output, each gradient leaf (and the input's) projected on a
  # fixed random direction: one number per leaf is enough to see a wrong gradient.
  w = np.random.default_rng(13).standard_normal((batch, size, size, cfg.out_ch)).astype(np.float32)

  grads = name in GRAD_CASES

  def run(p, x, t, r):
    y_eval = model.apply({'params': p}, x, t, False)
    train = lambda p, x: model.apply({'params': p}, x, t, True, rngs={'dropout': r})
    if not grads:
      return y_eval, train(p, x), None
    y_train, vjp = jax.vjp(train, p, x)
    return y_eval, y_train, vjp(jnp.asarray(w))

  y_eval, y_train, g = jax.jit(run)(params, x, t, jax.random.key(7))
  out[f'{name}/eval'] = np.asarray(y_eval)
  out[f'{name}/train'] = np.asarray(y_train)
  if not grads:
    return out
  gp, gx = g
  leaves = jax.tree.leaves(gp) + [gx]
  out[f'{name}/grad_proj'] = np.array([
      np.sum(np.asarray(g, np.float64) * np.random.default_rng([17, i]).standard_normal(g.shape))
      for i, g in enumerate(leaves)])
  out[f'{name}/grad_norm'] = np.array([np.linalg.norm(np.asarray(g, np.float64)) for g in leaves])
  return out


@pytest.fixture(scope='module')
def stored():
  return dict(np.load(PATH))


@pytest.mark.slow
@pytest.mark.parametrize('name', sorted(CASES))
def test_unet_matches_stored_reference(stored, name):
  got = compute(name)
  assert list(got[f'{name}/paths']) == list(stored[f'{name}/paths']), 'parameter names changed'
  assert list(got[f'{name}/shapes']) == list(stored[f'{name}/shapes']), 'parameter shapes changed'
  for key in ('init_sums', 'init_abs'):
    if f'{name}/{key}' in stored:
      np.testing.assert_allclose(got[f'{name}/{key}'], stored[f'{name}/{key}'], rtol=1e-5, atol=1e-5)
  for key in ('eval', 'train'):
    ref = stored[f'{name}/{key}']
    assert np.abs(ref).max() > 0.1  # a non-trivial reference
    np.testing.assert_allclose(got[f'{name}/{key}'], ref, rtol=0, atol=1e-5)
  if name not in GRAD_CASES:
    return
  # Gradients: equal up to float32 rounding, relative to each leaf's gradient norm.
  norm = stored[f'{name}/grad_norm']
  atol = 1e-6 * norm.max()  # some leaves' gradients are 0 but for rounding (a bias before a norm)
  np.testing.assert_allclose(got[f'{name}/grad_norm'], norm, rtol=1e-4, atol=atol)
  np.testing.assert_array_less(np.abs(got[f'{name}/grad_proj'] - stored[f'{name}/grad_proj']),
                               1e-4 * norm + atol)


if __name__ == '__main__':
  # --src=DIR: the source tree whose U-Net writes the reference (the stored reference was
  # written by the tree of commit dd5c0b8, unpacked with `git archive dd5c0b8 | tar -x -C DIR`).
  if not sys.argv[1:] or sys.argv[1] != '--write':
    sys.exit('usage: python3 tests/test_unet_reference.py --write [--src=DIR]  (overwrites the '
             'stored reference)')
  arrays = {}
  for case in CASES:
    arrays.update(compute(case))
    print(case, {k: v.shape for k, v in arrays.items() if k.startswith(case + '/')},
          'max |eval|', float(np.abs(arrays[case + '/eval']).max()))
  os.makedirs(os.path.dirname(PATH), exist_ok=True)
  np.savez_compressed(PATH, **arrays)
  print('wrote', PATH, os.path.getsize(PATH), 'bytes')
