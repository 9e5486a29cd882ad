"""Backbones: reference parameter counts, shapes, feature dicts, modes, dtypes, create()."""

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from busjax.models import common, densenet, layers, mobilenet_v2, resnet

# Reference counts (torchvision / Keras, 1000 classes, 3 channels), BatchNorm stats excluded.
REFERENCE_PARAMS = [
  ("mobilenet_v2", "mobilenet_v2", 3_504_872),
  ("densenet", "densenet121", 7_978_856),
  ("densenet", "densenet169", 14_149_480),
  ("densenet", "densenet201", 20_013_928),
  ("resnet", "resnet18", 11_689_512),
  ("resnet", "resnet50", 25_557_032),
]


def _create(module_name, rngs_seed=0, num_classes=3, **fields):
  """Builds a model the way the trainer does: import by name, create(config.model, ...).

  Tests share 1-channel, 3-class configurations: parameter initialisers compile once per
  shape, so reusing shapes keeps the file fast.
  """
  config = ml_collections.ConfigDict({"name": module_name, "in_channels": 1, **fields})
  module = importlib.import_module(f"busjax.models.{config.name}")
  return module.create(config, num_classes=num_classes, rngs=nnx.Rngs(rngs_seed))


@pytest.mark.parametrize("module_name,variant,expected", REFERENCE_PARAMS)
def test_parameter_count_matches_reference(module_name, variant, expected):
  count = common.count_params_abstract(
    lambda: _create(module_name, num_classes=1000, variant=variant, in_channels=3)
  )
  assert count == expected


def test_count_excludes_batchnorm_statistics():
  model = nnx.eval_shape(
    lambda: _create("resnet", variant="resnet18", width=0.125, small_stem=True)
  )
  stats = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
  everything = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
  assert stats > 0 and common.count_params(model) == everything - stats


SMALL_MODELS = {
  "resnet18": dict(module_name="resnet", variant="resnet18", width=0.125),
  "resnet50": dict(module_name="resnet", variant="resnet50", width=0.0625),
  "mobilenet_v2": dict(module_name="mobilenet_v2", width=0.25),
  # Fewer dense layers than 121 keep compilation short; the layout is the same.
  "densenet": dict(
    module_name="densenet", variant="densenet121", width=0.25, block_config=(2, 3, 2, 2)
  ),
}
EXPECTED_NAMES = {
  "resnet18": {"stem", "stage1", "stage2", "stage3", "stage4", "features"},
  "resnet50": {"stem", "stage1", "stage2", "stage3", "stage4", "features"},
  "mobilenet_v2": {"stem", *(f"block_{i}" for i in range(17)), "features"},
  "densenet": {"stem", "block_1", "block_2", "block_3", "block_4", "features"},
}


@pytest.mark.parametrize("name", sorted(SMALL_MODELS))
def test_forward_shapes_and_feature_dict(name):
  model = _create(**SMALL_MODELS[name])
  model.eval()
  x = jax.random.normal(jax.random.key(0), (2, 64, 64, 1))
  (logits, feature_maps), via_method = jax.jit(
    lambda x: (model(x, return_features=True), model.features(x)["features"])
  )(x)
  assert logits.shape == (2, 3) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert set(feature_maps) == EXPECTED_NAMES[name]
  final = feature_maps["features"]
  # 64 px / stride 32 = 2, and "features" has num_features channels.
  assert final.shape == (2, 2, 2, model.num_features)
  # stage_names go from fine to coarse, ending with "features".
  assert model.stage_names[-1] == "features"
  sizes = [feature_maps[n].shape[1] for n in model.stage_names]
  assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
  np.testing.assert_allclose(via_method, final, rtol=1e-5, atol=1e-5)


