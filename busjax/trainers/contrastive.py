"""Contrastive self-supervised pretraining (SimCLR-style NT-Xent) on unlabelled ultrasound images.

Top to bottom: config checks -> the loss -> the pretraining images -> model, optimiser, step ->
the pretraining loop -> the linear-probe read-out. The pretrained encoder is then fine-tuned by
the supervised regime: ``configs/ssl_finetune.py`` sets ``config.init_from`` to this run's
workdir and ``config.init_from_encoder``, and `state_utils.restore_or_init` loads
``params/rest.encoder.<module>`` into the classifier's ``<module>`` for every module but the head.

What the images are: the non-test part of ``config.data``'s split (train and val; test images
are never seen, not even unlabelled) plus every collection of ``config.ssl.extra_sources`` in
full (e.g. another hospital's unlabelled scans: a run that sees the external domain, which its
reports must say). Labels are never read by the pretraining.

After pretraining, the run reports like every regime: a logistic-regression probe on the frozen
representation, fitted on the labelled train part and regularised by val AUC, evaluated on val,
test and the external sets by the shared protocol (same evaluator, same clustered CIs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from busjax import checkpointing, configlib, sharding, writers
from busjax.data import pipeline, records, sources, splits
from busjax.evaluators import classification, metrics
from busjax.models import contrastive as contrastive_model
from busjax.trainers import protocol, state_utils, supervised

VIEW_POLICIES = ("ultrasound", "trivial")
OPTIMIZERS = ("adamw", "lars")
POSITIVES = ("views", "group")
PROBES = ("logistic", "none")


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def validate_config(c: ml_collections.ConfigDict) -> None:
  """This regime's sections (called by `configlib.validate`)."""
  configlib.validate_model(c.model)
  configlib.validate_optim(c.optim)
  s = c.ssl
  configlib.check(s.temperature > 0, f"ssl.temperature={s.temperature!r}: expected > 0")
  configlib.check(s.steps > 0, f"ssl.steps={s.steps!r}: expected > 0")
  configlib.check(
    s.views in VIEW_POLICIES, f"ssl.views={s.views!r}: expected one of {VIEW_POLICIES}"
  )
  configlib.check(
    s.optimizer in OPTIMIZERS, f"ssl.optimizer={s.optimizer!r}: expected one of {OPTIMIZERS}"
  )
  configlib.check(
    s.positives in POSITIVES, f"ssl.positives={s.positives!r}: expected one of {POSITIVES}"
  )
  configlib.check(
    0.0 <= s.partner_probability <= 1.0,
    f"ssl.partner_probability={s.partner_probability!r}: expected in [0, 1]",
  )
  configlib.check(s.probe in PROBES, f"ssl.probe={s.probe!r}: expected one of {PROBES}")
  configlib.check(
    not c.split.get("cross_validate"),
    "split.cross_validate: contrastive pretraining runs once per split (pretraining per fold "
    "would show each fold's encoder the other folds' test images); pretrain once, then "
    "cross-validate the fine-tuning",
  )
  configlib.check(
    c.input.batch_size >= 2, f"input.batch_size={c.input.batch_size!r}: expected >= 2"
  )


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


