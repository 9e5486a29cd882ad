"""Supervised baseline: a ResNet-18-style CNN from scratch, benign vs malignant.

Default (the README's main job) trains on the embedded synthetic phantom data:

  python -m busjax.main --config=configs/supervised.py --workdir=runs/supervised

Expected: about 5 minutes on 2 CPU cores; fold-0 test AUC about 0.76-0.80 (the 5-fold
out-of-fold AUC is 0.81, docs/phantom.md) and report.json + ROC / reliability / confusion PNGs
(marked SYNTHETIC) under runs/supervised/reports.

Arguments (comma-separated after `:`):
  smoke   shrink everything to seconds (tests, CI).
  busi    BUSI from a local folder with BreastMNIST's split (see `configlib.apply_protocol`):
            --config.data.root=DATA/Dataset_BUSI_with_GT
            --config.data.split_file=DATA/busi_breastmnist_split.tsv
  cv      leakage-aware 5-fold cross-validation (near-duplicate- and patient-grouped).
  busbra  also evaluate on BUS-BRA without retraining
          (--config.external.busbra.root=DATA/BUS-BRA-dev).
"""

from busjax import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  unknown = args - {"smoke", *configlib.PROTOCOL_ARGS}
  if unknown:
    raise ValueError(
      f"configs/supervised.py: unknown arguments {sorted(unknown)}; see the docstring"
    )
  c = configlib.base_config()
  c.data = configlib.phantom_data(image_size=96)
  c.model.variant = "resnet18"
  c.model.width = 0.5
  c.input.batch_size = 32
  c.train.epochs = 40
  c.train.ema_decay = (
    0.99  # Evaluate an exponential moving average of the weights: steadier on small sets.
  )
  c.train.eval_every = 100
  # Phantom images are generated one by one: no copies to find; patients are still grouped.
  c.split.near_duplicates = False
  configlib.apply_protocol(c, args)
  if "smoke" in args:
    configlib.apply_smoke(c)
  return c
