"""Convolution building blocks with the standard Flax parameter layout, fast on XLA:CPU.

XLA:CPU lowers the gradients of depthwise and 1x1 convolutions to slow generic loops: a plain
`nnx.Conv` MobileNetV2 trains several times slower on CPU than the same network written with
the rewrites below. The rewrites change only how the maths is expressed, never the
parameters:

* `PointwiseConv`: a 1x1 convolution as a matrix product over the channel axis
  (kernel ``(1, 1, in, out)``, exactly like ``nnx.Conv(in, out, (1, 1))``).
* `DepthwiseConv`: a depthwise kxk convolution as a sum of k*k shifted (strided) slices times
  per-channel weights (kernel ``(kh, kw, 1, C)``, like ``nnx.Conv(C, C, k,
  feature_group_count=C)``).
* `Conv`: any other convolution via ``lax.conv_general_dilated`` (`conv2d`), whose kernel
  gradient is one im2col matrix product (`kernel_gradient`) where the patches are narrow and
  few (3x3 grey stems, whose weight gradient XLA:CPU's own convolution runs 3-4x slower) and
  XLA's own everywhere else (docs/performance.md). On maps of at most 2 x 2 (input or output)
  the whole convolution, forward and both gradients, is one im2col matrix product
  (`small_map_conv`): XLA:CPU runs those 3x3 convolutions 2-95x slower (ResNet-18's last
  stage at 64 px). 1x1 kernels take the `PointwiseConv` path automatically.

And one compiler option (`compiler_options`, applied by `busjax.sharding.jit`): on XLA:CPU the
convolutions are compiled by XLA itself rather than handed to YNNPACK, which ran those with
<= 64 output channels on one core (docs/performance.md, "Convolutions on one core").

These rewrites are for XLA:CPU. On a GPU their strided 1x1 matmuls aborted jaxlib 0.11.2's
compiler, where XLA's own convolutions (cuDNN's) compiled and ran 1.5-1.9x PyTorch's speed
(docs/performance.md, "Accelerators"), so `Conv`, `PointwiseConv` and `DepthwiseConv` trace
one of two formulations (`conv_formulation`): "cpu" (the rewrites) or "xla"
(``lax.conv_general_dilated``, a grouped one for depthwise, with XLA's own gradients: what
``nnx.Conv`` computes). The default, "auto", takes "cpu" when JAX's
default backend is the CPU and "xla" otherwise; ``BUSJAX_CONV=cpu|xla|auto`` overrides it for a
process. Both compute the same function and parameters (tests/test_layers.py).

Measured on the 2-core development box (MobileNetV2, 224 px, batch 8, SGD train step):
10.1 img/s with these layers vs 2.8 img/s with ``nnx.Conv`` (3.6x).

Padding conventions differ between the reference implementations, and parity with imported
weights needs the right one (see `pad_widths`):

* ``"symmetric"`` (alias ``"torch"``): torchvision, ``k // 2`` zeros on every side.
* ``"same"`` (alias ``"keras"``): TensorFlow/Keras 'SAME', which for stride 2 on an even size
  pads one more zero at the bottom/right than at the top/left (Keras' ``correct_pad`` +
  'valid' is the same thing).

All modules compute in ``dtype`` (e.g. bfloat16) and keep float32 parameters.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

PADDING_ALIASES = {"symmetric": "symmetric", "torch": "symmetric", "same": "same", "keras": "same"}

CONV_FORMULATIONS = ("auto", "cpu", "xla")
_formulation: str | None = None  # None: BUSJAX_CONV, else "auto".


def _checked_formulation(name: str, source: str) -> str:
  if name not in CONV_FORMULATIONS:
    raise ValueError(f"{source}={name!r}: expected one of {', '.join(CONV_FORMULATIONS)}")
  return name


def resolved_formulation() -> str:
  """ "cpu" or "xla": what the convolution layers trace now (read at trace time, so set it
  before a jitted function is first called; a compiled function keeps the one it was traced
  with)."""
  name = _formulation or _checked_formulation(os.environ.get("BUSJAX_CONV", "auto"), "BUSJAX_CONV")
  if name == "auto":
    return "cpu" if jax.default_backend() == "cpu" else "xla"
  if name == "cpu" and jax.default_backend() == "gpu":
    _warn_rewrites_on_gpu()
  return name


# XLA:CPU hands each f32 convolution to YNNPACK, which ran every one with <= 64 output channels
# on one of the two cores of the development machine (ResNet-18's first stages, DenseNet's
# 3x3 convolutions to 32 channels); XLA's own (Eigen) convolutions use both and ran those
# 1.5-2.3x faster, forward and input gradient alike, and matched YNNPACK from 128 channels up
# (docs/performance.md, "Convolutions on one core"). YNNPACK keeps the matmuls and reductions,
# the rest of its default set.
_XLA_CPU_OPTIONS = (
  (
    "xla_cpu_experimental_ynn_fusion_type",
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE",
  ),
)


def compiler_options() -> dict[str, str] | None:
  """XLA options for busjax's jitted steps (`sharding.jit`): on the CPU backend with the "cpu"
  formulation, convolutions stay with XLA instead of YNNPACK; elsewhere none. None too, with a
  warning, if this jaxlib does not know the option."""
  if jax.default_backend() != "cpu" or resolved_formulation() != "cpu":
    return None
  return dict(_XLA_CPU_OPTIONS) if _xla_accepts(_XLA_CPU_OPTIONS) else None


@functools.cache
def _xla_accepts(options: tuple[tuple[str, str], ...]) -> bool:
  try:
    jax.jit(lambda x: x + 1).lower(np.float32(0)).compile(compiler_options=dict(options))
  except Exception as error:  # An unknown option or value: this jaxlib differs.
    warnings.warn(
      f"XLA options {dict(options)} not accepted, left at the defaults: {error}", stacklevel=3
    )
    return False
  return True


@functools.cache
def _warn_rewrites_on_gpu() -> None:
  """Once per process: the rewrites on a GPU needed a flag with jaxlib 0.11.2."""
  if "xla_gpu_enable_triton_gemm=false" not in os.environ.get("XLA_FLAGS", ""):
    warnings.warn(
      "the 'cpu' convolution formulation on a GPU: jaxlib 0.11.2's compiler aborted on its "
      "strided 1x1 matmuls (Triton GEMM fusion); if yours does, set "
      "XLA_FLAGS=--xla_gpu_enable_triton_gemm=false or use 'auto' (docs/performance.md)",
      stacklevel=3,
    )


@contextlib.contextmanager
def conv_formulation(name: str) -> Iterator[None]:
  """Traces the convolution layers as "cpu", "xla" or "auto" inside the block (see the module
  docstring); e.g. a benchmark timing both on one backend."""
  global _formulation
  previous, _formulation = _formulation, _checked_formulation(name, "conv_formulation")
  try:
    yield
  finally:
    _formulation = previous


def _scaled_normals(key: jax.Array, shape: tuple[int, ...], std: float, dtype) -> jax.Array:
  """Normals of standard deviation `std`, from one draw whose length is a power of four.

  Eager `jax.random.normal` compiles one threefry program per distinct shape, about a second
  each on a busy 2-core CPU: a network with 50 kernel shapes took a minute to initialise.
  Drawing a few fixed lengths shares those programs across all shapes (and all models in a
  process). With JAX's partitionable threefry (the default since jax 0.5) element i of a draw
  depends only on the key and i, so the first `size` of any longer draw are the `size` normals
  drawn alone: the length changes no value. Powers of four from 4,096 (powers of two from 256
  until the nineteenth session) take 5 programs for ResNet-18, DenseNet121 or the fusion model
  instead of 8-11: ResNet-18 w0.5's initialisation 2.06 -> 1.29 s with a cold compile cache,
  0.53-0.57 -> 0.43 s warm; DenseNet121's 1.06-1.12 -> 1.06-1.09 s (powers of eight: 1.20 s, its
  many 2**16 draws grown to 2**18). Eagerly, slicing, reshaping and scaling then happen in NumPy:
  as eager JAX ops each compiled a program per kernel shape too (~100 for DenseNet121, ~1 s); the
  float32 values are the same bits. Under a trace (`nnx.eval_shape`, a jitted initialisation)
  they stay JAX ops.
  """
  size = math.prod(shape)
  bucket = 4096
  while bucket < size:
    bucket *= 4
  draws = jax.random.normal(key, (bucket,), jnp.float32)
  if isinstance(draws, jax.core.Tracer):
    return (draws[:size].reshape(shape) * std).astype(dtype)
  return jnp.asarray(np.asarray(draws)[:size].reshape(shape) * np.float32(std), dtype)


def he_normal(
  scale: float = 2.0,
  mode: str = "fan_out",
  in_axis: int | Sequence[int] = -2,
  out_axis: int = -1,
) -> Callable:
  """Variance-scaling normal initialiser (std = sqrt(scale / fan)), fast to set up on CPU.

  Same fans as ``nnx.initializers.variance_scaling`` for a (.., in, out) kernel: fan_in is
  the product of all axes but `out_axis`, fan_out all but `in_axis`.
  """
  if mode not in ("fan_in", "fan_out"):
    raise ValueError(f"mode must be 'fan_in' or 'fan_out', got {mode!r}")

  def init(key: jax.Array, shape: Sequence[int], dtype: jnp.dtype = jnp.float32) -> jax.Array:
    shape = tuple(int(d) for d in shape)
    ndim = len(shape)
    in_axes = {a % ndim for a in ((in_axis,) if isinstance(in_axis, int) else in_axis)}
    size = math.prod(shape)
    fan_in = size // max(1, shape[out_axis % ndim])
    fan_out = size // max(1, math.prod(shape[a] for a in in_axes))
    fan = fan_in if mode == "fan_in" else fan_out
    std = (scale / max(1, fan)) ** 0.5
    return _scaled_normals(key, shape, std, dtype)

  return init


# He/Kaiming normal over fan-out, as torchvision initialises its convolutions.
default_kernel_init = he_normal(2.0, "fan_out")
# A depthwise kernel (kh, kw, 1, C) has fan-in kh*kw per output channel: scale by that.
depthwise_kernel_init = he_normal(2.0, "fan_in", in_axis=(0, 1, 2), out_axis=-1)
# Classifier: LeCun normal (std = 1/sqrt(fan_in)).
dense_kernel_init = he_normal(1.0, "fan_in")


def canonical_padding(padding: str) -> str:
  """Returns "symmetric" or "same" for a padding name or alias; raises ValueError otherwise."""
  try:
    return PADDING_ALIASES[padding.lower()]
  except (KeyError, AttributeError):
    raise ValueError(f"padding must be one of {sorted(PADDING_ALIASES)}, got {padding!r}") from None


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(value, int):
    return (value, value)
  first, second = value
  return (int(first), int(second))


def pad_widths(size: int, kernel_size: int, stride: int, padding: str) -> tuple[int, int]:
  """Zeros to add before and after one spatial axis of length `size`.

  Args:
    size: input length along the axis.
    kernel_size: kernel length along the axis.
    stride: stride along the axis.
    padding: "symmetric"/"torch" (k // 2 each side) or "same"/"keras" (TensorFlow 'SAME').

  Returns:
    (before, after).
  """
  mode = canonical_padding(padding)
  if mode == "symmetric":
    return (kernel_size // 2, kernel_size // 2)
  out_size = -(-size // stride)
  total = max((out_size - 1) * stride + kernel_size - size, 0)
  return (total // 2, total - total // 2)


def _spatial_padding(
  x: jax.Array, kernel_size: tuple[int, int], strides: tuple[int, int], padding: str
) -> tuple[tuple[int, int], tuple[int, int]]:
  return (
    pad_widths(x.shape[1], kernel_size[0], strides[0], padding),
    pad_widths(x.shape[2], kernel_size[1], strides[1], padding),
  )


def _tap_window(x: jax.Array, i: int, j: int, out_hw: tuple[int, int], strides) -> jax.Array:
  """The strided slice of padded NHWC `x` that kernel tap (i, j) sees: (N, out_h, out_w, C)."""
  (out_h, out_w), (sh, sw) = out_hw, strides
  limit = (x.shape[0], i + (out_h - 1) * sh + 1, j + (out_w - 1) * sw + 1, x.shape[3])
  return jax.lax.slice(x, (0, i, j, 0), limit, (1, sh, sw, 1))


def depthwise_conv2d(
  x: jax.Array, kernel: jax.Array, strides: tuple[int, int], padding: str
) -> jax.Array:
  """Depthwise convolution of NHWC `x` with kernel (kh, kw, 1, C), as shifted slices (the
  "cpu" formulation) or XLA's grouped convolution ("xla"; see `conv_formulation`).

  XLA fuses the k*k multiply-adds into one loop, and their gradients are plain reductions
  and pads, where the grouped-convolution gradient is a slow generic loop on CPU (MobileNetV2
  shapes at batch 32: forward 6-27x, backward 10-18x faster than ``feature_group_count``;
  see docs/performance.md). A custom gradient (keeping only `x`, reducing each tap's kernel
  gradient in other layouts) measured no faster: the per-tap reductions are memory-bound.
  """
  kh, kw = kernel.shape[:2]
  sh, sw = strides
  pad_h, pad_w = _spatial_padding(x, (kh, kw), strides, padding)
  if resolved_formulation() == "xla":  # A grouped convolution, one group per channel.
    return _conv(x, kernel, strides, (pad_h, pad_w), groups=x.shape[-1])
  x = jnp.pad(x, ((0, 0), pad_h, pad_w, (0, 0)))
  out_h = (x.shape[1] - kh) // sh + 1
  out_w = (x.shape[2] - kw) // sw + 1
  y = None
  for i in range(kh):
    for j in range(kw):
      term = _tap_window(x, i, j, (out_h, out_w), strides) * kernel[i, j, 0]
      y = term if y is None else y + term
  return y


def _conv(x: jax.Array, kernel: jax.Array, strides, padding, groups: int = 1) -> jax.Array:
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    window_strides=strides,
    padding=padding,
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )


# `conv2d`'s kernel gradient is one im2col matmul (`kernel_gradient`) for kernels with at most
# `_IM2COL_MAX_COLUMNS` patch columns (kh * kw * in: grey and RGB 3x3 stems on small images)
# whose patch matrix has at most `_IM2COL_MAX_ELEMENTS` entries, and XLA's own weight-gradient
# convolution everywhere else. Kernel gradient alone, batch 32, AVX-512 Xeon with convolutions off
# YNNPACK (`compiler_options`), XLA's own / im2col, ms: grey 3x3/2 at 224 px 16.2 / 5.2, at 128 px
# 5.5 / 1.4; grey 7x7/2 at 128 px 15.6 / 9.7 but at 224 px 45.6 / 54.7; RGB 7x7/2 at 128 px 24.6 /
# 48.9; RGB 3x3/2 at 224 px 22.6 / 23.4. At ResNet-18's 3x3 layers XLA's own is 1.3-3x faster than
# any arrangement as matmuls (32x32x32x64->64: 12.2 ms vs 35.2 by kernel rows, 42.9 im2col, 51.2 per
# tap), which were faster while YNNPACK ran the convolutions on one core (docs/performance.md,
# "Kernel gradients back to XLA's own"). In the train steps, with the stem's input stored
# (`stored`), the grey 7x7 stem at 128 px is no longer faster by im2col: ResNet-18 w0.5 128/32
# 168.1 -> 174.9 and 167.3 -> 172.9 img/s with XLA's own (1.04x, two in-process A/Bs), ResNet-18
# 1.00x. So only 3x3 kernels on at most 3 channels (27 columns) take it; MobileNetV2's grey 3x3
# stem: 1.00x either way.
_IM2COL_MAX_COLUMNS = 27
_IM2COL_MAX_ELEMENTS = 8 * 2**20


def kernel_gradient_path(kernel_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> str:
  """How `conv2d` computes the kernel gradient of an (N, out_h, out_w, out) output on XLA:CPU:
  "im2col" (`kernel_gradient`) for few, small patches, else "xla" (XLA's own)."""
  kh, kw, cin, _ = kernel_shape
  n, out_h, out_w = out_shape[:3]
  columns = kh * kw * cin
  if columns <= _IM2COL_MAX_COLUMNS and n * out_h * out_w * columns <= _IM2COL_MAX_ELEMENTS:
    return "im2col"
  return "xla"


def kernel_gradient(
  x: jax.Array,
  grad: jax.Array,
  kernel_shape: tuple[int, int, int, int],
  strides: tuple[int, int],
  padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
  """d(loss)/d(kernel) of a dense NHWC convolution as one matrix product.

  The im2col matrix of the padded input (`_patches`: every tap's strided window side by side,
  (batch * out_h * out_w, kh * kw * in)) transposed times the output gradient: the sum XLA's
  weight-gradient convolution computes, which XLA:CPU runs 3-4x slower for a 3x3 kernel on one
  channel (grey stems). Accumulates in float32.
  """
  kh, kw, _, cout = kernel_shape
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  patches = _patches(xp, (kh, kw), grad.shape[1:3], strides)
  g = grad.reshape(-1, cout)
  return jnp.dot(patches.T, g, preferred_element_type=jnp.float32).reshape(kernel_shape)


# The largest map side at which `conv2d` is one im2col matmul (`small_map_conv`). 3x3, fwd+bwd,
# ms, XLA's own / im2col, AVX-512 Xeon (docs/performance.md, "Convolutions on 2 x 2 maps"):
# 32x2x2x512->512 281 / 5.0; 8x2x2x256->256 5.1 / 0.8; 32x4x4x256->512/2 61.9 / 2.6; 8x1x1x512->512
# 4.9 / 1.4. At 4 x 4 and larger the two are within 2x either way (16x4x4x128->32 0.5 / 1.0,
# 32x4x4x512->512 21.0 / 17.4), and XLA's own wins from 7 x 7 up.
SMALL_MAP_SIDE = 2


def small_map_path(x_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> bool:
  """Whether `conv2d` computes an NHWC input -> output convolution as one im2col matmul: where
  the input's or the output's map is at most `SMALL_MAP_SIDE` on a side."""
  return min(x_shape[1:3]) <= SMALL_MAP_SIDE or min(out_shape[1:3]) <= SMALL_MAP_SIDE


def small_map_conv(x: jax.Array, kernel: jax.Array, strides, padding) -> jax.Array:
  """``lax.conv_general_dilated`` of NHWC `x` and an HWIO kernel as one matrix product: the
  im2col matrix (`_patches`) times the kernel's (kh * kw * in, out) reshape; its gradients are
  that product's (the kernel's is `kernel_gradient`'s sum). Accumulates in float32."""
  kh, kw, _, cout = kernel.shape
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  out_hw = _conv_out_hw(xp.shape[1:3], (kh, kw), strides)
  patches = _patches(xp, (kh, kw), out_hw, strides)
  y = jnp.dot(patches, kernel.reshape(-1, cout), preferred_element_type=jnp.float32)
  return y.astype(x.dtype).reshape(x.shape[0], *out_hw, cout)


def _conv_out_hw(padded_hw, kernel_hw, strides) -> tuple[int, int]:
  return tuple(
    (size - k) // s + 1 for size, k, s in zip(padded_hw, kernel_hw, strides, strict=True)
  )


def _patches(xp: jax.Array, kernel_hw, out_hw, strides) -> jax.Array:
  """im2col of padded NHWC `xp`: (N * out_h * out_w, kh * kw * C), columns in (i, j, c) order.

  Built in two levels, each kernel row's strided rows first, then its kw windows side by side,
  so XLA:CPU fuses each stack into one loop; one concatenation of kh * kw window copies was kh * kw
  copy kernels and a separate concatenation pass (grey 7x7/2 stem, 32x128x128x1 -> 32: kernel
  gradient 20.8 -> 6.0 ms; 3x3/2 on 32x64x64x16 13.2 -> 3.5 ms).
  """
  (kh, kw), (out_h, out_w), (sh, sw) = kernel_hw, out_hw, strides
  n, _, width, c = xp.shape
  rows = []
  for i in range(kh):
    slab = jax.lax.slice(xp, (0, i, 0, 0), (n, i + (out_h - 1) * sh + 1, width, c), (1, sh, 1, 1))
    windows = [
      jax.lax.slice(slab, (0, 0, j, 0), (n, out_h, j + (out_w - 1) * sw + 1, c), (1, 1, sw, 1))
      for j in range(kw)
    ]
    rows.append(jnp.stack(windows, axis=3))  # (N, out_h, out_w, kw, C)
  return jnp.stack(rows, axis=3).reshape(-1, kh * kw * c)


def pointwise_conv2d(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
  """1x1 convolution of NHWC `x` with kernel (1, 1, in, out): a matmul over the channel axis
  after subsampling for a stride ("cpu": XLA emits one GEMM for the forward and both
  gradients), or XLA's own convolution ("xla"; cuDNN's on a GPU, which also keeps jaxlib 0.11's
  GPU compiler off a strided slice feeding a GEMM fusion, on which it aborted)."""
  if resolved_formulation() == "xla":
    return _conv(x, kernel, strides, ((0, 0), (0, 0)))
  sh, sw = strides
  if sh > 1 or sw > 1:
    x = x[:, ::sh, ::sw, :]
  return jnp.dot(x, kernel[0, 0])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(
  x: jax.Array,
  kernel: jax.Array,
  strides: tuple[int, int],
  padding: tuple[tuple[int, int], tuple[int, int]],
) -> jax.Array:
  """Dense NHWC x HWIO convolution (explicit padding): ``lax.conv_general_dilated``'s values
  and input gradient, with the kernel gradient from `kernel_gradient` (fast on XLA:CPU) where
  `kernel_gradient_path` says it beats XLA's own; on maps of at most 2 x 2 all three from
  `small_map_conv` (`small_map_path`)."""
  return _dense_conv(x, kernel, strides, padding)


def _dense_conv(x, kernel, strides, padding):
  xp_hw = (x.shape[1] + sum(padding[0]), x.shape[2] + sum(padding[1]))
  out_hw = _conv_out_hw(xp_hw, kernel.shape[:2], strides)
  if small_map_path(x.shape, (x.shape[0], *out_hw)):
    return small_map_conv(x, kernel, strides, padding)
  return _conv(x, kernel, strides, padding)


def stored(x: jax.Array) -> jax.Array:
  """`x` through a conditional XLA:CPU cannot see through: its consumers read the stored array
  instead of recomputing it from its producers.

  `conv2d` keeps its input for the kernel gradient this way. XLA's weight-gradient convolution
  wants that input transposed (channels first, batch last), and given the input itself XLA
  fused its producers (BatchNorm, ReLU, a residual add: up to 11 arrays for a ResNet block's
  output) into the transpose, recomputing them while reading every array in transposed order;
  the input is stored for the forward convolution anyway. Train steps, same values: ResNet-18
  128/32 1.12x, w0.5 1.10x, DenseNet121 224/16 1.04x, the fusion model 1.07x; compiles up to 6 s
  longer (docs/performance.md, "Stored convolution inputs"). `lax.optimization_barrier` would say
  the same, but XLA:CPU removes barriers before it fuses, and a conditional whose branches are
  alike is removed. The predicate (the first element equals itself) fails only for NaN, where
  the other branch's `x + 0` has `x`'s values. Off the CPU backend it returns `x` itself: the
  fusion it prevents was measured on XLA:CPU only.
  """
  if jax.default_backend() != "cpu":
    return x
  first = x[(0,) * x.ndim]
  return jax.lax.cond(first == first, lambda v: v, lambda v: v + 0, x)


def _conv2d_fwd(x, kernel, strides, padding):
  return _dense_conv(x, kernel, strides, padding), (stored(x), kernel)


def _conv2d_bwd(strides, padding, residuals, grad):
  x, kernel = residuals
  if small_map_path(x.shape, grad.shape):
    _, vjp = jax.vjp(lambda inputs, k: small_map_conv(inputs, k, strides, padding), x, kernel)
    return vjp(grad)
  if kernel_gradient_path(kernel.shape, grad.shape) == "xla":
    _, vjp = jax.vjp(lambda inputs, k: _conv(inputs, k, strides, padding), x, kernel)
    return vjp(grad)
  _, input_vjp = jax.vjp(lambda inputs: _conv(inputs, kernel, strides, padding), x)
  dk = kernel_gradient(x, grad, kernel.shape, strides, padding)
  return input_vjp(grad)[0], dk.astype(kernel.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class PointwiseConv(nnx.Module):
  """1x1 convolution as a channel matmul; kernel (1, 1, in, out) like ``nnx.Conv``.

  A stride > 1 subsamples first (what a 1x1 strided convolution does, no padding needed).
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    strides: int | Sequence[int] = 1,
    use_bias: bool = False,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    kernel_init: Callable = default_kernel_init,
    rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.strides = _pair(strides)
    self.dtype = dtype
    self.kernel = nnx.Param(
      kernel_init(rngs.params(), (1, 1, in_features, out_features), param_dtype)
    )
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    y = pointwise_conv2d(jnp.asarray(x, dtype), jnp.asarray(self.kernel[...], dtype), self.strides)
    if self.bias is not None:
      y = y + jnp.asarray(self.bias[...], dtype)
    return y


class DepthwiseConv(nnx.Module):
  """Depthwise convolution (one kxk filter per channel) as a sum of shifted slices.

  Kernel (kh, kw, 1, C): the layout of ``nnx.Conv(C, C, (kh, kw), feature_group_count=C)``
  and of a Keras DepthwiseConv2D kernel (kh, kw, C, 1) transposed on its last two axes.
  """

  def __init__(
    self,
    features: int,
    *,
    kernel_size: int | Sequence[int] = 3,
    strides: int | Sequence[int] = 1,
    padding: str = "symmetric",
    use_bias: bool = False,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    kernel_init: Callable = depthwise_kernel_init,
    rngs: nnx.Rngs,
  ):
    self.features = features
    self.kernel_size = _pair(kernel_size)
    self.strides = _pair(strides)
    self.padding = canonical_padding(padding)
    self.dtype = dtype
    kh, kw = self.kernel_size
    self.kernel = nnx.Param(kernel_init(rngs.params(), (kh, kw, 1, features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype)) if use_bias else nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    if x.shape[-1] != self.features:
      raise ValueError(f"DepthwiseConv expects {self.features} channels, got shape {x.shape}")
    dtype = self.dtype or x.dtype
    kernel = jnp.asarray(self.kernel[...], dtype)
    y = depthwise_conv2d(jnp.asarray(x, dtype), kernel, self.strides, self.padding)
    if self.bias is not None:
      y = y + jnp.asarray(self.bias[...], dtype)
    return y


class Conv(nnx.Module):
  """General 2-D convolution, kernel (kh, kw, in, out); 1x1 kernels use the matmul path."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int] = 3,
    *,
    strides: int | Sequence[int] = 1,
    padding: str = "symmetric",
    use_bias: bool = False,
    dtype: jnp.dtype | None = None,
    param_dtype: jnp.dtype = jnp.float32,
    kernel_init: Callable = default_kernel_init,
    rngs: nnx.Rngs,
  ):
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = _pair(kernel_size)
    self.strides = _pair(strides)
    self.padding = canonical_padding(padding)
    self.dtype = dtype
    kh, kw = self.kernel_size
    self.kernel = nnx.Param(
      kernel_init(rngs.params(), (kh, kw, in_features, out_features), param_dtype)
    )
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = self.dtype or x.dtype
    x = jnp.asarray(x, dtype)
    kernel = jnp.asarray(self.kernel[...], dtype)
    if self.kernel_size == (1, 1):
      y = pointwise_conv2d(x, kernel, self.strides)
    else:
      padding = _spatial_padding(x, self.kernel_size, self.strides, self.padding)
      convolve = _conv if resolved_formulation() == "xla" else conv2d
      y = convolve(x, kernel, self.strides, padding)
    if self.bias is not None:
      y = y + jnp.asarray(self.bias[...], dtype)
    return y


class RunningStat(nnx.BatchStat):
  """A `nnx.BatchStat` (running BatchNorm statistics, power-iteration vectors) whose whole-array
  update ``stat[...] = new`` inside a trace skips flax's sharding comparison.

  flax's `Variable.set_value` compares ``getattr(new, "sharding", None)`` with the old array's;
  on a tracer that attribute raises an AttributeError whose message JAX builds by walking every
  equation traced so far, so each BatchNorm cost O(program) and tracing a train step O(layers^2):
  2.7 s of DenseNet121's 7.0 s lowering, 8.8 s of the fusion model's 15.2 s (flax 0.12.8 and
  0.12.12 alike, jax 0.10.2). The result is the one flax reaches for a tracer of the same shape
  and dtype: the new array replaces the old. Anything else goes through flax unchanged.
  """

  def __setitem__(self, key, value) -> None:
    if key is Ellipsis and isinstance(value, jax.core.Tracer):
      current = self.get_value()
      if value.shape == current.shape and value.dtype == current.dtype:
        self.set_value(value)
        return
    super().__setitem__(key, value)


class BatchNorm(nnx.BatchNorm):
  """`nnx.BatchNorm` with its running mean and variance held as `RunningStat`s (same values,
  same update; only the tracing cost differs) and an optional `activation` at call time:
  ``bn(x, activation=jax.nn.relu)`` is ``jax.nn.relu(bn(x))``.

  With ``fused=True``, training mode under the "cpu" formulation runs `batch_norm_train`
  (ReLU and ReLU6 fused into the normalisation and its hand-written gradient; any other
  activation applied after it) for the layout every busjax model uses: features last, no mask,
  no ``axis_name``, fast variance. Anything else, and evaluation mode, run flax's own code.
  `ConvBN` (ResNet, MobileNetV2, the fusion and multiscale models' own blocks) and DenseNet's
  layers opt in: with the input gradient stored, train steps 1.04x (ResNet-18 w0.5) to 1.55x
  (MobileNetV2) over flax's BatchNorm (docs/performance.md, "BatchNorm gradients stored").
  The GAN's and the projection head's BatchNorms keep flax's.
  """

  def __init__(self, num_features: int, *, fused: bool = False, **kwargs):
    super().__init__(num_features, **kwargs)
    self.mean = RunningStat(self.mean.get_value())
    self.var = RunningStat(self.var.get_value())
    self.fused = fused

  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
    activation: Callable[[jax.Array], jax.Array] | None = None,
  ) -> jax.Array:
    if use_running_average is None:
      use_running_average = self.use_running_average
    # The clip that fuses `activation`; None for one that cannot be fused (applied after).
    clip = (None, None) if activation is None else _FUSED_CLIPS.get(activation)
    fused = (
      self.fused
      and use_running_average is False  # None: flax's own error message.
      and mask is None
      and self.axis_name is None
      and self.axis in (-1, x.ndim - 1)
      and self.use_fast_variance
      and resolved_formulation() == "cpu"
    )
    if not fused:
      y = super().__call__(x, use_running_average, mask=mask)
      return y if activation is None else activation(y)
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    x, scale, bias = self.promote_dtype((x, scale, bias), dtype=self.dtype)
    y, mean, var = batch_norm_train(x, scale, bias, epsilon=self.epsilon, clip=clip or (None, None))
    self.mean[...] = self.momentum * self.mean[...] + (1 - self.momentum) * mean
    self.var[...] = self.momentum * self.var[...] + (1 - self.momentum) * var
    return y if clip is not None else activation(y)


# Activations `BatchNorm` fuses, as the (lower, upper) bounds they clip to.
_FUSED_CLIPS = {jax.nn.relu: (0.0, None), jax.nn.relu6: (0.0, 6.0)}


def batch_norm_train(
  x: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  *,
  epsilon: float,
  clip: tuple[float | None, float | None] = (None, None),
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over the last axis of `x`, optionally clipped to ``clip`` (ReLU:
  ``(0, None)``, ReLU6: ``(0, 6)``): ``(y, batch mean, batch variance)``, the statistics in float32
  without gradient.

  The values are flax's (``nnx.BatchNorm``: fast variance ``E[x^2] - E[x]^2`` clipped at 0,
  ``(x - mean) * rsqrt(var + eps) * scale + bias``, computed in at least float32, returned in
  x's dtype); the gradient is the textbook one written out (per-channel sums of the output
  gradient and of its product with the centred input, then the input gradient), keeping `x`
  and, with a clip, the output for the activation's mask (the next convolution keeps it anyway).
  XLA:CPU's own differentiation of flax's code gave it more, smaller loops: DenseNet121's train
  step compiled in 23 s instead of 30 s.

  The input gradient is `stored`: the convolution before a BatchNorm takes its kernel gradient
  from it transposed (channels first), and XLA:CPU fused the gradient's whole expression (seven
  operands) into that transpose, writing it in transposed order on one core: 65 ms for one of
  DenseNet121's (16, 56, 56, 128) gradients, against 6 ms in row order. Train steps 1.40x
  (DenseNet121, the fusion model) and 1.55x (MobileNetV2; docs/performance.md, "BatchNorm
  gradients stored").
  """
  features = x.shape[-1]
  scale = jnp.ones((features,), x.dtype) if scale is None else scale
  bias = jnp.zeros((features,), x.dtype) if bias is None else bias
  y, mean, var = _batch_norm_train(x, scale, bias, float(epsilon), tuple(clip))
  return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)


def _bn_forward(x, scale, bias, epsilon, clip):
  compute = jnp.promote_types(x.dtype, jnp.float32)
  xf = x.astype(compute)
  axes = tuple(range(x.ndim - 1))
  count = math.prod(x.shape[:-1])
  mean = jnp.sum(xf, axes) / count
  var = jnp.maximum(0.0, jnp.sum(xf * xf, axes) / count - mean * mean)
  rstd = jax.lax.rsqrt(var + epsilon)
  multiplier = rstd * scale.astype(compute)
  z = (xf - mean) * multiplier + bias.astype(compute)
  lower, upper = clip
  y = z if lower is None else jnp.maximum(z, lower)
  y = y if upper is None else jnp.minimum(y, upper)
  y = y.astype(x.dtype)
  clipped = y if (lower is not None or upper is not None) else None
  return y, (mean, var), (x, clipped, scale, bias, mean, rstd, multiplier)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, epsilon, clip):
  y, (mean, var), _ = _bn_forward(x, scale, bias, epsilon, clip)
  return y, mean, var


def _batch_norm_train_fwd(x, scale, bias, epsilon, clip):
  y, (mean, var), residuals = _bn_forward(x, scale, bias, epsilon, clip)
  return (y, mean, var), residuals


def _batch_norm_train_bwd(epsilon, clip, residuals, cotangents):
  """The gradient of y only: the statistics' cotangents are ignored (`batch_norm_train` stops
  their gradient; they only feed the running averages).

  Written without the centred input ``x - mean`` as an array: with it, XLA:CPU stored that array
  in the forward pass for the two uses here (YNNPACK's channel sum cannot take it fused), 945 MB
  of DenseNet121's 2,885 MB of step temporaries. The sums expand instead (``sum(dz * x) - mean *
  sum(dz)``, ``dx = a * dz - k * x + b`` per channel); their rounding error is the forward's own
  (its variance is ``E[x^2] - E[x]^2``): against float64, the centred and expanded forms both err
  8e-6, 3e-5, 8e-4 for |mean| / std = 0, 3, 10.
  """
  del epsilon
  x, y, scale, bias, mean, rstd, multiplier = residuals
  compute = mean.dtype
  xf = x.astype(compute)
  dz = cotangents[0].astype(compute)
  lower, upper = clip
  if y is not None:
    inside = True if lower is None else y > lower
    inside = inside if upper is None else inside & (y < upper)
    dz = jnp.where(inside, dz, 0.0)
  axes = tuple(range(x.ndim - 1))
  count = math.prod(x.shape[:-1])
  dbias = jnp.sum(dz, axes)
  dscale = (jnp.sum(dz * xf, axes) - mean * dbias) * rstd  # Sum of dz * normalised x.
  k = multiplier * rstd * dscale / count
  dx = multiplier * dz - xf * k + (k * mean - multiplier * dbias / count)
  # Stored: the convolution before the BatchNorm takes its kernel gradient from dx transposed,
  # and XLA:CPU fused this whole expression into that transpose (`batch_norm_train`).
  return stored(dx.astype(x.dtype)), dscale.astype(scale.dtype), dbias.astype(bias.dtype)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def batch_norm(
  num_features: int,
  *,
  epsilon: float = 1e-5,
  momentum: float = 0.9,
  dtype: jnp.dtype | None = None,
  fused: bool = False,
  rngs: nnx.Rngs,
) -> BatchNorm:
  """BatchNorm over NHWC channels with float32 scale/bias/mean/var.

  torchvision uses epsilon 1e-5 and momentum 0.1 (i.e. 0.9 here); Keras uses 1e-3 (DenseNet
  1.001e-5) and 0.99. Statistics are computed in at least float32 even for bfloat16 inputs.
  `fused`: see `BatchNorm`.
  """
  return BatchNorm(
    num_features, fused=fused, epsilon=epsilon, momentum=momentum, dtype=dtype, rngs=rngs
  )


class ConvBN(nnx.Module):
  """Convolution (bias only if `use_bias`) -> BatchNorm -> optional activation.

  `kind` picks the implementation: "conv" (general, 1x1 via matmul) or "depthwise".
  Parameters live at ``conv.kernel`` and ``bn.{scale,bias,mean,var}``.
  """

  def __init__(
    self,
    in_features: int,
    out_features: int,
    kernel_size: int = 3,
    *,
    strides: int = 1,
    padding: str = "symmetric",
    activation: Callable[[jax.Array], jax.Array] | None = jax.nn.relu,
    kind: str = "conv",
    use_bias: bool = False,
    bn_epsilon: float = 1e-5,
    bn_momentum: float = 0.9,
    dtype: jnp.dtype | None = None,
    rngs: nnx.Rngs,
  ):
    if kind == "depthwise":
      if in_features != out_features:
        raise ValueError("a depthwise ConvBN needs in_features == out_features")
      self.conv = DepthwiseConv(
        in_features,
        kernel_size=kernel_size,
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        rngs=rngs,
      )
    elif kind == "conv":
      self.conv = Conv(
        in_features,
        out_features,
        kernel_size,
        strides=strides,
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        rngs=rngs,
      )
    else:
      raise ValueError(f"kind must be 'conv' or 'depthwise', got {kind!r}")
    self.bn = batch_norm(
      out_features, epsilon=bn_epsilon, momentum=bn_momentum, dtype=dtype, fused=True, rngs=rngs
    )
    self.activation = activation

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.conv(x), activation=self.activation)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """3x3 stride-2 max pool with one pad on each side (torchvision; Keras pads zeros after
  ReLU, which gives the same result since the inputs are >= 0).

  The values are XLA's ``reduce_window``; with the "cpu" formulation the gradient is
  `_max_pool_gradient`'s (the same gradient, summed in another order: 1e-6), because XLA:CPU
  expands JAX's ``select_and_scatter_add`` into a reduce-window carrying four int32 index arrays
  and a scatter: ~170 ms of ResNet-18's ~960 ms step at 128 px, batch 32 (jax.profiler,
  docs/performance.md).
  """
  if resolved_formulation() == "xla":
    return _max_pool_3x3_s2(x)
  return _max_pool_3x3_s2_masked(x)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@jax.custom_vjp
def _max_pool_3x3_s2_masked(x: jax.Array) -> jax.Array:
  return _max_pool_3x3_s2(x)


def _max_pool_fwd(x):
  y = _max_pool_3x3_s2(x)
  return y, (x, y)


def _max_pool_gradient(residuals, grad):
  """Each output's gradient goes to the first input of its window (row-major) equal to the
  maximum, as ``select_and_scatter_add``'s ``ge`` does: nine masked taps, each put back in place
  by an interior pad (the transpose of its strided slice), all of which XLA fuses into one loop.
  """
  x, y = residuals
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-jnp.inf)
  out_hw = y.shape[1:3]
  zero = jnp.zeros((), grad.dtype)
  taken = None
  dxp = None
  for i in range(3):
    for j in range(3):
      hit = _tap_window(xp, i, j, out_hw, (2, 2)) == y
      if taken is not None:
        hit = hit & ~taken
      taken = hit if taken is None else taken | hit
      placed = jax.lax.pad(
        jnp.where(hit, grad, zero),
        zero,
        (
          (0, 0, 0),
          (i, xp.shape[1] - i - 2 * out_hw[0] + 1, 1),
          (j, xp.shape[2] - j - 2 * out_hw[1] + 1, 1),
          (0, 0, 0),
        ),
      )
      dxp = placed if dxp is None else dxp + placed
  return (dxp[:, 1:-1, 1:-1, :],)


_max_pool_3x3_s2_masked.defvjp(_max_pool_fwd, _max_pool_gradient)
