"""Entry point: `python -m busjax.main --config=configs/X.py[:arg] --workdir=DIR [--config.a=v]`.

Parses flags, initialises multi-process JAX when asked, logs the devices and dispatches to
`busjax.trainers.<config.trainer>.train_and_evaluate(config, workdir)`. Logic lives in the trainers.
A bad flag, config value, data file or checkpoint ends as one line on stderr and exit code 2.
"""

import importlib
import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from busjax import checkpointing, cli, configlib, host_memory, sharding
from busjax.data import records, splits

FLAGS = flags.FLAGS
_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file, `path.py` or `path.py:arg`.", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and reports.")
flags.DEFINE_string(
  "coordinator", None, "Multi-process: coordinator `host:port` (omit on SLURM / TPU VMs)."
)
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_bool(
  "distributed", False, "Call jax.distributed.initialize() (SLURM, Cloud TPU: no arguments)."
)
flags.DEFINE_bool(
  "library_logs",
  False,
  "Also show INFO lines from JAX, Orbax and other libraries (hundreds per checkpoint save).",
)
flags.DEFINE_string(
  "compilation_cache",
  "",
  "JAX persistent compilation cache folder; 'none' = off. Default: jax/ in busjax's cache folder "
  "($BUSJAX_CACHE_DIR, else ~/.cache/busjax), shared by all of this user's runs and kept under "
  "2 GiB (least recently used programs go first), or WORKDIR/jax_cache where "
  "BUSJAX_CACHE_DIR=none. A run whose programs compiled before (the same model in another "
  "workdir, a resumed run, a regime training the same classifier several times) skips "
  "recompiling them.",
)
flags.DEFINE_bool(
  "reuse_step_memory",
  True,
  "Single-device CPU runs (glibc): every train step's temporaries on the pages of the step "
  "before, instead of fresh ones (large models' steps 1.15-1.3x faster, a step's peak memory "
  "about the same; busjax/host_memory.py). --noreuse_step_memory: XLA's asynchronous dispatch, "
  "fresh pages.",
)
flags.mark_flags_as_required(["config", "workdir"])

_SHARED_COMPILATION_CACHE_BYTES = 2 * 2**30
_BUSJAX_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _BusjaxInfoOnly(std_logging.Filter):
  """Keeps busjax's own INFO lines (progress, evaluations) and every library WARNING or worse."""

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_BUSJAX_DIR)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  if not FLAGS.library_logs:
    logging.get_absl_handler().addFilter(_BusjaxInfoOnly())
  if FLAGS.coordinator or FLAGS.distributed:
    jax.distributed.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id)
    reused = False
  else:
    reused = FLAGS.reuse_step_memory and host_memory.reuse_step_memory()  # Before JAX starts.
  if reused:
    logging.info("Train steps reuse one set of host pages for their temporaries.")
  elif FLAGS.reuse_step_memory and FLAGS["reuse_step_memory"].present:  # Asked for by name.
    logging.warning(
      "--reuse_step_memory does nothing here: it needs glibc, one CPU device and one process."
    )
  shared_cache = splits.cache_dir()
  if FLAGS.compilation_cache != "none":
    if FLAGS.compilation_cache:
      sharding.enable_compilation_cache(FLAGS.compilation_cache)
    elif shared_cache is not None:
      sharding.enable_compilation_cache(
        os.path.join(shared_cache, "jax"), max_bytes=_SHARED_COMPILATION_CACHE_BYTES
      )
    else:
      sharding.enable_compilation_cache(os.path.join(FLAGS.workdir, "jax_cache"))
  logging.info(
    "JAX %s, process %d/%d, %d local / %d global devices: %s",
    jax.__version__,
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.devices(),
  )
  try:
    configlib.validate(config)
  except (configlib.ConfigError, OSError) as e:  # OSError: the config file itself failed to load.
    print(f"busjax: bad config: {e}", file=sys.stderr)
    return 2
  trainer = importlib.import_module(f"busjax.trainers.{config.trainer}")
  try:
    trainer.train_and_evaluate(config, FLAGS.workdir)
  except records.DataError as e:  # The user's files: their names are the message, not a stack.
    print(f"busjax: bad data: {e}", file=sys.stderr)
    return 2
  except checkpointing.CheckpointError as e:
    print(f"busjax: bad checkpoint: {e}", file=sys.stderr)
    return 2
  return 0


def _parse_flags(argv):
  """absl's parser, but a bad flag or config override is one line on stderr, not a traceback."""
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, ValueError, TypeError, AttributeError, OSError) as e:
    message = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
    if message[:1] == message[-1:] == "'":  # A KeyError's message arrives repr-quoted.
      message = message[1:-1].replace("\\n", " ").replace("\\'", "'")
    print(
      f"busjax: bad flag: {message}\nUsage: python -m busjax.main --config=configs/X.py[:args] "
      "--workdir=DIR [--config.field=value ...]",
      file=sys.stderr,
    )
    sys.exit(2)


def run():
  cli.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
