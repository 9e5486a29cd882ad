"""Dual-discriminator GAN rebalancing (after Zhao et al. 2026): the README's main job.

A class-conditional GAN with two discriminators (D2GAN: D1 rewards real images, D2 generated
ones) learns the training split with DiffAugment, then synthesises the minority class round by
round, through a quality filter, until the classes balance; a ResNet-18 with channel + spatial
attention learns from real + synthetic images. On the embedded synthetic phantom data (imbalanced
like BUSI: 437 benign, 210 malignant):

  python -m busjax.main --config=configs/gan_rebalance.py --workdir=runs/gan

Expected on 2 CPU cores: about 12 minutes. The workdir then holds reports/ (val and test,
marked SYNTHETIC because phantoms are), summary.json (per round: the GAN step, how many
candidates each filter stage passed, how many synthetic images trained the classifier, its val
AUC, the sample-quality headline), roundK/samples.png (real row above generated rows, marked
SYNTHETIC), roundK/sample_quality.json, roundK/synthetic.npz, gan/ (the GAN's checkpoints) and
each round's classifier run with its checkpoints. The same command resumes a killed run.

Arguments (comma-separated after `:`), combinable:
  smoke                   seconds-long run (tests, CI).
  busi, cv, busbra        data and protocol, as in configs/supervised.py (configlib.apply_protocol).
  gpu                     one accelerator: 128 px GAN and classifier, wider GAN, 4x the GAN steps
                          (about 20k images per round on an H100-class GPU in a few minutes).
  Ablations (the benchmark runs each on the same split):
  method=NAME             gan (default) | none | class_weights | oversample  (none, class_weights
                          and oversample use real images only, with the same classifier).
  objective=NAME          d2gan (default) | gan (one discriminator, non-saturating loss).
  nodiffaug               no DiffAugment.
"""

import ml_collections

from busjax import configlib

METHODS = ("gan", "none", "class_weights", "oversample")
OBJECTIVES = ("d2gan", "gan")


def get_config(arg=None):
  args = configlib.parse_arg(arg)
  known = {"smoke", "gpu", "nodiffaug", *configlib.PROTOCOL_ARGS}
  unknown = {a for a in args if a not in known and not a.startswith(("method=", "objective="))}
  if unknown:
    raise ValueError(
      f"configs/gan_rebalance.py: unknown arguments {sorted(unknown)}; see the docstring"
    )
  c = configlib.base_config()
  c.trainer = "gan_rebalance"
  c.data = configlib.phantom_data(image_size=64)
  c.split.near_duplicates = False  # Phantom: no copies to find; patients are still grouped.
  configlib.apply_protocol(c, args)

  # The classifier: ResNet-18 (width 0.5) with channel + spatial attention before pooling.
  c.model.attention = "channel_spatial"
  c.model.attention_reduction = 8
  c.input.batch_size = 32
  c.train.epochs = 15
  c.train.ema_decay = 0.99
  c.train.eval_every = 100

  c.rebalance = ml_collections.ConfigDict(
    dict(
      method=configlib.choice(args, "method", METHODS, "gan", where="configs/gan_rebalance.py"),
      rounds=2,
      candidates=2.0,  # Candidates drawn per image needed, per draw.
      max_draws=4,  # Draws per round before giving up on the rest (logged).
      d_quantile=0.25,  # Drop the candidates D1 finds least real.
      min_confidence=0.5,  # The previous classifier's minimum minority probability.
      distance_quantile=0.95,  # Feature distance to real minority images, vs real-to-real.
      memorisation_quantile=0.05,  # Near-copies of training images are dropped.
    )
  )
  c.gan = ml_collections.ConfigDict(
    dict(
      objective=configlib.choice(
        args, "objective", OBJECTIVES, "d2gan", where="configs/gan_rebalance.py"
      ),
      image_size=0,  # 0: the classifier's (data.image_size); 4 * 2**k.
      latent_dim=128,
      embed_dim=64,
      # CPU-sized: a 64 px GAN step costs ~0.5 s on 2 cores at these widths (x4 per doubling).
      g_width=8,
      d_width=8,
      max_multiplier=4,
      spectral_norm=True,
      power_iterations=1,
      alpha=0.2,  # D2GAN's weights of the KL (D1) and reverse-KL (D2) terms (Nguyen et al.).
      beta=0.1,
      r1_gamma=0.1,  # R1 penalty on D1 at real images; 0 = off.
      diffaugment="" if "nodiffaug" in args else "translation,cutout,intensity",
      batch_size=16,
      steps_per_round=300,
      ema_decay=0.999,
      ema_bn_batches=8,  # Latent batches for the EMA generator's BatchNorm statistics.
      log_every=50,
      checkpoint_every=100,
      dtype="float32",
      optim=ml_collections.ConfigDict(dict(lr=2e-4, b1=0.0, b2=0.99)),
    )
  )
  if "busi" in args:
    c.data.image_size = 128
  if "gpu" in args:
    c.data.image_size = 128
    for name in c.external.keys():
      c.external[name].image_size = 128
    c.gan.g_width = c.gan.d_width = 32
    c.gan.max_multiplier = 8
    c.gan.steps_per_round = 3000
    c.gan.batch_size = 64
    c.train.epochs = 40
  if "smoke" in args:
    configlib.apply_smoke(c)
    c.rebalance.max_draws = 2
    c.gan.update(
      image_size=16, latent_dim=16, embed_dim=8, g_width=8, d_width=8, max_multiplier=2,
      batch_size=8, steps_per_round=3, log_every=1, checkpoint_every=2, ema_bn_batches=2,
    )  # fmt: skip
  return c
