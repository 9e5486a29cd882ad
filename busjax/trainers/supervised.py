"""Supervised classification: one loop for every single-image classifier (baseline, fusion...).

Top to bottom: config checks -> model -> optimiser and state -> step -> the split's training loop.
Everything around the loop is shared with the other regimes: the protocol (splits, k-fold CV,
external sets, reports) in `busjax.trainers.protocol`, restore-or-init and the finiteness check in
`busjax.trainers.state_utils`, jitting with shardings in `busjax.sharding`, prediction and reports
in `busjax.evaluators.classification`. The step is pure, `(state, batch, rng) -> (state, metrics)`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from busjax import checkpointing, configlib, sharding, writers
from busjax.data import augment, pipeline, records
from busjax.evaluators import classification, metrics
from busjax.models import common as model_common
from busjax.models import contrastive as contrastive_model
from busjax.trainers import protocol, state_utils

TrainingError = state_utils.TrainingError
# train.trainable: "all" (fine-tune everything) or "head" (linear probe: every other module
# frozen, BatchNorm statistics included, the model run in evaluation mode).
TRAINABLE = ("all", "head")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def validate_config(c: ml_collections.ConfigDict) -> None:
  """This regime's sections (called by `configlib.validate`)."""
  configlib.validate_model(c.model)
  configlib.validate_optim(c.optim)
  configlib.validate_train(c.train)
  configlib.check(
    0.0 <= c.train.get("ema_decay", 0.0) < 1.0,
    f"train.ema_decay={c.train.get('ema_decay')!r}: expected in [0, 1)",
  )
  configlib.check(
    c.train.get("ema_bn_batches", 0) >= 0,
    f"train.ema_bn_batches={c.train.get('ema_bn_batches')!r}: expected >= 0",
  )
  configlib.check(
    c.train.get("trainable", "all") in TRAINABLE,
    f"train.trainable={c.train.get('trainable')!r}: expected one of {TRAINABLE}",
  )
  configlib.check(
    c.train.get("class_weights") in (None, "none", "balanced"),
    f"train.class_weights={c.train.get('class_weights')!r}: expected 'balanced' or 'none'",
  )


def class_weights(labels: np.ndarray, num_classes: int, mode: str | None) -> np.ndarray:
  """Per-class loss weights: 'balanced' = n / (k * n_c), as scikit-learn; None = ones."""
  if not mode or mode == "none":
    return np.ones(num_classes, np.float32)
  if mode != "balanced":
    raise ValueError(
      f"config.train.class_weights: unknown mode {mode!r} (use 'balanced' or 'none')"
    )
  counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
  weights = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
  return weights.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Model, optimiser, state
# ----------------------------------------------------------------------------------------------


def create_model(
  model_config: ml_collections.ConfigDict, num_classes: int, seed: int
) -> nnx.Module:
  """`busjax.models.<name>.create(...)`, then local pretrained weights (head skipped) if set."""
  module = state_utils.model_module(model_config.name)
  model = module.create(model_config, num_classes=num_classes, rngs=nnx.Rngs(seed))
  if model_config.get("pretrained"):
    from busjax.models import (
      pretrained,  # Lazy: keeps h5py/safetensors optional for plain training.
    )

    arch = model_config.get("pretrained_arch") or (
      model_config.name if model_config.name == "mobilenet_v2" else model_config.get("variant")
    )
    model = pretrained.load_pretrained(
      model,
      model_config.pretrained,
      arch=arch,
      fmt=model_config.get("pretrained_format"),
      skip_head=True,
    )
    logging.info(
      "Loaded pretrained %s weights from %s (head re-initialised).", arch, model_config.pretrained
    )
  return model


def _feature_channels(model: nnx.Module, config: ml_collections.ConfigDict) -> int:
  """Channels of the mask loss's feature map (shapes only: nothing runs)."""
  _, level = mask_loss_settings(config)
  graph, variables = nnx.split(model)
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 1), jnp.uint8)

  def feature_maps(variables, images):
    return nnx.merge(graph, variables)(_preprocess(images, config.model), return_features=True)[1]

  shapes = jax.eval_shape(feature_maps, variables, images)
  if level not in shapes:
    raise ValueError(
      f"train.mask_loss.level={level!r}: {config.model.name} has feature maps {sorted(shapes)}"
    )
  return int(shapes[level].shape[-1])


