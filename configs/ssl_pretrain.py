"""Contrastive self-supervised pretraining (after Li et al. 2026), then fine-tune with few labels.

Step 1 of 2 (step 2 is configs/ssl_finetune.py). A multiscale classifier (ResNet-18, width 0.5,
its last three stages fused by cross-scale attention) learns without labels: SimCLR's NT-Xent
between two ultrasound-tailored views of each image (crops that keep depth order and most of the
lesion's surroundings, horizontal flips only, gain/gamma/TGC, speckle, a small elastic
deformation; no vertical flips, no colour jitter). On the embedded synthetic phantoms:

  python -m busjax.main --config=configs/ssl_pretrain.py --workdir=runs/ssl_pretrain
  python -m busjax.main --config=configs/ssl_finetune.py --workdir=runs/ssl_finetune \\
      --config.init_from=runs/ssl_pretrain

The pretraining sees the non-test images of the split (train and val, labels ignored) and then
reports a logistic-regression probe on its frozen representation (reports/, summary.json, marked
SYNTHETIC on phantoms). The same command resumes a killed run.

Arguments (comma-separated after `:`), combinable:
  smoke               seconds-long run (tests, CI).
  busi, busbra        data and protocol, as in configs/supervised.py (configlib.apply_protocol);
                      the image size stays 64 px unless --config.data.image_size says otherwise.
  unlabelled_busbra   also pretrain on every BUS-BRA image, labels ignored
                      (--config.ssl.extra_sources.busbra.root=DATA/BUS-BRA-dev): this encoder has
                      seen the external domain; report it as its own row.
  views=NAME          ultrasound (default) | trivial (a generic TrivialAugment-style policy).
  positives=NAME      views (default: two views of one image) | group (also other images of the
                      same patient / near-duplicate group; see ssl.partner_probability).
  lars                LARS instead of AdamW.
  fusion=NAME         cross_attention (default) | concat | single: the multiscale ablation.
  backbone=plain      a plain ResNet-18 (width 0.5), no multiscale head.
"""

import ml_collections

from busjax import configlib
from busjax.data import augment

WHERE = "configs/ssl_pretrain.py"


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  known = {"smoke", "lars", "unlabelled_busbra", "busi", "busbra"}
  keyed = ("views=", "positives=", "fusion=", "backbone=")
  unknown = {a for a in args if a not in known and not a.startswith(keyed)}
  if unknown:
    raise ValueError(f"{WHERE}: unknown arguments {sorted(unknown)}; see the docstring")
  c = configlib.base_config()
  c.trainer = "contrastive"
  c.data = configlib.phantom_data(image_size=64)
  c.split.near_duplicates = False  # Phantom: no copies to find; patients are still grouped.
  configlib.apply_protocol(c, args)
  c.data.image_size = 64  # CPU-sized; pass --config.data.image_size=128 on an accelerator.
  for name in c.external.keys():
    c.external[name].image_size = 64
  c.model = configlib.multiscale_model(args, where=WHERE)
  c.input.batch_size = 64  # Pairs per step: 128 images through the encoder.
  c.optim.lr = 1e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_steps = 50

  view = augment.default_config("train")
  view.crop.probability = 1.0
  view.crop.scale = (0.35, 1.0)  # Keeps most of the lesion's surroundings (SimCLR: 0.08).
  view.gamma = view.gain = view.contrast = (0.7, 1.4)
  view.speckle.probability = 0.5
  view.speckle.sigma = 0.2
  view.elastic.probability = 0.3
  c.ssl = ml_collections.ConfigDict(
    dict(
      steps=800,
      temperature=0.2,
      views=configlib.choice(args, "views", ("ultrasound", "trivial"), "ultrasound", where=WHERE),
      view_augment=view,
      positives=configlib.choice(args, "positives", ("views", "group"), "views", where=WHERE),
      # How often the second view is another image of the same group (with positives=group).
      partner_probability=0.5 if "positives=group" in args else 0.0,
      optimizer="lars" if "lars" in args else "adamw",
      projection_hidden=512,
      projection_dim=128,
      checkpoint_every=200,
      probe="logistic",
      extra_sources=ml_collections.ConfigDict(),
    )
  )
  if "lars" in args:
    c.optim.lr = 0.3 * c.input.batch_size / 256  # SimCLR's square-root-free LARS scaling.
    c.optim.weight_decay = 1e-6
  if "unlabelled_busbra" in args:
    c.ssl.extra_sources.busbra = configlib.real_data("busbra", root=None, image_size=64)
  if "smoke" in args:
    configlib.apply_smoke(c)
    c.ssl.steps = 4
    c.ssl.checkpoint_every = 2
    c.ssl.projection_hidden = 32
    c.ssl.projection_dim = 16
    c.model.fusion_width = 32
    for name in c.ssl.extra_sources.keys():
      c.ssl.extra_sources[name].image_size = 64
  return c
