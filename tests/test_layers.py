"""Layer rewrites in busjax.models.layers match nnx.Conv: outputs and gradients, both paddings."""

import warnings

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from busjax.models import layers


def _reference_padding(x_shape, kernel_size, stride, padding):
  return [
    layers.pad_widths(x_shape[1], kernel_size, stride, padding),
    layers.pad_widths(x_shape[2], kernel_size, stride, padding),
  ]


def _assert_same_outputs_and_grads(fast, reference, x):
  """Compares f(x) and the gradients of a weighted sum w.r.t. (kernel, x), same kernel in both."""
  kernel = fast.kernel[...]
  # A non-uniform cotangent so that a transposed or shifted result cannot pass.
  weights = jax.random.normal(jax.random.key(7), fast(x).shape)

  @jax.jit
  def outputs_and_grads(kernel, inputs):
    results = []
    for module in (fast, reference):
      graphdef, state = nnx.split(module)

      def loss(kernel, inputs, graphdef=graphdef, state=state):
        copy = nnx.merge(graphdef, state)
        copy.kernel = nnx.Param(kernel)
        y = copy(inputs)
        return jnp.sum(y * weights), y

      grads, y = jax.grad(loss, argnums=(0, 1), has_aux=True)(kernel, inputs)
      results.append((y, *grads))
    return results

  (y_fast, *g_fast), (y_ref, *g_ref) = outputs_and_grads(kernel, x)
  assert y_fast.shape == y_ref.shape
  np.testing.assert_allclose(y_fast, y_ref, atol=1e-5, rtol=1e-5)
  for a, b in zip(g_fast, g_ref, strict=True):
    np.testing.assert_allclose(a, b, atol=1e-5 * max(1.0, float(jnp.abs(b).max())), rtol=1e-5)


@pytest.fixture(params=["cpu", "xla"])
def formulation(request):
  """Each parity test runs with both formulations `Conv`/`DepthwiseConv` can trace."""
  with layers.conv_formulation(request.param):
    yield request.param


