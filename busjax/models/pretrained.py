"""ImageNet weights into busjax backbones, from local Keras, torchvision or safetensors files.

Nothing is downloaded here: `docs/pretrained_weights.md` says how to fetch the files once. Sources:

* ``"keras"`` (``.h5``, ``.weights.h5``, ``.keras``): the keras.applications layout. The reference
  network is built with ``keras.applications.X(weights=None)`` (any Keras backend; JAX needs no
  TensorFlow), ``load_weights(path)`` fills it, and ``model.layers`` is walked by layer name, so
  Keras itself resolves its file formats. Depthwise kernels (3, 3, C, 1) become (3, 3, 1, C).
* ``"torch"`` (``.pth``, ``.pt``, ``.bin``): a torchvision ``state_dict`` read with
  ``torch.load(path, weights_only=True)`` (torch is optional); kernels OIHW -> HWIO, Linear
  (out, in) -> (in, out).
* ``"safetensors"`` (``.safetensors``, read with ``safetensors.numpy``, no torch): either a
  torchvision state_dict saved as safetensors, or a file in busjax layout written by this
  module's CLI. ``"npz"`` (``.npz``): busjax layout, ``np.load(allow_pickle=False)``.

"busjax layout" is a flat ``{"path.to.param": array}`` dict keyed like ``nnx.state(model)``
(e.g. ``"stem.conv.kernel"``, ``"stem.bn.mean"``); convert once and keep that file:

  python -m busjax.models.pretrained --arch=mobilenet_v2 --src=FILE.h5 --out=mnv2.safetensors

Conventions must match the source: Keras MobileNetV2 uses TF 'SAME' padding (busjax
``padding="same"``) and BatchNorm epsilon 1e-3, Keras DenseNet 1.001e-5 and symmetric padding,
torchvision symmetric padding and 1e-5. `load_pretrained` checks the model against the source
and raises with the settings to use. A single-channel model takes an RGB stem kernel summed over
its input channels (exact for a grey image replicated to RGB).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Iterator, Mapping

import numpy as np
from flax import nnx

from busjax.models import common, layers

FORMATS = ("keras", "torch", "safetensors", "npz")
ARCHS = ("mobilenet_v2", "densenet121")


class WeightImportError(ValueError):
  """A weight file does not fit the model; the message names the file and the first bad tensor."""


# -------------------------------------------------------------------------------------------------
# Architecture tables: one "unit" per conv / BN / dense layer, with its name in each source layout.
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Unit:
  """One weight-bearing layer.

  Attributes:
    kind: "conv", "depthwise", "bn" or "dense".
    busjax: module path in the busjax model (params are ``<busjax>.kernel``, ``<busjax>.scale``...).
    keras: the keras.applications layer name.
    torch: the torchvision state_dict prefix (params are ``<torch>.weight`` ...).
    head: True for the ImageNet classifier (skipped by ``skip_head``).
  """

  kind: str
  busjax: str
  keras: str
  torch: str
  head: bool = False


def _mobilenet_v2_units() -> list[Unit]:
  units = [
    Unit("conv", "stem.conv", "Conv1", "features.0.0"),
    Unit("bn", "stem.bn", "bn_Conv1", "features.0.1"),
  ]
  # 17 inverted-residual blocks; block 0 has no expansion conv (expand ratio 1).
  for i in range(17):
    keras = "expanded_conv" if i == 0 else f"block_{i}"
    torch = f"features.{i + 1}.conv"
    b = f"blocks.{i}"
    t = 0
    if i > 0:
      units += [
        Unit("conv", f"{b}.expand.conv", f"{keras}_expand", f"{torch}.0.0"),
        Unit("bn", f"{b}.expand.bn", f"{keras}_expand_BN", f"{torch}.0.1"),
      ]
      t = 1
    units += [
      Unit("depthwise", f"{b}.depthwise.conv", f"{keras}_depthwise", f"{torch}.{t}.0"),
      Unit("bn", f"{b}.depthwise.bn", f"{keras}_depthwise_BN", f"{torch}.{t}.1"),
      Unit("conv", f"{b}.project.conv", f"{keras}_project", f"{torch}.{t + 1}"),
      Unit("bn", f"{b}.project.bn", f"{keras}_project_BN", f"{torch}.{t + 2}"),
    ]
  units += [
    Unit("conv", "last_conv.conv", "Conv_1", "features.18.0"),
    Unit("bn", "last_conv.bn", "Conv_1_bn", "features.18.1"),
    Unit("dense", "head.fc", "predictions", "classifier.1", head=True),
  ]
  return units


def _densenet_units(block_sizes=(6, 12, 24, 16)) -> list[Unit]:
  units = [
    Unit("conv", "stem.conv", "conv1_conv", "features.conv0"),
    Unit("bn", "stem.bn", "conv1_bn", "features.norm0"),
  ]
  for b, size in enumerate(block_sizes):
    for j in range(size):
      path = f"blocks.{b}.{j}"
      keras = f"conv{b + 2}_block{j + 1}"
      torch = f"features.denseblock{b + 1}.denselayer{j + 1}"
      units += [
        Unit("bn", f"{path}.norm1", f"{keras}_0_bn", f"{torch}.norm1"),
        Unit("conv", f"{path}.conv1", f"{keras}_1_conv", f"{torch}.conv1"),
        Unit("bn", f"{path}.norm2", f"{keras}_1_bn", f"{torch}.norm2"),
        Unit("conv", f"{path}.conv2", f"{keras}_2_conv", f"{torch}.conv2"),
      ]
    if b < len(block_sizes) - 1:
      path = f"transitions.{b}"
      units += [
        Unit("bn", f"{path}.norm", f"pool{b + 2}_bn", f"features.transition{b + 1}.norm"),
        Unit("conv", f"{path}.conv", f"pool{b + 2}_conv", f"features.transition{b + 1}.conv"),
      ]
  units += [
    Unit("bn", "final_norm", "bn", "features.norm5"),
    Unit("dense", "head.fc", "predictions", "classifier", head=True),
  ]
  return units


def architecture_units(arch: str) -> list[Unit]:
  """The weight-bearing layers of `arch` ("mobilenet_v2" or "densenet121") in forward order."""
  if arch == "mobilenet_v2":
    return _mobilenet_v2_units()
  if arch == "densenet121":
    return _densenet_units()
  raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


# Parameter names per kind: busjax leaf name -> (keras attribute, torch suffix).
_PARAMS = {
  "conv": {"kernel": ("kernel", "weight")},
  "depthwise": {"kernel": ("kernel", "weight")},
  "dense": {"kernel": ("kernel", "weight"), "bias": ("bias", "bias")},
  "bn": {
    "scale": ("gamma", "weight"),
    "bias": ("beta", "bias"),
    "mean": ("moving_mean", "running_mean"),
    "var": ("moving_variance", "running_var"),
  },
}

# What the busjax model must be set to for each source's numbers to mean the same thing.
_CONVENTIONS = {
  ("keras", "mobilenet_v2"): {"padding": "same", "bn_epsilon": 1e-3},
  ("keras", "densenet121"): {"padding": "symmetric", "bn_epsilon": 1.001e-5},
  ("torch", "mobilenet_v2"): {"padding": "symmetric", "bn_epsilon": 1e-5},
  ("torch", "densenet121"): {"padding": "symmetric", "bn_epsilon": 1e-5},
}

# -------------------------------------------------------------------------------------------------
# Readers: each returns a flat busjax-layout dict {"stem.conv.kernel": array, ...}.
# -------------------------------------------------------------------------------------------------


def infer_format(path: str) -> str:
  """ "keras", "torch", "safetensors" or "npz" from the file name."""
  name = os.path.basename(path).lower()
  if name.endswith((".h5", ".hdf5", ".keras")):
    return "keras"
  if name.endswith((".pth", ".pt", ".bin")):
    return "torch"
  if name.endswith(".safetensors"):
    return "safetensors"
  if name.endswith(".npz"):
    return "npz"
  raise WeightImportError(
    f"{path}: cannot tell the weight format from the suffix; pass fmt= one of {FORMATS}"
  )


def _keras_application(arch: str, include_top: bool, alpha: float):
  os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 without TensorFlow
  import keras  # optional dependency, only for Keras sources

  kwargs = dict(weights=None, include_top=include_top, classifier_activation=None)
  if not include_top:
    kwargs["input_shape"] = (224, 224, 3)
  if arch == "mobilenet_v2":
    return keras.applications.MobileNetV2(alpha=alpha, **kwargs)
  if arch == "densenet121":
    return keras.applications.DenseNet121(**kwargs)
  raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def keras_model_to_flat(keras_model, arch: str) -> dict[str, np.ndarray]:
  """Reads a built keras.applications model layer by layer into busjax layout.

  Args:
    keras_model: e.g. ``keras.applications.MobileNetV2(weights=None)`` after ``load_weights``.
    arch: "mobilenet_v2" or "densenet121".

  Returns:
    Flat busjax-layout dict; the head is absent when the Keras model has no "predictions" layer.
  """
  by_name = {layer.name: layer for layer in keras_model.layers}
  flat = {}
  for unit in architecture_units(arch):
    layer = by_name.get(unit.keras)
    if layer is None:
      if unit.head:
        continue
      raise WeightImportError(f"Keras {arch}: no layer named {unit.keras!r} (busjax {unit.busjax})")
    for leaf, (attr, _) in _PARAMS[unit.kind].items():
      value = np.asarray(getattr(layer, attr).numpy(), np.float32)
      if unit.kind == "depthwise":
        value = np.transpose(value, (0, 1, 3, 2))  # (kh, kw, C, 1) -> (kh, kw, 1, C)
      flat[f"{unit.busjax}.{leaf}"] = value
  return flat


def read_keras(path: str, arch: str, *, alpha: float = 1.0) -> dict[str, np.ndarray]:
  """Builds the keras.applications reference net, loads `path` into it, returns busjax layout.

  Full-model files ("..._224.h5", ".weights.h5" of a model with its top) and "no_top" files
  both work: the net is built with its top first, then without it.
  """
  if not os.path.exists(path):
    raise WeightImportError(f"{path}: no such file")
  errors = []
  for include_top in (True, False):
    model = _keras_application(arch, include_top, alpha)
    try:
      model.load_weights(path)
    except Exception as e:  # Keras raises many types; both attempts are reported
      errors.append(f"include_top={include_top}: {type(e).__name__}: {e}")
      continue
    return keras_model_to_flat(model, arch)
  raise WeightImportError(
    f"{path}: Keras could not load it into keras.applications {arch}:\n  " + "\n  ".join(errors)
  )


def _fix_old_densenet_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  # Old torchvision DenseNet files say "denselayer1.norm.1.weight" for "denselayer1.norm1.weight".
  pattern = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|"
    r"running_mean|running_var))$"
  )
  out = {}
  for key, value in state.items():
    match = pattern.match(key)
    out[match.group(1) + match.group(2) if match else key] = value
  return out


def torch_state_to_flat(
  state: Mapping[str, np.ndarray], arch: str, *, source: str = "state_dict"
) -> dict[str, np.ndarray]:
  """Maps a torchvision state_dict (numpy values) to busjax layout; the head is optional."""
  state = _fix_old_densenet_keys(state)
  flat = {}
  for unit in architecture_units(arch):
    for leaf, (_, suffix) in _PARAMS[unit.kind].items():
      key = f"{unit.torch}.{suffix}"
      if key not in state:
        if unit.head:
          break
        raise WeightImportError(
          f"{source}: torchvision {arch} tensor {key!r} is missing (busjax {unit.busjax}.{leaf})"
        )
      value = np.asarray(state[key], np.float32)
      if unit.kind in ("conv", "depthwise"):
        if value.ndim != 4:
          raise WeightImportError(f"{source}: {key} has shape {value.shape}, expected 4-D OIHW")
        value = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO; depthwise (C,1,k,k)->(k,k,1,C)
      elif unit.kind == "dense" and leaf == "kernel":
        value = value.T
      flat[f"{unit.busjax}.{leaf}"] = value
  return flat


def read_torch(path: str, arch: str) -> dict[str, np.ndarray]:
  """Reads a torchvision state_dict with ``torch.load(weights_only=True)`` (no pickled code)."""
  if not os.path.exists(path):
    raise WeightImportError(f"{path}: no such file")
  try:
    import torch  # optional
  except ImportError as e:
    raise WeightImportError(
      f"{path}: reading .pth needs torch (pip install torch); or convert the "
      "state_dict to .safetensors elsewhere and pass that"
    ) from e
  state = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("state_dict", "model"):
    if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
      state = state[wrapper]
  if not isinstance(state, dict):
    raise WeightImportError(f"{path}: expected a state_dict, got {type(state).__name__}")
  arrays = {
    k: v.detach().to(torch.float32).numpy()
    for k, v in state.items()
    if hasattr(v, "detach") and v.dtype.is_floating_point
  }
  return torch_state_to_flat(arrays, arch, source=path)


def read_flat_file(path: str) -> dict[str, np.ndarray]:
  """All tensors of a .safetensors or .npz file, as float32-or-original numpy arrays."""
  if not os.path.exists(path):
    raise WeightImportError(f"{path}: no such file")
  if path.lower().endswith(".npz"):
    try:
      with np.load(path, allow_pickle=False) as data:
        return {k: np.asarray(data[k]) for k in data.files}
    except (ValueError, OSError) as e:
      raise WeightImportError(f"{path}: not a readable .npz of arrays: {e}") from e
  from safetensors import numpy as safetensors_numpy  # optional

  try:
    return dict(safetensors_numpy.load_file(path))
  except Exception as e:  # safetensors raises its own error types
    raise WeightImportError(f"{path}: not a readable .safetensors file: {e}") from e


def read_weights(
  path: str, *, arch: str, fmt: str | None = None, alpha: float = 1.0
) -> tuple[dict[str, np.ndarray], str]:
  """Reads any supported file into busjax layout.

  Returns:
    (flat dict, convention) where convention is "keras", "torch" or "busjax" (already converted;
    conventions are then the user's responsibility and only shapes are checked).
  """
  fmt = fmt or infer_format(path)
  if fmt not in FORMATS:
    raise WeightImportError(f"{path}: unknown fmt {fmt!r}; expected one of {FORMATS}")
  if fmt == "keras":
    return read_keras(path, arch, alpha=alpha), "keras"
  if fmt == "torch":
    return read_torch(path, arch), "torch"
  flat = read_flat_file(path)
  busjax_keys = {f"{u.busjax}.{leaf}" for u in architecture_units(arch) for leaf in _PARAMS[u.kind]}
  if fmt == "npz" or busjax_keys & set(flat):
    return flat, "busjax"
  return torch_state_to_flat(flat, arch, source=path), "torch"


# -------------------------------------------------------------------------------------------------
# Writing into a busjax model.
# -------------------------------------------------------------------------------------------------


def _path_key(path) -> str:
  return ".".join(str(p) for p in path)


def model_variables(model: nnx.Module) -> dict[str, nnx.Variable]:
  """Every Param / BatchStat of `model` by dotted path (the busjax layout's keys)."""
  return {
    _path_key(path): node
    for path, node in nnx.iter_graph(model)
    if isinstance(node, nnx.Param | nnx.BatchStat)
  }


def _iter_modules(model: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      yield _path_key(path), node


def check_conventions(model: nnx.Module, arch: str, source: str, *, path: str = "") -> None:
  """Raises unless the model's padding and BatchNorm epsilon are those of the weights' source."""
  wanted = _CONVENTIONS.get((source, arch))
  if wanted is None:
    return
  for name, module in _iter_modules(model):
    padding = getattr(module, "padding", None)
    is_spatial = (
      isinstance(module, layers.Conv | layers.DepthwiseConv)
      and max(getattr(module, "kernel_size", (1, 1))) > 1
    )  # 1x1 convs pad nothing either way
    if isinstance(padding, str) and is_spatial:
      if layers.canonical_padding(padding) != wanted["padding"]:
        raise WeightImportError(
          f"{path}: {source} {arch} weights need padding={wanted['padding']!r}, but module "
          f"{name or '<root>'} uses {padding!r}; build the model with "
          f"padding={wanted['padding']!r}, bn_epsilon={wanted['bn_epsilon']} "
          "(or pass check=False)"
        )
    if isinstance(module, nnx.BatchNorm):
      if not np.isclose(module.epsilon, wanted["bn_epsilon"], rtol=1e-3, atol=0):
        raise WeightImportError(
          f"{path}: {source} {arch} weights need bn_epsilon={wanted['bn_epsilon']}, but "
          f"BatchNorm {name} has epsilon={module.epsilon}; build the model with "
          f"padding={wanted['padding']!r}, bn_epsilon={wanted['bn_epsilon']} "
          "(or pass check=False)"
        )


def assign_flat(
  model: nnx.Module,
  flat: Mapping[str, np.ndarray],
  *,
  arch: str,
  skip_head: bool = True,
  source: str = "weights",
) -> nnx.Module:
  """Writes busjax-layout arrays into `model`'s variables, in place.

  Every backbone tensor of `arch` must be present with the model's shape (an RGB stem kernel
  is summed over its input channels for a one-channel model); extra head tensors are ignored
  when ``skip_head``. Raises `WeightImportError` naming the first missing or mis-shaped tensor.
  """
  variables = model_variables(model)
  units = architecture_units(arch)
  wanted = [(f"{u.busjax}.{leaf}", u) for u in units for leaf in _PARAMS[u.kind]]
  for key, unit in wanted:
    if unit.head and skip_head:
      continue
    if key not in variables:
      raise WeightImportError(
        f"{source}: the model has no variable {key!r} ({arch} layout); "
        "is it a busjax " + arch + " backbone?"
      )
    if key not in flat:
      raise WeightImportError(f"{source}: tensor {key!r} is missing")
    value = np.asarray(flat[key], np.float32)
    target = variables[key]
    if (
      unit is units[0]
      and value.ndim == 4
      and value.shape[2] == 3
      and target.shape[2] == 1
      and value.shape[:2] + value.shape[3:] == target.shape[:2] + target.shape[3:]
    ):
      # Grey input: conv(x * [1, 1, 1], W) == conv(x, sum_c W), so the RGB filters are exact.
      value = value.sum(axis=2, keepdims=True)
    if tuple(value.shape) != tuple(target.shape):
      raise WeightImportError(
        f"{source}: tensor {key!r} has shape {tuple(value.shape)}, the model "
        f"expects {tuple(target.shape)} (check arch/width/in_channels)"
      )
    target[...] = np.asarray(value, target.dtype)
  return model


# The widths keras.applications.MobileNetV2 builds (its `alpha`).
KERAS_MOBILENET_V2_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


def infer_keras_alpha(model: nnx.Module) -> float:
  """The Keras MobileNetV2 `alpha` whose stem and last-block widths match `model` (else 1.0)."""
  variables = model_variables(model)
  try:
    stem = variables["stem.conv.kernel"].shape[-1]
    last = variables["blocks.16.project.conv.kernel"].shape[-1]
  except KeyError:
    return 1.0
  for alpha in KERAS_MOBILENET_V2_ALPHAS:
    if (common.make_divisible(32 * alpha), common.make_divisible(320 * alpha)) == (stem, last):
      return alpha
  return 1.0


def load_pretrained(
  model: nnx.Module,
  path: str,
  *,
  arch: str,
  fmt: str | None = None,
  skip_head: bool = True,
  check: bool = True,
) -> nnx.Module:
  """Loads ImageNet weights from a local file into a busjax backbone, in place.

  Args:
    model: a busjax ``mobilenet_v2`` or ``densenet121`` backbone (as its module's create builds).
    path: a Keras .h5/.weights.h5/.keras file, a torchvision .pth, a .safetensors (torchvision or
      busjax layout) or a busjax-layout .npz.
    arch: "mobilenet_v2" or "densenet121".
    fmt: one of FORMATS; inferred from the suffix when None.
    skip_head: keep the model's own classifier (ImageNet has 1000 classes).
    check: require the model's padding / BatchNorm epsilon to match the source's conventions.

  Returns:
    `model`, with its backbone variables replaced.
  """
  alpha = infer_keras_alpha(model) if arch == "mobilenet_v2" else 1.0
  flat, convention = read_weights(path, arch=arch, fmt=fmt, alpha=alpha)
  if check:
    check_conventions(model, arch, convention, path=path)
  return assign_flat(model, flat, arch=arch, skip_head=skip_head, source=path)


def save_flat(flat: Mapping[str, np.ndarray], path: str) -> None:
  """Writes a busjax-layout dict as .safetensors or .npz (no pickle either way)."""
  arrays = {k: np.ascontiguousarray(v, np.float32) for k, v in flat.items()}
  if path.lower().endswith(".npz"):
    np.savez(path, **arrays)
  elif path.lower().endswith(".safetensors"):
    from safetensors import numpy as safetensors_numpy

    safetensors_numpy.save_file(arrays, path)
  else:
    raise WeightImportError(f"{path}: output must end in .safetensors or .npz")


def main(argv: list[str] | None = None) -> int:
  """CLI: convert a Keras/torchvision file once into busjax layout."""
  import argparse

  parser = argparse.ArgumentParser(
    prog="python -m busjax.models.pretrained",
    description="Convert ImageNet weights (Keras / torchvision / safetensors) to busjax layout.",
  )
  parser.add_argument("--arch", required=True, choices=ARCHS)
  parser.add_argument("--src", required=True, help="local weight file")
  parser.add_argument("--out", required=True, help="output .safetensors or .npz")
  parser.add_argument("--fmt", choices=FORMATS, default=None, help="source format")
  parser.add_argument("--alpha", type=float, default=1.0, help="Keras MobileNetV2 width (alpha)")
  args = parser.parse_args(argv)
  flat, convention = read_weights(args.src, arch=args.arch, fmt=args.fmt, alpha=args.alpha)
  save_flat(flat, args.out)
  wanted = _CONVENTIONS.get((convention, args.arch))
  print(f"wrote {len(flat)} tensors ({args.arch}, {convention} conventions) to {args.out}")
  if wanted:
    print(
      f"build the busjax model with padding={wanted['padding']!r}, "
      f"bn_epsilon={wanted['bn_epsilon']}"
    )
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
