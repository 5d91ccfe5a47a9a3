"""Entry point: `python main.py --config=configs/mvtec.py:bottle --workdir=DIR --mode=train`.

Modes: train, tune, eval, train_eval (default), predict (with --input=FOLDER, optional --output),
export (DIR/export/, a jax.export artifact of the scoring function). The work is done in
esm/run.py; bad input ends with a one-line error (add --traceback to see where it came from).
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from esm import host_memory
from esm.errors import UserError
from esm.modes import MODE_NAMES

config_flags.DEFINE_config_file('config', 'configs/demo.py', 'Config file, e.g. configs/mvtec.py:bottle.')
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and reports.')
flags.DEFINE_enum('mode', 'train_eval', MODE_NAMES, 'What to run.')
flags.DEFINE_string('input', None, 'predict: folder of images to score.')
flags.DEFINE_string('output', None, 'predict: output folder (default: a new DIR/predict/run_NNN).')
flags.DEFINE_bool('traceback', False, 'Show the full traceback of input errors.')
flags.DEFINE_bool('reuse_host_memory', True, 'Keep freed host memory for reuse (glibc), so that '
                  'XLA:CPU does not page-fault its buffers in again at every call; the resident '
                  'size then stays at its peak. See esm/host_memory.py.')
FLAGS = flags.FLAGS
_REPO = os.path.dirname(os.path.abspath(__file__))


class _ProjectInfoOnly:
  """Keeps INFO lines from this project only: orbax and TFDS log every internal step at INFO."""

  def filter(self, record) -> bool:
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_REPO)


def parse_flags(argv):
  """absl's parsing, with a bad config file or override (a misspelt field, with its "did you mean"
  hint) as one `error:` line and exit status 2 instead of a traceback."""
  try:
    rest = FLAGS(argv)
    FLAGS.config.get('seed')  # config_flags reports a config file that failed to load on first use
    return rest
  except Exception as e:  # pylint: disable=broad-except  (any parse failure is a usage error)
    if '--traceback' in argv:
      raise
    text = str(e).replace("\\'", "'").replace('\\n', '\n').strip()
    if len(text) > 1 and text[0] == text[-1] == "'":
      text = text[1:-1]
    message = ' '.join(line.strip() for line in text.splitlines() if line.strip())
    named = [a.split('=')[0] for a in argv if a.startswith('--config.') and
             f"'{a.split('=')[0].split('.')[-1]}'" in message]
    print(f'error: {named[0] + ": " if named else ""}{message}', file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if not FLAGS.workdir:
    raise app.UsageError('--workdir is required')
  if FLAGS.reuse_host_memory:  # before anything starts XLA's threads
    host_memory.reuse_freed_memory()
  logging.get_absl_handler().addFilter(_ProjectInfoOnly())
  from esm import run  # pylint: disable=g-import-not-at-top  (keeps --help fast)
  try:
    run.run(FLAGS.config, FLAGS.workdir, FLAGS.mode, input_dir=FLAGS.input,
            overridden=set(config_flags.get_override_values(FLAGS['config'])),
            output_dir=FLAGS.output)
  except UserError as e:
    if FLAGS.traceback:
      raise
    logging.flush()
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