@pytest.mark.parametrize("padding", ["symmetric", "same"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [8, 9])
def test_depthwise_matches_grouped_nnx_conv(padding, stride, size, formulation):
  channels = 6
  x = jax.random.normal(jax.random.key(0), (2, size, size + 1, channels))
  fast = layers.DepthwiseConv(
    channels, kernel_size=3, strides=stride, padding=padding, rngs=nnx.Rngs(1)
  )
  assert fast.kernel.shape == (3, 3, 1, channels)
  reference = nnx.Conv(
    channels,
    channels,
    (3, 3),
    strides=stride,
    feature_group_count=channels,
    use_bias=False,
    padding=_reference_padding(x.shape, 3, stride, padding),
    rngs=nnx.Rngs(2),
  )
  assert reference.kernel.shape == fast.kernel.shape
  _assert_same_outputs_and_grads(fast, reference, x)


@pytest.mark.parametrize("stride", [1, 2])
def test_pointwise_matches_nnx_conv(stride, formulation):
  x = jax.random.normal(jax.random.key(0), (2, 9, 8, 5))
  fast = layers.PointwiseConv(5, 7, strides=stride, rngs=nnx.Rngs(1))
  reference = nnx.Conv(
    5, 7, (1, 1), strides=stride, use_bias=False, padding="VALID", rngs=nnx.Rngs(2)
  )
  assert fast.kernel.shape == reference.kernel.shape == (1, 1, 5, 7)
  _assert_same_outputs_and_grads(fast, reference, x)


@pytest.mark.parametrize("padding", ["symmetric", "same"])
@pytest.mark.parametrize("kernel_size,stride", [(3, 1), (3, 2), (7, 2), (1, 2)])
# 1 and 3 input channels: a 3x3 kernel's gradient is one im2col matmul (a 7x7 kernel's, 49 or
# 147 patch columns, XLA's own); 40: XLA's own.
@pytest.mark.parametrize("channels", [1, 3, 40])
def test_conv_matches_nnx_conv(padding, kernel_size, stride, channels, formulation):
  x = jax.random.normal(jax.random.key(0), (2, 10, 11, channels))
  fast = layers.Conv(channels, 4, kernel_size, strides=stride, padding=padding, rngs=nnx.Rngs(1))
  reference = nnx.Conv(
    channels,
    4,
    (kernel_size, kernel_size),
    strides=stride,
    use_bias=False,
    padding=_reference_padding(x.shape, kernel_size, stride, padding),
    rngs=nnx.Rngs(2),
  )
  _assert_same_outputs_and_grads(fast, reference, x)


@pytest.mark.parametrize("padding", ["symmetric", "same"])
@pytest.mark.parametrize("size,stride", [(1, 1), (2, 1), (2, 2), (3, 2), (4, 2), (5, 2), (4, 1)])
def test_conv_on_small_maps_matches_nnx_conv(padding, size, stride):
  """ResNet-18's last stage at 64 px (4 x 4 -> 2 x 2 maps) and smaller: one im2col matmul
  forward and backward on the CPU path, the same function as nnx.Conv; 4 x 4 at stride 1 keeps
  XLA's convolution."""
  x = jax.random.normal(jax.random.key(0), (3, size, size, 24))
  out = (size + sum(layers.pad_widths(size, 3, stride, padding)) - 3) // stride + 1
  assert layers.small_map_path(x.shape, (3, out, out, 16)) == (min(size, out) <= 2)
  fast = layers.Conv(24, 16, 3, strides=stride, padding=padding, rngs=nnx.Rngs(1))
  reference = nnx.Conv(
    24,
    16,
    (3, 3),
    strides=stride,
    use_bias=False,
    padding=_reference_padding(x.shape, 3, stride, padding),
    rngs=nnx.Rngs(2),
  )
  with layers.conv_formulation("cpu"):
    _assert_same_outputs_and_grads(fast, reference, x)


def test_small_maps_take_one_matmul_and_no_convolution():
  """The 2 x 2 convolutions XLA:CPU runs up to 95x slower are gone from the traced gradient."""
  conv = layers.Conv(32, 32, 3, strides=1, padding="symmetric", rngs=nnx.Rngs(1))
  with layers.conv_formulation("cpu"):
    small = _primitives(conv, jnp.ones((2, 2, 2, 32)))
    large = _primitives(conv, jnp.ones((2, 8, 8, 32)))
  assert "conv_general_dilated" not in small and "dot_general" in small
  assert "conv_general_dilated" in large


def test_stored_gives_its_input_and_stays_a_conditional_in_xla_cpu(monkeypatch):
  """`stored` returns its input's values (also where the first element is NaN) and survives
  XLA:CPU's optimisations as a conditional, so `conv2d`'s kernel gradient reads the stored input
  rather than recomputing its producers inside the transpose (docs/performance.md)."""
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
  np.testing.assert_array_equal(layers.stored(x), x)
  nan_first = x.at[0, 0, 0, 0].set(jnp.nan)
  np.testing.assert_array_equal(layers.stored(nan_first), nan_first)
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 8, 8))

  def output(x, kernel):
    return layers.conv2d(jax.nn.relu(x * 2.0 + 1.0), kernel, (1, 1), ((1, 1), (1, 1)))

  _assert_kernel_gradient_keeps_stored(output, x, kernel, monkeypatch)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.stored(x) is x  # Off the CPU: no conditional.


def _assert_kernel_gradient_keeps_stored(output, x, kernel, monkeypatch) -> None:
  """The compiled kernel gradient of ``sum(output(x, kernel) ** 2)`` holds a conditional (a
  `stored` array), and none with `stored` patched to the identity."""

  def has_conditional() -> bool:  # A new function each time: traced afresh.
    def kernel_gradient(x, kernel):
      return jax.grad(lambda k: jnp.sum(output(x, k) ** 2))(kernel)

    with layers.conv_formulation("cpu"):
      text = jax.jit(kernel_gradient).lower(x, kernel).compile().as_text()
    return " conditional(" in text

  assert has_conditional()
  with monkeypatch.context() as patch:
    patch.setattr(layers, "stored", lambda v: v)
    assert not has_conditional()


