"""The PyTorch script a researcher would otherwise write for BUSI: the end-to-end peer of
`benchmarks/speed.py --e2e_data=...`.

Reads the same split file as busjax's ``busi`` protocol (its train part: 15% held out at random
for validation, as busjax holds out a grouped 15%; its val part: the test set, as busjax reports
it), decodes every image once (PIL, grey, resized to `--image_size`) and caches it as a uint8
tensor, then trains the same ResNet-18 (width
`--width`, one channel) with AdamW, a linear warm-up and cosine decay, gradient clipping at 1.0,
random flips and shifted crops, batch `--batch_size`. After every epoch it scores the val part
(ROC AUC) and saves the weights (safetensors, as busjax never pickles); at the end it scores the
test part. Prints one JSON line with its timings.

  python -m benchmarks.torch_peer --root=DATA/Dataset_BUSI_with_GT \\
    --split_file=DATA/busi_breastmnist_split.tsv --epochs=3 --workdir=/tmp/peer
"""

from __future__ import annotations

import csv
import json
import math
import os
import time

_T0 = time.perf_counter()  # Before the heavy imports: the wall a user waits.

import numpy as np  # noqa: E402
import torch  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from benchmarks import torch_reference  # noqa: E402

_ROOT = flags.DEFINE_string("root", None, "Dataset_BUSI_with_GT folder.", required=True)
_SPLIT = flags.DEFINE_string("split_file", None, "busi_breastmnist_split.tsv.", required=True)
_EPOCHS = flags.DEFINE_integer("epochs", 3, "Training epochs.")
_SIDE = flags.DEFINE_integer("image_size", 128, "Side the images are resized to.")
_WIDTH = flags.DEFINE_float("width", 0.5, "ResNet-18 width (busjax's supervised config: 0.5).")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Training batch.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the weights are saved.", required=True)


def load_split(root: str, split_file: str, side: int) -> dict[str, tuple[torch.Tensor, np.ndarray]]:
  """{split: (uint8 images (N, 1, side, side), labels (N,) with 1 = malignant)}: "train" and
  "val" from the file's train part (85/15, seed 0), "test" its val part."""
  parts: dict[str, tuple[list, list]] = {}
  rng = np.random.default_rng(0)
  with open(split_file, newline="") as f:
    for row in csv.DictReader(f, delimiter="\t"):
      name, part = row["busi_name"], row["medmnist_split"]
      if name.startswith("normal"):
        continue  # busjax's BUSI task is benign vs malignant.
      part = {"val": "test", "train": "val" if rng.random() < 0.15 else "train"}[part]
      image = Image.open(os.path.join(root, name)).convert("L").resize((side, side), Image.BILINEAR)
      images, labels = parts.setdefault(part, ([], []))
      images.append(np.asarray(image, np.uint8))
      labels.append(int(name.startswith("malignant")))
  return {
    part: (torch.from_numpy(np.stack(images))[:, None], np.asarray(labels))
    for part, (images, labels) in parts.items()
  }


def _normalise(images: torch.Tensor) -> torch.Tensor:
  return ((images.float() / 255.0 - 0.5) / 0.25).contiguous(memory_format=torch.channels_last)


def _augment(images: torch.Tensor, generator: torch.Generator, pad: int = 8) -> torch.Tensor:
  flip = torch.rand(len(images), generator=generator) < 0.5
  images = torch.where(flip[:, None, None, None], images.flip(-1), images)
  side = images.shape[-1]
  padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
  dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=generator).tolist()
  return padded[..., dy : dy + side, dx : dx + side]


def _auc(model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray) -> float:
  model.eval()
  with torch.inference_mode():
    batches = [images[i : i + 64] for i in range(0, len(images), 64)]
    p = torch.cat([model(_normalise(b)).softmax(-1)[:, 1] for b in batches])
  return float(roc_auc_score(labels, p.numpy()))


def main(argv):
  del argv
  from safetensors.torch import save_file

  torch.manual_seed(0)
  torch.set_num_threads(os.cpu_count() or 1)
  t_load = time.perf_counter()
  data = load_split(_ROOT.value, _SPLIT.value, _SIDE.value)
  load_s = time.perf_counter() - t_load
  train_x, train_y = data["train"]
  train_y = torch.from_numpy(train_y)
  model = torch_reference.ResNet18(1, 2, width=_WIDTH.value).to(memory_format=torch.channels_last)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
  steps_per_epoch = len(train_x) // _BATCH.value
  total, warmup = steps_per_epoch * _EPOCHS.value, 50

  def lr_at(step):
    if step < warmup:
      return (step + 1) / warmup
    cos = 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return 0.01 + 0.99 * cos

  schedule = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
  loss_fn = torch.nn.CrossEntropyLoss()
  generator = torch.Generator().manual_seed(0)
  os.makedirs(_WORKDIR.value, exist_ok=True)
  t_train = time.perf_counter()
  val_aucs = []
  for epoch in range(_EPOCHS.value):
    model.train()
    order = torch.randperm(len(train_x), generator=generator)
    for step in range(steps_per_epoch):
      index = order[step * _BATCH.value : (step + 1) * _BATCH.value]
      x = _normalise(_augment(train_x[index], generator))
      opt.zero_grad(set_to_none=True)
      loss_fn(model(x), train_y[index]).backward()
      torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
      opt.step()
      schedule.step()
    val_aucs.append(_auc(model, *data["val"]))
    weights = {name: t.contiguous() for name, t in model.state_dict().items()}  # channels-last
    save_file(weights, os.path.join(_WORKDIR.value, f"epoch_{epoch + 1}.safetensors"))
  train_s = time.perf_counter() - t_train
  test_auc = _auc(model, *data["test"])
  print(
    json.dumps(
      {
        "images": {part: len(y) for part, (_, y) in data.items()},
        "steps": total,
        "load_s": load_s,
        "train_and_val_s": train_s,
        "wall_s": time.perf_counter() - _T0,
        "val_auc": val_aucs,
        "test_auc": test_auc,
      }
    )
  )


if __name__ == "__main__":
  app.run(main)