def test_resnet_small_stem_keeps_resolution():
  x = jnp.zeros((1, 32, 32, 1))
  standard = _create("resnet", variant="resnet18", width=0.125)
  small = _create("resnet", variant="resnet18", width=0.125, small_stem=True)
  standard.eval()  # BatchNorm must not update statistics while only tracing shapes
  small.eval()
  # eval_shape traces the forward pass without running it.
  assert jax.eval_shape(lambda x: standard.features(x)["features"], x).shape[1:3] == (1, 1)
  assert jax.eval_shape(lambda x: small.features(x)["features"], x).shape[1:3] == (4, 4)
  assert small.stem.conv.kernel.shape == (3, 3, 1, 8)


def test_width_options_scale_channels():
  abstract = lambda *args, **kwargs: nnx.eval_shape(lambda: _create(*args, **kwargs))
  assert abstract("resnet", variant="resnet18", width=0.5).num_features == 256
  assert abstract("resnet", variant="resnet50", width=0.25).num_features == 512
  assert abstract("mobilenet_v2", width=1.4).num_features == 1792
  assert abstract("mobilenet_v2", width=0.5).num_features == 1280
  dense = abstract("densenet", variant="densenet121", growth_rate=8, num_init_features=16)
  # 16 -> +6*8=64 -> 32 -> +12*8=128 -> 64 -> +24*8=256 -> 128 -> +16*8 = 256
  assert dense.num_features == 256


def test_train_and_eval_modes_differ_and_only_train_updates_statistics():
  model = _create("resnet", variant="resnet18", width=0.125, small_stem=True)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1)) * 3 + 1
  stats_before = jax.tree.map(jnp.copy, nnx.state(model, nnx.BatchStat))
  model.eval()
  eval_logits = model(x)
  assert all(
    np.array_equal(a, b)
    for a, b in zip(
      jax.tree.leaves(stats_before), jax.tree.leaves(nnx.state(model, nnx.BatchStat)), strict=True
    )
  )
  model.train()
  train_logits = model(x)
  stats_after = nnx.state(model, nnx.BatchStat)
  assert not np.allclose(eval_logits, train_logits, atol=1e-3)
  assert any(
    not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(stats_before), jax.tree.leaves(stats_after), strict=True)
  )


def test_dropout_is_random_in_train_and_off_in_eval():
  model = _create("resnet", variant="resnet18", width=0.125, small_stem=True, dropout=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 1))
  model.eval()
  np.testing.assert_array_equal(model(x), model(x))
  model.train()
  assert not np.allclose(model(x), model(x))
  # Without dropout there is no RNG state for the trainer to thread.
  plain = _create("resnet", variant="resnet18", width=0.125, small_stem=True)
  assert plain.head.dropout is None
  assert not jax.tree.leaves(nnx.state(plain, nnx.RngState))


def test_bfloat16_compute_with_float32_params():
  model = _create(**SMALL_MODELS["densenet"], dtype="bfloat16")
  model.eval()  # a closed-over model must not update BatchNorm statistics inside jax.jit
  logits, feature_maps = jax.jit(lambda x: model(x, return_features=True))(jnp.ones((2, 32, 32, 1)))
  assert feature_maps["features"].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  dtypes = {x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))}
  assert dtypes == {jnp.dtype(jnp.float32)}


def test_functional_train_step_reaches_every_parameter():
  """The trainer's idiom: split, pure jitted grad with merge inside; no dead parameters."""
  model = _create("resnet", variant="resnet18", width=0.125, small_stem=True)
  model.train()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(0), (4, 16, 16, 1))
  labels = jnp.array([0, 1, 0, 1])

  @jax.jit
  def grads_and_stats(params, rest):
    def loss_fn(params):
      # copy=True: fresh Variables at this trace level, so BatchNorm can update its stats
      # under jax.grad (merge otherwise reuses the jit-level Variables and refuses).
      merged = nnx.merge(graphdef, params, rest, copy=True)
      logits = merged(x)
      loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])
      return loss, nnx.state(merged, nnx.BatchStat)

    return jax.grad(loss_fn, has_aux=True)(params)

  grads, new_stats = grads_and_stats(params, rest)
  norms = [float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)]
  assert all(n > 0 for n in norms)
  assert len(norms) == len(jax.tree.leaves(params))
  assert jax.tree.structure(new_stats) == jax.tree.structure(nnx.state(model, nnx.BatchStat))