def _primitives(module, x) -> set[str]:
  """Names of the primitives in the jaxpr of module(x)'s gradient w.r.t. x and the kernel."""
  graphdef, state = nnx.split(module)

  def loss(state, x):
    return jnp.sum(nnx.merge(graphdef, state)(x) ** 2)

  jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(state, x)
  names = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jaxpr.jaxpr)
  return names


def test_auto_formulation_follows_the_backend_and_the_environment(monkeypatch):
  """ "auto" is the CPU rewrites on the CPU, XLA's own convolutions elsewhere; BUSJAX_CONV and
  `conv_formulation` override it, and a bad name is a one-line error naming its source."""
  monkeypatch.delenv("BUSJAX_CONV", raising=False)
  assert layers.resolved_formulation() == ("cpu" if jax.default_backend() == "cpu" else "xla")
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert layers.resolved_formulation() == "xla"
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")  # No warning here.
  monkeypatch.setenv("BUSJAX_CONV", "cpu")
  assert layers.resolved_formulation() == "cpu"
  with layers.conv_formulation("xla"):
    assert layers.resolved_formulation() == "xla"
  assert layers.resolved_formulation() == "cpu"
  monkeypatch.setenv("BUSJAX_CONV", "cudnn")
  with pytest.raises(ValueError, match="BUSJAX_CONV='cudnn': expected one of auto, cpu, xla"):
    layers.resolved_formulation()
  with pytest.raises(ValueError, match="conv_formulation='fast'"), layers.conv_formulation("fast"):
    pass


