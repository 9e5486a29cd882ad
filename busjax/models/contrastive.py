"""Contrastive pretraining wrapper: any busjax classifier as the encoder, plus a projection head.

The encoder is the very classifier that fine-tuning builds (same module, same parameter names),
so a fine-tune's ``config.init_from`` maps ``params.<module>`` onto ``params.encoder.<module>``
for every module but the head (`encoder_mapping`). The representation is the global average of
the encoder's "features" map, the vector its head would read; the projection head (SimCLR: linear
-> BN -> ReLU -> linear) maps it to the space where the contrastive loss is computed and is
thrown away afterwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from busjax.models import common, layers


class ProjectionHead(nnx.Module):
  """Linear -> BatchNorm -> ReLU -> Linear (SimCLR v1)."""

  def __init__(self, in_features: int, hidden: int, out_features: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(in_features, hidden, use_bias=False, rngs=rngs)
    self.bn = layers.BatchNorm(hidden, momentum=0.9, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, out_features, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.relu(self.bn(self.fc1(x))))


class ContrastiveModel(nnx.Module):
  """``encoder`` (a classifier whose head is unused) + ``projection``."""

  def __init__(
    self, encoder: nnx.Module, *, hidden: int = 512, projection_dim: int = 128, rngs: nnx.Rngs
  ):
    self.encoder = encoder
    self.projection = ProjectionHead(encoder.num_features, hidden, projection_dim, rngs=rngs)

  def embed(self, x: jax.Array) -> jax.Array:
    """(N, D) float32 representation: the pooled "features" map the classifier head reads."""
    _, feature_maps = self.encoder(x, return_features=True)
    return common.global_average_pool(feature_maps["features"])

  def __call__(self, x: jax.Array) -> jax.Array:
    """(N, projection_dim) float32 projections (not normalised)."""
    return self.projection(self.embed(x)).astype(jnp.float32)


def encoder_mapping(
  flat_names, *, source_prefix: str = "encoder.", exclude: tuple[str, ...] = ("head",)
) -> dict[str, str]:
  """`state_utils.restore_or_init` mapping that loads a pretrained encoder into a classifier.

  Args:
    flat_names: the classifier state's flat names (``params.stem.conv.kernel.value``, ...).
    source_prefix: where the encoder sits in the pretraining state.
    exclude: top-level modules that stay freshly initialised (the classification head).

  Returns:
    ``{"params.stem.": "params.encoder.stem.", "rest.stem.": "rest.encoder.stem.", ...}`` for
    every top-level module of ``params`` and ``rest`` except `exclude`.
  """
  modules = set()
  for name in flat_names:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] in ("params", "rest") and parts[1] not in exclude:
      modules.add((parts[0], parts[1]))
  return {f"{tree}.{m}.": f"{tree}.{source_prefix}{m}." for tree, m in sorted(modules)}
