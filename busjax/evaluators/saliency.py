"""Saliency maps for busjax classifiers, and how well they agree with lesion masks.

Maps (each ``(N, H, W)`` float32, one per image, for one target class per image):

* `gradients`: |∂ score / ∂ input|, channels reduced by max (vanilla saliency, Simonyan et al.).
* `smoothgrad`: the mean of `gradients` over noisy copies of the input (Smilkov et al. 2017).
* `integrated_gradients`: (x − x') · mean over the straight path of ∂ score / ∂ input, summed over
  channels (Sundararajan et al. 2017); signed, and its sum over pixels approximates
  score(x) − score(x') (completeness; the trapezoid rule with `steps` intervals).
* `expected_gradients`: integrated gradients averaged over baselines drawn from a background set
  (Erion et al. 2021), the SHAP value estimate of SHAP's GradientExplainer, in JAX.
* `partition_shap`: Owen values from `shap`'s Partition explainer with an image masker over a
  fixed-batch jitted predict (no recompiles per call); the optional `shap` package.
* `grad_cam` / `grad_cam_plus_plus`: channel weights from the gradient at a feature map (plain
  mean, or Grad-CAM++'s second-order weights), ReLU of the weighted map, bilinearly upsampled to
  the input (Selvaraju et al. 2017; Chattopadhay et al. 2018). For a busjax model the map is any
  of its named maps (`tapped_model(model, "stage3")`, `layer_names` lists them; the last one
  by default), reached through `models.common.tap`: no second forward, no model surgery.

The *score* of class c is its logit for a softmax head (so explaining the benign class explains
the benign logit, never silently the malignant one); for a single-logit head it is the logit for
class 1 and minus the logit for class 0. Everything is jitted, batched and differentiable in JAX.

Agreement with a lesion mask (``(N, H, W)`` {0, 1}), per image: `pointing_game` (the map's peak
lies in the lesion), `energy_in_mask` (share of the positive attribution inside it),
`top_fraction_iou` (IoU of the top-k% pixels with it); and, with the model, `deletion_insertion`
(the area under p(target) as the most salient pixels are removed from the image / added to a
blank one: low deletion and high insertion mean a faithful map).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from busjax import sharding
from busjax.models import common as model_common

ScoreFn = Callable[[jax.Array], jax.Array]  # (N, H, W, C) float input -> (N, classes) logits
# (x, delta or None) -> (logits, the feature map Grad-CAM explains); delta (the map's shape) is
# added to the map on the way to the logits, so d logits / d delta is the gradient at the map.
TappedFn = Callable[[jax.Array, jax.Array | None], tuple[jax.Array, jax.Array]]


def class_scores(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """(N,) score of each image's target class (see the module docstring)."""
  logits = logits.astype(jnp.float32)
  if logits.shape[-1] == 1:
    return jnp.where(targets == 1, logits[:, 0], -logits[:, 0])
  return jnp.take_along_axis(logits, targets[:, None].astype(jnp.int32), axis=1)[:, 0]


def _input_grads(logit_fn: ScoreFn, x: jax.Array, targets: jax.Array) -> jax.Array:
  # Images are independent in evaluation mode: the gradient of the summed scores is per image.
  return jax.grad(lambda v: class_scores(logit_fn(v), targets).sum())(x)


def gradients(logit_fn: ScoreFn, x: jax.Array, targets: jax.Array) -> jax.Array:
  """Vanilla saliency: max over channels of |∂ score / ∂ x|."""
  return jnp.max(jnp.abs(_input_grads(logit_fn, x, targets)), axis=-1)


def smoothgrad(
  logit_fn: ScoreFn,
  x: jax.Array,
  targets: jax.Array,
  rng: jax.Array,
  *,
  samples: int = 16,
  sigma: float = 0.15,
) -> jax.Array:
  """Mean vanilla saliency over `samples` copies of x with Gaussian noise of std `sigma` times
  each image's value range."""
  spread = (x.max(axis=(1, 2, 3)) - x.min(axis=(1, 2, 3)))[:, None, None, None]

  def one(key):
    noisy = x + sigma * spread * jax.random.normal(key, x.shape, x.dtype)
    return gradients(logit_fn, noisy, targets)

  return jnp.mean(jax.lax.map(one, jax.random.split(rng, samples)), axis=0)


