"""Feature-fusion classifier: several CNN backbones on one image, fused last maps, attention, head.

After Asif et al. (2025): MobileNetV2 and DenseNet121 see the same image; each last feature map is
projected by a 1x1 conv + BN + ReLU to ``projection_channels``, maps of different spatial sizes are
resized to the smallest one, then fused by

* ``"concat"`` (default): channel concatenation (n * P channels);
* ``"add"``: element-wise sum (P channels);
* ``"attention_weighted"``: a softmax over branches of a per-image score (linear on each branch's
  pooled map), then the weighted sum (P channels);

followed by an attention block (`busjax.models.attention`), global average pooling, dropout and a
linear head. Ablations are config changes: one backbone, ``attention="none"``, any fusion.

Config (``config.model``), with defaults:
  name="fusion"; backbones=("mobilenet_v2", "densenet121"); backbone_widths=None (one per backbone,
  else ``width``, else 1.0); projection_channels=256; fusion="concat"; attention="cbam";
  attention_reduction=16; dropout=0.2; in_channels=1; dtype="float32".
  A sub-config named after a backbone (e.g. ``config.model.mobilenet_v2 = {"padding": "same",
  "bn_epsilon": 1e-3, "pretrained": "mnv2.safetensors"}``) overrides that backbone's fields;
  ``pretrained`` loads busjax/Keras/torchvision weights into it (`busjax.models.pretrained`).
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from busjax.models import attention as attention_lib
from busjax.models import common, layers

FUSIONS = ("concat", "add", "attention_weighted")

# Backbone name -> (module under busjax.models, variant passed to its create()).
BACKBONES = {
  "mobilenet_v2": ("mobilenet_v2", None),
  "densenet121": ("densenet", "densenet121"),
  "densenet169": ("densenet", "densenet169"),
  "resnet18": ("resnet", "resnet18"),
  "resnet34": ("resnet", "resnet34"),
  "resnet50": ("resnet", "resnet50"),
}

# Fields of the fusion config that every backbone inherits unless its own sub-config says otherwise.
_SHARED_FIELDS = ("in_channels", "dtype", "padding", "bn_epsilon")


def backbone_config(
  model_config: ml_collections.ConfigDict, name: str, index: int
) -> ml_collections.ConfigDict:
  """The config a backbone's own ``create`` receives (shared fields + width + its sub-config)."""
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; expected one of {sorted(BACKBONES)}")
  module_name, variant = BACKBONES[name]
  sub = ml_collections.ConfigDict({"name": module_name})
  if variant is not None:
    sub.variant = variant
  for field in _SHARED_FIELDS:
    if field in model_config:
      sub[field] = model_config[field]
  widths = model_config.get("backbone_widths")
  if widths is not None:
    if len(widths) != len(model_config.backbones):
      raise ValueError(
        f"backbone_widths={tuple(widths)} must give one width per backbone "
        f"{tuple(model_config.backbones)}"
      )
    sub.width = float(widths[index])
  else:
    sub.width = float(model_config.get("width", 1.0))
  overrides = model_config.get(name)
  if overrides is not None:
    for key, value in overrides.items():
      if key not in ("pretrained", "pretrained_arch", "pretrained_format"):
        sub[key] = value
  return sub


