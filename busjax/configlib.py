"""Shared config pieces: the default sections, `:smoke` shrinking, data-source presets, validation.

Config files in `configs/` build on these so each stays a short, readable recipe. Validation runs
before any work, so a typo in a config value is a one-line error, not a traceback from deep inside.
"""

from __future__ import annotations

import importlib
import math
import os

import ml_collections
from ml_collections import config_dict

from busjax.data import augment, splits

SOURCES = (
  "phantom",
  "busi",
  "busbra",
  "breastmnist",
  "csv",
  "tfds",
  "paired_phantom",
  "paired_csv",
)
SPLIT_KINDS = ("kfold", "predefined", "official_folds", "holdout")
# optim.decay: which parameters AdamW decays. "kernels": weights with >= 2 dimensions (no decay
# on BatchNorm scales and biases, the usual practice); "all": every parameter.
DECAY_MASKS = ("kernels", "all")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def optional_path(value: str | None = None):
  """A string field that may stay None yet can be set from the command line (`--config.x=PATH`).

  A plain None field cannot be overridden by flags (ml_collections needs the type).
  """
  return config_dict.placeholder(str) if value is None else value


def phantom_data(image_size: int = 96, **phantom_kwargs) -> ml_collections.ConfigDict:
  """The embedded synthetic default: BUSI-like class counts, benign vs malignant."""
  # difficulty = phantom.DEFAULT_DIFFICULTY (not imported: the generator loads lazily).
  phantom = dict(
    counts=(437, 210, 133), seed=0, difficulty=0.2, images_per_patient=(1, 3), calipers=0.0
  )
  phantom.update(phantom_kwargs)
  return ml_collections.ConfigDict(
    dict(
      source="phantom",
      root=optional_path(),
      classes="binary",
      image_size=image_size,
      on_error="raise",
      split_file=optional_path(),
      phantom=phantom,
    )
  )


