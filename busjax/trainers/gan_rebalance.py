"""GAN rebalancing (after Zhao et al. 2026): a class-conditional dual-discriminator GAN synthesises
the minority class round by round until the training set balances; a channel + spatial attention
classifier learns from real + synthetic images.

``config.rebalance.method`` picks the method or one of its baselines, all on the same classifier,
split and protocol (so the ablation table compares like for like):

* "gan": round 0 trains the classifier on real images only; round k = 1..K trains the GAN
  further (to step ``k * gan.steps_per_round``), samples minority candidates with the EMA
  generator and keeps those that pass a quality filter, adds them, and trains the classifier
  on real + synthetic (mixed through the Grain pipeline, every record equally likely). Each
  round adds ``1 / (rounds left)`` of the remaining deficit, so round K balances the classes.
* "none": real images, plain loss. "class_weights": real images, class-weighted loss.
  "oversample": real images, the minority drawn more often so that classes balance.

The quality filter (each stage's count is in summary.json): D1 must score a candidate at or
above the `d_quantile` of the candidates' scores (D1 rewards real data); the previous round's
classifier must give it the minority class with at least `min_confidence`; in that classifier's
pooled features it must lie no further from the nearest real minority training image than the
`distance_quantile` of real-to-real nearest distances; and the memorisation guard drops
near-copies of training images (`busjax.evaluators.sample_quality.memorisation_mask`).

Synthetic images only ever enter training: validation, test and external reports are on real
images, and every report says how many synthetic images trained the model. Per round,
``roundK/`` holds ``synthetic.npz`` (the kept images, uint8), ``samples.png`` (a grid marked
SYNTHETIC), ``sample_quality.json`` (KID, Frechet distance, precision/recall and memorisation
against held-out real minority images, in the classifier's features) and the classifier's run.
Everything resumes: the GAN from its newest checkpoint (with the data iterator), a finished
round from its files, a classifier from its own checkpoints.
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

from busjax import checkpointing, configlib, sharding, writers
from busjax.data import pipeline, records
from busjax.evaluators import metrics, report, sample_quality
from busjax.models import diffaugment, gan
from busjax.trainers import protocol, state_utils, supervised

METHODS = ("gan", "none", "class_weights", "oversample")
SYNTHETIC_FILE = "synthetic.npz"
QUALITY_FILE = "sample_quality.json"
GRID_FILE = "samples.png"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def validate_config(c: ml_collections.ConfigDict) -> None:
  """The classifier's sections (as the supervised regime), then ``rebalance`` and ``gan``."""
  supervised.validate_config(c)
  check = configlib.check
  r = c.rebalance
  check(r.method in METHODS, f"rebalance.method={r.method!r}: expected one of {METHODS}")
  check(not c.get("resume"), "resume: not supported here; re-run with the same --workdir instead")
  if r.method != "gan":
    return
  check(r.rounds >= 1, f"rebalance.rounds={r.rounds!r}: expected >= 1")
  check(0 <= r.d_quantile < 1, f"rebalance.d_quantile={r.d_quantile!r}: expected in [0, 1)")
  check(
    0 <= r.min_confidence <= 1, f"rebalance.min_confidence={r.min_confidence!r}: expected [0, 1]"
  )
  check(
    0 < r.distance_quantile <= 1,
    f"rebalance.distance_quantile={r.distance_quantile!r}: expected in (0, 1]",
  )
  check(
    0 <= r.memorisation_quantile < 1,
    f"rebalance.memorisation_quantile={r.memorisation_quantile!r}: expected in [0, 1)",
  )
  check(r.candidates >= 1, f"rebalance.candidates={r.candidates!r}: expected >= 1")
  check(r.max_draws >= 1, f"rebalance.max_draws={r.max_draws!r}: expected >= 1")
  g = c.gan
  check(g.objective in gan.OBJECTIVES, f"gan.objective={g.objective!r}: expected {gan.OBJECTIVES}")
  try:
    gan.num_resolution_steps(gan_image_size(c))
    diffaugment.parse_policy(g.diffaugment)
  except ValueError as e:
    check(False, f"gan: {e}")
  check(g.alpha > 0 and g.beta > 0, f"gan.alpha={g.alpha!r}, gan.beta={g.beta!r}: expected > 0")
  check(g.r1_gamma >= 0, f"gan.r1_gamma={g.r1_gamma!r}: expected >= 0")
  check(g.steps_per_round >= 1, f"gan.steps_per_round={g.steps_per_round!r}: expected >= 1")
  check(g.batch_size >= 2, f"gan.batch_size={g.batch_size!r}: expected >= 2")
  check(0 <= g.ema_decay < 1, f"gan.ema_decay={g.ema_decay!r}: expected in [0, 1)")
  configlib.validate_optim(g.optim, prefix="gan.optim")