class Projection(nnx.Module):
  """1x1 conv + BN + ReLU: brings each backbone's last map to the same channel count."""

  def __init__(self, in_features: int, out_features: int, *, dtype=None, rngs: nnx.Rngs):
    self.block = layers.ConvBN(in_features, out_features, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.block(x)


def align_spatial(maps: list[jax.Array]) -> list[jax.Array]:
  """Resizes NHWC maps to the smallest height and width among them (antialiased bilinear).

  Both standard backbones reduce by 32, so at 224 px this is a no-op; it matters for odd sizes
  and for backbones with other strides.
  """
  height = min(m.shape[1] for m in maps)
  width = min(m.shape[2] for m in maps)
  out = []
  for m in maps:
    if m.shape[1:3] != (height, width):
      m = jax.image.resize(
        m, (m.shape[0], height, width, m.shape[3]), "linear", antialias=True
      ).astype(m.dtype)
    out.append(m)
  return out


class FusionModel(nnx.Module):
  """Backbones -> projections -> aligned fusion -> attention -> pooled -> dropout -> linear head."""

  def __init__(
    self,
    backbones: dict[str, nnx.Module],
    *,
    num_classes: int,
    projection_channels: int = 256,
    fusion: str = "concat",
    attention: str = "cbam",
    attention_reduction: int = 16,
    dropout: float = 0.0,
    dtype=None,
    rngs: nnx.Rngs,
  ):
    if not backbones:
      raise ValueError("FusionModel needs at least one backbone")
    if fusion not in FUSIONS:
      raise ValueError(f"unknown fusion {fusion!r}; expected one of {FUSIONS}")
    self.backbone_names = tuple(backbones)
    self.fusion = fusion
    self.dtype = dtype
    self.backbones = nnx.Dict(backbones)
    self.projections = nnx.Dict(
      {
        name: Projection(net.num_features, projection_channels, dtype=dtype, rngs=rngs)
        for name, net in backbones.items()
      }
    )
    if fusion == "attention_weighted":
      # One score per branch from its pooled map; softmax across branches weights the sum.
      self.branch_scores = nnx.Dict(
        {name: nnx.Linear(projection_channels, 1, dtype=dtype, rngs=rngs) for name in backbones}
      )
    fused_channels = projection_channels * (len(backbones) if fusion == "concat" else 1)
    self.attention = attention_lib.create_attention(
      attention, fused_channels, rngs, reduction=attention_reduction, dtype=dtype
    )
    self.dropout = nnx.Dropout(dropout, rngs=rngs)
    self.head = nnx.Linear(fused_channels, num_classes, dtype=dtype, rngs=rngs)
    self.num_features = fused_channels

  def branch_weights(self, projected: list[jax.Array]) -> jax.Array:
    """(N, n_branches) softmax weights of the attention-weighted fusion."""
    scores = [
      self.branch_scores[name](jnp.mean(m, axis=(1, 2)))
      for name, m in zip(self.backbone_names, projected, strict=True)
    ]
    return jax.nn.softmax(jnp.concatenate(scores, axis=-1).astype(jnp.float32), axis=-1)

  def __call__(self, x: jax.Array, *, return_features: bool = False):
    features = {}
    projected = []
    for name in self.backbone_names:
      with common.tap_scope(f"{name}/"):
        _, backbone_features = self.backbones[name](x, return_features=True)
      last = backbone_features["features"]
      features[name] = last
      projected.append(self.projections[name](last))
    projected = align_spatial(projected)
    if self.fusion == "concat":
      fused = jnp.concatenate(projected, axis=-1)
    elif self.fusion == "add":
      fused = sum(projected[1:], projected[0])
    else:
      weights = self.branch_weights(projected).astype(projected[0].dtype)
      fused = sum(
        w[:, None, None, None] * m
        for w, m in zip(jnp.moveaxis(weights, -1, 0), projected, strict=True)
      )
      features["branch_weights"] = weights
    fused = common.tap("fused", fused)
    attended = common.tap("features", self.attention(fused))
    pooled = jnp.mean(attended.astype(jnp.float32), axis=(1, 2))
    logits = self.head(self.dropout(pooled).astype(self.dtype or pooled.dtype))
    logits = logits.astype(jnp.float32)
    if not return_features:
      return logits
    features.update(fused=fused, attended=attended, features=attended, pooled=pooled)
    return logits, features


def _dtype(name: str | None):
  return jnp.bfloat16 if name == "bfloat16" else jnp.float32


def create(
  model_config: ml_collections.ConfigDict, *, num_classes: int, rngs: nnx.Rngs
) -> FusionModel:
  """Builds a `FusionModel` from ``config.model`` (fields in the module docstring).

  Backbones are created by their own modules' ``create``; a backbone sub-config with a
  ``pretrained`` path loads those weights (head skipped) before the model is returned.
  """
  names = tuple(model_config.get("backbones", ("mobilenet_v2", "densenet121")))
  if len(set(names)) != len(names):
    raise ValueError(f"backbones={names} lists a backbone twice")
  backbones = {}
  for index, name in enumerate(names):
    sub = backbone_config(model_config, name, index)
    module = importlib.import_module(f"busjax.models.{sub.name}")
    # The backbones' own heads are never called: keep them minimal and without dropout RNGs.
    sub.dropout = 0.0
    net = module.create(sub, num_classes=1, rngs=rngs)
    overrides = model_config.get(name)
    if overrides is not None and overrides.get("pretrained"):
      from busjax.models import pretrained  # local: keeps h5py/keras optional for plain training

      net = pretrained.load_pretrained(
        net,
        overrides.pretrained,
        arch=overrides.get("pretrained_arch", name),
        fmt=overrides.get("pretrained_format"),
        skip_head=True,
      )
    backbones[name] = net
  return FusionModel(
    backbones,
    num_classes=num_classes,
    projection_channels=int(model_config.get("projection_channels", 256)),
    fusion=model_config.get("fusion", "concat"),
    attention=model_config.get("attention", "cbam"),
    attention_reduction=int(model_config.get("attention_reduction", 16)),
    dropout=float(model_config.get("dropout", 0.2)),
    dtype=_dtype(model_config.get("dtype", "float32")),
    rngs=rngs,
  )