def integrated_gradients(
  logit_fn: ScoreFn,
  x: jax.Array,
  targets: jax.Array,
  *,
  baseline: jax.Array | float = 0.0,
  steps: int = 32,
) -> jax.Array:
  """Integrated gradients from `baseline` (an array like x, or a constant) to x, summed over
  channels; trapezoid rule on `steps` intervals."""
  baseline = jnp.broadcast_to(jnp.asarray(baseline, x.dtype), x.shape)
  alphas = jnp.linspace(0.0, 1.0, steps + 1)
  weights = jnp.full(steps + 1, 1.0 / steps).at[0].set(0.5 / steps).at[-1].set(0.5 / steps)

  def one(carry, alpha_weight):
    alpha, weight = alpha_weight
    grads = _input_grads(logit_fn, baseline + alpha * (x - baseline), targets)
    return carry + weight * grads, None

  total, _ = jax.lax.scan(one, jnp.zeros_like(x), (alphas, weights))
  return jnp.sum((x - baseline) * total, axis=-1)


def expected_gradients(
  logit_fn: ScoreFn,
  x: jax.Array,
  targets: jax.Array,
  background: jax.Array,
  rng: jax.Array,
  *,
  samples: int = 32,
) -> jax.Array:
  """Expected gradients (Erion et al. 2021; SHAP's GradientExplainer): integrated gradients
  averaged over baselines drawn from `background` (M, H, W, C) and path points drawn uniformly,
  summed over channels. Its sum over pixels approximates score(x) − E_background score, exactly
  so for a model linear in its input."""
  background = jnp.asarray(background, x.dtype)

  def one(carry, key):
    pick, where = jax.random.split(key)
    base = background[jax.random.randint(pick, (x.shape[0],), 0, background.shape[0])]
    alpha = jax.random.uniform(where, (x.shape[0], 1, 1, 1), x.dtype)
    grads = _input_grads(logit_fn, base + alpha * (x - base), targets)
    return carry + (x - base) * grads / samples, None

  total, _ = jax.lax.scan(one, jnp.zeros_like(x), jax.random.split(rng, samples))
  return jnp.sum(total, axis=-1)


def partition_shap(
  prob_fn: Callable[[np.ndarray], np.ndarray],
  x: np.ndarray,
  targets: np.ndarray,
  *,
  mask_value: float | str = 0.0,
  max_evals: int = 500,
  batch_size: int = 50,
) -> np.ndarray:
  """SHAP (Owen) values of p(target) per pixel from `shap`'s Partition explainer with an image
  masker, summed over channels: (N, H, W). Their sum over pixels is p(target | x) minus
  p(target | everything masked).

  Args:
    prob_fn: (B, H, W, C) float -> (B, classes) probabilities; a fixed-batch jitted predict
      (`inference.LoadedRun.probabilities`) compiles once whatever B shap asks for.
    mask_value: what a hidden superpixel becomes: a number (the black level, as IG's baseline
      and the deletion curve), or a shap masker string such as "blur(16,16)" or "inpaint_telea".
    max_evals: model evaluations per image (the partition tree's depth follows from it).
  """
  try:
    import shap
  except ImportError as error:  # An optional extra: the rest of busjax runs without it.
    raise ImportError("SHAP needs the 'shap' package: pip install 'busjax[explain]'") from error
  x = np.asarray(x, np.float32)
  targets = np.asarray(targets)
  masker = shap.maskers.Image(mask_value, x.shape[1:])
  values = np.zeros(x.shape[:3], np.float32)
  for target in np.unique(targets):
    rows = np.flatnonzero(targets == target)
    explainer = shap.Explainer(lambda b, t=int(target): prob_fn(b)[:, t : t + 1], masker)
    explanation = explainer(x[rows], max_evals=max_evals, batch_size=batch_size, silent=True)
    values[rows] = explanation.values[..., 0].sum(axis=-1)
  return values


def split_at(feature_fn: ScoreFn, head_fn: ScoreFn) -> TappedFn:
  """A model written as (input -> feature map, feature map -> logits) as a `TappedFn`."""

  def tapped(x, delta):
    maps = feature_fn(x)
    return head_fn(maps if delta is None else maps + delta.astype(maps.dtype)), maps

  return tapped


