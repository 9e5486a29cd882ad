"""Feature fusion (after Asif et al. 2025): MobileNetV2 + DenseNet121 features, attention, head.

The paper's recipe is the default: both backbones at full width on 224 px inputs, concatenated
last feature maps, CBAM attention, class-weighted cross-entropy, AdamW with warmup + cosine, the
ultrasound augmentation. On the embedded synthetic phantom data:

  python -m busjax.main --config=configs/fusion.py --workdir=runs/fusion

Expected: from scratch on 2 CPU cores this is slow (about 4 img/s per core: roughly an hour);
on one GPU a few minutes. Phantom test AUC is reported as for the baseline (configs/supervised.py).
`--config.data.image_size=128 --config.model.width=0.5` is the CPU-sized variant that
benchmarks/quality.py uses.

The paper fine-tunes ImageNet weights; give them as local files (nothing downloads; see
docs/pretrained_weights.md) with the `pretrained` argument:

  python -m busjax.main --config=configs/fusion.py:busi,pretrained --workdir=runs/fusion_busi \
    --config.data.root=DATA/Dataset_BUSI_with_GT \
    --config.data.split_file=DATA/busi_breastmnist_split.tsv \
    --config.model.mobilenet_v2.pretrained=weights/mobilenet_v2_torchvision.safetensors \
    --config.model.densenet121.pretrained=weights/densenet121_torchvision.safetensors

Arguments (comma-separated after `:`), combinable:
  smoke                  seconds-long run (tests, CI).
  busi, cv, busbra       data and protocol, as in configs/supervised.py (configlib.apply_protocol).
  pretrained             ImageNet init from local files: 3-channel input (grey repeated), ImageNet
                         normalisation, torchvision conventions, fine-tuning learning rate.
  Ablations (one change each against the default):
  mobilenet | densenet   a single backbone (projection + attention + head kept).
  attention=NAME         none | se | eca | cbam (default) | channel_spatial.
  fusion=NAME            concat (default) | add | attention_weighted.
"""

import ml_collections

from busjax import configlib

ATTENTIONS = ("none", "se", "eca", "cbam", "channel_spatial")
FUSIONS = ("concat", "add", "attention_weighted")


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  known = {"smoke", "busi", "cv", "busbra", "pretrained", "mobilenet", "densenet"}
  unknown = {a for a in args if a not in known and not a.startswith(("attention=", "fusion="))}
  if unknown:
    raise ValueError(f"configs/fusion.py: unknown arguments {sorted(unknown)}; see the docstring")
  c = configlib.base_config()
  c.data = configlib.phantom_data(image_size=224)
  c.input.batch_size = 32
  c.train.eval_every = 100
  c.split.near_duplicates = False  # Phantom: no copies to find; patients are still grouped.
  # Data, split and protocol exactly as the supervised baseline, so the two compare like for like.
  configlib.apply_protocol(c, args)

  backbones = ("mobilenet_v2", "densenet121")
  if "mobilenet" in args:
    backbones = ("mobilenet_v2",)
  elif "densenet" in args:
    backbones = ("densenet121",)
  c.model = ml_collections.ConfigDict(
    dict(
      name="fusion",
      backbones=backbones,
      width=1.0,
      projection_channels=256,
      fusion=configlib.choice(args, "fusion", FUSIONS, "concat", where="configs/fusion.py"),
      attention=configlib.choice(args, "attention", ATTENTIONS, "cbam", where="configs/fusion.py"),
      attention_reduction=16,
      dropout=0.2,
      in_channels=1,
      dtype="float32",
      normalization="default",
      pretrained=configlib.optional_path(),
      pretrained_format=configlib.optional_path(),
    )
  )
  c.optim.lr = 1e-3  # From scratch; 1e-4 when fine-tuning ImageNet weights (below).
  c.train.epochs = 30

  if "pretrained" in args:
    c.model.in_channels = 3  # The grey image repeated; ImageNet stems expect RGB.
    c.model.normalization = "imagenet"
    c.model.padding = "symmetric"  # torchvision conventions for both backbones.
    c.model.bn_epsilon = 1e-5
    for name in backbones:
      # Required: validation names the flag when it is missing.
      c.model[name] = ml_collections.ConfigDict(
        dict(pretrained=configlib.optional_path(), pretrained_format=configlib.optional_path())
      )
    c.optim.lr = 1e-4  # Fine-tuning.
    c.optim.warmup_steps = 100
    c.train.epochs = 30
  if "smoke" in args:
    configlib.apply_smoke(c)
  return c
