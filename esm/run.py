"""Train / tune / evaluate / predict / export orchestration, nothing else."""

import copy
import math
import os

import jax
from absl import logging

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


def categories(config) -> list:
  """The categories a config names: one, or every category of the dataset for 'all'."""
  if config.data.category != 'all':
    return [config.data.category]
  return list(pipeline.category_names(config.data.dataset, config.data.root))


def category_config(config, category: str):
  """A copy of config for one category, with that category's T_d from the dataset's table."""
  c = copy.deepcopy(config)
  c.data.category = category
  table = dict(config.sampling.t_d_by_category)
  if category in table:
    c.sampling.t_d = table[category]
  return c


def resolve_num_steps(config) -> None:
  """config.train.num_epochs > 0 sets num_steps from the size of the training split."""
  if config.train.num_epochs > 0:
    n = pipeline.num_train_examples(config.data)
    config.train.num_steps = max(1, math.ceil(config.train.num_epochs * n / config.train.batch_size))
    logging.info('%d epochs of %d images at batch %d = %d steps', config.train.num_epochs, n,
                 config.train.batch_size, config.train.num_steps)


def prepare_data_on_main_process_first(config) -> None:
  """In a multi-process run, process 0 prepares the dataset while the others wait: on a shared
  disk no two processes then write the same cache folder (each process reads it afterwards)."""
  if jax.process_count() == 1:
    return
  if parallel.is_main_process():
    pipeline.prepare_dataset(config.data)
  parallel.barrier('dataset prepared')


def train(config, workdir: str):
  with workdir_lib.training_lock(workdir):
    validate.check_checkpoint_compatible(workdir_lib.load_saved_config(workdir), config, workdir)
    resolve_num_steps(config)
    workdir_lib.save_config(config, workdir)

    def train_iter(start_step):
      return pipeline.get_train_iterator(config.data, global_batch_size=config.train.batch_size,
                                         seed=config.seed, start_step=start_step)

    return train_lib.train_and_checkpoint(config, workdir, train_iter)


def run(config, workdir: str, mode: str, input_dir=None, overridden=(), output_dir=None) -> None:
  """Runs `mode` on every category the config names. `overridden`: the dotted config fields given
  on the command line, which win over DIR/tuned.json; output_dir: predict's output folder."""
  validate.validate_config(config, mode)
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