def gan_image_size(c: ml_collections.ConfigDict) -> int:
  """The GAN's side: ``gan.image_size``, or the classifier's (``data.image_size``) if 0."""
  return int(c.gan.image_size or c.data.image_size)


def _classifier_config(config, class_weights: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict(config.to_dict())
  c.train.class_weights = class_weights
  return c


# ----------------------------------------------------------------------------------------------
# GAN: state and the pure step
# ----------------------------------------------------------------------------------------------

D_NAMES = ("discriminator1", "discriminator2")


@dataclasses.dataclass(frozen=True)
class GanDefs:
  """Static halves: each network in training mode, the generator and D1 in evaluation mode,
  and the generator for BatchNorm standing statistics (training mode, momentum 0)."""

  train: dict[str, Any]
  generator_eval: Any
  d1_eval: Any
  generator_refresh: Any
  latent_dim: int


def _optimizer(optim_config) -> optax.GradientTransformation:
  """Adam with GAN betas (b1 0, b2 0.99 by default), constant rate, no decay."""
  return optax.adam(
    optim_config.lr, b1=optim_config.get("b1", 0.0), b2=optim_config.get("b2", 0.99)
  )


def create_gan_state(config, num_classes: int):
  """(GanDefs, state dict, generator tx, discriminator tx) for ``config.gan``."""
  model_config = ml_collections.ConfigDict(config.gan.to_dict())
  model_config.image_size = gan_image_size(config)
  models = gan.create(model_config, num_classes=num_classes, rngs=nnx.Rngs(config.seed + 17))
  nets = {"generator": models.generator, "discriminator1": models.discriminator1}
  if models.discriminator2 is not None:
    nets["discriminator2"] = models.discriminator2
  graphs, state = {}, {"step": jnp.zeros((), jnp.int32)}
  for name, net in nets.items():
    net.train()
    graphs[name], params, rest = nnx.split(net, nnx.Param, ...)
    state[name] = {"params": params, "rest": rest}
  models.generator.eval()
  generator_eval = nnx.split(models.generator, nnx.Param, ...)[0]
  models.discriminator1.eval()
  d1_eval = nnx.split(models.discriminator1, nnx.Param, ...)[0]
  refresh = nnx.clone(models.generator)
  refresh.train()
  for _, module in nnx.iter_modules(refresh):
    if isinstance(module, nnx.BatchNorm):
      module.momentum = 0.0
  generator_refresh = nnx.split(refresh, nnx.Param, ...)[0]
  g_tx = _optimizer(config.gan.optim)
  d_tx = _optimizer(config.gan.optim)
  state["g_opt"] = g_tx.init(state["generator"]["params"])
  state["d_opt"] = d_tx.init({n: state[n]["params"] for n in D_NAMES if n in state})
  state["generator_ema"] = jax.tree.map(jnp.copy, state["generator"]["params"])
  defs = GanDefs(
    train=graphs,
    generator_eval=generator_eval,
    d1_eval=d1_eval,
    generator_refresh=generator_refresh,
    latent_dim=models.generator.latent_dim,
  )
  return defs, state, g_tx, d_tx


def make_gan_step(defs: GanDefs, g_tx, d_tx, gan_config):
  """The pure step `(state, batch, rng) -> (state, metrics)`: one discriminator update (D1, and
  D2 for D2GAN, on real and generated images with the same DiffAugment draw), then one
  generator update, then the generator's EMA."""
  dual = "discriminator2" in defs.train
  alpha, beta = float(gan_config.alpha), float(gan_config.beta)
  r1_gamma = float(gan_config.r1_gamma)
  policy = gan_config.diffaugment
  ema_decay = float(gan_config.ema_decay)
  augment = (lambda x, key: diffaugment.diff_augment(x, key, policy)) if policy else None

  def maybe_augment(images, key):
    return augment(images, key) if augment else images

  def step(state, batch, rng):
    z_key, aug_key, z2_key, aug2_key = jax.random.split(rng, 4)
    merge = lambda name: nnx.merge(defs.train[name], state[name]["params"], state[name]["rest"])
    generator = merge("generator")
    ds = [merge(n) for n in D_NAMES if n in state]
    real = gan.to_model_range(batch["image"])
    labels = batch["label"]
    fake = jax.lax.stop_gradient(generator.sample(z_key, labels))
    # One key for both: real image i and fake image i get the same translation, cutout and
    # intensity change, so D cannot tell them apart by the augmentation.
    real_aug, fake_aug = maybe_augment(real, aug_key), maybe_augment(fake, aug_key)
    n = real.shape[0]

    def real_and_fake(d):
      # One call on [real; fake]: one power-iteration update of spectral norm per step.
      out = d(jnp.concatenate([real_aug, fake_aug]), jnp.concatenate([labels, labels]))
      return out[:n], out[n:]

    def d_loss_fn(*ds):
      outs = [real_and_fake(d) for d in ds]
      if dual:
        (d1_real, d1_fake), (d2_real, d2_fake) = outs
        loss = gan.d2gan_discriminator_loss(d1_real, d1_fake, d2_real, d2_fake, alpha, beta)
      else:
        (d1_real, d1_fake), d2_real = outs[0], None
        loss = gan.gan_discriminator_loss(d1_real, d1_fake)
      total, r1 = loss, jnp.zeros((), jnp.float32)
      if r1_gamma:
        # R1 differentiates D1 inside this loss: an evaluation-mode view leaves u alone there.
        r1 = gan.r1_penalty(nnx.with_attributes(ds[0], use_running_average=True), real, labels)
        total = total + 0.5 * r1_gamma * r1
      return total, (loss, r1, jnp.mean(d1_real), jnp.mean(d1_fake))

    argnums = tuple(range(len(ds)))
    (_, (d_loss, r1, d1_real_mean, d1_fake_mean)), d_grads = nnx.value_and_grad(
      d_loss_fn, argnums=argnums, has_aux=True
    )(*ds)
    d_names = [n for n in D_NAMES if n in state]
    d_params = {name: state[name]["params"] for name in d_names}
    d_grads = dict(zip(d_names, d_grads, strict=True))
    updates, d_opt = d_tx.update(d_grads, state["d_opt"], d_params)
    d_params = optax.apply_updates(d_params, updates)
    for name, d in zip(d_names, ds, strict=True):
      nnx.update(d, d_params[name])

    # The discriminators are constants in the generator's loss (closed over, not arguments),
    # so they must not write state there: evaluation-mode views (u was updated above).
    views = [nnx.with_attributes(d, use_running_average=True) for d in ds]

    def g_loss_fn(generator):
      fake = maybe_augment(generator.sample(z2_key, labels), aug2_key)
      if dual:
        return gan.d2gan_generator_loss(views[0](fake, labels), views[1](fake, labels), beta)
      return gan.gan_generator_loss(views[0](fake, labels))

    g_loss, g_grads = nnx.value_and_grad(g_loss_fn)(generator)
    g_updates, g_opt = g_tx.update(g_grads, state["g_opt"], state["generator"]["params"])
    g_params = optax.apply_updates(state["generator"]["params"], g_updates)
    new_state = dict(state, step=state["step"] + 1, g_opt=g_opt, d_opt=d_opt)
    new_state["generator"] = {"params": g_params, "rest": nnx.split(generator, nnx.Param, ...)[2]}
    for name, d in zip(d_names, ds, strict=True):
      new_state[name] = {"params": d_params[name], "rest": nnx.split(d, nnx.Param, ...)[2]}
    new_state["generator_ema"] = state_utils.ema_update(
      state["generator_ema"], g_params, state["step"], ema_decay
    )
    step_metrics = {
      "d_loss": d_loss,
      "g_loss": g_loss,
      "r1": r1,
      "d1_real": d1_real_mean,
      "d1_fake": d1_fake_mean,
      "d_grad_norm": state_utils.global_norm(d_grads),
      "g_grad_norm": state_utils.global_norm(g_grads),
    }
    return new_state, step_metrics

  return step


def make_sampler(defs: GanDefs, mesh):
  """`(state, generator_rest, key, labels) -> (uint8 images (N, S, S), D1 scores (N,))` with the
  EMA generator and its standing statistics; jitted, replicated outputs."""

  def sample(state, generator_rest, key, labels):
    generator = nnx.merge(defs.generator_eval, state["generator_ema"], generator_rest)
    images = generator.sample(key, labels)
    d1 = nnx.merge(defs.d1_eval, state["discriminator1"]["params"], state["discriminator1"]["rest"])
    return gan.to_uint8(images)[..., 0], d1(images, labels)

  return sharding.jit(sample, out_shardings=sharding.replicated(mesh))


def make_standing_stats(defs: GanDefs, mesh):
  """`(ema params, rest, key, label_probs, batches, batch) -> rest`: the generator's BatchNorm
  statistics for the EMA weights (BigGAN's standing statistics): the live generator's running
  averages describe other weights, so each of `batches` latent batches (classes drawn with
  the training frequencies) runs in training mode with momentum 0 and the statistics are
  averaged."""

  def one(params, rest, key, labels):
    generator = nnx.merge(defs.generator_refresh, params, rest)
    generator.sample(key, labels)
    return nnx.split(generator, nnx.Param, ...)[2]

  one = sharding.jit(one, out_shardings=sharding.replicated(mesh))

  def standing(params, rest, key, label_probs, batches: int, batch_size: int):
    def one_batch(i):
      label_key, z_key = jax.random.split(jax.random.fold_in(key, i))
      labels = jax.random.choice(
        label_key, len(label_probs), (batch_size,), p=jnp.asarray(label_probs)
      )
      return one(params, rest, z_key, labels)

    return state_utils.average_statistics(one_batch, range(batches), like=rest)

  return standing


class _GanRun:
  """The GAN of one split: its state, jitted step, data iterator and checkpoints, trained in
  stretches (`train_until`) across rounds."""

  def __init__(self, config, workdir: str, train_set: records.Collection, mesh):
    self.config = config
    self.workdir = workdir
    self.mesh = mesh
    g = config.gan
    num_classes = len(train_set.class_names)
    self.image_size = gan_image_size(config)
    if g.batch_size % mesh.devices.size:
      raise ValueError(
        f"config.gan.batch_size={g.batch_size} must be divisible by the "
        f"{mesh.devices.size} devices of the mesh"
      )
    self.defs, state, g_tx, d_tx = create_gan_state(config, num_classes)
    self.train_iter = iter(
      pipeline.train_dataset(
        train_set,
        image_size=self.image_size,
        global_batch_size=g.batch_size,
        seed=config.seed + 29,
        augment_config=g.get("augment"),
        num_workers=config.input.get("num_workers", 0),
      )
    )
    self.step_fn = sharding.jit_train_step(make_gan_step(self.defs, g_tx, d_tx, g), mesh, state)
    self.sampler = make_sampler(self.defs, mesh)
    self.standing_stats = make_standing_stats(self.defs, mesh)
    counts = np.bincount(train_set.labels, minlength=num_classes).astype(np.float64)
    self.label_probs = counts / counts.sum()
    self.ckpt = checkpointing.Checkpointer(workdir, every_steps=max(1, g.checkpoint_every))
    # No init_from/resume for the GAN: it always trains on this split (this workdir resumes).
    no_transfer = ml_collections.ConfigDict({"resume": None, "init_from": None})
    state, _ = state_utils.restore_or_init(
      self.ckpt, no_transfer, state, data_iterator=self.train_iter
    )
    self.state = sharding.replicate(state, mesh)
    self.writer = writers.MetricWriter(workdir)
    self.train_seconds = 0.0

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state["step"]))

  def train_until(self, last_step: int) -> None:
    """Trains to `last_step` (nothing if already there); checkpoints on the grid and at the end."""
    start = self.step
    if start >= last_step:
      return
    g = self.config.gan
    rng = jax.random.key(self.config.seed + 31)
    progress = writers.ProgressLogger(
      last_step, every=g.log_every, batch_size=g.batch_size, start_step=start
    )
    last_good = start or None
    t0 = time.time()
    pace = state_utils.StepPacer()
    for step in range(start + 1, last_step + 1):
      batch = next(self.train_iter)
      batch = sharding.host_to_global({"image": batch["image"], "label": batch["label"]}, self.mesh)
      self.state, step_metrics = self.step_fn(self.state, batch, jax.random.fold_in(rng, step))
      step_metrics = pace(step_metrics)
      if step % g.log_every == 0 or step == last_step or step == start + 1:
        state_utils.log_train_metrics(
          step_metrics, step, ckpt=self.ckpt, last_good_step=last_good, workdir=self.workdir,
          writer=self.writer, progress=progress, split="gan",
        )  # fmt: skip
      if step % max(1, g.checkpoint_every) == 0 or step == last_step:
        self.ckpt.save(
          step,
          state_utils.flatten_state(self.state),
          data_iterator=self.train_iter,
          force=step == last_step,
        )
        last_good = step
    self.ckpt.wait_until_finished()
    self.train_seconds += time.time() - t0

  def sample(self, label: int, count: int, key: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """`count` images of class `label` and their D1 scores, from the EMA generator."""
    g = self.config.gan
    stats_key, sample_key = jax.random.split(key)
    rest = self.standing_stats(
      self.state["generator_ema"],
      self.state["generator"]["rest"],
      stats_key,
      self.label_probs,
      int(g.ema_bn_batches),
      int(g.batch_size),
    )
    images, scores = [], []
    for i in range(math.ceil(count / g.batch_size)):
      labels = jnp.full((g.batch_size,), label, jnp.int32)
      batch_images, batch_scores = self.sampler(
        self.state, rest, jax.random.fold_in(sample_key, i), labels
      )
      images.append(np.asarray(batch_images))
      scores.append(np.asarray(batch_scores, np.float32))
    return np.concatenate(images)[:count], np.concatenate(scores)[:count]

  def close(self) -> None:
    self.ckpt.close()
    self.writer.close()


# ----------------------------------------------------------------------------------------------
# Synthetic records
# ----------------------------------------------------------------------------------------------


def synthetic_collection(
  images: np.ndarray, label: int, rounds: np.ndarray, like: records.Collection
) -> records.Collection:
  """In-memory records of generated images, marked synthetic (ids ``synthetic/roundK/i``)."""
  recs = tuple(
    records.Record(
      id=f"synthetic/round{int(k)}/{i:05d}",
      label=int(label),
      patient_id=f"synthetic/round{int(k)}/{i:05d}",
      image=np.asarray(image, np.uint8),
      meta={"synthetic": True, "round": int(k)},
    )
    for i, (image, k) in enumerate(zip(images, rounds, strict=True))
  )
  return records.Collection(
    name=f"{like.name} GAN-synthetic",
    records=recs,
    class_names=like.class_names,
    synthetic=True,
  )


def _save_npz_atomic(path: str, **arrays: np.ndarray) -> None:
  tmp = path + ".tmp.npz"
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def _resized(collection: records.Collection, size: int, limit: int) -> np.ndarray:
  batch = next(
    pipeline.eval_batches(
      collection.subset(range(min(limit, len(collection)))),
      image_size=size,
      batch_size=limit,
      process_index=0,
      process_count=1,
    )
  )
  return batch["image"][batch["valid"], ..., 0]


# ----------------------------------------------------------------------------------------------
# Train one split
# ----------------------------------------------------------------------------------------------


def _real_only(config, workdir, data, method):
  """The baselines: the same classifier on real images only."""
  train_set = data["train"]
  cfg = _classifier_config(config, "balanced" if method == "class_weights" else "none")
  batches = None
  if method == "oversample":
    counts = np.bincount(train_set.labels, minlength=len(train_set.class_names))
    weights = 1.0 / counts[train_set.labels]

    def batches(seed):
      return iter(
        pipeline.train_dataset(
          train_set,
          image_size=config.data.image_size,
          global_batch_size=config.input.batch_size,
          seed=seed,
          augment_config=config.input.augment,
          num_workers=config.input.get("num_workers", 0),
          sample_weights=weights,
        )
      )

  trained = supervised.train_split(cfg, workdir, data, train_batches=batches)
  trained.info.update(rebalance=method, synthetic_train_images=0)
  return trained


def _mixed_batches(config, train_set, synthetic):
  """seed -> iterator over real + synthetic, every record equally likely."""

  def batches(seed):
    return iter(
      pipeline.mixture_dataset(
        [train_set, synthetic],
        [len(train_set), len(synthetic)],
        image_size=config.data.image_size,
        global_batch_size=config.input.batch_size,
        seed=seed,
        augment_config=config.input.augment,
        num_workers=config.input.get("num_workers", 0),
      )
    )

  return batches


def _val_auc(trained, val_set) -> float | None:
  if val_set is None or len(set(val_set.labels.tolist())) < 2:
    return None
  probs = trained.predict(val_set)
  y = (val_set.labels == records.MALIGNANT).astype(np.int32)
  return float(metrics.roc_auc(y, probs[:, records.MALIGNANT]))


def _draw_round(config, gan_run, classifier, train_set, val_set, minority, need, key, k):
  """Samples candidates until `need` pass the filter (or `max_draws` draws); kept images and
  the round's counts."""
  r = config.rebalance
  train_features = classifier.features(train_set)
  minority_features = train_features[train_set.labels == minority]
  reference = None
  if val_set is not None and np.sum(val_set.labels == minority) >= 2:
    val_minority = val_set.subset(np.flatnonzero(val_set.labels == minority))
    reference = classifier.features(val_minority)
  kept, counts = [], {"candidates": 0}
  per_draw = max(1, math.ceil(need * r.candidates))
  for draw in range(int(r.max_draws)):
    if sum(len(x) for x in kept) >= need:
      break
    images, scores = gan_run.sample(minority, per_draw, jax.random.fold_in(key, draw))
    candidates = synthetic_collection(images, minority, np.full(len(images), k), train_set)
    masks = sample_quality.filter_candidates(
      d_scores=scores,
      p_minority=classifier.predict(candidates)[:, minority],
      features=classifier.features(candidates),
      minority_features=minority_features,
      train_features=train_features,
      reference_features=reference,
      rebalance_config=r,
    )
    counts["candidates"] += len(images)
    for name, mask in masks.items():
      counts[f"passed_{name}"] = counts.get(f"passed_{name}", 0) + int(mask.sum())
    kept.append(images[masks["keep"]])
  images = np.concatenate(kept)[:need] if kept else np.zeros((0,), np.uint8)
  counts["kept"] = len(images)
  if len(images) < need:
    logging.warning(
      "Round %d: only %d of %d synthetic images passed the filter after %d draws of %d.",
      k,
      len(images),
      need,
      int(r.max_draws),
      per_draw,
    )
  return images, counts


def _baseline_real(baseline, train_set, val_set, minority):
  """`baseline`'s features of the real minority images: (training, held-out val or None)."""
  train_features = baseline.features(train_set.subset(np.flatnonzero(train_set.labels == minority)))
  reference = None
  if val_set is not None and np.sum(val_set.labels == minority) >= 4:
    reference = baseline.features(val_set.subset(np.flatnonzero(val_set.labels == minority)))
  return train_features, reference


def _quality(config, baseline, baseline_real, kept_collection):
  """Sample-quality summary of the kept images against held-out real minority images, or None
  with too few images to measure (k-NN precision/recall needs at least 4 on each side).

  Every round is measured in the features of `baseline`, the round-0 classifier (real images
  only), so that the rounds' figures compare; no Inception weights exist offline.
  `baseline_real` is `_baseline_real`'s (training, held-out) features, computed once per split.
  """
  if len(kept_collection) < 4:
    return None
  train_features, reference = baseline_real
  real = reference if reference is not None else train_features
  if len(real) < 4:
    return None
  fake = baseline.features(kept_collection)
  feature_space = (
    f"pooled last feature map of the round-0 classifier (real images only; "
    f"{baseline.info['model']}, {baseline.info['selected_checkpoint']})"
  )
  held_out = "held-out (val) real minority" if real is reference else "training minority"
  out = sample_quality.summary(
    real,
    fake,
    train_features,
    feature_space=feature_space,
    memorisation_quantile=config.rebalance.memorisation_quantile,
    kid_subsets=100,
    seed=config.seed,
  )
  out["real_images"] = held_out
  return out


def train_split(
  config: ml_collections.ConfigDict, workdir: str, data: dict[str, records.Collection]
) -> protocol.Trained:
  """Rebalances data["train"] as ``config.rebalance.method`` says and trains the classifier;
  the predictor of the last round's classifier (selected on data["val"])."""
  os.makedirs(workdir, exist_ok=True)
  method = config.rebalance.method
  if method != "gan":
    return _real_only(config, workdir, data, method)
  train_set, val_set = data["train"], data.get("val")
  counts = np.bincount(train_set.labels, minlength=len(train_set.class_names))
  minority = int(np.argmin(counts))
  deficit = int(counts.max() - counts[minority])
  rounds = int(config.rebalance.rounds)
  mesh = sharding.make_mesh(config.get("mesh"))
  cfg = _classifier_config(config, "none")
  logging.info(
    "GAN rebalancing %s: %s; %d %s images to add over %d rounds.",
    train_set.name,
    dict(zip(train_set.class_names, counts.tolist(), strict=True)),
    deficit,
    train_set.class_names[minority],
    rounds,
  )

  classifier = baseline = supervised.train_split(cfg, os.path.join(workdir, "round0"), data)
  history = [
    {"round": 0, "synthetic_total": 0, "val_auc": _val_auc(classifier, val_set), **_sel(classifier)}
  ]
  gan_run = _GanRun(config, os.path.join(workdir, "gan"), train_set, mesh)
  synthetic_images, synthetic_rounds = [], []
  baseline_real = None
  gan_key = jax.random.key(config.seed + 43)
  try:
    for k in range(1, rounds + 1):
      round_dir = os.path.join(workdir, f"round{k}")
      os.makedirs(round_dir, exist_ok=True)
      pool_file = os.path.join(round_dir, SYNTHETIC_FILE)
      entry: dict[str, Any] = {"round": k}
      if os.path.exists(pool_file):
        with np.load(pool_file) as f:  # Written by this trainer: plain arrays, no pickle.
          images = f["images"]
        with open(os.path.join(round_dir, QUALITY_FILE)) as f:
          saved = json.load(f)
        entry.update(saved["round"], sample_quality=_quality_brief(saved["sample_quality"]))
        logging.info("Round %d: %d synthetic images from %s.", k, len(images), pool_file)
      else:
        gan_run.train_until(k * int(config.gan.steps_per_round))
        have = sum(len(x) for x in synthetic_images)
        need = math.ceil((deficit - have) / (rounds - k + 1))
        images, draw_counts = _draw_round(
          config,
          gan_run,
          classifier,
          train_set,
          val_set,
          minority,
          need,
          jax.random.fold_in(gan_key, k),
          k,
        )
        kept = synthetic_collection(images, minority, np.full(len(images), k), train_set)
        if baseline_real is None:  # The round-0 classifier is fixed: its features once.
          baseline_real = _baseline_real(baseline, train_set, val_set, minority)
        quality = _quality(config, baseline, baseline_real, kept)
        entry.update(gan_step=gan_run.step, needed=need, **draw_counts)
        if jax.process_index() == 0:
          report.write_json(
            os.path.join(round_dir, QUALITY_FILE), {"round": entry, "sample_quality": quality}
          )
          title = (
            f"SYNTHETIC: GAN ({config.gan.objective}) samples of class "
            f"'{train_set.class_names[minority]}', round {k}, step {gan_run.step}; "
            f"trained on {train_set.name} (real row: its training images)"
          )
          real = _resized(
            train_set.subset(np.flatnonzero(train_set.labels == minority)), gan_run.image_size, 8
          )
          sample_quality.save_grid(os.path.join(round_dir, GRID_FILE), real, images, title=title)
          _save_npz_atomic(pool_file, images=images)
        entry["sample_quality"] = _quality_brief(quality)
      synthetic_images.append(images)
      synthetic_rounds.append(np.full(len(images), k))
      synthetic = synthetic_collection(
        np.concatenate(synthetic_images), minority, np.concatenate(synthetic_rounds), train_set
      )
      classifier = supervised.train_split(
        cfg,
        os.path.join(round_dir, "classifier"),
        data,
        train_batches=_mixed_batches(config, train_set, synthetic),
        num_examples=len(train_set) + len(synthetic),
      )
      entry.update(
        synthetic_total=len(synthetic), val_auc=_val_auc(classifier, val_set), **_sel(classifier)
      )
      history.append(entry)
      logging.info("Round %d: %s", k, json.dumps(_printable(entry)))
  finally:
    gan_run.close()

  total = sum(len(x) for x in synthetic_images)
  info = dict(classifier.info)
  info.update(
    rebalance="gan",
    gan_objective=config.gan.objective,
    gan_steps=gan_run.step,
    gan_train_seconds=round(gan_run.train_seconds, 1),
    synthetic_train_images=total,
    trained_on=(
      f"{train_set.name} + {total} GAN-synthetic {train_set.class_names[minority]} images"
    ),
    rounds=history,
  )
  return protocol.Trained(predict=classifier.predict, info=info, features=classifier.features)


def _sel(trained) -> dict[str, Any]:
  return {"selected_checkpoint": trained.info.get("selected_checkpoint")}


def _quality_brief(quality: dict[str, Any] | None) -> dict[str, Any] | None:
  """The headline sample-quality figures for summary.json (the full JSON is per round)."""
  if quality is None:
    return None
  memo = quality.get("memorisation") or {}
  return {
    "kid": quality["kid"]["mean"],
    "kid_std": quality["kid"]["std"],
    "frechet_distance": quality["frechet_distance"],
    "precision": quality["precision_recall"]["precision"],
    "recall": quality["precision_recall"]["recall"],
    "memorisation_dropped": (memo.get("guard") or {}).get("n_dropped"),
    "real_images": quality["real_images"],
  }


def _printable(entry: dict[str, Any]) -> dict[str, Any]:
  return {k: v for k, v in entry.items() if k != "sample_quality"}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates as `config` says; checkpoints, metrics and reports go under `workdir`."""
  return protocol.train_and_evaluate(config, workdir, train_split)
