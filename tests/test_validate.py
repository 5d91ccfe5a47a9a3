"""Config checks before any compute: each bad field is a one-line UserError naming it."""

import json

import pytest

from configs import common, mpdd, mvtec
from configs.cpu import common as cpu_common
from configs.cpu import pill as cpu_pill
from configs.default import get_default_config
from esm import config as config_lib
from esm import validate, workdir
from esm.errors import UserError


def check(config_dict, mode):
  """What the entry does before any compute: type every section, then the checks across them."""
  validate.validate_config(config_lib.from_configdict(config_dict), mode)


@pytest.mark.parametrize('field, value, match', [
    ('sampling.t_d', 1001, 'sampling.t_d'),
    ('sampling.t_d', 0, 'sampling.t_d'),
    ('sampling.method', 'ddim', 'sampling.method'),
    ('sampling.sigma_time', 'late', 'sampling.sigma_time'),
    ('detect.weights', (1.0, 1.0, 1.0), 'detect.weights: expected 4'),
    ('data.dataset', 'imagenet', 'data.dataset'),
    ('data.image_size', 100, 'not divisible'),
    ('train.batch_size', 0, 'train.batch_size'),
    ('loss.kind', 'vlb', 'loss.kind'),
])
def test_bad_field_is_named(field, value, match):
  c = common.override(get_default_config(), {field: value})
  with pytest.raises(UserError, match=match) as e:
    check(c, 'train_eval')
  assert '\n' not in str(e.value)


def test_unknown_mode_and_category():
  with pytest.raises(UserError, match='--mode'):
    check(get_default_config(), 'fit')
  with pytest.raises(UserError, match="unknown mpdd category 'tube'.*tubes"):
    check(mpdd.get_config('tube'), 'train')
  check(mvtec.get_config('bottle'), 'train')
  check(mvtec.get_config(), 'train')  # all categories


def test_esm_sampling_needs_a_dual_stream_model():
  c = get_default_config()
  c.loss.kind = 'dsm'
  with pytest.raises(UserError, match="needs a dual-stream model"):
    check(c, 'eval')
  c.sampling.method = 'sgm'
  check(c, 'eval')


def test_paper_t_d_tables():
  assert mvtec.get_config('bottle').sampling.t_d == 100
  assert mvtec.get_config('wood').sampling.t_d == 20
  assert mpdd.get_config('metal_plate').sampling.t_d == 50
  assert len(mvtec.T_D) == 15 and len(mpdd.T_D) == 6


def test_checkpoint_from_a_different_model_is_refused(tmp_path):
  saved = json.loads(get_default_config().to_json_best_effort())
  c = get_default_config()
  c.model.ch = 64
  c.model.var_param = 'direct'
  with pytest.raises(UserError, match='model.ch, model.var_param'):
    validate.check_checkpoint_compatible(saved, config_lib.from_configdict(c), str(tmp_path))
  c = get_default_config()
  c.model.dropout = 0.3  # does not change the parameters
  c.train.lr = 1.0
  validate.check_checkpoint_compatible(saved, config_lib.from_configdict(c), str(tmp_path))


def test_builders_offer_every_catalogue_category():
  from datasets import catalog, mpdd as mpdd_builder, mvtec_ad, visa  # pylint: disable=g-import-not-at-top
  for builder, dataset in ((mvtec_ad.MvtecAd, 'mvtec_ad'), (visa.Visa, 'visa'),
                           (mpdd_builder.Mpdd, 'mpdd')):
    assert [c.name for c in builder.BUILDER_CONFIGS] == list(catalog.categories(dataset))


def test_override_refuses_an_unknown_field():
  c = common.override(get_default_config(), {'train.lr': 0.5, 'eval.batch_size': 4})
  assert (c.train.lr, c.eval.batch_size) == (0.5, 4)
  with pytest.raises(KeyError, match='train.num_step'):
    common.override(c, {'train.num_step': 5})


def test_saved_configs_with_renamed_fields_still_load(tmp_path, caplog):
  old = json.loads(get_default_config().to_json_best_effort())
  old['sampling']['batch_size'] = old['eval'].pop('batch_size')
  old['sampling']['min_var'] = old['sampling'].pop('sigma_min_var')
  old['sampling']['max_var'] = old['sampling'].pop('sigma_max_var')
  (tmp_path / 'config.json').write_text(json.dumps(old))
  loaded = workdir.load_saved_config(str(tmp_path))
  assert loaded == json.loads(get_default_config().to_json_best_effort())
  assert sum('deprecated' in r.message for r in caplog.records) == 3


def test_workdirs_written_before_the_scan_layouts_and_the_image_score_stay_compatible(tmp_path):
  old = config_lib.to_dict(config_lib.from_configdict(get_default_config()))
  for section, field in (('model', 'scan_streams'), ('model', 'scan_blocks'),
                         ('train', 'compiler_options'), ('detect', 'image_score')):
    del old[section][field]
  (tmp_path / 'config.json').write_text(json.dumps(old))
  saved = workdir.load_saved_config(str(tmp_path))
  assert config_lib.from_dict(saved).detect.image_score == 'map'  # every field is there again
  validate.check_checkpoint_compatible(saved, config_lib.from_configdict(get_default_config()),
                                       str(tmp_path))
  c = get_default_config()
  c.model.scan_streams = True  # another parameter tree: refused until converted (convert_state)
  with pytest.raises(UserError, match='model.scan_streams'):
    validate.check_checkpoint_compatible(saved, config_lib.from_configdict(c), str(tmp_path))


def test_cpu_scale_default_is_the_dsm_model_at_one_t_d_for_every_category():
  for c in (cpu_pill.get_config(), cpu_common.get_config('mvtec_ad/screw'),
            cpu_common.get_config('visa/candle')):
    check(c, 'train_eval')
    assert (c.loss.kind, c.sampling.method, c.sampling.t_d) == ('dsm', 'sgm', cpu_common.T_D)
    assert c.detect.image_detectors == ('re',) and c.detect.weights == (0.5, 1.0, 1.0, 1.0)
    assert (c.data.image_size, c.model.attn_resolutions) == (64, (16,))
  with pytest.raises(ValueError, match='DATASET/CATEGORY'):
    cpu_common.get_config('screw')


def test_cpu_model_attends_at_its_last_level_at_any_size():
  for size in (48, 96):  # the U-Net halves the side twice: ch_mult (1, 2, 2)
    c = cpu_common.cpu_config('mvtec_ad', 'bottle', image_size=size)
    check(c, 'train_eval')
    assert (c.data.image_size, c.model.attn_resolutions) == (size, (size // 4,))
