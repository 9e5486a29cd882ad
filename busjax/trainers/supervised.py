"""Supervised classification: one loop for every single-image classifier (baseline, fusion...).

Top to bottom: data -> model -> state and shardings -> step -> restore -> loop -> final evaluation.
The step is pure, `(state, batch, rng) -> (state, metrics)`, and jitted exactly once with explicit
shardings (batch over the mesh's ``data`` axis, everything else replicated).

`train_and_evaluate(config, workdir)` trains one split, or every fold in cross-validation mode
(``config.split.cross_validate``), and writes reports under ``workdir/reports``.
"""

from __future__ import annotations

import dataclasses
import json
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

from busjax import checkpointing, sharding, writers
from busjax.data import pipeline, records, sources, splits
from busjax.evaluators import metrics, report
from busjax.models import common as model_common
from busjax.trainers import state_utils


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_splits(
  config: ml_collections.ConfigDict, fold: int | None
) -> dict[str, records.Collection]:
  """The train/val/test collections for `fold` (None: the config's own fold)."""
  collection = sources.from_config(config.data)
  logging.info("Data: %s", json.dumps(collection.describe()))
  return splits.make_splits(collection, config.split, fold=fold)


def load_external(config: ml_collections.ConfigDict) -> dict[str, records.Collection]:
  """External evaluation sets (another hospital / scanner), never used for training."""
  external = {}
  for name, data_config in (config.get("external") or {}).items():
    external[name] = sources.from_config(data_config)
  return external


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


def _preprocess(images, model_config):
  """uint8 batch -> normalised model input, inside the jitted step."""
  mean, std = model_common.normalization_stats(model_config.get("normalization") or "default")
  dtype = jnp.bfloat16 if model_config.get("dtype", "float32") == "bfloat16" else jnp.float32
  return model_common.preprocess(
    images, in_channels=model_config.get("in_channels", 1), mean=mean, std=std, dtype=dtype
  )


def create_optimizer(
  optim_config: ml_collections.ConfigDict, total_steps: int
) -> optax.GradientTransformation:
  """AdamW with linear warmup and cosine decay; optional global-norm clipping."""
  warmup = min(int(optim_config.get("warmup_steps", 0)), max(total_steps - 1, 0))
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0 if warmup else optim_config.lr,
    peak_value=optim_config.lr,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=optim_config.lr * optim_config.get("final_lr_fraction", 0.01),
  )
  chain = []
  if optim_config.get("clip_norm"):
    chain.append(optax.clip_by_global_norm(optim_config.clip_norm))
  chain.append(
    optax.adamw(
      schedule,
      b1=optim_config.get("b1", 0.9),
      b2=optim_config.get("b2", 0.999),
      weight_decay=optim_config.get("weight_decay", 0.0),
    )
  )
  return optax.chain(*chain)


@dataclasses.dataclass(frozen=True)
class ModelDefs:
  """The static halves of the model: one graph for training mode, one for evaluation mode."""

  train: Any
  eval: Any


def create_train_state(model: nnx.Module, tx: optax.GradientTransformation, use_ema: bool):
  """Splits the model into (graphdefs, state dict of arrays) for the pure step."""
  model.train()
  graph_train, params, rest = nnx.split(model, nnx.Param, ...)
  model.eval()
  graph_eval, _, _ = nnx.split(model, nnx.Param, ...)
  state = {
    "step": jnp.zeros((), jnp.int32),
    "params": params,
    "rest": rest,  # BatchNorm statistics, dropout RNG streams: everything that is not a parameter.
    "opt_state": tx.init(params),
  }
  if use_ema:
    state["ema"] = jax.tree.map(jnp.copy, params)
  return ModelDefs(train=graph_train, eval=graph_eval), state


# ----------------------------------------------------------------------------------------------
# Loss and the pure steps
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


