"""Tests for busjax.models.pretrained: Keras parity, torchvision/safetensors layouts, clear errors.

The parity tests build keras.applications nets (JAX backend) with random weights *and* random
BatchNorm statistics, save them as .weights.h5, import them into busjax and compare logits.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from busjax.models import pretrained  # noqa: E402

safetensors_numpy = pytest.importorskip("safetensors.numpy")

ARCH_MODULES = {"mobilenet_v2": "mobilenet_v2", "densenet121": "densenet"}


def _busjax_model(arch, *, in_channels=3, num_classes=1000, seed=1, **fields):
  module = pytest.importorskip(f"busjax.models.{ARCH_MODULES[arch]}")
  config = ml_collections.ConfigDict(dict(in_channels=in_channels, dropout=0.0, **fields))
  if arch == "densenet121":
    config.variant = "densenet121"
  model = module.create(config, num_classes=num_classes, rngs=nnx.Rngs(seed))
  model.eval()
  return model


def _randomise_keras(model, seed=0):
  """Random kernels at He scale, and BatchNorm gamma/beta/mean/var far from their defaults."""
  rng = np.random.default_rng(seed)
  for layer in model.layers:
    name = type(layer).__name__
    if name == "BatchNormalization":
      c = layer.gamma.shape[0]
      layer.set_weights(
        [
          rng.uniform(0.5, 1.5, c),
          rng.normal(0, 0.2, c),
          rng.normal(0, 0.2, c),
          rng.uniform(0.5, 2.0, c),
        ]
      )
    elif layer.weights:
      values = []
      for w in layer.weights:
        shape = tuple(w.shape)
        fan_in = int(np.prod(shape[:-1])) if name != "DepthwiseConv2D" else shape[0] * shape[1]
        values.append(
          rng.normal(0, np.sqrt(2.0 / max(fan_in, 1)), shape)
          if len(shape) > 1
          else rng.normal(0, 0.1, shape)
        )
      layer.set_weights(values)


def _keras_net(arch, size):
  keras = pytest.importorskip("keras")  # only the parity tests need Keras
  kwargs = dict(weights=None, input_shape=(size, size, 3), classifier_activation=None)
  if arch == "mobilenet_v2":
    return keras.applications.MobileNetV2(**kwargs)
  return keras.applications.DenseNet121(**kwargs)


def _assert_logits_close(busjax_logits, keras_logits, tol=1e-4):
  busjax_logits, keras_logits = np.asarray(busjax_logits), np.asarray(keras_logits)
  scale = max(1.0, float(np.abs(keras_logits).max()))
  assert np.abs(keras_logits).std() > 1e-2  # random weights must give non-trivial logits
  np.testing.assert_allclose(busjax_logits, keras_logits, rtol=0, atol=tol * scale)


# Jitted: one compiled forward instead of thousands of op-by-op dispatches (DenseNet121: ~30 s).
@nnx.jit
def _forward(model, x):
  return model(x)


@nnx.jit
def _forward_features(model, x):
  return model(x, return_features=True)


def _keras_parity(arch, size, tmp_path, **fields):
  net = _keras_net(arch, size)
  _randomise_keras(net)
  path = str(tmp_path / f"{arch}.weights.h5")
  net.save_weights(path)
  x = np.random.default_rng(1).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  keras_logits = np.asarray(net.predict(x, verbose=0))
  model = _busjax_model(arch, **fields)
  pretrained.load_pretrained(model, path, arch=arch, skip_head=False)
  _assert_logits_close(_forward(model, jnp.asarray(x)), keras_logits)
  return model, x, keras_logits


@pytest.mark.slow
def test_keras_mobilenet_v2_parity_at_64(tmp_path):
  _keras_parity("mobilenet_v2", 64, tmp_path, padding="same", bn_epsilon=1e-3)


@pytest.mark.slow
def test_keras_mobilenet_v2_parity_at_224_in_memory():
  net = _keras_net("mobilenet_v2", 224)
  _randomise_keras(net, seed=3)
  x = np.random.default_rng(2).uniform(-1, 1, (1, 224, 224, 3)).astype(np.float32)
  model = _busjax_model("mobilenet_v2", padding="same", bn_epsilon=1e-3)
  flat = pretrained.keras_model_to_flat(net, "mobilenet_v2")
  pretrained.assign_flat(model, flat, arch="mobilenet_v2", skip_head=False)
  _assert_logits_close(_forward(model, jnp.asarray(x)), net.predict(x, verbose=0))


@pytest.mark.slow
def test_keras_densenet121_parity_at_64(tmp_path):
  _keras_parity("densenet121", 64, tmp_path, padding="symmetric", bn_epsilon=1.001e-5)


# ---------------------------------------------------------------------------------------------
# torchvision layout without torchvision: a state_dict written from a busjax model's own weights.
# ---------------------------------------------------------------------------------------------


def _torchvision_state(model, arch):
  """The inverse mapping, written apart from the module: HWIO -> OIHW, (in,out) -> (out,in)."""
  variables = pretrained.model_variables(model)
  names = {
    "kernel": "weight",
    "bias": "bias",
    "scale": "weight",
    "mean": "running_mean",
    "var": "running_var",
  }
  state = {}
  for unit in pretrained.architecture_units(arch):
    leaves = (
      ("scale", "bias", "mean", "var")
      if unit.kind == "bn"
      else (("kernel", "bias") if unit.kind == "dense" else ("kernel",))
    )
    for leaf in leaves:
      value = np.asarray(variables[f"{unit.busjax}.{leaf}"][...])
      if value.ndim == 4:
        value = value.transpose(3, 2, 0, 1)
      elif value.ndim == 2:
        value = value.T
      state[f"{unit.torch}.{names[leaf]}"] = np.ascontiguousarray(value)
    if unit.kind == "bn":
      state[f"{unit.torch}.num_batches_tracked"] = np.zeros((), np.int64)
  return state


def _randomise_busjax(model, seed):
  rng = np.random.default_rng(seed)
  for key, variable in pretrained.model_variables(model).items():
    shape = variable.shape
    if key.endswith(".var"):
      variable[...] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
    else:
      variable[...] = rng.normal(0, 0.1, shape).astype(np.float32)


SMALL = {"mobilenet_v2": dict(width=0.35), "densenet121": dict(growth_rate=4, num_init_features=8)}


@pytest.mark.parametrize(
  "arch", ["mobilenet_v2", pytest.param("densenet121", marks=pytest.mark.slow)]
)
def test_torchvision_safetensors_round_trip(tmp_path, arch):
  source = _busjax_model(arch, num_classes=5, **SMALL[arch])
  _randomise_busjax(source, seed=0)
  state = _torchvision_state(source, arch)
  if arch == "mobilenet_v2":
    assert state["features.0.0.weight"].shape == (16, 3, 3, 3)
    assert state["features.2.conv.1.0.weight"].shape[1:] == (1, 3, 3)  # depthwise (C, 1, 3, 3)
  else:
    assert state["features.conv0.weight"].shape == (8, 3, 7, 7)
    assert "features.denseblock4.denselayer16.conv2.weight" in state
  path = str(tmp_path / f"{arch}_torchvision.safetensors")
  safetensors_numpy.save_file(state, path)
  target = _busjax_model(arch, num_classes=5, seed=7, **SMALL[arch])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
  assert not np.allclose(np.asarray(_forward(target, x)), np.asarray(_forward(source, x)))
  pretrained.load_pretrained(target, path, arch=arch, skip_head=False)
  np.testing.assert_allclose(
    np.asarray(_forward(target, x)), np.asarray(_forward(source, x)), rtol=1e-5, atol=1e-5
  )


def test_skip_head_keeps_the_models_classifier(tmp_path):
  source = _busjax_model("mobilenet_v2", num_classes=1000, width=0.35)
  _randomise_busjax(source, seed=1)
  path = str(tmp_path / "tv.safetensors")
  safetensors_numpy.save_file(_torchvision_state(source, "mobilenet_v2"), path)
  target = _busjax_model("mobilenet_v2", num_classes=2, width=0.35, seed=3)
  head_before = np.asarray(target.head.fc.kernel[...])
  pretrained.load_pretrained(target, path, arch="mobilenet_v2")  # skip_head=True by default
  np.testing.assert_array_equal(np.asarray(target.head.fc.kernel[...]), head_before)
  np.testing.assert_array_equal(
    np.asarray(target.stem.conv.kernel[...]), np.asarray(source.stem.conv.kernel[...])
  )


def test_grey_model_takes_rgb_stem_summed(tmp_path):
  source = _busjax_model("mobilenet_v2", width=0.35)
  _randomise_busjax(source, seed=2)
  path = str(tmp_path / "tv.safetensors")
  safetensors_numpy.save_file(_torchvision_state(source, "mobilenet_v2"), path)
  grey = _busjax_model("mobilenet_v2", width=0.35, in_channels=1, seed=5)
  pretrained.load_pretrained(grey, path, arch="mobilenet_v2")
  x = np.random.default_rng(0).normal(size=(1, 32, 32, 1)).astype(np.float32)
  rgb_logits, rgb_maps = _forward_features(source, jnp.asarray(np.repeat(x, 3, axis=-1)))
  _, grey_maps = _forward_features(grey, jnp.asarray(x))
  np.testing.assert_allclose(
    np.asarray(grey_maps["features"]), np.asarray(rgb_maps["features"]), rtol=1e-4, atol=1e-5
  )
  assert rgb_logits.shape == (1, 1000)


def test_cli_converts_to_busjax_layout_and_npz_loads(tmp_path):
  source = _busjax_model("mobilenet_v2", width=0.35)
  _randomise_busjax(source, seed=4)
  src = str(tmp_path / "tv.safetensors")
  safetensors_numpy.save_file(_torchvision_state(source, "mobilenet_v2"), src)
  for out in ("mnv2.safetensors", "mnv2.npz"):
    out_path = str(tmp_path / out)
    assert pretrained.main(["--arch=mobilenet_v2", f"--src={src}", f"--out={out_path}"]) == 0
    flat, convention = pretrained.read_weights(out_path, arch="mobilenet_v2")
    assert convention == "busjax"
    assert flat["stem.conv.kernel"].shape == (3, 3, 3, 16)
    target = _busjax_model("mobilenet_v2", width=0.35, seed=9)
    pretrained.load_pretrained(target, out_path, arch="mobilenet_v2", skip_head=False)
    np.testing.assert_array_equal(
      np.asarray(target.blocks[5].depthwise.conv.kernel[...]),
      np.asarray(source.blocks[5].depthwise.conv.kernel[...]),
    )


def test_torch_pth_is_read_with_weights_only(tmp_path):
  torch = pytest.importorskip("torch")
  source = _busjax_model("mobilenet_v2", width=0.35)
  _randomise_busjax(source, seed=6)
  state = {k: torch.from_numpy(v) for k, v in _torchvision_state(source, "mobilenet_v2").items()}
  path = str(tmp_path / "mnv2.pth")
  torch.save(state, path)
  target = _busjax_model("mobilenet_v2", width=0.35, seed=8)
  pretrained.load_pretrained(target, path, arch="mobilenet_v2", skip_head=False)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)), jnp.float32)
  np.testing.assert_allclose(
    np.asarray(_forward(target, x)), np.asarray(_forward(source, x)), rtol=1e-5, atol=1e-5
  )


# ---------------------------------------------------------------------------------------------
# Errors name the file and the first bad tensor.
# ---------------------------------------------------------------------------------------------


def _write_tv(tmp_path, mutate):
  source = _busjax_model("mobilenet_v2", width=0.35)
  state = _torchvision_state(source, "mobilenet_v2")
  mutate(state)
  path = str(tmp_path / "bad.safetensors")
  safetensors_numpy.save_file(state, path)
  return path


def test_missing_tensor_is_named(tmp_path):
  path = _write_tv(tmp_path, lambda s: s.pop("features.3.conv.1.1.running_var"))
  model = _busjax_model("mobilenet_v2", width=0.35)
  with pytest.raises(
    pretrained.WeightImportError,
    match=r"bad\.safetensors.*features\.3\.conv\."
    r"1\.1\.running_var.*missing",
  ):
    pretrained.load_pretrained(model, path, arch="mobilenet_v2")


def test_misshaped_tensor_is_named(tmp_path):
  path = _write_tv(
    tmp_path, lambda s: s.update({"features.4.conv.2.weight": np.zeros((8, 8, 1, 1), np.float32)})
  )
  model = _busjax_model("mobilenet_v2", width=0.35)
  with pytest.raises(
    pretrained.WeightImportError,
    match=r"blocks\.3\.project\.conv\.kernel.*"
    r"shape \(1, 1, 8, 8\)",
  ):
    pretrained.load_pretrained(model, path, arch="mobilenet_v2")


def test_width_mismatch_is_a_shape_error(tmp_path):
  path = _write_tv(tmp_path, lambda s: None)
  model = _busjax_model("mobilenet_v2", width=0.5)
  with pytest.raises(
    pretrained.WeightImportError,
    match=r"blocks\.1\.project\.conv\.kernel.*the model expects \(1, 1, 48, 16\)",
  ):
    pretrained.load_pretrained(model, path, arch="mobilenet_v2")


def test_convention_mismatch_says_what_to_set(tmp_path):
  path = _write_tv(tmp_path, lambda s: None)
  model = _busjax_model("mobilenet_v2", width=0.35, padding="same")
  with pytest.raises(pretrained.WeightImportError, match="padding='symmetric'"):
    pretrained.load_pretrained(model, path, arch="mobilenet_v2")
  pretrained.load_pretrained(model, path, arch="mobilenet_v2", check=False)
  model = _busjax_model("mobilenet_v2", width=0.35, bn_epsilon=1e-3)
  with pytest.raises(pretrained.WeightImportError, match="bn_epsilon=1e-05"):
    pretrained.load_pretrained(model, path, arch="mobilenet_v2")


def test_bad_files_and_suffixes(tmp_path):
  model = _busjax_model("mobilenet_v2", width=0.35)
  with pytest.raises(pretrained.WeightImportError, match="cannot tell the weight format"):
    pretrained.load_pretrained(model, str(tmp_path / "w.ckpt"), arch="mobilenet_v2")
  with pytest.raises(pretrained.WeightImportError, match="no such file"):
    pretrained.load_pretrained(model, str(tmp_path / "w.safetensors"), arch="mobilenet_v2")
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"not a safetensors file")
  with pytest.raises(pretrained.WeightImportError, match="junk.safetensors"):
    pretrained.load_pretrained(model, str(junk), arch="mobilenet_v2")
  pickled = tmp_path / "objects.npz"
  np.savez(pickled, a=np.array([{"x": 1}], dtype=object))
  with pytest.raises(pretrained.WeightImportError, match="objects.npz"):
    pretrained.load_pretrained(model, str(pickled), arch="mobilenet_v2")
  with pytest.raises(ValueError, match="unknown arch"):
    pretrained.architecture_units("vgg16")


def test_old_torchvision_densenet_keys_are_renamed():
  fixed = pretrained._fix_old_densenet_keys(
    {
      "features.denseblock1.denselayer1.norm.1.weight": 1,
      "features.denseblock1.denselayer1.conv.2.weight": 2,
      "features.norm5.weight": 3,
    }
  )
  assert set(fixed) == {
    "features.denseblock1.denselayer1.norm1.weight",
    "features.denseblock1.denselayer1.conv2.weight",
    "features.norm5.weight",
  }