def real_data(
  source: str, root: str | None, image_size: int, **kwargs
) -> ml_collections.ConfigDict:
  """A local real dataset (`root` is the user's folder; nothing downloads)."""
  fields = dict(
    source=source,
    root=optional_path(root),
    classes="binary",
    image_size=image_size,
    on_error="raise",
    split_file=optional_path(),
  )
  fields.update({k: optional_path() if v is None else v for k, v in kwargs.items()})
  return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
  """Every section with its defaults; config files override what their recipe needs."""
  c = ml_collections.ConfigDict()
  c.trainer = "supervised"
  c.seed = 0
  c.resume = optional_path()  # Another run's workdir to continue (full state).
  c.init_from = optional_path()  # Another run's workdir to take weights from (fresh optimiser).
  # init_from is a contrastive pretraining run (trainer "contrastive"): load its encoder
  # (params/rest.encoder.<module> -> <module>, every module but the head), latest checkpoint.
  c.init_from_encoder = False
  c.data = phantom_data()
  c.external = ml_collections.ConfigDict()  # name -> data config, evaluated after training.
  # val_from_train (kind "predefined" only): the given "val" part becomes the test set and a
  # grouped, stratified `val_fraction` of "train" selects the checkpoint and threshold (BUSI's
  # BreastMNIST split has no test part; selecting on the reported images would flatter them).
  c.split = ml_collections.ConfigDict(
    dict(
      kind="kfold",
      k=5,
      fold=0,
      val_fraction=0.15,
      # Which of the round(1 / val_fraction) grouped parts is val (a fold ensemble's members take
      # 0, 1, ... with val_fraction 1/k; 0 is the usual single model).
      val_fold=0,
      near_duplicates=True,
      val_from_train=False,
      cross_validate=False,
      seed=0,
      # Label-efficiency studies: keep this share of the train part's images (whole groups, per
      # class; val and test stay whole); the 10% subset of a seed lies inside its 25% subset.
      label_fraction=1.0,
      label_fraction_seed=0,
    )
  )
  c.input = ml_collections.ConfigDict(dict(batch_size=32, eval_batch_size=64, num_workers=0))
  c.input.augment = augment.default_config("train")  # Ultrasound-aware; see busjax/data/augment.py.
  # normalization: "default" (grey, mean 0.5 / std 0.25), "imagenet" or "inception" (with
  # pretrained weights); pretrained: a local weights file (see docs/pretrained_weights.md).
  c.model = ml_collections.ConfigDict(
    dict(
      name="resnet",
      variant="resnet18",
      width=0.5,
      in_channels=1,
      dropout=0.0,
      dtype="float32",
      normalization="default",
      pretrained=optional_path(),
      pretrained_format=optional_path(),
      # Predictions (validation, reports, predict/explain) average the image and its left-right
      # mirror: test-time augmentation with the one flip that keeps an image possible.
      test_time_flip=False,
    )
  )
  c.optim = ml_collections.ConfigDict(
    dict(
      lr=1e-3,
      weight_decay=1e-4,
      decay="kernels",
      warmup_steps=50,
      clip_norm=1.0,
      final_lr_fraction=0.01,
    )
  )
  c.train = ml_collections.ConfigDict(
    dict(
      epochs=20,
      num_steps=0,
      log_every=20,
      eval_every=100,
      checkpoint_every=0,
      class_weights="balanced",
      focal_gamma=0.0,
      label_smoothing=0.0,
      ema_decay=0.0,
      # With EMA: BatchNorm statistics are re-estimated for the averaged weights on this many
      # fixed training batches before each evaluation (the live model's would not match them).
      ema_bn_batches=8,
      # "all", or "head": a linear probe (every other module frozen, run in evaluation mode).
      trainable="all",
      # Mask-guided training: an auxiliary lesion-segmentation loss (per-pixel BCE + soft Dice of
      # a 1x1-conv head on the `level` feature map against the lesion mask, area-downsampled to
      # that map) added with this weight; images with an empty mask do not enter it. The head is
      # trained beside the model (state["aux"]) and never used for prediction. 0 = off.
      mask_loss=ml_collections.ConfigDict(dict(weight=0.0, level="stage3")),
    )
  )
  # Reports: percentile-bootstrap resamples behind every interval (AUC, sensitivity/specificity,
  # reader comparison), patient-clustered when patient ids are known.
  c.report = ml_collections.ConfigDict(dict(bootstrap_resamples=2000))
  # A seed ensemble: `members` models trained alike with seeds seed, seed + 1, ... (each in
  # WORKDIR/memberK, resumable on its own), reported as one model (mean probability; threshold
  # and temperature chosen on val from the ensemble's own predictions). Supervised regime only.
  c.ensemble = ml_collections.ConfigDict(dict(members=1))
  c.mesh = ml_collections.ConfigDict(dict(data=-1))
  return c


PROTOCOL_ARGS = ("busi", "cv", "busbra")


def apply_protocol(c: ml_collections.ConfigDict, args: set[str]) -> ml_collections.ConfigDict:
  """The data/evaluation arguments every method's config shares, so methods compare like for like.

  busi    BUSI from a local folder (--config.data.root=.../Dataset_BUSI_with_GT) with BreastMNIST's
          assignment (--config.data.split_file=.../busi_breastmnist_split.tsv): its val part is
          reported as the test set; checkpoint and threshold are chosen on a patient- and
          near-duplicate-grouped 15% of its train part (selecting on reported images flatters them).
  cv      leakage-aware k-fold cross-validation (patient- and near-duplicate-grouped); with busi it
          replaces the BreastMNIST split.
  busbra  also evaluate on BUS-BRA, another hospital, without retraining
          (--config.external.busbra.root=.../BUS-BRA-dev); its BI-RADS give the reader's point.
  """
  if "busi" in args:
    # Real scans carry finer detail than the phantoms: at least 128 px (fusion keeps its 224).
    c.data = real_data("busi", root=None, image_size=max(c.data.image_size, 128))
    c.split.kind = "predefined"
    c.split.val_from_train = True
    c.split.near_duplicates = True
  if "cv" in args:
    c.split.kind = "kfold"
    c.split.val_from_train = False
    c.split.cross_validate = True
  if "busbra" in args:
    c.external.busbra = real_data("busbra", root=None, image_size=c.data.image_size)
  return c


