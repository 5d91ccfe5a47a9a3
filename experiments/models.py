"""The models the experiments compare, as dotted config overrides, the CPU-scale categories, and
the flag every experiment shares (--root), defined once so that the scripts import together.

One table for experiments/study.py, regret.py and evidence.py; evidence.py passes the same
overrides to main.py as --config.<field>=<value>.
"""

from absl import flags

# The dual-stream models sample with ESM at T_d = 12 of 250: below it ESM's clamp on σ²_θ binds
# at every step (docs/results.md, "Real data at CPU scale"); 'sgm' is configs/cpu's own default.
# Their maps combine every detector with the paper's equal weights (configs/cpu's half-weight S_Cos
# was chosen on the SGM model); their image score is the standardised mean of every detector's
# own, which against the paper's map lost nothing on bottle and gained on pill over seeds 4-6
# (docs/results.md, "The standardised image score"); S_RE alone scores lower on bottle.
DUAL = {'sampling.method': 'esm', 'sampling.t_d': 12, 'detect.image_detectors': (),
        'detect.image_score': 'standardised_mean', 'detect.weights': (1.0, 1.0, 1.0, 1.0)}
MODELS = {
    'esm': {'loss.kind': 'esm', **DUAL},  # dual stream, eq. 10
    'sgm': {'loss.kind': 'dsm', 'sampling.method': 'sgm'},  # single stream, DSM
    'hybrid': {'loss.kind': 'hybrid', **DUAL},  # ours: DSM ε + eq. 10 σ²
    'esm_direct': {'loss.kind': 'esm', 'model.var_param': 'direct', **DUAL},  # ESM, σ² = exp(v)
}
# The same models at 48² (configs/cpu's IMAGE_SIZE is 64): the figures docs/results.md gives at 48².
AT_48 = {'data.image_size': 48, 'model.attn_resolutions': (12,)}
MODELS.update({f'{name}48': {**MODELS[name], **AT_48} for name in ('esm', 'sgm', 'hybrid')})


def is_single_stream(model: str) -> bool:
  """Whether a model of MODELS is the DSM-trained single stream, which samples with SGM alone."""
  return MODELS[model]['loss.kind'] == 'dsm'

# The CPU-scale categories (configs/cpu/<category>.py) and the dataset folder each lies in.
DATASETS = {'bottle': 'mvtec_ad', 'pill': 'mvtec_ad', 'metal_plate': 'mpdd'}

ROOT = flags.DEFINE_string('root', None, 'Folder holding one folder per dataset (mvtec_ad/, mpdd/).')