def nt_xent(
  z1: jax.Array, z2: jax.Array, temperature: float, groups: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """SimCLR's NT-Xent on the global batch; (loss, top-1 accuracy of finding the positive).

  Written as plain math on the whole (sharded) batch: under `jax.jit` with a data-sharded batch
  XLA inserts the all-gathers, so the loss is the same on any number of devices.

  Args:
    z1, z2: (N, D) projections of the two views of image i at row i.
    temperature: the softmax temperature tau.
    groups: optional (N,) group ids; rows of one group are positives of each other too
      (supervised-contrastive form with weak labels such as the patient, Khosla et al. 2020).

  Returns:
    The mean over the 2N anchors of -mean over positives p of log softmax_j(sim(i, j) / tau)[p]
    (j != i; sim = cosine), and how often the anchor's own other view scores highest.
  """
  z = jnp.concatenate([z1, z2], 0).astype(jnp.float32)
  z = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  n2 = z.shape[0]
  n = n2 // 2
  self_mask = jnp.eye(n2, dtype=bool)
  logits = jnp.where(self_mask, -1e9, z @ z.T / temperature)
  log_prob = jax.nn.log_softmax(logits, axis=-1)
  partner = jnp.concatenate([jnp.arange(n) + n, jnp.arange(n)])
  positives = jax.nn.one_hot(partner, n2, dtype=bool)
  if groups is not None:
    g = jnp.concatenate([groups, groups])
    positives = positives | ((g[:, None] == g[None, :]) & ~self_mask)
  per_anchor = -jnp.where(positives, log_prob, 0.0).sum(-1) / positives.sum(-1)
  accuracy = (jnp.argmax(logits, -1) == partner).mean()
  return per_anchor.mean(), accuracy


# ----------------------------------------------------------------------------------------------
# The pretraining images
# ----------------------------------------------------------------------------------------------


def pretraining_images(
  config: ml_collections.ConfigDict, loaded: tuple[records.Collection, Any]
) -> tuple[records.Collection, np.ndarray]:
  """(collection, group id per record): config.data's non-test split part + extra sources.

  `loaded` is `protocol.load_data(config)`. Group ids join a patient's images and near-duplicate
  copies within each source (for the same-group positives); ids of different sources never
  coincide.
  """
  collection, pairs = loaded
  parts = splits.make_splits(collection, config.split, pairs=pairs)
  pieces = [
    records.Collection(
      name=f"{collection.name}/train+val",
      records=parts["train"].records + parts["val"].records,
      class_names=collection.class_names,
      synthetic=collection.synthetic,
    )
  ]
  for name, data_config in (config.ssl.get("extra_sources") or {}).items():
    extra = sources.from_config(data_config)
    logging.info("Unlabelled pretraining source %s: %d images.", name, len(extra))
    pieces.append(extra)
  near_duplicates = bool(config.split.get("near_duplicates", True))
  all_records, groups, offset = [], [], 0
  for piece in pieces:
    if piece is pieces[0]:
      # The split's records carry their cluster already (patient + near-duplicate group).
      ids = np.unique([r.meta["cluster"] for r in piece.records], return_inverse=True)[1]
    else:
      ids = splits.group_ids(piece, near_duplicates=near_duplicates)
    ids = np.asarray(ids, np.int64).reshape(-1)
    groups.append(ids + offset)
    offset += int(ids.max()) + 1 if len(ids) else 0
    all_records.extend(piece.records)
  merged = records.Collection(
    name="+".join(p.name for p in pieces),
    records=tuple(all_records),
    class_names=pieces[0].class_names,
    synthetic=all(p.synthetic for p in pieces),
  )
  return merged, np.concatenate(groups)


def view_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The augmentation of both views: config.ssl.view_augment with the chosen policy."""
  view = ml_collections.ConfigDict(config.ssl.view_augment.to_dict())
  view.policy = config.ssl.views
  return view


# ----------------------------------------------------------------------------------------------
# Model, optimiser, step
# ----------------------------------------------------------------------------------------------


def create_model(config: ml_collections.ConfigDict, num_classes: int) -> nnx.Module:
  """The classifier fine-tuning will build, wrapped with a projection head."""
  encoder = supervised.create_model(config.model, num_classes, config.seed)
  return contrastive_model.ContrastiveModel(
    encoder,
    hidden=int(config.ssl.projection_hidden),
    projection_dim=int(config.ssl.projection_dim),
    rngs=nnx.Rngs(config.seed + 1),
  )


def create_optimizer(config: ml_collections.ConfigDict, total_steps: int):
  """AdamW (as the supervised regime's) or LARS (SimCLR's large-batch choice), warmup + cosine."""
  if config.ssl.optimizer == "adamw":
    return supervised.create_optimizer(config.optim, total_steps)
  return optax.lars(
    supervised.lr_schedule(config.optim, total_steps),
    weight_decay=config.optim.get("weight_decay", 0.0),
    weight_decay_mask=supervised.kernels_only,
    trust_ratio_mask=supervised.kernels_only,
  )


def make_step(defs: supervised.ModelDefs, tx, config: ml_collections.ConfigDict):
  """The pure step `(state, batch, rng) -> (state, metrics)` on a batch of two views."""
  temperature = float(config.ssl.temperature)
  use_groups = config.ssl.positives == "group"

  def step(state, batch, rng):
    rest = state_utils.reseed_rng_streams(state["rest"], rng)
    model = nnx.merge(defs.train, state["params"], rest)
    # Both views in one forward pass: BatchNorm statistics over the whole (global) batch.
    images = jnp.concatenate([batch["view1"], batch["view2"]], 0)
    inputs = supervised._preprocess(images, config.model)

    def loss_fn(m):
      z = m(inputs)
      z1, z2 = jnp.split(z, 2, axis=0)
      return nt_xent(z1, z2, temperature, batch["group"] if use_groups else None)

    (loss, accuracy), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(
      state, step=state["step"] + 1, params=params, rest=new_rest, opt_state=opt_state
    )
    return new_state, {
      "loss": loss,
      "positive_top1": accuracy,
      "grad_norm": state_utils.global_norm(grads),
      "param_norm": state_utils.global_norm(params),
    }

  return step


def make_embed(defs: supervised.ModelDefs, config: ml_collections.ConfigDict):
  """`((params, rest), batch) -> (N, D)` frozen representation, evaluation mode."""

  def embed(variables, batch):
    model = nnx.merge(defs.eval, *variables)
    return model.embed(supervised._preprocess(batch["image"], config.model))

  return embed


# ----------------------------------------------------------------------------------------------
# Pretrain
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Pretrained:
  """The pretraining's result: a frozen embedding function and facts for the reports."""

  embed: classification.Predictor
  info: dict[str, Any]


def pretrain(
  config: ml_collections.ConfigDict,
  workdir: str,
  loaded: tuple[records.Collection, Any] | None = None,
) -> Pretrained:
  """Pretrains on the unlabelled images; resumable at any checkpoint (state + Grain iterator).

  `loaded`: `protocol.load_data(config)`, if the caller has it already.
  """
  os.makedirs(workdir, exist_ok=True)
  images, groups = pretraining_images(config, loaded or protocol.load_data(config))
  mesh = sharding.make_mesh(config.get("mesh"))
  batch_size = int(config.input.batch_size)
  if batch_size % mesh.devices.size:
    raise ValueError(
      f"config.input.batch_size={batch_size} must be divisible by the {mesh.devices.size} "
      "devices of the mesh"
    )
  total_steps = int(config.ssl.steps)
  epochs = total_steps * batch_size / max(len(images), 1)
  logging.info(
    "Contrastive pretraining on %s (%d unlabelled images, %d groups): %d steps of %d pairs "
    "(%.1f epochs), %s views, tau %.2f.",
    images.name,
    len(images),
    len(np.unique(groups)),
    total_steps,
    batch_size,
    epochs,
    config.ssl.views,
    config.ssl.temperature,
  )
  writer = writers.MetricWriter(workdir)
  writer.write_hparams(config.to_dict())
  view = view_config(config)
  data_iter = iter(
    pipeline.contrastive_dataset(
      images,
      image_size=config.data.image_size,
      global_batch_size=batch_size,
      seed=config.seed,
      view_configs=(view, view),
      groups=groups,
      partner_probability=float(config.ssl.partner_probability),
      num_workers=config.input.get("num_workers", 0),
    )
  )
  model = create_model(config, num_classes=2)
  tx = create_optimizer(config, total_steps)
  defs, state = supervised.create_train_state(model, tx, use_ema=False)
  del model
  train_step = sharding.jit_train_step(make_step(defs, tx, config), mesh, state)
  embed = sharding.jit_predict(make_embed(defs, config), mesh)

  with checkpointing.Checkpointer(workdir, best_metric=None, every_steps=1) as ckpt:
    state, origin = state_utils.restore_or_init(ckpt, config, state, data_iterator=data_iter)
    state = sharding.replicate(state, mesh)
    start_step = int(jax.device_get(state["step"]))
    rng = jax.random.key(config.seed)
    progress = writers.ProgressLogger(
      total_steps, every=config.train.log_every, batch_size=batch_size, start_step=start_step
    )
    ckpt_every = int(config.ssl.get("checkpoint_every") or max(total_steps // 4, 1))
    last_good_step = start_step if origin == "workdir" else None
    t_start = time.time()
    pace = state_utils.StepPacer()
    for step in range(start_step + 1, total_steps + 1):
      batch = next(data_iter)
      batch = {
        "view1": batch["view1"],
        "view2": batch["view2"],
        # The group of the image each row's first view came from (for same-group positives).
        "group": groups[batch["index"]].astype(np.int32),
      }
      batch = sharding.host_to_global(batch, mesh)
      state, step_metrics = train_step(state, batch, jax.random.fold_in(rng, step))
      step_metrics = pace(step_metrics)
      is_ckpt = step % ckpt_every == 0 or step == total_steps
      if step % config.train.log_every == 0 or is_ckpt or step == start_step + 1:
        state_utils.log_train_metrics(
          step_metrics, step, ckpt=ckpt, last_good_step=last_good_step, workdir=workdir,
          writer=writer, progress=progress,
        )  # fmt: skip
      if is_ckpt:
        ckpt.save(
          step,
          state_utils.flatten_state(state),
          data_iterator=data_iter,
          force=step == total_steps,
        )
        last_good_step = step
    ckpt.wait_until_finished()
  writer.close()
  variables = (state["params"], state["rest"])
  mesh_batch = config.input.get("eval_batch_size", batch_size)

  def embed_collection(collection):
    return classification.predict_collection(
      embed,
      variables,
      collection,
      mesh=mesh,
      batch_size=mesh_batch,
      image_size=config.data.image_size,
    )

  info = {
    "pretrained_on": images.name,
    "pretraining_images": len(images),
    "pretraining_steps": total_steps,
    "pretraining_epochs": round(epochs, 1),
    "pretraining_seconds": round(time.time() - t_start, 1),
    "resumed_at_step": start_step,
    "views": config.ssl.views,
  }
  return Pretrained(embed=embed_collection, info=info)


# ----------------------------------------------------------------------------------------------
# The read-out: a linear probe through the shared protocol
# ----------------------------------------------------------------------------------------------


def probe_split(
  config: ml_collections.ConfigDict,
  workdir: str,
  data: dict[str, records.Collection],
  *,
  pretrained: Pretrained,
) -> protocol.Trained:
  """Logistic regression on the frozen representation of data["train"]; C chosen on val AUC."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler

  del workdir
  train = data["train"]
  x_train = np.asarray(pretrained.embed(train), np.float64)
  y_train = train.labels
  val = data.get("val")
  candidates = [0.001, 0.01, 0.1, 1.0, 10.0]

  def fit(c):
    return make_pipeline(
      StandardScaler(), LogisticRegression(C=c, max_iter=2000, class_weight="balanced")
    ).fit(x_train, y_train)

  chosen, best = 1.0, -math.inf
  if val is not None and len(set(val.labels.tolist())) == 2:
    x_val = np.asarray(pretrained.embed(val), np.float64)
    y_val = (val.labels == records.MALIGNANT).astype(int)
    for c in candidates:
      probs = fit(c).predict_proba(x_val)
      auc = metrics.roc_auc(y_val, probs[:, records.MALIGNANT])
      if auc > best:
        chosen, best = c, auc
  classifier = fit(chosen)
  logging.info("Linear probe: C=%g (val AUC %.3f).", chosen, best)

  def predict(collection):
    return classifier.predict_proba(np.asarray(pretrained.embed(collection), np.float64))

  info = {
    **pretrained.info,
    "model": f"{protocol._model_name(config)} + linear probe (C={chosen:g})",
    "steps": pretrained.info["pretraining_steps"],
    "train_seconds": pretrained.info["pretraining_seconds"],
    "selected_checkpoint": "last (pretraining)",
    "selected_step": pretrained.info["pretraining_steps"],
    "trained_on": (
      f"{train.name} (probe); encoder pretrained unlabelled on {pretrained.info['pretrained_on']}"
    ),
  }
  return protocol.Trained(predict=predict, info=info, features=pretrained.embed)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains (checkpoints in `workdir`), then reports the linear probe like every regime."""
  with records.decoded_files_kept():  # One decode per file for pretraining and probe.
    loaded = protocol.load_data(config)  # Once: the pretraining and the probe share it.
    pretrained = pretrain(config, workdir, loaded)
    if config.ssl.probe == "none":
      return {"workdir": workdir, **pretrained.info}
    return protocol.train_and_evaluate(
      config, workdir, functools.partial(probe_split, pretrained=pretrained), loaded=loaded
    )