def apply_smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks any config so the same file runs end to end in seconds on a CPU."""
  if c.data.source == "phantom":
    c.data.phantom.counts = (24, 16, 8)
  c.data.image_size = 64  # The phantom generator's smallest size.
  c.input.batch_size = 8
  c.input.eval_batch_size = 16
  c.train.num_steps = 4
  c.train.log_every = 2
  c.train.eval_every = 2
  # Wide intervals are fine for a smoke run; 2000 resamples cost ~0.5 s per interval.
  c.report.bootstrap_resamples = 200
  c.optim.warmup_steps = 1
  c.split.k = min(c.split.get("k", 5), 3)
  for name in list(c.external.keys()):
    if c.external[name].source == "phantom":
      c.external[name].phantom.counts = (12, 8, 0)
    c.external[name].image_size = 64
  if "width" in c.model:
    c.model.width = min(c.model.width, 0.25)
  return c


MULTISCALE_FUSIONS = ("cross_attention", "concat", "single")


def multiscale_model(args: set[str], *, where: str) -> ml_collections.ConfigDict:
  """The self-supervised method's classifier (Li et al. 2026), shared by pretrain and fine-tune.

  A ResNet-18 (width 0.5) whose last three stages are fused by cross-scale attention;
  ``fusion=concat`` (top-down, no attention) and ``fusion=single`` (last stage only) are the
  ablations, ``backbone=plain`` the plain ResNet-18 without the multiscale head.
  """
  fusion = choice(args, "fusion", MULTISCALE_FUSIONS, "cross_attention", where=where)
  model = base_config().model
  if choice(args, "backbone", ("multiscale", "plain"), "multiscale", where=where) == "plain":
    return model
  model.update(
    name="multiscale", backbone="resnet18", scales=3, fusion=fusion, fusion_width=128, heads=4,
    mlp_ratio=2,
  )  # fmt: skip
  return model


def load_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """``get_config(arg)`` of a config file, as ``--config=path:arg`` would give (Colab, tests).

  `path` may also be a bare name of busjax's own configs (``"supervised"``).
  """
  import importlib.util

  if not path.endswith(".py"):
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                        f"{path}.py")  # fmt: skip
  if not os.path.isfile(path):
    raise ConfigError(f"{path}: no such config file")
  spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def parse_arg(arg: str | None) -> set[str]:
  """`configs/x.py:smoke,cv` -> {"smoke", "cv"}."""
  return {a.strip() for a in (arg or "").split(",") if a.strip()}


def choice(args: set[str], key: str, allowed: tuple[str, ...], default: str, *, where: str) -> str:
  """The value of a `key=value` config argument (`configs/x.py:key=value`), one of `allowed`.

  Raises ValueError naming `where` (the config file) if it is given twice or is not allowed.
  """
  values = [a.split("=", 1)[1] for a in args if a.startswith(f"{key}=")]
  if len(values) > 1 or (values and values[0] not in allowed):
    raise ValueError(f"{where}: {key}= takes one of {allowed}, got {values}")
  return values[0] if values else default


def _check(condition: bool, message: str) -> None:
  if not condition:
    raise ConfigError(message)


def validate_data(prefix: str, d: ml_collections.ConfigDict) -> None:
  """One data section: a known source and task, an image size it can make, a root that exists."""
  from busjax.data import sources  # The loaders own the list of tasks they can serve.

  _check(d.source in SOURCES, f"{prefix}.source={d.source!r}: expected one of {SOURCES}")
  _check(
    d.get("classes", "binary") in sources.CLASSES,
    f"{prefix}.classes={d.get('classes')!r}: expected one of {sources.CLASSES}",
  )
  _check(
    isinstance(d.image_size, int) and 16 <= d.image_size <= 1024,
    f"{prefix}.image_size={d.image_size!r}: expected an integer in [16, 1024]",
  )
  _check(
    d.get("on_error", "raise") in ("raise", "skip"),
    f"{prefix}.on_error={d.get('on_error')!r}: expected 'raise' or 'skip'",
  )
  if d.source in ("phantom", "paired_phantom"):
    _check(
      64 <= d.image_size <= 512,
      f"{prefix}.image_size={d.image_size!r}: the phantom generator makes 64..512 px images",
    )
  else:
    _check(
      bool(d.get("root")),
      f"{prefix}.root is required for source {d.source!r} (pass --config.data.root=/path/to/data)",
    )
    _check(os.path.exists(d.root), f"{prefix}.root={d.root!r}: no such file or folder")


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming the first field that cannot work.

  Checks the sections every regime shares (data, external, split, input, report), then calls the
  trainer module's own ``validate_config(c)`` for its sections (model, optimiser, a GAN's
  generator, ...), so a regime's config never fails on another regime's fields.
  """
  try:
    trainer = importlib.import_module(f"busjax.trainers.{c.trainer}")
  except ModuleNotFoundError as e:
    raise ConfigError(f"trainer={c.trainer!r}: no module busjax/trainers/{c.trainer}.py") from e
  validate_data("data", c.data)
  for name, d in c.get("external", {}).items():
    validate_data(f"external.{name}", d)
  _check(c.split.kind in SPLIT_KINDS, f"split.kind={c.split.kind!r}: expected one of {SPLIT_KINDS}")
  if c.split.kind == "kfold":
    _check(
      isinstance(c.split.k, int) and c.split.k >= 2,
      f"split.k={c.split.k!r}: expected an integer >= 2",
    )
    _check(
      0 <= c.split.fold < c.split.k,
      f"split.fold={c.split.fold!r}: expected 0 <= fold < k={c.split.k}",
    )
  _check(
    0.0 <= c.split.get("val_fraction", 0.0) < 1.0,
    f"split.val_fraction={c.split.get('val_fraction')!r}: expected a fraction in [0, 1)",
  )
  if c.split.get("val_fraction", 0.0) > 0:
    parts = splits.fraction_parts(c.split.val_fraction)
    _check(
      isinstance(c.split.get("val_fold", 0), int) and 0 <= c.split.get("val_fold", 0) < parts,
      f"split.val_fold={c.split.get('val_fold')!r}: expected 0 <= val_fold < {parts} "
      f"(val_fraction {c.split.val_fraction} cuts {parts} parts)",
    )
  _check(
    isinstance(c.input.batch_size, int) and c.input.batch_size > 0,
    f"input.batch_size={c.input.batch_size!r}: expected a positive integer",
  )
  resamples = c.report.bootstrap_resamples
  _check(
    isinstance(resamples, int) and not isinstance(resamples, bool) and resamples >= 100,
    f"report.bootstrap_resamples={resamples!r}: expected an integer >= 100 (fewer gives "
    "unstable 95% interval ends)",
  )
  members = c.get("ensemble", {}).get("members", 1)
  _check(
    isinstance(members, int) and not isinstance(members, bool) and members >= 1,
    f"ensemble.members={members!r}: expected an integer >= 1",
  )
  _check(
    members == 1 or c.trainer == "supervised",
    f"ensemble.members={members}: seed ensembles are for the supervised trainer, not {c.trainer!r}",
  )
  fraction = c.split.get("label_fraction", 1.0)
  _check(
    isinstance(fraction, (int, float)) and 0 < fraction <= 1,
    f"split.label_fraction={fraction!r}: expected in (0, 1]",
  )
  _check(
    not c.get("init_from_encoder") or bool(c.get("init_from")),
    "init_from_encoder=True needs init_from: pass --config.init_from=RUN (a contrastive "
    "pretraining run, e.g. runs/ssl_pretrain), or the config's scratch argument",
  )
  for path in ("resume", "init_from"):
    if c.get(path):
      _check(os.path.isdir(c[path]), f"{path}={c[path]!r}: no such run directory")
  if hasattr(trainer, "validate_config"):
    trainer.validate_config(c)


