"""The typed configuration: one frozen dataclass per section of a config file, and `Config` of them.

A config file (configs/) is an ml_collections ConfigDict; it is read once, at the entry
(`from_configdict`), and a workdir's config.json is read back with `from_dict`. Below that the
library passes these frozen dataclasses and never changes them in place: `with_fields` returns a
copy with dotted fields set. Each section is checked once, in its dataclass's __post_init__; the
checks that span sections are in esm/validate.py. The defaults and the one-line description of
every field are in configs/default.py, as in the flax examples.

Each section lives beside the code that reads it where that code owns the names it is checked
against (SamplingConfig beside SAMPLERS, DetectConfig beside DETECTORS, ...); the sections that
only hold numbers are here.
"""

import dataclasses
import typing
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from datasets.catalog import DataConfig
from esm.baselines import BaselinesConfig
from esm.defects import PAINTED_DEFECTS
from esm.dev_defects import FAMILIES
from esm.detectors import DetectConfig
from esm.errors import UserError
from esm.features.vit import FeaturesConfig
from esm.losses import LossConfig
from esm.models.dual_stream import ModelConfig
from esm.sampling import SAMPLERS, SIGMA_FLOORS, SamplingConfig
from esm.sde import SDEConfig

_POSITIVE_TRAIN_INTS = ('num_steps', 'batch_size', 'log_every', 'ckpt_every', 'keep',
                        'max_bad_steps', 'inject_nonfinite_count')
FLOAT32_MAX = 3.4028234663852886e38


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """config.train: the optimiser, the loop's schedule, checkpoints and fault injection."""
  num_steps: int
  num_epochs: int  # > 0: the train mode sets num_steps from it (esm/train.py, resolve_num_steps)
  batch_size: int
  lr: float
  warmup_steps: int
  grad_clip: float
  ema_rate: float
  log_every: int
  ckpt_every: int
  keep: int
  max_bad_steps: int
  inject_nonfinite_step: int
  inject_nonfinite_count: int
  compiler_options: Dict[str, Any]  # XLA options of the train step, over the platform's

  def __post_init__(self):
    if not 0 < self.lr < FLOAT32_MAX:
      raise UserError(f'train.lr: expected a positive float32 value, got {self.lr}')
    for name in _POSITIVE_TRAIN_INTS:
      if getattr(self, name) < 1:
        raise UserError(f'train.{name}: expected a positive integer, got {getattr(self, name)}')
    if self.warmup_steps < 0:
      raise UserError(f'train.warmup_steps: expected an integer >= 0, got {self.warmup_steps}')
    if not 0.0 <= self.grad_clip < FLOAT32_MAX:
      raise UserError(f'train.grad_clip: expected a number >= 0 (0 disables), got {self.grad_clip}')
    if not 0.0 <= self.ema_rate < 1.0:
      raise UserError(f'train.ema_rate: expected a decay in [0, 1), got {self.ema_rate}')


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """config.parallel: how this process joins a multi-host run (esm/parallel.py)."""
  coordinator: str
  num_processes: int
  process_id: int

  def __post_init__(self):
    if self.num_processes < 1:
      raise UserError(f'parallel.num_processes: expected at least 1, got {self.num_processes}')
    if self.coordinator and not 0 <= self.process_id < self.num_processes:
      raise UserError(f'parallel.process_id={self.process_id}: expected 0 <= process_id < '
                      f'parallel.num_processes={self.num_processes}')


TUNE_RULES = ('noise_aware', 'legacy')