def _preprocess(images, model_config):
  """uint8 batch -> normalised model input, inside the jitted step."""
  mean, std = model_common.normalization_stats(model_config.get("normalization") or "default")
  dtype = jnp.bfloat16 if model_config.get("dtype", "float32") == "bfloat16" else jnp.float32
  return model_common.preprocess(
    images, in_channels=model_config.get("in_channels", 1), mean=mean, std=std, dtype=dtype
  )


def lr_schedule(optim_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``final_lr_fraction``."""
  warmup = min(int(optim_config.get("warmup_steps", 0)), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0 if warmup else optim_config.lr,
    peak_value=optim_config.lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=optim_config.lr * optim_config.get("final_lr_fraction", 0.01),
  )


def kernels_only(params):
  """Weight-decay mask: weights with >= 2 dimensions (not BatchNorm scales or biases)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def create_optimizer(
  optim_config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay; optional global-norm clipping.

  ``optim_config.decay`` = "kernels" (default) decays only weights with >= 2 dimensions:
  decaying BatchNorm scales and biases pulls them to 0 for no regularising benefit.
  """
  schedule = lr_schedule(optim_config, total_steps)
  mask = kernels_only if optim_config.get("decay", "kernels") == "kernels" else None
  chain = []
  if optim_config.get("clip_norm"):
    chain.append(optax.clip_by_global_norm(optim_config.clip_norm))
  chain.append(
    optax.adamw(
      schedule,
      b1=optim_config.get("b1", 0.9),
      b2=optim_config.get("b2", 0.999),
      weight_decay=optim_config.get("weight_decay", 0.0),
      mask=mask,
    )
  )
  return optax.chain(*chain)


@dataclasses.dataclass(frozen=True)
class ModelDefs:
  """The static halves of the model: training mode, evaluation mode, and BatchNorm refresh
  (training mode with momentum 0 and dropout off, so running statistics = one batch's)."""

  train: Any
  eval: Any
  bn_refresh: Any


def bn_refresh_graph(model: nnx.Module):
  """The graph of `model` in BatchNorm-refresh mode: training mode with momentum 0 (running
  statistics = the last batch's) and dropout off; `model` itself is left unchanged."""
  refresh = nnx.clone(model)
  refresh.train()
  for _, module in nnx.iter_modules(refresh):
    if isinstance(module, nnx.BatchNorm):
      module.momentum = 0.0
    elif isinstance(module, nnx.Dropout):
      module.deterministic = True
  return nnx.split(refresh, nnx.Param, ...)[0]


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, use_ema: bool):
  """Splits the model into (graphdefs, state dict of arrays) for the pure step.

  With `use_ema` the state also holds ``ema`` (averaged parameters) and ``ema_rest`` (BatchNorm
  statistics re-estimated for them, see `make_bn_refresh`).
  """
  model.train()
  graph_train, params, rest = nnx.split(model, nnx.Param, ...)
  model.eval()
  graph_eval, _, _ = nnx.split(model, nnx.Param, ...)
  graph_refresh = bn_refresh_graph(model)
  state = {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "rest": rest,  # BatchNorm statistics, dropout RNG streams: everything that is not a parameter.
    "opt_state": tx.init(params),
  }
  if use_ema:
    state["ema"] = jax.tree.map(jnp.copy, params)
    state["ema_rest"] = jax.tree.map(jnp.copy, rest)
  return ModelDefs(train=graph_train, eval=graph_eval, bn_refresh=graph_refresh), state


# ----------------------------------------------------------------------------------------------
# Loss and the pure functions
# ----------------------------------------------------------------------------------------------


def classification_loss(
  logits, labels, weights, *, focal_gamma: float = 0.0, label_smoothing: float = 0.0
):
  """Mean (class-weighted) cross-entropy, or focal loss when `focal_gamma` > 0."""
  num_classes = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  log_p = jax.nn.log_softmax(logits)
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = targets * (1.0 - label_smoothing) + label_smoothing / num_classes
  per_example = -(targets * log_p).sum(-1)
  if focal_gamma:
    p_true = jnp.exp((jax.nn.one_hot(labels, num_classes) * log_p).sum(-1))
    per_example = per_example * (1.0 - p_true) ** focal_gamma
  w = weights[labels]
  return (per_example * w).sum() / jnp.maximum(w.sum(), 1e-12)


def mask_loss_settings(config: ml_collections.ConfigDict) -> tuple[float, str]:
  """(weight, feature level) of the mask-guided auxiliary loss; weight 0 = off."""
  settings = config.train.get("mask_loss") or {}
  return float(settings.get("weight", 0.0)), str(settings.get("level", "stage3"))


def init_mask_head(channels: int) -> dict[str, jax.Array]:
  """The auxiliary lesion-segmentation head: a 1x1 convolution to one logit per position."""
  return {"kernel": jnp.zeros((channels, 1), jnp.float32), "bias": jnp.zeros((1,), jnp.float32)}


def lesion_loss(feature_map, masks, head) -> jax.Array:
  """Per-pixel BCE + soft Dice of ``head`` on ``feature_map`` (B, h, w, C) against the lesion
  ``masks`` (B, S, S, 1) {0, 1}, area-averaged to h x w; mean over images with a lesion (an empty
  mask may mean "no mask known", so it teaches nothing)."""
  logits = (feature_map.astype(jnp.float32) @ head["kernel"])[..., 0] + head["bias"][0]
  b, h, w = logits.shape
  target = masks[..., 0].astype(jnp.float32)
  size = target.shape[1]
  if size % h == 0 and target.shape[2] % w == 0:  # Exact area average (the usual case).
    target = target.reshape(b, h, size // h, w, target.shape[2] // w).mean(axis=(2, 4))
  else:
    target = jax.image.resize(target, (b, h, w), "linear", antialias=True)
  has_lesion = (target.max(axis=(1, 2)) > 0).astype(jnp.float32)
  bce = optax.sigmoid_binary_cross_entropy(logits, target).mean(axis=(1, 2))
  p = jax.nn.sigmoid(logits)
  dice = 1.0 - (2.0 * (p * target).sum((1, 2)) + 1.0) / (p.sum((1, 2)) + target.sum((1, 2)) + 1.0)
  return ((bce + dice) * has_lesion).sum() / jnp.maximum(has_lesion.sum(), 1.0)


def head_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """`tx` on the ``head`` sub-tree, zero updates (and no optimiser state) everywhere else."""

  def labels(params):
    return jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if state_utils.path_name(path).startswith("head.") else "frozen",
      params,
    )

  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def make_train_step(
  defs: ModelDefs,
  tx,
  config: ml_collections.ConfigDict,
  aux_tx: optax.GradientTransformation | None = None,
):
  """The pure step `(state, batch, rng, loss_weights) -> (state, metrics)`.

  `sharding.jit_train_step(step, mesh, state, constants=(loss_weights,))` jits it: the per-class
  loss weights (`class_weights`) are an argument, not a constant of the program, so every fold
  of a cross-validation runs the same compiled step.

  With ``train.trainable="head"`` the model runs in evaluation mode (frozen BatchNorm
  statistics, no dropout) and `tx` must be `head_only`: a linear probe. With a mask loss
  (``state["aux"]``, the segmentation head, updated by `aux_tx`) the batch holds ``mask``.
  """
  graph = defs.eval if config.train.get("trainable", "all") == "head" else defs.train
  focal_gamma = float(config.train.get("focal_gamma", 0.0))
  label_smoothing = float(config.train.get("label_smoothing", 0.0))
  ema_decay = float(config.train.get("ema_decay", 0.0))
  mask_weight, mask_level = mask_loss_settings(config)

  def train_step(state, batch, rng, weights):
    # Dropout draws from the model's own RNG streams (in state["rest"]); reseed them from the
    # step's rng so that resumed runs and any device count see identical randomness.
    rest = state_utils.reseed_rng_streams(state["rest"], rng)
    model = nnx.merge(graph, state["params"], rest)
    images = _preprocess(batch["image"], config.model)

    def loss_fn(m, aux):
      if aux is None:
        logits, seg_loss = m(images), jnp.zeros((), jnp.float32)
      else:
        logits, feature_maps = m(images, return_features=True)
        seg_loss = lesion_loss(feature_maps[mask_level], batch["mask"], aux)
      loss = classification_loss(
        logits, batch["label"], weights, focal_gamma=focal_gamma, label_smoothing=label_smoothing
      )
      return loss + mask_weight * seg_loss, (logits, loss, seg_loss)

    (total, (logits, loss, seg_loss)), (grads, aux_grads) = nnx.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True
    )(model, state.get("aux"))
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(
      state, step=state["step"] + 1, params=params, rest=new_rest, opt_state=opt_state
    )
    if "aux" in state:
      aux_updates, new_state["aux_opt_state"] = aux_tx.update(
        aux_grads, state["aux_opt_state"], state["aux"]
      )
      new_state["aux"] = optax.apply_updates(state["aux"], aux_updates)
    if "ema" in state:
      new_state["ema"] = state_utils.ema_update(state["ema"], params, state["step"], ema_decay)
    step_metrics = {
      "loss": total,
      "accuracy": (logits.argmax(-1) == batch["label"]).mean(),
      "grad_norm": state_utils.global_norm(grads),
      "param_norm": state_utils.global_norm(params),
    }
    if "aux" in state:
      step_metrics["class_loss"], step_metrics["mask_loss"] = loss, seg_loss
    return new_state, step_metrics

  return train_step


def make_bn_refresh(defs: ModelDefs, config: ml_collections.ConfigDict):
  """`(params, rest, batches) -> rest`: BatchNorm statistics that belong to `params`.

  Averaged weights (EMA) never ran forward during training, so the live model's running
  statistics do not describe their activations. Each fixed training batch is run through
  `params` in training mode with momentum 0 (running statistics = that batch's), and the
  statistics are averaged over batches (precise BatchNorm); non-float entries (RNG streams)
  stay as they were.
  """

  @sharding.jit
  def one_batch(params, rest, images):
    model = nnx.merge(defs.bn_refresh, params, rest)
    model(_preprocess(images, config.model))
    return nnx.split(model, nnx.Param, ...)[2]

  def refresh(params, rest, batches):
    mean = state_utils.average_statistics(
      lambda images: one_batch(params, rest, images), batches, like=rest
    )
    return rest if mean is None else mean

  return refresh


def make_apply(defs: ModelDefs, config: ml_collections.ConfigDict, *, features: bool = False):
  """`((params, rest), batch) -> class probabilities`, evaluation mode; with `features`, the
  model's last feature map average-pooled instead, (N, channels) float32."""

  def apply(variables, batch):
    params, rest = variables
    model = nnx.merge(defs.eval, params, rest)
    images = _preprocess(batch["image"], config.model)
    if features:
      _, feature_maps = model(images, return_features=True)
      return jnp.mean(feature_maps["features"].astype(jnp.float32), axis=(1, 2))
    return class_probabilities(model, images, config.model)

  return apply


def class_probabilities(model: nnx.Module, x: jax.Array, model_config) -> jax.Array:
  """Softmax of the model on NHWC input `x`; with ``model.test_time_flip``, averaged with the
  prediction on the left-right mirror image (probe orientation is arbitrary; depth is not, so
  never up-down)."""
  probs = jax.nn.softmax(model(x).astype(jnp.float32), axis=-1)
  if model_config.get("test_time_flip"):
    probs = (probs + jax.nn.softmax(model(x[:, :, ::-1]).astype(jnp.float32), axis=-1)) / 2
  return probs


def eval_variables(state) -> tuple[Any, Any]:
  """The weights that are evaluated: the EMA with its own statistics, else the live model."""
  if "ema" in state:
    return state["ema"], state["ema_rest"]
  return state["params"], state["rest"]


# ----------------------------------------------------------------------------------------------
# Train one split
# ----------------------------------------------------------------------------------------------


def _num_steps(config, num_train: int) -> int:
  """train.num_steps if set, else the epochs' steps, at least train.min_steps (few-label runs:
  10% of the labels for the same epochs would be a tenth of the updates)."""
  if config.train.get("num_steps"):
    return int(config.train.num_steps)
  steps = math.ceil(config.train.epochs * num_train / config.input.batch_size)
  return max(1, steps, int(config.train.get("min_steps", 0)))


def train_split(
  config: ml_collections.ConfigDict,
  workdir: str,
  data: dict[str, records.Collection],
  *,
  train_batches: Callable[[int], Iterator[dict[str, np.ndarray]]] | None = None,
  num_examples: int | None = None,
  eval_batches: Callable[..., Iterator[dict[str, np.ndarray]]] | None = None,
) -> protocol.Trained:
  """Trains on data["train"], selects the checkpoint by AUC on data["val"]; the predictor.

  Args:
    config: the run's config.
    workdir: checkpoints, metrics and the train log go here.
    data: "train" and optionally "val" collections.
    train_batches: ``seed -> iterator`` of training batches (a Grain iterator, so that its
      state is checkpointed); default: `pipeline.train_dataset` over data["train"]. Other
      regimes pass e.g. a mixture of real and synthetic records.
    num_examples: the epoch length ``train.epochs`` counts in; default len(data["train"]).
    eval_batches: how data["val"] and predicted collections become batches (the `batches`
      of `classification.predict_collection`); default `pipeline.eval_batches`.
  """
  os.makedirs(workdir, exist_ok=True)
  train_set, val_set = data["train"], data.get("val")
  if val_set is not None and len(set(val_set.labels.tolist())) < 2:
    # No AUC on a val part with one class (or none): the last checkpoint is reported.
    logging.warning(
      "%s: %d images, %s; no checkpoint selection, the last step is evaluated.",
      val_set.name,
      len(val_set),
      "empty" if len(val_set) == 0 else "one class only",
    )
    val_set = None
  num_classes = len(train_set.class_names)
  mesh = sharding.make_mesh(config.get("mesh"))
  batch_size = config.input.batch_size
  if batch_size % mesh.devices.size:
    raise ValueError(
      f"config.input.batch_size={batch_size} must be divisible by the {mesh.devices.size} "
      "devices of the mesh"
    )
  total_steps = _num_steps(config, num_examples or len(train_set))
  writer = writers.MetricWriter(workdir)
  writer.write_hparams(config.to_dict())
  logging.info(
    "Training on %s (%d images) for %d steps, batch %d, %d devices.",
    train_set.name,
    len(train_set),
    total_steps,
    batch_size,
    mesh.devices.size,
  )

  # --- Data.
  mask_weight, _ = mask_loss_settings(config)

  def default_train_batches(seed):
    return iter(
      pipeline.train_dataset(
        train_set,
        image_size=config.data.image_size,
        global_batch_size=batch_size,
        seed=seed,
        augment_config=config.input.augment,
        num_workers=config.input.get("num_workers", 0),
        with_masks=mask_weight > 0 or augment.uses_masks(config.input.augment),
      )
    )

  train_batches = train_batches or default_train_batches
  train_iter = train_batches(config.seed)

  # --- Model, optimiser, state, jitted functions.
  model = create_model(config.model, num_classes, config.seed)
  tx = create_optimizer(config.optim, total_steps)
  frozen = config.train.get("trainable", "all") == "head"
  if frozen:
    tx = head_only(tx)
  defs, state = create_train_state(model, tx, use_ema=bool(config.train.get("ema_decay")))
  aux_tx = None
  if mask_weight > 0:
    # The segmentation head's optimiser: Adam on the model's schedule (the head is tiny and not
    # decayed); it is checkpointed with the model but never used for prediction.
    aux_tx = optax.adam(lr_schedule(config.optim, total_steps))
    state["aux"] = init_mask_head(_feature_channels(model, config))
    state["aux_opt_state"] = aux_tx.init(state["aux"])
  del model
  weights = class_weights(train_set.labels, num_classes, config.train.get("class_weights"))
  train_step = sharding.jit_train_step(
    make_train_step(defs, tx, config, aux_tx), mesh, state, constants=(weights,)
  )
  predict = sharding.jit_predict(make_apply(defs, config), mesh)
  embed = sharding.jit_predict(make_apply(defs, config, features=True), mesh)
  refresh_bn = make_bn_refresh(defs, config)
  bn_batches = []
  if "ema" in state and config.train.get("ema_bn_batches", 8) and not frozen:
    # Fixed augmented training batches (their own seed): the same ones at every evaluation.
    bn_iter = train_batches(config.seed + 1_000_003)
    bn_batches = [
      sharding.host_to_global({"image": b["image"]}, mesh)["image"]
      for b in itertools.islice(bn_iter, int(config.train.ema_bn_batches))
    ]
    del bn_iter

  def predict_on(variables, collection, fn=predict):
    return classification.predict_collection(
      fn,
      variables,
      collection,
      mesh=mesh,
      batch_size=config.input.get("eval_batch_size", batch_size),
      image_size=config.data.image_size,
      batches=eval_batches,
    )

  # --- Restore.
  # Closed on every exit: Orbax cleans up in a background thread that must finish first.
  with checkpointing.Checkpointer(
    workdir, best_metric="val_auc" if val_set is not None else None, best_mode="max", every_steps=1
  ) as ckpt:
    init_from, which = ("params.", "rest."), "best"
    if config.get("init_from_encoder"):
      # A contrastive pretraining run: its encoder, every module but the head, newest step.
      init_from = contrastive_model.encoder_mapping(state_utils.flatten_state(state))
      which = "latest"
    state, origin = state_utils.restore_or_init(
      ckpt, config, state, data_iterator=train_iter, init_from=init_from, init_from_which=which
    )
    if origin == "init_from" and "ema" in state:
      # Copies: the step donates its state, and one buffer must not be donated twice.
      state["ema"] = jax.tree.map(jnp.copy, state["params"])
      state["ema_rest"] = jax.tree.map(jnp.copy, state["rest"])
    state = sharding.replicate(state, mesh)
    start_step = int(jax.device_get(state["step"]))

    # --- Loop.
    rng = jax.random.key(config.seed)
    progress = writers.ProgressLogger(
      total_steps, every=config.train.log_every, batch_size=batch_size, start_step=start_step
    )
    eval_every = config.train.get("eval_every") or total_steps
    ckpt_every = config.train.get("checkpoint_every") or eval_every
    last_good_step = start_step if origin == "workdir" else None
    last_val = (None, None)  # (step, val probabilities): the report reuses the last step's.
    t_start = time.time()
    pace = state_utils.StepPacer()
    for step in range(start_step + 1, total_steps + 1):
      batch = next(train_iter)
      keys = ("image", "label", "mask") if "aux" in state else ("image", "label")
      if "aux" in state and "mask" not in batch:
        raise ValueError("train.mask_loss needs lesion masks, but the training batches have none")
      batch = sharding.host_to_global({k: batch[k] for k in keys}, mesh)
      state, step_metrics = train_step(state, batch, jax.random.fold_in(rng, step))
      step_metrics = pace(step_metrics)
      is_eval = step % eval_every == 0 or step == total_steps
      is_ckpt = is_eval or step % ckpt_every == 0
      if step % config.train.log_every == 0 or is_ckpt or step == start_step + 1:
        state_utils.log_train_metrics(
          step_metrics, step, ckpt=ckpt, last_good_step=last_good_step, workdir=workdir,
          writer=writer, progress=progress,
        )  # fmt: skip
      ckpt_metrics = None
      if is_eval and bn_batches:
        state["ema_rest"] = refresh_bn(state["ema"], state["rest"], bn_batches)
      if is_eval and val_set is not None:
        last_val = (step, predict_on(eval_variables(state), val_set))
        val = classification.predictions(val_set, last_val[1])
        ckpt_metrics = {"val_auc": metrics.roc_auc(val.y_malignant, val.p_malignant)}
        writer.write_scalars(step, ckpt_metrics, split="val")
        logging.info("step %d: val AUC %.4f", step, ckpt_metrics["val_auc"])
      if is_ckpt:
        ckpt.save(
          step,
          state_utils.flatten_state(state),
          data_iterator=train_iter,
          metrics=ckpt_metrics,
          force=step == total_steps,
        )
        last_good_step = step
    ckpt.wait_until_finished()
    train_seconds = time.time() - t_start
    writer.close()

    # --- The selected checkpoint.
    final_state, selected, selected_step = state, "last", total_steps
    if val_set is not None and ckpt.best_step() is not None:
      selected_step = ckpt.best_step()
      if selected_step != int(jax.device_get(state["step"])):  # Else it is already here.
        _, flat = ckpt.restore_best(state_utils.abstract_flat_state(state))
        final_state = state_utils.unflatten_state(state, flat)
      selected = f"best (step {selected_step})"
  variables = eval_variables(final_state)

  def predict(collection):
    if collection is val_set and last_val[0] == selected_step:
      return last_val[1]  # The selected step's val predictions, made during training.
    return predict_on(variables, collection)

  info = {
    "model": config.model.name
    + (f"/{config.model.variant}" if config.model.get("variant") else ""),
    "steps": total_steps,
    # Seconds of this process's training: steps resumed_at_step+1 .. steps (0 steps when a
    # finished run is re-evaluated, e.g. a CV re-run whose folds are done).
    "train_seconds": round(train_seconds, 1),
    "resumed_at_step": start_step,
    "selected_checkpoint": selected,
    "selected_step": int(selected_step),
  }
  return protocol.Trained(
    predict=predict,
    info=info,
    features=lambda c: predict_on(variables, c, embed),
  )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates as `config` says; checkpoints, metrics and reports go under `workdir`."""
  return protocol.train_and_evaluate(config, workdir, train_split)