def make_train_step(
  defs: ModelDefs, tx, config: ml_collections.ConfigDict, loss_weights: np.ndarray
):
  """The pure step `(state, batch, rng) -> (state, metrics)`; the caller jits it once."""
  focal_gamma = float(config.train.get("focal_gamma", 0.0))
  label_smoothing = float(config.train.get("label_smoothing", 0.0))
  ema_decay = float(config.train.get("ema_decay", 0.0))
  weights = jnp.asarray(loss_weights)

  def train_step(state, batch, rng):
    # Dropout draws from the model's own RNG streams (in state["rest"]); reseed them from the
    # step's rng so that resumed runs and any device count see identical randomness.
    rest = state_utils.reseed_rng_streams(state["rest"], rng)
    model = nnx.merge(defs.train, state["params"], rest)
    images = _preprocess(batch["image"], config.model)

    def loss_fn(m):
      logits = m(images)
      loss = classification_loss(
        logits, batch["label"], weights, focal_gamma=focal_gamma, label_smoothing=label_smoothing
      )
      return loss, logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    _, _, new_rest = nnx.split(model, nnx.Param, ...)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(
      state, step=state["step"] + 1, params=params, rest=new_rest, opt_state=opt_state
    )
    if "ema" in state:
      # Warm-up keeps early EMA weights from being dominated by the random initialisation.
      decay = jnp.minimum(ema_decay, (1.0 + state["step"]) / (10.0 + state["step"]))
      new_state["ema"] = jax.tree.map(
        lambda e, p: decay * e + (1.0 - decay) * p, state["ema"], params
      )
    step_metrics = {
      "loss": loss,
      "accuracy": (logits.argmax(-1) == batch["label"]).mean(),
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
    }
    return new_state, step_metrics

  return train_step


def make_predict_fn(defs: ModelDefs, config: ml_collections.ConfigDict):
  """`(params, rest, batch) -> (probabilities, index, valid)`, evaluation mode.

  The caller jits it with replicated outputs, so every process can read the whole global batch.
  """

  def predict(params, rest, batch):
    model = nnx.merge(defs.eval, params, rest)
    logits = model(_preprocess(batch["image"], config.model))
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1), batch["index"], batch["valid"]

  return predict