@dataclasses.dataclass(frozen=True)
class TuneConfig:
  """config.tune: the label-free tuning of esm/tune.py."""
  enabled: Optional[bool]  # None: on for the folder dataset only
  t_d_fractions: Tuple[float, ...]
  methods: Tuple[str, ...]  # () = every sampler the checkpoint supports
  sigma_floors: Tuple[str, ...]  # ESM^σ's per-step floors tried (sampling.sigma_floor)
  folds: int
  defects_per_image: int
  defect_kinds: Tuple[str, ...]
  tie_tolerance: float
  seed: int
  rule: str  # 'noise_aware' (esm/choice.py) or 'legacy' (esm/dev_set.py choose)
  families: Tuple[str, ...]  # development defect families (esm/dev_defects.py)
  strengths: Tuple[float, ...]  # their strengths: mean change in the mask, in standard deviations
  defect_area: Tuple[float, float]  # (low, high): region area as a fraction of the image, log-uniform
  bootstrap: int  # resamples of the source images behind each SE

  def __post_init__(self):
    if not self.t_d_fractions or not all(0 < f <= 1 for f in self.t_d_fractions):
      raise UserError(f'tune.t_d_fractions: expected fractions of T in (0, 1], got '
                      f'{self.t_d_fractions}')
    unknown = set(self.methods) - set(SAMPLERS)
    if unknown:
      raise UserError(f'tune.methods: unknown samplers {sorted(unknown)}; expected names from '
                      f'{tuple(SAMPLERS)}')
    if not self.sigma_floors or set(self.sigma_floors) - set(SIGMA_FLOORS):
      raise UserError(f'tune.sigma_floors: expected names from {SIGMA_FLOORS}, got '
                      f'{self.sigma_floors}')
    if self.folds < 2:
      raise UserError(f'tune.folds: expected at least 2 (cross-fitting), got {self.folds}')
    if self.defects_per_image < 1:
      raise UserError(f'tune.defects_per_image: expected at least 1, got {self.defects_per_image}')
    unknown = set(self.defect_kinds) - set(PAINTED_DEFECTS)
    if not self.defect_kinds or unknown:
      raise UserError(f'tune.defect_kinds: expected names from {PAINTED_DEFECTS}, got '
                      f'{self.defect_kinds}')
    if not 0 <= self.tie_tolerance < 1:
      raise UserError(f'tune.tie_tolerance: expected [0, 1), got {self.tie_tolerance}')
    if self.rule not in TUNE_RULES:
      raise UserError(f'tune.rule: expected one of {TUNE_RULES}, got {self.rule!r}')
    if not self.families or set(self.families) - set(FAMILIES):
      raise UserError(f'tune.families: expected names from {FAMILIES}, got {self.families}')
    if not self.strengths or not all(s > 0 for s in self.strengths):
      raise UserError(f'tune.strengths: expected positive numbers, got {self.strengths}')
    if len(self.defect_area) != 2 or not 0 < self.defect_area[0] <= self.defect_area[1] <= 1:
      raise UserError(f'tune.defect_area: expected (low, high) with 0 < low <= high <= 1, got '
                      f'{self.defect_area}')
    if self.bootstrap < 50:
      raise UserError(f'tune.bootstrap: expected at least 50 resamples, got {self.bootstrap}')

  def is_enabled(self, dataset: str) -> bool:
    """Whether train_eval tunes: tune.enabled, or, when it is None, for the folder dataset only."""
    return dataset == 'folder' if self.enabled is None else bool(self.enabled)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """config.eval: evaluation's batch and the report's extras."""
  batch_size: int
  figures_per_type: int
  sweep_t_d: bool

  def __post_init__(self):
    if self.batch_size < 1:
      raise UserError(f'eval.batch_size: expected a positive integer, got {self.batch_size}')
    if self.figures_per_type < 0:
      raise UserError(f'eval.figures_per_type: expected an integer >= 0, got '
                      f'{self.figures_per_type}')