def test_mobilenet_padding_option_reaches_every_strided_conv():
  torch_style = _create("mobilenet_v2", width=0.25, padding="torch", rngs_seed=3)
  keras_style = _create("mobilenet_v2", width=0.25, padding="keras", rngs_seed=3, bn_epsilon=1e-3)
  for model, padding, epsilon in ((torch_style, "symmetric", 1e-5), (keras_style, "same", 1e-3)):
    strided = [
      m
      for _, m in nnx.iter_graph(model)
      if isinstance(m, layers.DepthwiseConv | layers.Conv) and m.strides != (1, 1)
    ]
    assert len(strided) == 5  # the stem and four stride-2 depthwise convs
    assert {m.padding for m in strided} == {padding}
    norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    assert {m.epsilon for m in norms} == {epsilon}
  # Same weights, same shapes, different values: the conventions really differ.
  x = jax.random.normal(jax.random.key(0), (1, 32, 32, 1))
  a, b = torch_style.stem.conv(x), keras_style.stem.conv(x)
  assert a.shape == b.shape == (1, 16, 16, 8)
  assert not np.allclose(a, b)


def test_depthwise_kernels_have_standard_layout():
  model = _create("mobilenet_v2", width=0.25)
  block = model.blocks[1]
  hidden = block.expand.conv.kernel.shape[-1]
  assert block.expand.conv.kernel.shape == (1, 1, 8, hidden)
  assert block.depthwise.conv.kernel.shape == (3, 3, 1, hidden)
  assert block.project.conv.kernel.shape == (1, 1, hidden, 8)
  assert model.head.fc.kernel.shape == (1280, 3)
  assert model.stem.conv.kernel.shape == (3, 3, 1, 8)


def test_bad_variants_and_options_are_rejected():
  with pytest.raises(ValueError, match="resnet"):
    resnet.ResNet("resnet19", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="densenet"):
    densenet.DenseNet("densenet100", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="dtype"):
    mobilenet_v2.MobileNetV2(dtype="float8", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="padding"):
    _create("mobilenet_v2", padding="valid")


def test_preprocess_grayscale_to_three_channels_and_normalises():
  images = jnp.array([[[0, 255], [128, 64]]], dtype=jnp.uint8)  # (1, 2, 2)
  x = common.preprocess(
    images, in_channels=3, mean=common.IMAGENET_MEAN, std=common.IMAGENET_STD, dtype="bfloat16"
  )
  assert x.shape == (1, 2, 2, 3) and x.dtype == jnp.bfloat16
  expected = (np.array(1.0) - np.array(common.IMAGENET_MEAN)) / np.array(common.IMAGENET_STD)
  np.testing.assert_allclose(np.asarray(x[0, 0, 1], np.float32), expected, rtol=1e-2)
  gray = common.preprocess(images[..., None], in_channels=1)
  assert gray.shape == (1, 2, 2, 1) and gray.dtype == jnp.float32
  expected_gray = (np.array([[0, 255], [128, 64]]) / 255 - 0.5) / 0.25
  np.testing.assert_allclose(gray[0, :, :, 0], expected_gray, rtol=1e-5, atol=1e-6)
  rgb = jnp.stack([images, images, images], axis=-1)
  np.testing.assert_allclose(common.preprocess(rgb, in_channels=1), gray, rtol=1e-5, atol=1e-6)
  mean, std = common.normalization_stats("inception")
  np.testing.assert_allclose(
    common.preprocess(images, in_channels=1, mean=mean, std=std)[0, 0, 1], [1.0], rtol=1e-6
  )
  with pytest.raises(ValueError, match="shape"):
    common.preprocess(jnp.zeros((2, 4, 4, 2), jnp.uint8), in_channels=3)
  with pytest.raises(ValueError, match="mean"):
    common.preprocess(images, in_channels=1, mean=common.IMAGENET_MEAN)
