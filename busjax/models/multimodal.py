"""End-to-end multimodal classifier: one network per modality, pooled features fused, one head.

The end-to-end counterpart of the two-stage regime (`busjax.trainers.multimodal`, whose ablation
it is): the input is (N, H, W, M), one grey channel per modality (`pipeline.paired_dataset` puts one
image of each modality of a patient side by side as channels). Channel m goes through its own
branch, any busjax classifier (ResNet-18 with ECA for ultrasound and with CBAM for mammography in
configs/multimodal.py); each branch's last feature map is average-pooled, the pooled vectors are
concatenated, and dropout + a linear head give the logits. Both branches and the head learn
jointly from the one classification loss: no frozen stage, no second-stage learner.

Config (``config.model``): name="multimodal"; modalities=("us", "mammo"); one sub-config per
modality (a busjax model config with ``name``; its ``in_channels`` is 1); dropout=0.2;
in_channels = len(modalities); dtype="float32".
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from busjax.models import common


class MultimodalNet(nnx.Module):
  """Per-modality branches -> pooled features -> concatenation -> dropout -> linear head."""

  # Grad-CAM's default map: the ultrasound branch's last map ("mammo/features" for the other).
  cam_layer = "us/features"

  def __init__(
    self,
    branches: dict[str, nnx.Module],
    *,
    num_classes: int,
    dropout: float = 0.0,
    dtype=None,
    rngs: nnx.Rngs,
  ):
    if not branches:
      raise ValueError("MultimodalNet needs at least one branch")
    self.modalities = tuple(branches)
    self.branches = nnx.Dict(branches)
    self.num_features = sum(int(b.num_features) for b in branches.values())
    self.dtype = dtype
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(self.num_features, num_classes, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, *, return_features: bool = False):
    """Logits (float32) for (N, H, W, modalities) input; with `return_features`, also the
    feature dict (each modality's pooled vector, and ``features`` the fused one as (N, 1, 1, C),
    so that tools that pool the last map see the fused features)."""
    if x.shape[-1] != len(self.modalities):
      raise ValueError(
        f"MultimodalNet expects {len(self.modalities)} channels {self.modalities}, got {x.shape}"
      )
    features, pooled = {}, []
    for channel, modality in enumerate(self.modalities):
      with common.tap_scope(f"{modality}/"):
        _, maps = self.branches[modality](x[..., channel : channel + 1], return_features=True)
      features[modality] = jnp.mean(maps["features"].astype(jnp.float32), axis=(1, 2))
      pooled.append(features[modality])
    fused = jnp.concatenate(pooled, axis=-1)
    logits = self.head(self.dropout(fused).astype(self.dtype or fused.dtype)).astype(jnp.float32)
    if not return_features:
      return logits
    features["features"] = fused[:, None, None, :]
    return logits, features


def branch_config(model_config: ml_collections.ConfigDict, modality: str):
  """One branch's own model config: one grey channel, no head dropout (its head is unused)."""
  sub = ml_collections.ConfigDict(model_config[modality].to_dict())
  sub.in_channels = 1
  sub.dropout = 0.0
  sub.dtype = model_config.get("dtype", "float32")
  return sub


def create(
  model_config: ml_collections.ConfigDict, *, num_classes: int, rngs: nnx.Rngs
) -> MultimodalNet:
  """Builds a `MultimodalNet` from ``config.model`` (fields in the module docstring)."""
  modalities = tuple(model_config.get("modalities", ("us", "mammo")))
  branches = {}
  for modality in modalities:
    sub = branch_config(model_config, modality)
    module = importlib.import_module(f"busjax.models.{sub.name}")
    branches[modality] = module.create(sub, num_classes=1, rngs=rngs)
  return MultimodalNet(
    branches,
    num_classes=num_classes,
    dropout=float(model_config.get("dropout", 0.0)),
    dtype=jnp.bfloat16 if model_config.get("dtype") == "bfloat16" else jnp.float32,
    rngs=rngs,
  )
