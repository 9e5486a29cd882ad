"""Every config file and documented argument builds a config that validates (or fails clearly)."""

import csv
import json
import os

import numpy as np
import pytest

from busjax import configlib
from busjax.evaluators import metrics
from busjax.trainers import supervised

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def get_config(name, arg=""):
  return configlib.load_file(os.path.join(CONFIGS, f"{name}.py"), arg)


@pytest.mark.parametrize(
  "name, arg",
  [
    ("supervised", ""),
    ("supervised", "smoke"),
    ("fusion", ""),
    ("fusion", "smoke"),
    ("fusion", "mobilenet"),
    ("fusion", "densenet,attention=none"),
    ("fusion", "attention=eca"),
    ("fusion", "attention=channel_spatial,fusion=attention_weighted"),
    ("fusion", "fusion=add,smoke"),
    ("ssl_pretrain", ""),
    ("ssl_pretrain", "smoke,views=trivial,positives=group,lars"),
    ("ssl_pretrain", "fusion=single"),
    ("ssl_pretrain", "backbone=plain"),
    ("ssl_finetune", "scratch"),
    ("ssl_finetune", "smoke,scratch,probe,labels=10,fusion=concat"),
    ("generalise", ""),
    ("generalise", "smoke"),
  ],
)
def test_phantom_configs_validate(name, arg):
  config = get_config(name, arg)
  configlib.validate(config)
  assert config.data.source == "phantom"


def test_config_phantom_default_is_the_generator_default():
  from busjax.data import phantom

  assert get_config("supervised").data.phantom.difficulty == phantom.DEFAULT_DIFFICULTY
  assert get_config("fusion").data.phantom.difficulty == phantom.DEFAULT_DIFFICULTY


def test_fusion_ablation_arguments_change_one_thing():
  base = get_config("fusion")
  assert tuple(base.model.backbones) == ("mobilenet_v2", "densenet121")
  assert base.model.attention == "cbam" and base.model.fusion == "concat"
  assert tuple(get_config("fusion", "mobilenet").model.backbones) == ("mobilenet_v2",)
  assert tuple(get_config("fusion", "densenet").model.backbones) == ("densenet121",)
  no_attention = get_config("fusion", "attention=none")
  assert no_attention.model.attention == "none"
  assert no_attention.model.to_dict() == dict(base.model.to_dict(), attention="none")
  with pytest.raises(ValueError, match="attention="):
    get_config("fusion", "attention=transformer")
  with pytest.raises(ValueError, match="unknown arguments"):
    get_config("fusion", "mobilnet")
  with pytest.raises(ValueError, match="unknown arguments"):
    get_config("supervised", "bussi")


def test_real_data_protocols_need_their_folders(tmp_path):
  for name in ("supervised", "fusion"):
    config = get_config(name, "busi,busbra")
    assert config.split.kind == "predefined" and config.split.val_from_train
    with pytest.raises(configlib.ConfigError, match="data.root"):
      configlib.validate(config)
    config.data.root = str(tmp_path)
    with pytest.raises(configlib.ConfigError, match="external.busbra.root"):
      configlib.validate(config)
    cv = get_config(name, "busi,cv")
    assert cv.split.kind == "kfold" and cv.split.cross_validate and not cv.split.val_from_train


def test_report_resamples_default_smoke_and_bad_values():
  assert get_config("supervised", None).report.bootstrap_resamples == 2000
  smoke = get_config("fusion", "smoke")
  assert smoke.report.bootstrap_resamples == 200
  configlib.validate(smoke)
  for bad in (10, 0, -200):
    smoke.report.bootstrap_resamples = bad
    with pytest.raises(configlib.ConfigError, match="report.bootstrap_resamples"):
      configlib.validate(smoke)


def test_val_fold_must_name_one_of_the_parts_val_fraction_cuts():
  config = get_config("supervised", "smoke")
  config.split.val_fraction, config.split.val_fold = 0.2, 4
  configlib.validate(config)
  for bad in (5, -1):
    config.split.val_fold = bad
    with pytest.raises(configlib.ConfigError, match="val_fold.*val_fraction 0.2 cuts 5 parts"):
      configlib.validate(config)


def test_pretrained_fusion_names_each_missing_weight_file(tmp_path):
  config = get_config("fusion", "pretrained")
  assert config.model.in_channels == 3 and config.model.normalization == "imagenet"
  with pytest.raises(configlib.ConfigError, match="model.mobilenet_v2.pretrained"):
    configlib.validate(config)
  config.model.mobilenet_v2.pretrained = str(tmp_path / "mnv2.safetensors")
  with pytest.raises(configlib.ConfigError, match="mnv2.safetensors"):
    configlib.validate(config)


def test_fusion_smoke_trains_end_to_end(tmp_path):
  config = get_config("fusion", "smoke,mobilenet,attention=channel_spatial")
  config.model.width = 0.25
  summary = supervised.train_and_evaluate(config, str(tmp_path))
  assert summary["steps"] == config.train.num_steps
  report = json.loads((tmp_path / "reports" / "test" / "report.json").read_text())
  assert report["provenance"]["model"] == "fusion" and report["synthetic"]
  # The fusion model's probabilities, written per image, give the reported AUC.
  with open(tmp_path / "reports" / "test" / "predictions.csv", newline="") as f:
    rows = list(csv.DictReader(f))
  y = np.asarray([int(r["label"]) for r in rows])
  p = np.asarray([float(r["p_malignant"]) for r in rows])
  assert len(rows) == report["counts"]["images"] and len(set(p.tolist())) > 1
  assert summary["reports"]["test"]["auc"] == pytest.approx(metrics.roc_auc(y, p), abs=1e-9)


def test_load_file_by_path_or_bare_name_and_a_clear_error_for_neither():
  by_name = configlib.load_file("ssl_finetune", "smoke,scratch")
  by_path = configlib.load_file(os.path.join(CONFIGS, "ssl_finetune.py"), "smoke,scratch")
  assert by_name.to_dict() == by_path.to_dict() and by_name.init_from_encoder is False
  with pytest.raises(configlib.ConfigError, match="no such config file"):
    configlib.load_file("no_such_recipe")
