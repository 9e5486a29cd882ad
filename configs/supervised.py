"""Supervised baseline: a ResNet-18-style CNN from scratch, benign vs malignant.

Default (the README's main job) trains on the embedded synthetic phantom data:

  python -m busjax.main --config=configs/supervised.py --workdir=runs/supervised

Expected: about 5 minutes on 2 CPU cores; test AUC in the phantom's target band (0.80–0.97) and
report.json + ROC / reliability / confusion PNGs (marked SYNTHETIC) under runs/supervised/reports.

Arguments (comma-separated after `:`):
  smoke   shrink everything to seconds (tests, CI).
  busi    BUSI from a local folder (--config.data.root=.../Dataset_BUSI_with_GT), BreastMNIST's
          train/val split (--config.data.split_file=.../busi_breastmnist_split.tsv).
  cv      leakage-aware 5-fold cross-validation (near-duplicate- and patient-grouped).
  busbra  also evaluate on BUS-BRA without retraining (--config.external.busbra.root=.../BUS-BRA-dev).
"""

from busjax import configlib


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  c = configlib.base_config()
  c.data = configlib.phantom_data(image_size=96)
  c.model.variant = "resnet18"
  c.model.width = 0.5
  c.input.batch_size = 32
  c.train.epochs = 25
  c.train.eval_every = 100

  if "busi" in args:
    c.data = configlib.real_data("busi", root=None, image_size=128, split_file=None)
    c.split.kind = "predefined"  # BreastMNIST's train/val assignment, given by data.split_file.
  if "cv" in args:
    c.split.kind = "kfold"
    c.split.cross_validate = True
  if "busbra" in args:
    c.external.busbra = configlib.real_data("busbra", root=None, image_size=c.data.image_size)
  if "smoke" in args:
    configlib.apply_smoke(c)
  return c