def test_the_rewrites_on_a_gpu_warn_once_unless_the_flag_is_set(monkeypatch):
  """jaxlib 0.11.2's GPU compiler aborted (a fatal error, no traceback) on the rewrites: asking
  for them on a GPU says so once, with the flag that made them compile."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  monkeypatch.setenv("BUSJAX_CONV", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")
  layers._warn_rewrites_on_gpu.cache_clear()
  with pytest.warns(UserWarning, match="--xla_gpu_enable_triton_gemm=false"):
    assert layers.resolved_formulation() == "cpu"
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert layers.resolved_formulation() == "cpu"  # Once per process, not once per layer.
    layers._warn_rewrites_on_gpu.cache_clear()
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=false")
    assert layers.resolved_formulation() == "cpu"
  layers._warn_rewrites_on_gpu.cache_clear()


def test_formulations_trace_different_programs():
  """ "cpu" traces the rewrites (shifted slices; a narrow kernel's gradient as a matmul), "xla"
  XLA's own convolutions: the switch is real, not a name."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  depthwise = layers.DepthwiseConv(3, kernel_size=3, rngs=nnx.Rngs(0))
  conv = layers.Conv(3, 4, 3, rngs=nnx.Rngs(0))  # 27 patch columns.
  pointwise = layers.PointwiseConv(3, 4, strides=2, rngs=nnx.Rngs(0))
  with layers.conv_formulation("cpu"):
    assert "conv_general_dilated" not in _primitives(depthwise, x)
    assert "conv_general_dilated" not in _primitives(pointwise, x)
    assert "dot_general" in _primitives(conv, x)  # A narrow kernel's gradient: im2col matmul.
    wide = layers.Conv(40, 4, 3, rngs=nnx.Rngs(0))  # 360 patch columns: XLA's own gradient.
    assert "dot_general" not in _primitives(wide, jnp.ones((2, 8, 8, 40)))
  with layers.conv_formulation("xla"):
    assert "conv_general_dilated" in _primitives(depthwise, x)
    assert "dot_general" not in _primitives(pointwise, x)
    conv_primitives = _primitives(conv, x)
    assert "conv_general_dilated" in conv_primitives
    assert "dot_general" not in conv_primitives


@pytest.mark.parametrize("shape", [(2, 9, 8, 5), (3, 10, 7, 4)])
def test_max_pool_gradient_matches_select_and_scatter(shape, formulation):
  """The masked-tap gradient ("cpu") is ``select_and_scatter_add``'s: every output's gradient to
  the first maximum of its window, also among ties (the zeros after a ReLU, equal plateaus)."""
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), shape))
  x = x.at[0, :4, :4, 0].set(1.5)  # A plateau: all nine taps tie.
  reference = lambda v: nnx.max_pool(v, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
  y, vjp = jax.vjp(layers.max_pool_3x3_s2, x)
  y_ref, vjp_ref = jax.vjp(reference, x)
  np.testing.assert_array_equal(y, y_ref)
  grad = jax.random.normal(jax.random.key(1), y.shape)
  np.testing.assert_allclose(vjp(grad)[0], vjp_ref(grad)[0], rtol=1e-6, atol=1e-6)
  ones = vjp(jnp.ones_like(y))[0]  # Each output sends exactly one 1 somewhere.
  assert float(ones.sum()) == y.size and float(ones[0, 0, 0, 0]) >= 1.0
  primitives = str(jax.make_jaxpr(jax.grad(lambda v: layers.max_pool_3x3_s2(v).sum()))(x))
  assert ("select_and_scatter_add" in primitives) == (layers.resolved_formulation() == "xla")


def _bn_train_step(make_bn):
  """A jitted step through three BatchNorms: (output, new running means and variances)."""
  bns = [make_bn() for _ in range(3)]
  graphdef, state = nnx.split(nnx.List(bns))

  @jax.jit
  def step(state, x):
    model = nnx.merge(graphdef, state)

    def loss(model):
      h = x
      for bn in model:
        h = jnp.tanh(bn(h))
      return jnp.sum(h**2)

    value, _ = nnx.value_and_grad(loss)(model)
    return value, nnx.state(model, nnx.BatchStat)

  return step, state


def test_batch_norm_running_stats_update_like_flax_without_tracer_errors(monkeypatch):
  """`layers.BatchNorm` = ``nnx.BatchNorm`` (outputs, running statistics) but its statistics'
  update never asks a tracer for its sharding, which made JAX walk the whole trace once per
  BatchNorm to word an error message (quadratic tracing, docs/performance.md)."""
  from jax._src.interpreters import partial_eval

  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 6)) * 3 + 1
  ours_step, ours_state = _bn_train_step(lambda: layers.batch_norm(6, rngs=nnx.Rngs(0)))
  flax_step, flax_state = _bn_train_step(lambda: nnx.BatchNorm(6, momentum=0.9, rngs=nnx.Rngs(0)))
  origin_messages = []
  real = partial_eval.DynamicJaxprTracer._origin_msg
  monkeypatch.setattr(
    partial_eval.DynamicJaxprTracer,
    "_origin_msg",
    lambda self: origin_messages.append(1) or real(self),
  )
  ours_loss, ours_stats = ours_step(ours_state, x)
  assert origin_messages == []
  flax_loss, flax_stats = flax_step(flax_state, x)
  np.testing.assert_allclose(ours_loss, flax_loss, rtol=1e-6)
  ours_leaves, flax_leaves = jax.tree.leaves(ours_stats), jax.tree.leaves(flax_stats)
  assert len(ours_leaves) == len(flax_leaves) == 6
  for a, b in zip(ours_leaves, flax_leaves, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  assert not np.allclose(ours_leaves[0], 0.0)  # The means moved.
  bn = layers.batch_norm(6, rngs=nnx.Rngs(0))
  assert isinstance(bn, nnx.BatchNorm) and isinstance(bn.mean, nnx.BatchStat)
  bn.var[...] = jnp.full(6, 2.0)  # Outside a trace flax's own path runs.
  np.testing.assert_array_equal(bn.var.get_value(), np.full(6, 2.0))


def _bn_results(bn, x, weights, activation, *, fused_call):
  """(output, d loss / d (x, scale, bias), running mean, running var) after one training-mode
  call, loss = sum(weights * output); `fused_call` passes `activation` to the layer."""

  def loss(model, inputs):
    if fused_call:
      y = model(inputs, use_running_average=False, activation=activation)
    else:
      y = model(inputs, use_running_average=False)
      y = y if activation is None else activation(y)
    return jnp.sum(y.astype(jnp.float32) * weights), y

  (_, y), (grads, dx) = jax.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))(bn, x)
  affine = [grads[name][...] for name in ("scale", "bias") if name in grads]
  return [y, dx, *affine, bn.mean[...], bn.var[...]]


