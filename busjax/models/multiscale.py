"""Multiscale classifier: feature maps of several backbone stages fused by cross-scale attention.

After Li et al. (2026): a lesion's margin is a fine-scale feature and its shape and shadowing are
coarse ones, so the classifier reads several stages of one backbone. Each chosen stage is
projected by a 1x1 conv + BN + ReLU to ``width`` channels, then fused by

* ``"cross_attention"`` (default): every stage becomes a set of tokens (its pixels, plus a fixed
  2-D sinusoidal position in image coordinates, so one location has one code at every scale,
  plus a learned scale embedding); from the coarsest pair down, the coarse tokens attend to the
  fine ones, then the fine tokens attend back to the updated coarse ones (pre-norm multi-head
  attention and an MLP, both residual, their output layers zero-initialised so training starts
  from plain multiscale pooling); each stage's tokens are averaged and concatenated;
* ``"concat"``: top-down upsample-and-concatenate: every projected map resized to the finest
  chosen stage, concatenated, a 3x3 conv + BN + ReLU, pooled (the simpler option);
* ``"single"``: only the last stage, projected and pooled (the single-scale ablation).

Config (``config.model``), with defaults: name="multiscale"; backbone="resnet18" (a name of
`busjax.models.fusion.BACKBONES`); width (of the backbone)=1.0; scales=3 (the last N stages of
the backbone's ``stage_names``); fusion_width=128; fusion="cross_attention"; heads=4;
mlp_ratio=2; dropout=0.0; in_channels=1; dtype="float32"; a sub-config named after the backbone
overrides its fields (e.g. ``config.model.resnet18 = {"small_stem": True}``).

Feature maps: every backbone map, "scale<i>" (the projected maps, fine to coarse), "tokens<i>"
after fusion, and "features" = the fused vector as an (N, 1, 1, D) map, so that, as for every
busjax model, the head (and an SSL encoder's embedding) is the global average of "features".
"""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from busjax.models import common, fusion, layers

FUSIONS = ("cross_attention", "concat", "single")