def predict_collection(
  predict_fn, params, rest, collection: records.Collection, config, mesh
) -> dict:
  """Runs a jitted `predict_fn` over every record once: ids, labels, patients, probabilities."""
  batch_size = config.input.get("eval_batch_size", config.input.batch_size)
  batch_size = max(batch_size // mesh.devices.size, 1) * mesh.devices.size
  probs = np.zeros((len(collection), len(collection.class_names)), np.float32)
  seen = np.zeros(len(collection), bool)
  batches = pipeline.eval_batches(
    collection,
    image_size=config.data.image_size,
    batch_size=batch_size,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  for batch in batches:
    arrays = sharding.host_to_global({k: batch[k] for k in ("image", "index", "valid")}, mesh)
    out, index, valid = jax.device_get(predict_fn(params, rest, arrays))
    probs[index[valid]] = out[valid]
    seen[index[valid]] = True
  if not seen.all():
    raise RuntimeError(f"{collection.name}: evaluation missed {int((~seen).sum())} records")
  return {
    "ids": [r.id for r in collection.records],
    "labels": collection.labels,
    "patient_ids": collection.patient_ids,
    "probs": probs,
    "p_malignant": probs[:, records.MALIGNANT],
    "y_malignant": (collection.labels == records.MALIGNANT).astype(np.int32),
  }


# ----------------------------------------------------------------------------------------------
# Restore
# ----------------------------------------------------------------------------------------------


def _restore(ckpt: checkpointing.Checkpointer, config, state, data_iterator):
  """Resume order, first that applies: workdir -> config.resume -> config.init_from -> scratch."""
  abstract = state_utils.abstract_flat_state(state)
  restored = ckpt.restore_latest(abstract, data_iterator=data_iterator)
  if restored is not None:
    step, flat = restored
    logging.info("Resuming from this workdir's checkpoint at step %d.", step)
    return state_utils.unflatten_state(state, flat), "workdir"
  if config.get("resume"):
    flat = checkpointing.load_state(config.resume, abstract, which="latest")
    logging.info("Continuing run %s (config.resume).", config.resume)
    return state_utils.unflatten_state(state, flat), "resume"
  if config.get("init_from"):
    # Weights only: another run's parameters and statistics, fresh optimiser and step.
    target = {"params": state["params"], "rest": state["rest"]}
    flat = checkpointing.load_state(
      config.init_from, state_utils.abstract_flat_state(target), which="best", partial=True
    )
    loaded = state_utils.unflatten_state(target, flat)
    logging.info("Initialised weights from %s (config.init_from).", config.init_from)
    new_state = dict(state, **loaded)
    if "ema" in state:
      new_state["ema"] = jax.tree.map(jnp.copy, loaded["params"])
    return new_state, "init_from"
  return state, "scratch"


# ----------------------------------------------------------------------------------------------
# Train one split
# ----------------------------------------------------------------------------------------------


def _num_steps(config, num_train: int) -> int:
  if config.train.get("num_steps"):
    return int(config.train.num_steps)
  return max(1, math.ceil(config.train.epochs * num_train / config.input.batch_size))


def _provenance(
  config, collection: records.Collection, split_name: str, trained_on: str, step: int
):
  return {
    "source": collection.name,
    "split": split_name,
    "synthetic": bool(collection.synthetic),
    "trained_on": trained_on,
    "model": config.model.name
    + (f"/{config.model.variant}" if config.model.get("variant") else ""),
    "step": int(step),
    "images": len(collection),
    "config_seed": int(config.seed),
  }


def train_split(
  config: ml_collections.ConfigDict,
  workdir: str,
  data: dict[str, records.Collection],
  external: dict[str, records.Collection],
) -> dict[str, Any]:
  """Trains on data["train"], selects on data["val"], reports on val/test/external; a summary."""
  os.makedirs(workdir, exist_ok=True)
  train_set, val_set = data["train"], data.get("val")
  if val_set is not None and len(val_set) == 0:
    val_set = None
  num_classes = len(train_set.class_names)
  mesh = sharding.make_mesh(config.get("mesh"))
  batch_size = config.input.batch_size
  if batch_size % mesh.devices.size:
    raise ValueError(
      f"config.input.batch_size={batch_size} must be divisible by the {mesh.devices.size} "
      "devices of the mesh"
    )
  total_steps = _num_steps(config, len(train_set))
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
  train_ds = pipeline.train_dataset(
    train_set,
    image_size=config.data.image_size,
    global_batch_size=batch_size,
    seed=config.seed,
    augment_config=config.input.augment,
    num_workers=config.input.get("num_workers", 0),
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  train_iter = iter(train_ds)

  # --- Model, optimiser, state and shardings.
  model = create_model(config.model, num_classes, config.seed)
  tx = create_optimizer(config.optim, total_steps)
  defs, state = create_train_state(model, tx, use_ema=bool(config.train.get("ema_decay")))
  del model
  replicated = sharding.replicated(mesh)
  state = jax.device_put(state, replicated)
  state_shardings = jax.tree.map(lambda _: replicated, state)
  batch_shardings = {"image": sharding.data_sharding(mesh), "label": sharding.data_sharding(mesh)}

  weights = class_weights(train_set.labels, num_classes, config.train.get("class_weights"))
  train_step = jax.jit(
    make_train_step(defs, tx, config, weights),
    in_shardings=(state_shardings, batch_shardings, replicated),
    out_shardings=(state_shardings, replicated),
    donate_argnums=0,
  )
  predict = jax.jit(make_predict_fn(defs, config), out_shardings=replicated)

  # --- Restore.
  ckpt = checkpointing.Checkpointer(
    workdir, best_metric="val_auc" if val_set is not None else None, best_mode="max", every_steps=1
  )
  state, origin = _restore(ckpt, config, state, train_iter)
  state = jax.device_put(state, state_shardings)
  start_step = int(jax.device_get(state["step"]))

  # --- Loop.
  rng = jax.random.key(config.seed)
  progress = writers.ProgressLogger(
    total_steps, every=config.train.log_every, batch_size=batch_size, start_step=start_step
  )
  eval_every = config.train.get("eval_every") or total_steps
  ckpt_every = config.train.get("checkpoint_every") or eval_every
  last_good_step = start_step if origin == "workdir" else None
  t_start, step = time.time(), start_step
  for step in range(start_step + 1, total_steps + 1):
    batch = next(train_iter)
    batch = sharding.host_to_global({"image": batch["image"], "label": batch["label"]}, mesh)
    state, step_metrics = train_step(state, batch, jax.random.fold_in(rng, step))
    is_eval = step % eval_every == 0 or step == total_steps
    is_ckpt = is_eval or step % ckpt_every == 0
    if step % config.train.log_every == 0 or is_ckpt or step == start_step + 1:
      host_metrics = jax.device_get(step_metrics)
      if not state_utils.all_finite(host_metrics):
        ckpt.wait_until_finished()
        where = (
          f"the last good checkpoint (step {last_good_step}) is kept in {workdir}"
          if last_good_step
          else "no checkpoint was written yet"
        )
        raise TrainingError(
          f"non-finite training metrics at step {step}: "
          f"{ {k: float(v) for k, v in host_metrics.items()} }; {where}. "
          "Lower config.optim.lr, set config.optim.clip_norm, or use float32."
        )
      writer.write_scalars(step, host_metrics, split="train")
      progress(step, host_metrics)
    ckpt_metrics = None
    if is_eval and val_set is not None:
      eval_params = state["ema"] if "ema" in state else state["params"]
      val = predict_collection(predict, eval_params, state["rest"], val_set, config, mesh)
      ckpt_metrics = {"val_auc": metrics.roc_auc(val["y_malignant"], val["p_malignant"])}
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

  # --- Final evaluation on the selected checkpoint.
  final_state, selected = state, "last"
  if val_set is not None and ckpt.best_step() is not None:
    _, flat = ckpt.restore_best(state_utils.abstract_flat_state(state))
    final_state, selected = (
      state_utils.unflatten_state(state, flat),
      f"best (step {ckpt.best_step()})",
    )
  ckpt.close()
  eval_params = final_state["ema"] if "ema" in final_state else final_state["params"]
  summary = {
    "workdir": workdir,
    "steps": total_steps,
    # Seconds of this process's training: steps resumed_at_step+1 .. steps (0 steps when a
    # finished run is re-evaluated, e.g. a CV re-run whose folds are done).
    "train_seconds": round(train_seconds, 1),
    "resumed_at_step": start_step,
    "selected_checkpoint": selected,
    "reports": {},
  }
  threshold = None
  trained_on = train_set.name
  evaluations = [("val", val_set), ("test", data.get("test"))] + list(external.items())
  for split_name, collection in evaluations:
    if collection is None or len(collection) == 0:
      continue
    preds = predict_collection(predict, eval_params, final_state["rest"], collection, config, mesh)
    if split_name == "val":
      threshold = float(metrics.youden_threshold(preds["y_malignant"], preds["p_malignant"]))
    if jax.process_index() != 0:
      continue  # Every process ran the (collective) prediction; one writes the files.
    reader = None
    if all(r.meta.get("birads") not in (None, "") for r in collection.records):
      # BI-RADS >= 4 (biopsy recommended) as the reader's call, e.g. BUS-BRA's radiologists.
      reader = {"birads": [r.meta["birads"] for r in collection.records], "threshold": 4}
    result = report.write_report(
      os.path.join(workdir, "reports"),
      name=split_name,
      provenance=_provenance(config, collection, split_name, trained_on, total_steps),
      y=preds["y_malignant"],
      p=preds["p_malignant"],
      patient_ids=preds["patient_ids"],
      ids=preds["ids"],
      threshold=threshold,
      reader=reader,
      bootstrap=config.report.bootstrap_resamples,
    )
    summary["reports"][split_name] = {
      "auc": result["auc"]["value"],
      "auc_ci": result["auc"]["bootstrap_ci"],
      "source": collection.name,
      "images": len(collection),
    }
    ci = result["auc"]["bootstrap_ci"]
    logging.info(
      "%s: AUC %.3f [%.3f, %.3f] on %s (%d images%s), checkpoint %s -> %s",
      split_name,
      result["auc"]["value"],
      ci["lo"],
      ci["hi"],
      collection.name,
      len(collection),
      ", SYNTHETIC" if collection.synthetic else "",
      selected,
      os.path.join(workdir, "reports", split_name, "report.json"),
    )
    np.savez(
      os.path.join(workdir, "reports", f"{split_name}_predictions.npz"),
      p_malignant=preds["p_malignant"],
      y_malignant=preds["y_malignant"],
      patient_ids=np.asarray(preds["patient_ids"], dtype=str),
      ids=np.asarray(preds["ids"], dtype=str),
    )
  writer.close()
  if jax.process_index() == 0:
    report.write_json(os.path.join(workdir, "summary.json"), summary)
  return summary


# ----------------------------------------------------------------------------------------------
# Entry point: one split, or k-fold cross-validation
# ----------------------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates as `config` says; checkpoints, metrics and reports go under `workdir`."""
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  external = load_external(config)
  if not config.split.get("cross_validate"):
    return train_split(config, workdir, load_splits(config, fold=None), external)

  k = int(config.split.k)
  summaries, pooled = [], []
  for fold in range(k):
    fold_dir = os.path.join(workdir, f"fold{fold}")
    summaries.append(train_split(config, fold_dir, load_splits(config, fold=fold), external))
    pooled.append(np.load(os.path.join(fold_dir, "reports", "test_predictions.npz")))
  return _aggregate_folds(config, workdir, summaries, pooled)


def _aggregate_folds(config, workdir, summaries, pooled) -> dict[str, Any]:
  """Out-of-fold report: every image predicted once by the model that did not see it."""
  y = np.concatenate([p["y_malignant"] for p in pooled])
  p = np.concatenate([p["p_malignant"] for p in pooled])
  patients = np.concatenate([p["patient_ids"] for p in pooled])
  ids = np.concatenate([p["ids"] for p in pooled])
  source = sources.from_config(config.data)
  provenance = _provenance(
    config,
    source,
    f"{config.split.k}-fold CV, out-of-fold test predictions",
    trained_on=f"{source.name} (each fold's training part)",
    step=summaries[0]["steps"],
  )
  pooled_report = report.write_report(
    os.path.join(workdir, "reports"),
    name="cv_out_of_fold",
    provenance=provenance,
    y=y,
    p=p,
    patient_ids=patients,
    ids=ids,
    bootstrap=config.report.bootstrap_resamples,
  )
  fold_aucs = [s["reports"]["test"]["auc"] for s in summaries]
  summary = {
    "folds": summaries,
    "fold_test_auc": fold_aucs,
    "fold_test_auc_mean": float(np.mean(fold_aucs)),
    "fold_test_auc_sd": float(np.std(fold_aucs)),
    "out_of_fold": {
      "auc": pooled_report["auc"]["value"],
      "auc_ci": pooled_report["auc"]["bootstrap_ci"],
    },
  }
  for name in summaries[0]["reports"]:
    if name not in ("val", "test"):
      aucs = [s["reports"][name]["auc"] for s in summaries]
      summary[f"{name}_auc_per_fold"] = aucs
      summary[f"{name}_auc_mean"] = float(np.mean(aucs))
  report.write_json(os.path.join(workdir, "summary.json"), summary)
  ci = summary["out_of_fold"]["auc_ci"]
  logging.info(
    "%d-fold CV: out-of-fold AUC %.3f [%.3f, %.3f]; fold test AUCs %s -> %s",
    config.split.k,
    summary["out_of_fold"]["auc"],
    ci["lo"],
    ci["hi"],
    ", ".join(f"{a:.3f}" for a in fold_aucs),
    os.path.join(workdir, "reports", "cv_out_of_fold", "report.json"),
  )
  return summary