@pytest.mark.parametrize("activation", [None, jax.nn.relu, jax.nn.relu6, jax.nn.silu])
@pytest.mark.parametrize("shape", [(4, 6, 5, 12), (16, 7)])
@pytest.mark.parametrize("affine", [True, False])
def test_fused_batch_norm_matches_flax(activation, shape, affine):
  """The fused training-mode BatchNorm (+ ReLU / ReLU6, its written-out gradient) computes what
  ``nnx.BatchNorm`` followed by the activation computes: outputs, gradients for the input, scale
  and bias, and the running statistics; values spread around the clips (0 and 6)."""
  features = shape[-1]

  def make(cls, **kwargs):
    bn = cls(features, use_scale=affine, use_bias=affine, momentum=0.8, rngs=nnx.Rngs(0), **kwargs)
    if affine:
      bn.scale[...] = jnp.linspace(0.5, 2.0, features)
      bn.bias[...] = jnp.linspace(-1.0, 3.0, features)
    return bn

  x = jax.random.normal(jax.random.key(0), shape) * 3 + 2
  weights = jax.random.normal(jax.random.key(1), shape)
  with layers.conv_formulation("cpu"):
    fused = _bn_results(make(layers.BatchNorm, fused=True), x, weights, activation, fused_call=True)
  plain = _bn_results(make(nnx.BatchNorm), x, weights, activation, fused_call=False)
  assert len(fused) == len(plain) == (6 if affine else 4)
  for ours, theirs in zip(fused, plain, strict=True):
    scale = float(jnp.max(jnp.abs(theirs)))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5 * scale)
  if activation is jax.nn.relu6 and affine:  # Both clips were exercised.
    assert 0 < float(jnp.mean(plain[0] == 6.0)) < 0.5 and 0 < float(jnp.mean(plain[0] == 0.0))


def test_fused_batch_norm_path_choice(monkeypatch):
  """The written-out gradient runs only where it is meant to: a fused layer, training mode, the
  "cpu" formulation; evaluation mode and unfused layers run flax's code (and still apply the
  activation)."""
  calls = []
  real = layers.batch_norm_train
  monkeypatch.setattr(layers, "batch_norm_train", lambda *a, **k: calls.append(1) or real(*a, **k))
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5))
  for fused, mode, formulation, expected in [
    (True, False, "cpu", 1),
    (True, True, "cpu", 0),
    (True, False, "xla", 0),
    (False, False, "cpu", 0),
  ]:
    calls.clear()
    bn = layers.batch_norm(5, fused=fused, rngs=nnx.Rngs(0))
    with layers.conv_formulation(formulation):
      y = bn(x, use_running_average=mode, activation=jax.nn.relu)
    assert len(calls) == expected, (fused, mode, formulation)
    assert float(jnp.min(y)) == 0.0


def _tiny_backbone(name: str) -> nnx.Module:
  from busjax.models import densenet, mobilenet_v2, resnet

  rngs = nnx.Rngs(0)
  if name == "densenet":
    return densenet.DenseNet(
      block_config=(2, 2), growth_rate=4, num_init_features=8, num_classes=2, in_channels=1,
      rngs=rngs,
    )  # fmt: skip
  if name == "resnet18":
    return resnet.ResNet("resnet18", num_classes=2, in_channels=1, width=0.125, rngs=rngs)
  return mobilenet_v2.MobileNetV2(num_classes=2, in_channels=1, width=0.25, dropout=0.0, rngs=rngs)