def _cam(tapped_fn: TappedFn, x: jax.Array, targets: jax.Array, plus_plus: bool) -> jax.Array:
  shape = jax.eval_shape(lambda v: tapped_fn(v, None)[1], x).shape
  if len(shape) != 4:
    raise ValueError(f"Grad-CAM needs an (N, h, w, K) feature map; the tapped one is {shape}")

  def score(delta):  # d score / d delta at 0 is the gradient at the map.
    logits, maps = tapped_fn(x, delta)
    return class_scores(logits, targets).sum(), maps.astype(jnp.float32)

  grads, maps = jax.grad(score, has_aux=True)(jnp.zeros(shape, jnp.float32))
  if plus_plus:
    # Grad-CAM++ with the exponential score: dY/dA = e^S g, second and third derivatives by
    # powers of g (Chattopadhay et al., eq. 19).
    g2, g3 = grads**2, grads**3
    denominator = 2.0 * g2 + jnp.sum(maps, axis=(1, 2), keepdims=True) * g3
    alpha = g2 / jnp.where(denominator != 0.0, denominator, 1.0)
    weights = jnp.sum(alpha * jax.nn.relu(grads), axis=(1, 2))
  else:
    weights = jnp.mean(grads, axis=(1, 2))
  cam = jax.nn.relu(jnp.einsum("nhwk,nk->nhw", maps, weights))
  return jax.image.resize(cam, (x.shape[0], x.shape[1], x.shape[2]), "linear")


def grad_cam(tapped_fn: TappedFn, x: jax.Array, targets: jax.Array) -> jax.Array:
  """Grad-CAM at the map `tapped_fn` exposes, upsampled to the input."""
  return _cam(tapped_fn, x, targets, plus_plus=False)


def grad_cam_plus_plus(tapped_fn: TappedFn, x: jax.Array, targets: jax.Array) -> jax.Array:
  """Grad-CAM++ at the map `tapped_fn` exposes, upsampled to the input."""
  return _cam(tapped_fn, x, targets, plus_plus=True)


# ----------------------------------------------------------------------------------------------
# busjax models
# ----------------------------------------------------------------------------------------------


def default_layer(model: nnx.Module) -> str:
  """The map Grad-CAM uses unless told: the model's `cam_layer`, else its last map "features"."""
  return getattr(model, "cam_layer", "features")


def tapped_model(model: nnx.Module, layer: str | None = None) -> TappedFn:
  """A busjax classifier (evaluation mode) as a `TappedFn` at its named feature map `layer`
  (a key of its ``return_features`` dict, e.g. "stage3"; a sub-model's maps are qualified,
  e.g. "densenet121/block_3" in the fusion model; default: `default_layer`)."""
  model.eval()
  layer = layer or default_layer(model)

  def tapped(x, delta):
    with model_common.tapping(layer, delta) as seen:
      logits = model(x)
    if seen.value is None:
      raise ValueError(
        f"{type(model).__name__} has no feature map {layer!r}; its maps: {', '.join(seen.names)}"
      )
    return logits, seen.value

  return tapped


def layer_names(model: nnx.Module, x: jax.Array) -> list[str]:
  """The named maps a Grad-CAM `layer` can be, in forward order (shapes only; nothing runs)."""
  graph, state = nnx.split(model)

  def names(state, x):
    m = nnx.merge(graph, state)
    m.eval()
    with model_common.tapping("") as seen:
      m(x)
    return seen.names

  found: list[str] = []
  jax.eval_shape(lambda s, v: found.extend(names(s, v)), state, x)
  return found


JAX_METHODS = ("gradcam", "gradcam_pp", "gradients", "smoothgrad", "ig", "eg")
METHODS = (*JAX_METHODS, "shap")  # "shap": `partition_shap` (model-agnostic, numpy side).


def make_explainer(
  model: nnx.Module, method: str, *, layer: str | None = None, **kwargs
) -> Callable:
  """A jitted ``(x float (N, H, W, C), targets (N,), rng) -> maps (N, H, W)`` for one of
  `JAX_METHODS` (`layer`: Grad-CAM's map; kwargs: smoothgrad's samples/sigma, ig's
  baseline/steps, eg's background/samples). Fixed shapes: one compile."""
  if method not in JAX_METHODS:
    raise ValueError(f"unknown saliency method {method!r}; expected one of {JAX_METHODS}")
  graph, state = nnx.split(model)

  def explain(state, x, targets, rng):
    m = nnx.merge(graph, state)
    m.eval()
    if method in ("gradcam", "gradcam_pp"):
      return _cam(tapped_model(m, layer), x, targets, plus_plus=method == "gradcam_pp")
    if method == "gradients":
      return gradients(m, x, targets)
    if method == "smoothgrad":
      return smoothgrad(m, x, targets, rng, **kwargs)
    if method == "eg":
      return expected_gradients(m, x, targets, rng=rng, **kwargs)
    return integrated_gradients(m, x, targets, **kwargs)

  jitted = sharding.jit(explain)

  def run(x, targets, rng=None):
    return jitted(state, x, targets, jax.random.key(0) if rng is None else rng)

  return run