def validate_optim(optim: ml_collections.ConfigDict, prefix: str = "optim") -> None:
  """An AdamW section: positive finite lr, non-negative decay, a known decay mask."""
  lr = optim.lr
  _check(
    isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0,
    f"{prefix}.lr={lr!r}: expected > 0",
  )
  _check(
    optim.get("weight_decay", 0.0) >= 0,
    f"{prefix}.weight_decay={optim.get('weight_decay')!r}: expected >= 0",
  )
  _check(
    optim.get("decay", "kernels") in DECAY_MASKS,
    f"{prefix}.decay={optim.get('decay')!r}: expected one of {DECAY_MASKS}",
  )


def validate_train(train: ml_collections.ConfigDict) -> None:
  """Step counts and logging intervals."""
  _check(
    train.get("num_steps", 0) > 0 or train.get("epochs", 0) > 0,
    "train.num_steps or train.epochs must be > 0",
  )
  _check(train.get("log_every", 1) > 0, f"train.log_every={train.get('log_every')!r}: expected > 0")
  mask_loss = train.get("mask_loss") or {}
  _check(
    mask_loss.get("weight", 0.0) >= 0,
    f"train.mask_loss.weight={mask_loss.get('weight')!r}: expected >= 0",
  )


def validate_model(model: ml_collections.ConfigDict, prefix: str = "model") -> None:
  """A busjax.models network: module exists, dtype, channels, normalisation, weight files."""
  try:
    importlib.import_module(f"busjax.models.{model.name}")
  except ModuleNotFoundError as e:
    raise ConfigError(
      f"{prefix}.name={model.name!r}: no module busjax/models/{model.name}.py"
    ) from e
  _check(
    model.get("dtype", "float32") in ("float32", "bfloat16"),
    f"{prefix}.dtype={model.get('dtype')!r}: expected 'float32' or 'bfloat16'",
  )
  if model.name == "multimodal":
    modalities = tuple(model.get("modalities", ()))
    _check(
      bool(modalities) and model.get("in_channels") == len(modalities),
      f"{prefix}: a multimodal network needs modalities and in_channels = their number "
      f"(got {modalities!r}, in_channels={model.get('in_channels')!r})",
    )
    for modality in modalities:
      _check(modality in model, f"{prefix}.{modality}: the {modality} branch's model is missing")
      validate_model(model[modality], prefix=f"{prefix}.{modality}")
  else:
    _check(
      model.get("in_channels", 1) in (1, 3),
      f"{prefix}.in_channels={model.get('in_channels')!r}: "
      "expected 1 (grayscale) or 3 (ImageNet weights)",
    )
  _check(
    model.get("normalization", "default") in ("default", "imagenet", "inception"),
    f"{prefix}.normalization={model.get('normalization')!r}: expected 'default', 'imagenet' or "
    "'inception'",
  )
  if model.get("pretrained"):
    _check(
      os.path.isfile(model.pretrained),
      f"{prefix}.pretrained={model.pretrained!r}: no such file "
      "(weights come from a local file; see docs/pretrained_weights.md)",
    )
  if model.name == "fusion":
    for name in model.get("backbones", ()):
      sub = model.get(name)
      if sub is not None and "pretrained" in sub:
        _check(
          bool(sub.pretrained),
          f"{prefix}.{name}.pretrained is required by this config "
          f"(--config.{prefix}.{name}.pretrained=FILE; see docs/pretrained_weights.md)",
        )
        _check(
          os.path.isfile(sub.pretrained),
          f"{prefix}.{name}.pretrained={sub.pretrained!r}: no such file",
        )


def check(condition: bool, message: str) -> None:
  """Raises ConfigError(message) unless `condition`: for trainers' own `validate_config`."""
  _check(condition, message)