def sinusoidal_positions(height: int, width: int, dim: int) -> jax.Array:
  """(height * width, dim) fixed 2-D sine/cosine codes of pixel centres in [0, 1] coordinates.

  Half the channels encode y, half x, at frequencies 2^0 .. 2^(dim/4 - 1) times pi: a pixel of a
  coarse map and the fine pixels it covers get nearby codes, whatever the map sizes.
  """
  if dim % 4:
    raise ValueError(f"positional code width {dim} must be divisible by 4")
  ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height
  xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width
  frequencies = math.pi * 2.0 ** jnp.arange(dim // 4, dtype=jnp.float32)
  y_angles = ys[:, None] * frequencies  # (H, dim/4)
  x_angles = xs[:, None] * frequencies  # (W, dim/4)
  y_code = jnp.concatenate([jnp.sin(y_angles), jnp.cos(y_angles)], -1)  # (H, dim/2)
  x_code = jnp.concatenate([jnp.sin(x_angles), jnp.cos(x_angles)], -1)  # (W, dim/2)
  grid = jnp.concatenate(
    [
      jnp.broadcast_to(y_code[:, None, :], (height, width, dim // 2)),
      jnp.broadcast_to(x_code[None, :, :], (height, width, dim // 2)),
    ],
    -1,
  )
  return grid.reshape(height * width, dim)


class CrossAttention(nnx.Module):
  """Queries attend to a context: pre-norm multi-head attention + MLP, both residual."""

  def __init__(self, dim: int, heads: int, mlp_ratio: int = 2, *, dtype=None, rngs: nnx.Rngs):
    if dim % heads:
      raise ValueError(f"fusion_width {dim} must be divisible by heads {heads}")
    self.heads = heads
    self.norm_q = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.norm_context = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.query = nnx.Linear(dim, dim, dtype=dtype, rngs=rngs)
    self.key_value = nnx.Linear(dim, 2 * dim, dtype=dtype, rngs=rngs)
    zeros = nnx.initializers.zeros_init()
    self.out = nnx.Linear(dim, dim, dtype=dtype, kernel_init=zeros, rngs=rngs)
    self.norm_mlp = nnx.LayerNorm(dim, dtype=dtype, rngs=rngs)
    self.mlp_in = nnx.Linear(dim, mlp_ratio * dim, dtype=dtype, rngs=rngs)
    self.mlp_out = nnx.Linear(mlp_ratio * dim, dim, dtype=dtype, kernel_init=zeros, rngs=rngs)

  def attention_weights(self, queries: jax.Array, context: jax.Array) -> jax.Array:
    """(N, heads, Lq, Lk) softmax weights (float32)."""
    q = self._split(self.query(self.norm_q(queries)))
    k, _ = jnp.split(self.key_value(self.norm_context(context)), 2, axis=-1)
    k = self._split(k)
    scores = jnp.einsum("nhqd,nhkd->nhqk", q, k).astype(jnp.float32)
    return jax.nn.softmax(scores / math.sqrt(q.shape[-1]), axis=-1)

  def _split(self, x: jax.Array) -> jax.Array:
    n, length, dim = x.shape
    return x.reshape(n, length, self.heads, dim // self.heads).transpose(0, 2, 1, 3)

  def __call__(self, queries: jax.Array, context: jax.Array) -> jax.Array:
    """(N, Lq, D) queries, (N, Lk, D) context -> updated (N, Lq, D) queries."""
    _, values = jnp.split(self.key_value(self.norm_context(context)), 2, axis=-1)
    weights = self.attention_weights(queries, context).astype(values.dtype)
    attended = jnp.einsum("nhqk,nhkd->nhqd", weights, self._split(values))
    n, _, length, _ = attended.shape
    attended = attended.transpose(0, 2, 1, 3).reshape(n, length, -1)
    x = queries + self.out(attended)
    return x + self.mlp_out(jax.nn.gelu(self.mlp_in(self.norm_mlp(x))))


class MultiscaleModel(nnx.Module):
  """Backbone stages -> projections -> cross-scale fusion -> (N, 1, 1, D) -> head."""

  # Grad-CAM's default map: "features" here is the fused vector (1 x 1), not a map.
  cam_layer = "backbone/features"

  def __init__(
    self,
    backbone: nnx.Module,
    *,
    num_classes: int,
    in_channels: int = 1,
    scales: int = 3,
    fusion_width: int = 128,
    fusion: str = "cross_attention",
    heads: int = 4,
    mlp_ratio: int = 2,
    dropout: float = 0.0,
    dtype=None,
    rngs: nnx.Rngs,
  ):
    if fusion not in FUSIONS:
      raise ValueError(f"unknown multiscale fusion {fusion!r}; expected one of {FUSIONS}")
    names = tuple(backbone.stage_names)
    if not 1 <= scales <= len(names):
      raise ValueError(f"scales={scales}: the backbone has {len(names)} stages {names}")
    if fusion == "single":
      scales = 1
    self.fusion = fusion
    self.scale_names = names[-scales:]
    self.backbone = backbone
    channels = self._stage_channels(backbone, in_channels)
    self.projections = nnx.List(
      [
        layers.ConvBN(channels[name], fusion_width, 1, dtype=dtype, rngs=rngs)
        for name in self.scale_names
      ]
    )
    out_features = fusion_width
    if fusion == "concat":
      self.merge = layers.ConvBN(
        fusion_width * scales, fusion_width, 3, padding="symmetric", dtype=dtype, rngs=rngs
      )
    elif fusion == "cross_attention":
      self.scale_embedding = nnx.Param(
        0.02 * jax.random.normal(rngs.params(), (scales, fusion_width), jnp.float32)
      )
      pairs = max(scales - 1, 0)
      # Per adjacent pair (fine i, coarse i+1): coarse attends to fine, then fine to coarse.
      self.coarse_to_fine = nnx.List(
        [
          CrossAttention(fusion_width, heads, mlp_ratio, dtype=dtype, rngs=rngs)
          for _ in range(pairs)
        ]
      )
      self.fine_to_coarse = nnx.List(
        [
          CrossAttention(fusion_width, heads, mlp_ratio, dtype=dtype, rngs=rngs)
          for _ in range(pairs)
        ]
      )
      self.norm = nnx.LayerNorm(fusion_width * scales, dtype=dtype, rngs=rngs)
      out_features = fusion_width * scales
    self.num_features = out_features
    self.stage_names = (*self.scale_names, "features")
    self.head = common.Head(out_features, num_classes, dropout=dropout, dtype=dtype, rngs=rngs)

  @staticmethod
  def _stage_channels(backbone: nnx.Module, in_channels: int) -> dict[str, int]:
    """Channels of each named map, from shapes only (nothing runs, no statistics change)."""
    graph, state = nnx.split(backbone)
    probe = jax.ShapeDtypeStruct((1, 64, 64, in_channels), jnp.float32)
    shapes = jax.eval_shape(lambda s, x: nnx.merge(graph, s).features(x), state, probe)
    return {name: shape.shape[-1] for name, shape in shapes.items()}

  def _tokens(self, maps: list[jax.Array]) -> list[jax.Array]:
    tokens = []
    for i, m in enumerate(maps):
      n, h, w, d = m.shape
      code = sinusoidal_positions(h, w, d) + self.scale_embedding[...][i]
      tokens.append(m.reshape(n, h * w, d) + code.astype(m.dtype))
    return tokens

  def __call__(self, x: jax.Array, *, return_features: bool = False):
    with common.tap_scope("backbone/"):
      feature_maps = dict(self.backbone.features(x))
    projected = [
      common.tap(f"scale{i}", proj(feature_maps[name]))
      for i, (proj, name) in enumerate(zip(self.projections, self.scale_names, strict=True))
    ]
    for i, m in enumerate(projected):
      feature_maps[f"scale{i}"] = m
    if self.fusion == "single":
      fused = common.global_average_pool(projected[-1])
    elif self.fusion == "concat":
      n, h, w, _ = projected[0].shape
      resized = [
        m
        if m.shape[1:3] == (h, w)
        else jax.image.resize(m, (n, h, w, m.shape[-1]), "linear").astype(m.dtype)
        for m in projected
      ]
      fused = common.global_average_pool(self.merge(jnp.concatenate(resized, -1)))
    else:
      tokens = self._tokens(projected)
      # Coarsest pair first: the global context flows down to the finest scale.
      for i in reversed(range(len(tokens) - 1)):
        tokens[i + 1] = self.coarse_to_fine[i](tokens[i + 1], tokens[i])
        tokens[i] = self.fine_to_coarse[i](tokens[i], tokens[i + 1])
      for i, t in enumerate(tokens):
        feature_maps[f"tokens{i}"] = t
      fused = self.norm(jnp.concatenate([jnp.mean(t, axis=1) for t in tokens], -1))
    fused = fused.astype(jnp.float32)
    feature_maps["features"] = fused[:, None, None, :]
    logits = self.head(feature_maps["features"])
    return (logits, feature_maps) if return_features else logits


def create(
  model_config: ml_collections.ConfigDict, *, num_classes: int, rngs: nnx.Rngs
) -> MultiscaleModel:
  """Builds a `MultiscaleModel` from ``config.model`` (fields in the module docstring)."""
  get = lambda field, default: common.config_get(model_config, field, default)
  backbone_name = get("backbone", "resnet18")
  sub = fusion.backbone_config(model_config, backbone_name, 0)
  sub.dropout = 0.0  # The backbone's own head is never called.
  module = importlib.import_module(f"busjax.models.{sub.name}")
  backbone = module.create(sub, num_classes=1, rngs=rngs)
  return MultiscaleModel(
    backbone,
    num_classes=num_classes,
    in_channels=get("in_channels", 1),
    scales=int(get("scales", 3)),
    fusion_width=int(get("fusion_width", 128)),
    fusion=get("fusion", "cross_attention"),
    heads=int(get("heads", 4)),
    mlp_ratio=int(get("mlp_ratio", 2)),
    dropout=float(get("dropout", 0.0)),
    dtype=common.compute_dtype(get("dtype", "float32")),
    rngs=rngs,
  )