@dataclasses.dataclass(frozen=True)
class PredictConfig:
  """config.predict: --mode=predict's folders and whether it may re-fit the saved state."""
  refit: bool
  input_dir: str  # the folder of images to score (main.py's --input)
  output_dir: str  # '' = a new DIR/predict/run_NNN (main.py's --output)


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole configuration: the top-level fields and one dataclass per section."""
  seed: int
  compilation_cache_dir: str
  data: DataConfig
  sde: SDEConfig
  model: ModelConfig
  loss: LossConfig
  train: TrainConfig
  parallel: ParallelConfig
  sampling: SamplingConfig
  detect: DetectConfig
  features: FeaturesConfig
  tune: TuneConfig
  baselines: BaselinesConfig
  eval: EvalConfig
  predict: PredictConfig
  # Dotted fields given on the command line (main.py); DIR/tuned.json never overrides them.
  command_line: Tuple[str, ...] = ()


def _sections() -> Dict[str, type]:
  return {f.name: f.type for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.type)}


def _coerce(value: Any, annotation: Any, name: str) -> Any:
  """value as the annotated type: lists become tuples, ints floats; None stays for Optional."""
  origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin is typing.Union:
    if value is None and type(None) in args:
      return None
    annotation = next(a for a in args if a is not type(None))
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
  if origin is tuple:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
      raise UserError(f'{name}: expected a sequence, got {value!r}')
    inner = args[0] if args else Any
    return tuple(_coerce(v, inner, name) for v in value)
  if origin in (dict, Mapping, typing.Mapping) or annotation is dict:
    if not isinstance(value, Mapping):
      raise UserError(f'{name}: expected a mapping, got {value!r}')
    inner = args[1] if len(args) == 2 else Any
    return {str(k): _coerce(v, inner, name) for k, v in value.items()}
  if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if annotation in (int, str, bool) and not isinstance(value, annotation):
    raise UserError(f'{name}: expected {annotation.__name__}, got {value!r}')
  if annotation is int and isinstance(value, bool):
    raise UserError(f'{name}: expected int, got {value!r}')
  return value


def section_from_dict(cls: type, values: Mapping[str, Any], name: str):
  """The section dataclass `cls` from a mapping that must give every field and no other."""
  hints = typing.get_type_hints(cls)
  fields = [f.name for f in dataclasses.fields(cls)]
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise UserError(f'{name}: unknown field(s) {", ".join(unknown)}; expected fields from '
                    f'{", ".join(fields)}')
  missing = [f for f in fields if f not in values]
  if missing:
    raise UserError(f'{name}: missing field(s) {", ".join(missing)}')
  return cls(**{f: _coerce(values[f], hints[f], f'{name}.{f}') for f in fields})


def from_dict(values: Mapping[str, Any]) -> Config:
  """A Config from nested plain values (a config.json read back, or ConfigDict.to_dict())."""
  sections = _sections()
  kwargs = {}
  for f in dataclasses.fields(Config):
    if f.name in sections:
      kwargs[f.name] = section_from_dict(sections[f.name], values.get(f.name, {}), f.name)
    elif f.name in values:
      kwargs[f.name] = _coerce(values[f.name], typing.get_type_hints(Config)[f.name], f.name)
    elif f.default is dataclasses.MISSING:
      raise UserError(f'config: missing field {f.name}')
  unknown = sorted(set(values) - {f.name for f in dataclasses.fields(Config)})
  if unknown:
    raise UserError(f'config: unknown field(s) {", ".join(unknown)}')
  return Config(**kwargs)


def from_configdict(config_dict, command_line: Iterable[str] = ()) -> Config:
  """The entry's conversion: a config file's ConfigDict, typed and checked."""
  values = config_dict.to_dict()
  values['command_line'] = tuple(sorted(command_line))
  return from_dict(values)


def plain(value: Any) -> Any:
  """value with tuples as lists, as JSON holds it."""
  if isinstance(value, (tuple, list)):
    return [plain(v) for v in value]
  if isinstance(value, Mapping):
    return {k: plain(v) for k, v in value.items()}
  return value


def to_dict(config: Config) -> Dict[str, Any]:
  """Nested plain values (tuples as lists), as config.json stores them."""
  return plain(dataclasses.asdict(config))


def get_field(config: Any, dotted: str) -> Any:
  """The value of a dotted field ('sampling.t_d') of a Config, a ConfigDict or a nested dict."""
  node = config
  for part in dotted.split('.'):
    node = node[part] if isinstance(node, Mapping) else getattr(node, part)
  return node


def with_fields(config: Config, changes: Mapping[str, Any]) -> Config:
  """A checked copy of config with dotted fields set, e.g. {'train.lr': 1e-3}; an unknown field
  is a UserError naming it."""
  values = to_dict(config)
  for dotted, value in changes.items():
    *path, leaf = dotted.split('.')
    node = values
    for part in path:
      if not isinstance(node.get(part), dict):
        raise UserError(f'{dotted}: no such config field')
      node = node[part]
    if leaf not in node:
      raise UserError(f'{dotted}: no such config field')
    node[leaf] = plain(value)
  return from_dict(values)


def field_differences(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str = '') -> List[str]:
  """Dotted names of the fields that differ between two nested dicts (tuples equal lists)."""
  diffs = []
  for key in sorted(set(a) | set(b)):
    x, y = a.get(key), b.get(key)
    name = f'{prefix}{key}'
    if isinstance(x, Mapping) and isinstance(y, Mapping):
      diffs += field_differences(x, y, name + '.')
    elif plain(x) != plain(y):
      diffs.append(name)
  return diffs
