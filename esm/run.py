"""The entry below main.py: the config file's ConfigDict is typed here, then each category of it
runs the requested modes. MODES maps a mode's name to its function `fn(config, workdir)`; the modes
are siblings and never import each other. train_eval is train, then tune when tune.enabled says so,
then eval; the modes that score images use DIR/tuned.json's choice (esm/tuned.py)."""

import os
from typing import Any, List, Tuple

import jax
from absl import logging

from datasets import catalog
from datasets import folder
from datasets import pipeline
from esm import config as config_lib
from esm import detector_state
from esm import evaluate
from esm import exporter
from esm import parallel
from esm import predict
from esm import report
from esm import scoring
from esm import train
from esm import tune
from esm import tuned as tuned_lib
from esm import validate
from esm import workdir as workdir_lib
from esm.config import Config
from esm.errors import UserError

MODES = {'train': train.train, 'tune': tune.tune, 'eval': evaluate.evaluate,
         'predict': predict.predict, 'export': exporter.export}
SCORING_MODES = ('eval', 'predict', 'export')  # these score with DIR/tuned.json's choice
STATE_READERS = ('predict', 'export')  # these read DIR/detector.json (predict.refit re-fits it)


def mode_steps(mode: str, config: Config) -> List[str]:
  """The modes `mode` runs, in order; the one place that decides whether train_eval tunes."""
  if mode == 'train_eval':
    return ['train'] + (['tune'] if config.tune.is_enabled(config.data.dataset) else []) + ['eval']
  return [mode]


def categories(config) -> list:
  """The categories a config names: one, or every category of the dataset for 'all', each of which
  must be present under data.root (checked before anything is computed or written)."""
  data = config.data
  if data.category != 'all':
    return [data.category]
  names = list(pipeline.category_names(data.dataset, data.root))
  if data.dataset in catalog.BENCHMARKS:
    if not data.root or not os.path.isdir(data.root):
      raise UserError(f"data.root={data.root!r}: data.category='all' needs the folder that holds "
                      f'the {data.dataset} category folders')
    missing = [c for c in names if not os.path.isdir(os.path.join(data.root, c))]
    if missing:
      raise UserError(f"data.category='all': {len(missing)} of the {len(names)} {data.dataset} "
                      f'categories are missing under {data.root}: {", ".join(missing)}; add them, '
                      'or name one category')
  if not names:
    raise UserError(f"data.category='all': no category folder with train/{folder.GOOD} under "
                    f'{data.root}')
  return names


def category_config(config: Config, category: str) -> Config:
  """config for one category, with that category's T_d from the dataset's table."""
  changes = {'data.category': category}
  if category in config.sampling.t_d_by_category:
    changes['sampling.t_d'] = config.sampling.t_d_by_category[category]
  return config_lib.with_fields(config, changes)


def prepare_data_on_main_process_first(config) -> None:
  """In a multi-process run, process 0 prepares the dataset while the others wait: on a shared
  disk no two processes then write the same cache folder (each process reads it afterwards)."""
  if jax.process_count() == 1:
    return
  if parallel.is_main_process():
    pipeline.prepare_dataset(config.data)
  parallel.barrier('dataset prepared')


def enable_compilation_cache(path: str) -> None:
  """jax's persistent compilation cache in `path` ('' = off), so that a rerun skips compiling;
  a cache folder already set (JAX_COMPILATION_CACHE_DIR, a test session) is kept."""
  if path and not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', path)


def refit_state(config: Config, workdir: str) -> None:
  """predict.refit: DIR/detector.json fitted anew, with these flags, on the held-out images."""
  logging.warning('predict.refit: re-fitting the normalisation and thresholds of %s on the '
                  'held-out images of %s/%s', workdir, config.data.dataset, config.data.category)
  validate.check_checkpoint_compatible(workdir_lib.load_saved_config(workdir), config, workdir)
  scorer = scoring.Scorer(config, workdir)
  val = pipeline.get_eval_data(config.data, 'val', global_batch_size=config.eval.batch_size)
  detector_state.fit_and_save(config, workdir, scorer, scorer.fit_normalisation(val))


def run_category(config: Config, workdir: str, mode: str) -> Tuple[bool, Any]:
  """Runs the modes of `mode` on one category: (False, None) when training was preempted (its
  checkpoint is saved; a rerun resumes), else (True, the last mode's result)."""
  prepare_data_on_main_process_first(config)
  result = None
  for step in mode_steps(mode, config):
    if step in SCORING_MODES:
      config = tuned_lib.apply(config, workdir)
    if step in STATE_READERS and config.predict.refit:
      refit_state(config, workdir)
    result = MODES[step](config, workdir)
    if step == 'train' and result is None:
      return False, None
  return True, result


def typed_config(config_dict, overridden=(), input_dir=None, output_dir=None) -> Config:
  """The config file's ConfigDict as a checked Config; main.py's --input and --output fill the
  predict fields, `overridden` names the fields given on the command line."""
  config = config_lib.from_configdict(config_dict, overridden)
  changes = {k: v for k, v in (('predict.input_dir', input_dir), ('predict.output_dir', output_dir))
             if v is not None}
  return config_lib.with_fields(config, changes) if changes else config


def run(config_dict, workdir: str, mode: str, input_dir=None, overridden=(),
        output_dir=None) -> bool:
  """Runs `mode` on every category the config names. `overridden`: the dotted config fields given
  on the command line, which win over DIR/tuned.json; input_dir, output_dir: predict's folders.
  False when training was preempted (its checkpoint is saved; a rerun resumes)."""
  config = typed_config(config_dict, overridden, input_dir, output_dir)
  validate.validate_config(config, mode)
  enable_compilation_cache(config.compilation_cache_dir)
  parallel.initialise(config.parallel)
  validate.check_batches_split_over_devices(config)
  cats = categories(config)
  multi = config.data.category == 'all'
  results = []
  for k, category in enumerate(cats):
    cfg = category_config(config, category)
    wd = os.path.join(workdir, category) if multi else workdir
    if multi:
      logging.info('=== category %s (%d/%d) -> %s', category, k + 1, len(cats), wd)
      if cfg.predict.output_dir:
        cfg = config_lib.with_fields(cfg, {'predict.output_dir': os.path.join(
            cfg.predict.output_dir, category)})
    finished, result = run_category(cfg, wd, mode)
    if not finished:
      return False  # preempted: the checkpoint is saved, the rerun resumes
    if mode_steps(mode, cfg)[-1] == 'eval':
      results.append(result)
  if multi and results and jax.process_index() == 0:
    report.write_combined(results, workdir)
  return True