@pytest.mark.parametrize("name", ["densenet", "resnet18", "mobilenet_v2"])
def test_fused_batch_norm_train_step_matches_plain(name):
  """DenseNet's layers and every `ConvBN` (ResNet, MobileNetV2) take the fused BatchNorm; a tiny
  network's loss gradient equals the same network with flax's BatchNorm + activation
  (`fused=False`; the same rewritten convolutions)."""
  model = _tiny_backbone(name)
  norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, layers.BatchNorm)]
  assert norms and all(norm.fused for norm in norms)
  # 64 px: MobileNetV2's last maps are 2 x 2. At 1 x 1 (32 px) its last BatchNorms see four
  # values per channel and its first blocks' gradients are ill-conditioned: fused vs flax differ
  # by 0.2% there, flax's with XLA's convolutions vs the rewritten ones by 1-2%.
  x = jax.random.normal(jax.random.key(0), (4, 64, 64, 1))

  def loss(m):
    return jnp.sum(m(x) ** 2)

  def grads():
    model.train()
    return jax.jit(nnx.grad(loss))(model)

  with layers.conv_formulation("cpu"):
    fused = grads()
  for norm in norms:
    norm.fused = False
  with layers.conv_formulation("cpu"):
    plain = grads()
  scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(plain))
  for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(plain), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_fused_batch_norm_input_gradient_is_stored(monkeypatch):
  """The fused BatchNorm's input gradient reaches the convolution before it through `stored`:
  the compiled kernel gradient of a 1x1 convolution (a matmul) followed by the BatchNorm holds a
  conditional, and none with `stored` patched out (XLA:CPU then fuses the whole gradient into
  the transpose the kernel gradient reads; docs/performance.md)."""
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
  kernel = jax.random.normal(jax.random.key(1), (1, 1, 8, 16))
  scale, bias = jnp.linspace(0.5, 2.0, 16), jnp.linspace(-1.0, 1.0, 16)

  def output(x, kernel):
    y = layers.pointwise_conv2d(x, kernel, (1, 1))
    return layers.batch_norm_train(y, scale, bias, epsilon=1e-5, clip=(0.0, None))[0]

  _assert_kernel_gradient_keeps_stored(output, x, kernel, monkeypatch)


@pytest.mark.parametrize(
  "x_shape,kernel_shape,strides,padding",
  [
    ((2, 9, 8, 30), (3, 3, 30, 6), (2, 2), ((1, 1), (1, 1))),
    ((2, 9, 8, 30), (3, 3, 30, 6), (1, 1), ((1, 1), (1, 1))),
    ((2, 7, 10, 5), (5, 3, 5, 4), (1, 1), ((2, 1), (0, 3))),  # Uneven kernel and padding.
    ((3, 16, 15, 1), (7, 7, 1, 8), (2, 2), ((2, 3), (3, 3))),  # A grey stem, 'same' padding.
  ],
)
def test_kernel_gradient_is_xlas_weight_gradient(x_shape, kernel_shape, strides, padding):
  """The im2col kernel gradient is XLA's weight-gradient sum (only speed differs)."""
  x = jax.random.normal(jax.random.key(0), x_shape)
  kernel = jnp.zeros(kernel_shape)
  y, vjp = jax.vjp(lambda k: layers._conv(x, k, strides, padding), kernel)
  grad = jax.random.normal(jax.random.key(1), y.shape)
  (expected,) = vjp(grad)
  got = layers.kernel_gradient(x, grad, kernel_shape, strides, padding)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "kernel_shape,out_shape,path",
  [
    ((7, 7, 1, 64), (32, 64, 64, 64), "xla"),  # ResNet's grey stem at 128 px: 49 columns.
    ((3, 3, 1, 32), (32, 112, 112, 32), "im2col"),  # MobileNetV2's grey stem at 224 px.
    ((3, 3, 3, 32), (32, 112, 112, 32), "xla"),  # RGB at 224 px: a patch matrix too large.
    ((7, 7, 1, 64), (16, 112, 112, 64), "xla"),  # DenseNet121's stem at 224 px: the same.
    ((7, 7, 3, 64), (2, 8, 8, 64), "xla"),  # 147 columns: wide patches, however few.
    ((3, 3, 32, 32), (32, 32, 32, 32), "xla"),  # Every layer past the stem.
    ((3, 3, 128, 32), (16, 56, 56, 32), "xla"),
  ],
)
def test_kernel_gradient_path_choice(kernel_shape, out_shape, path):
  assert layers.kernel_gradient_path(kernel_shape, out_shape) == path


