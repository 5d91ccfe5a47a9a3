"""The names of main.py's --mode; esm/run.py maps each to what it runs. Kept apart, with no
imports, so that main.py lists them without loading JAX."""

MODE_NAMES = ('train', 'tune', 'eval', 'train_eval', 'predict', 'export')