# ----------------------------------------------------------------------------------------------
# Agreement with lesion masks, faithfulness
# ----------------------------------------------------------------------------------------------


def _check(maps, masks) -> tuple[np.ndarray, np.ndarray]:
  maps = np.asarray(maps, np.float64)
  masks = np.asarray(masks) > 0
  if maps.shape != masks.shape or maps.ndim != 3:
    raise ValueError(f"maps {maps.shape} and masks {masks.shape} must both be (N, H, W)")
  return maps, masks


def pointing_game(maps, masks) -> np.ndarray:
  """(N,) bool: the map's maximum falls inside the lesion (NaN-free; ties: the first)."""
  maps, masks = _check(maps, masks)
  flat = maps.reshape(len(maps), -1).argmax(axis=1)
  return masks.reshape(len(masks), -1)[np.arange(len(masks)), flat]


def energy_in_mask(maps, masks) -> np.ndarray:
  """(N,) share of the positive attribution inside the lesion (nan for an all-zero map)."""
  maps, masks = _check(maps, masks)
  positive = np.maximum(maps, 0.0)
  total = positive.sum(axis=(1, 2))
  inside = (positive * masks).sum(axis=(1, 2))
  return np.where(total > 0, inside / np.where(total > 0, total, 1.0), np.nan)


def top_fraction_iou(maps, masks, fraction: float = 0.1) -> np.ndarray:
  """(N,) IoU between the top `fraction` of pixels by attribution and the lesion."""
  maps, masks = _check(maps, masks)
  n, h, w = maps.shape
  k = max(1, int(round(fraction * h * w)))
  order = np.argsort(-maps.reshape(n, -1), axis=1, kind="stable")[:, :k]
  top = np.zeros((n, h * w), bool)
  np.put_along_axis(top, order, True, axis=1)
  flat = masks.reshape(n, -1)
  union = (top | flat).sum(axis=1)
  return (top & flat).sum(axis=1) / np.maximum(union, 1)


def deletion_insertion(
  prob_fn: Callable[[np.ndarray], np.ndarray],
  x: np.ndarray,
  maps: np.ndarray,
  targets: np.ndarray,
  *,
  steps: int = 16,
  baseline: float = 0.0,
) -> dict[str, np.ndarray]:
  """Per image, the area under p(target) as pixels are removed in order of attribution
  (deletion: x -> baseline) or added to a baseline image (insertion: baseline -> x).

  Args:
    prob_fn: (N, H, W, C) float input -> (N, classes) probabilities (a fixed-batch jitted
      predict is fastest).
    x: the inputs the maps explain; maps: (N, H, W); targets: (N,) classes.
    steps: points on each curve after the start (each adds 1/steps of the pixels).

  Returns:
    ``{"deletion": (N,), "insertion": (N,)}``, areas in [0, 1] (trapezoid over the fraction).
  """
  x = np.asarray(x, np.float32)
  n, h, w = np.asarray(maps).shape
  order = np.argsort(-np.asarray(maps).reshape(n, -1), axis=1, kind="stable")
  rank = np.empty_like(order)
  np.put_along_axis(rank, order, np.arange(h * w)[None, :].repeat(n, 0), axis=1)
  rank = rank.reshape(n, h, w, 1)
  blank = np.full_like(x, baseline)
  rows = np.arange(n)
  curves = {"deletion": [], "insertion": []}
  for step in range(steps + 1):
    shown = rank < round(step / steps * h * w)  # The `step/steps` most salient pixels.
    for kind, image in (
      ("deletion", np.where(shown, blank, x)),
      ("insertion", np.where(shown, x, blank)),
    ):
      curves[kind].append(np.asarray(prob_fn(image))[rows, targets])
  fractions = np.linspace(0.0, 1.0, steps + 1)
  return {k: np.trapezoid(np.stack(v, 1), fractions, axis=1) for k, v in curves.items()}