def test_same_padding_is_tensorflow_same_and_differs_from_symmetric():
  # TF 'SAME' at stride 2 on an even size pads only after; torchvision pads both sides.
  assert layers.pad_widths(224, 3, 2, "same") == (0, 1)
  assert layers.pad_widths(225, 3, 2, "keras") == (1, 1)
  assert layers.pad_widths(224, 3, 2, "torch") == (1, 1)
  assert layers.pad_widths(224, 7, 2, "same") == (2, 3)
  x = jax.random.normal(jax.random.key(0), (1, 8, 8, 4))
  conv_same = layers.DepthwiseConv(4, strides=2, padding="same", rngs=nnx.Rngs(0))
  conv_sym = layers.DepthwiseConv(4, strides=2, padding="symmetric", rngs=nnx.Rngs(0))
  # Same kernel, same output shape, different values: the conventions really differ.
  assert conv_same(x).shape == conv_sym(x).shape == (1, 4, 4, 4)
  assert not np.allclose(conv_same(x), conv_sym(x))
  # And 'same' agrees with XLA's own SAME padding.
  reference = nnx.Conv(
    4, 4, (3, 3), strides=2, feature_group_count=4, use_bias=False, padding="SAME", rngs=nnx.Rngs(0)
  )
  reference.kernel[...] = conv_same.kernel[...]
  np.testing.assert_allclose(conv_same(x), reference(x), atol=1e-5)


def test_unknown_padding_is_rejected():
  with pytest.raises(ValueError, match="padding"):
    layers.Conv(3, 4, 3, padding="reflect", rngs=nnx.Rngs(0))


def test_bfloat16_compute_keeps_float32_params():
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  block = layers.ConvBN(4, 4, 3, kind="depthwise", dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  y = block(x)
  assert y.dtype == jnp.bfloat16
  assert block.conv.kernel.dtype == jnp.float32
  assert block.bn.scale.dtype == jnp.float32 and block.bn.mean.dtype == jnp.float32
  pointwise = layers.PointwiseConv(4, 6, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  assert pointwise(x).dtype == jnp.bfloat16


def test_depthwise_rejects_wrong_channel_count():
  conv = layers.DepthwiseConv(4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="4 channels"):
    conv(jnp.zeros((1, 8, 8, 3)))


@pytest.mark.parametrize(
  "init,shape,fan",
  [
    (layers.default_kernel_init, (3, 3, 16, 32), 3 * 3 * 32),  # He fan-out, torchvision
    (layers.depthwise_kernel_init, (3, 3, 1, 64), 3 * 3),  # per-channel fan-in
    (layers.dense_kernel_init, (256, 10), 256),  # LeCun fan-in (scale 1)
  ],
)
def test_initialisers_have_variance_scaling_std(init, shape, fan):
  scale = 1.0 if init is layers.dense_kernel_init else 2.0
  kernel = np.asarray(init(jax.random.key(0), shape))
  assert kernel.shape == shape and kernel.dtype == np.float32
  np.testing.assert_allclose(kernel.std(), np.sqrt(scale / fan), rtol=0.06)
  assert abs(kernel.mean()) < 0.1 * kernel.std()
  # Deterministic in the key, different across keys.
  np.testing.assert_array_equal(kernel, init(jax.random.key(0), shape))
  assert not np.allclose(kernel, init(jax.random.key(1), shape))


@pytest.mark.parametrize("shape", [(3, 3, 33, 32), (7, 7, 1, 64), (1000, 7)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_initialiser_values_are_the_device_formula(shape, dtype):
  """Slicing and scaling on the host (no per-shape programs) gives bit for bit the values the
  same formula gives in JAX ops, and the draw's length (a few shared ones) changes none of them:
  initial weights, hence trained results, stay reproducible."""
  key = jax.random.key(7)
  size = int(np.prod(shape))
  std = (2.0 / (size // shape[-2])) ** 0.5  # He fan-out: all axes but the input one.
  expected = (jax.random.normal(key, (size,), jnp.float32).reshape(shape) * std).astype(dtype)
  got = layers.default_kernel_init(key, shape, dtype)
  assert got.dtype == dtype and isinstance(got, jax.Array)
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
  # Under a trace (a jitted initialisation, nnx.eval_shape) the same values, as JAX ops.
  traced = jax.jit(lambda k: layers.default_kernel_init(k, shape, dtype))(key)
  np.testing.assert_array_equal(np.asarray(traced, np.float32), np.asarray(expected, np.float32))
  assert jax.eval_shape(lambda k: layers.default_kernel_init(k, shape, dtype), key).shape == shape
