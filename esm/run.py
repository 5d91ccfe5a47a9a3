"""Train / tune / evaluate / predict / export orchestration, nothing else."""

import copy
import math
import os

import jax
from absl import logging

from datasets import catalog
from datasets import folder
from datasets import pipeline
from esm import evaluate
from esm import export as export_lib
from esm import parallel
from esm import predict as predict_lib
from esm import report
from esm import train as train_lib
from esm import tune as tune_lib
from esm import validate
from esm import workdir as workdir_lib
from esm.errors import UserError


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


def category_config(config, category: str):
  """A copy of config for one category, with that category's T_d from the dataset's table."""
  c = copy.deepcopy(config)
  c.data.category = category
  table = dict(config.sampling.t_d_by_category)
  if category in table:
    c.sampling.t_d = table[category]
  return c


def resolve_num_steps(config, num_train: int) -> None:
  """config.train.num_epochs > 0 sets num_steps from the size of the training split."""
  if config.train.num_epochs > 0:
    config.train.num_steps = max(1, math.ceil(config.train.num_epochs * num_train /
                                              config.train.batch_size))
    logging.info('%d epochs of %d images at batch %d = %d steps', config.train.num_epochs,
                 num_train, config.train.batch_size, config.train.num_steps)


def prepare_data_on_main_process_first(config) -> None:
  """In a multi-process run, process 0 prepares the dataset while the others wait: on a shared
  disk no two processes then write the same cache folder (each process reads it afterwards)."""
  if jax.process_count() == 1:
    return
  if parallel.is_main_process():
    pipeline.prepare_dataset(config.data)
  parallel.barrier('dataset prepared')


def train(config, workdir: str):
  # The data are listed, checked and prepared first: a bad dataset leaves no workdir behind.
  num_train = pipeline.num_train_examples(config.data)
  if num_train < 1:
    raise UserError(f'data.val_fraction={config.data.val_fraction}: no training image is left '
                    f'in {config.data.dataset}/{config.data.category} after the held-out slice')
  with workdir_lib.training_lock(workdir):
    validate.check_checkpoint_compatible(workdir_lib.load_saved_config(workdir), config, workdir)
    resolve_num_steps(config, num_train)
    workdir_lib.save_config(config, workdir)  # after every check: a failed start writes nothing

    def train_iter(start_step):
      return pipeline.get_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                         seed=config.seed, start_step=start_step)

    return train_lib.train_and_checkpoint(config, workdir, train_iter)


def enable_compilation_cache(path: str) -> None:
  """jax's persistent compilation cache in `path` ('' = off), so that a rerun skips compiling;
  a cache folder already set (JAX_COMPILATION_CACHE_DIR, a test session) is kept."""
  if path and not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir', path)


def run(config, workdir: str, mode: str, input_dir=None, overridden=(), output_dir=None) -> None:
  """Runs `mode` on every category the config names. `overridden`: the dotted config fields given
  on the command line, which win over DIR/tuned.json; output_dir: predict's output folder."""
  validate.validate_config(config, mode)
  enable_compilation_cache(config.compilation_cache_dir)
  parallel.initialise(config.parallel)
  validate.check_batches_split_over_devices(config)
  cats = categories(config)
  multi = config.data.category == 'all'
  results = []
  for category in cats:
    cfg = category_config(config, category)
    wd = os.path.join(workdir, category) if multi else workdir
    if multi:
      logging.info('=== category %s (%d/%d) -> %s', category, cats.index(category) + 1, len(cats), wd)
    prepare_data_on_main_process_first(cfg)
    if mode in ('train', 'train_eval'):
      if train(cfg, wd) is None:
        return  # preempted: the checkpoint is saved, the rerun resumes
    tune_cfg = tune_lib.TuneConfig.from_config(cfg.tune)
    if mode == 'tune' or (mode == 'train_eval' and tune_cfg.is_enabled(cfg.data.dataset)):
      tune_lib.tune(cfg, wd)
    if mode in ('eval', 'train_eval', 'predict', 'export'):
      sources = tune_lib.apply_tuned(cfg, wd, overridden)
      if mode == 'predict':
        out = os.path.join(output_dir, category) if output_dir and multi else output_dir
        predict_lib.predict(cfg, wd, input_dir, out)
      elif mode == 'export':
        predict_lib.checked_state(cfg, wd)
        export_lib.export_detector(wd, cfg.eval.batch_size)
      else:
        results.append(evaluate.evaluate(cfg, wd, settings_source=sources,
                                         tuned=tune_lib.load_tuned(wd)))
  if multi and results and jax.process_index() == 0:
    report.write_combined(results, workdir)
