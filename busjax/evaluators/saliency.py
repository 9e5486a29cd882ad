"""Saliency maps for busjax classifiers, and how well they agree with lesion masks.

Maps (each ``(N, H, W)`` float32, one per image, for one target class per image):

* `gradients`: |∂ score / ∂ input|, channels reduced by max (vanilla saliency, Simonyan et al.).
* `smoothgrad`: the mean of `gradients` over noisy copies of the input (Smilkov et al. 2017).
* `integrated_gradients`: (x − x') · mean over the straight path of ∂ score / ∂ input, summed over
  channels (Sundararajan et al. 2017); signed, and its sum over pixels approximates
  score(x) − score(x') (completeness; the trapezoid rule with `steps` intervals).
* `grad_cam` / `grad_cam_plus_plus`: channel weights from the gradient at the last feature map
  (plain mean, or Grad-CAM++'s second-order weights), ReLU of the weighted map, bilinearly
  upsampled to the input (Selvaraju et al. 2017; Chattopadhay et al. 2018).

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

from busjax.models import common as model_common
from busjax.models import fusion as fusion_model

ScoreFn = Callable[[jax.Array], jax.Array]  # (N, H, W, C) float input -> (N, classes) logits


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


def _cam(
  feature_fn: ScoreFn,
  head_fn: ScoreFn,
  x: jax.Array,
  targets: jax.Array,
  plus_plus: bool,
) -> jax.Array:
  maps = feature_fn(x).astype(jnp.float32)  # (N, h, w, K)
  scores_of = lambda a: class_scores(head_fn(a), targets)  # noqa: E731
  grads = jax.grad(lambda a: scores_of(a).sum())(maps)
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


def grad_cam(feature_fn: ScoreFn, head_fn: ScoreFn, x: jax.Array, targets: jax.Array):
  """Grad-CAM at the map `feature_fn` returns (`head_fn` maps it to logits), input-sized."""
  return _cam(feature_fn, head_fn, x, targets, plus_plus=False)


def grad_cam_plus_plus(feature_fn: ScoreFn, head_fn: ScoreFn, x: jax.Array, targets: jax.Array):
  """Grad-CAM++ at the map `feature_fn` returns, input-sized."""
  return _cam(feature_fn, head_fn, x, targets, plus_plus=True)


# ----------------------------------------------------------------------------------------------
# busjax models
# ----------------------------------------------------------------------------------------------


def model_functions(model: nnx.Module) -> tuple[ScoreFn, ScoreFn, ScoreFn]:
  """(logits, last feature map, head) functions of a busjax classifier in evaluation mode.

  The last map is ``features["features"]`` of ``model(x, return_features=True)``: ResNet,
  DenseNet and MobileNetV2 (their `common.Head` pools it) and the fusion model (pooled, then its
  linear head). Other models get the logits only (Grad-CAM raises for them).
  """
  model.eval()

  def logits(x):
    return model(x)

  def last_map(x):
    return model(x, return_features=True)[1]["features"]

  if isinstance(getattr(model, "head", None), model_common.Head):
    return logits, last_map, model.head
  if isinstance(model, fusion_model.FusionModel):
    return logits, last_map, lambda a: model.head(jnp.mean(a.astype(jnp.float32), axis=(1, 2)))

  def no_cam(a):
    raise ValueError(f"Grad-CAM needs a pooled linear head on the last map; {type(model)} has none")

  return logits, last_map, no_cam


METHODS = ("gradcam", "gradcam_pp", "gradients", "smoothgrad", "ig")


def make_explainer(model: nnx.Module, method: str, **kwargs) -> Callable:
  """A jitted ``(x float (N, H, W, C), targets (N,), rng) -> maps (N, H, W)`` for one method
  (kwargs: smoothgrad's samples/sigma, ig's baseline/steps). Fixed shapes: one compile."""
  if method not in METHODS:
    raise ValueError(f"unknown saliency method {method!r}; expected one of {METHODS}")
  graph, state = nnx.split(model)

  def explain(state, x, targets, rng):
    m = nnx.merge(graph, state)
    logits, last_map, head = model_functions(m)
    if method == "gradcam":
      return grad_cam(last_map, head, x, targets)
    if method == "gradcam_pp":
      return grad_cam_plus_plus(last_map, head, x, targets)
    if method == "gradients":
      return gradients(logits, x, targets)
    if method == "smoothgrad":
      return smoothgrad(logits, x, targets, rng, **kwargs)
    return integrated_gradients(logits, x, targets, **kwargs)

  jitted = jax.jit(explain)

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
