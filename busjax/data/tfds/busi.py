"""TFDS builder for BUSI (Al-Dhabyani et al., Data in Brief 2020) from the user's own copy.

Configs: ``busi/binary`` (benign 0, malignant 1) and ``busi/three`` (normal = 2). One split,
``train``, holds every image: busjax makes its own grouped k-fold splits (splits.py), and the
BreastMNIST split, when `busi_breastmnist_split.tsv` is found, is kept in ``metadata/split``.
Images are validated and converted to 8-bit grayscale by `sources.busi`; masks are the union of
``X_mask*.png``, stored 0/255.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from busjax.data import records, sources
from busjax.data import tfds as busjax_tfds

BUSI_FOLDER = "Dataset_BUSI_with_GT"
SPLIT_FILE = "busi_breastmnist_split.tsv"

_CITATION = """
@article{al2020dataset,
  title={Dataset of breast ultrasound images},
  author={Al-Dhabyani, Walid and Gomaa, Mohammed and Khaled, Hussien and Fahmy, Aly},
  journal={Data in Brief}, volume={28}, pages={104863}, year={2020}
}"""


def find_layout(manual_dir: str) -> tuple[str, str | None]:
  """(BUSI folder, split file or None) for manual_dir = the BUSI folder or its parent."""
  nested = os.path.join(manual_dir, BUSI_FOLDER)
  busi_dir = nested if os.path.isdir(nested) else manual_dir
  for candidate in (os.path.join(busi_dir, SPLIT_FILE), os.path.join(manual_dir, SPLIT_FILE)):
    if os.path.isfile(candidate):
      return busi_dir, candidate
  return busi_dir, None


class Busi(tfds.core.GeneratorBasedBuilder):
  """BUSI breast ultrasound with lesion masks, from a manual download."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Grayscale PNG images, union masks, BreastMNIST split in metadata."}
  BUILDER_CONFIGS = [
    tfds.core.BuilderConfig(name="binary", description="benign (0) vs malignant (1)"),
    tfds.core.BuilderConfig(name="three", description="benign (0), malignant (1), normal (2)"),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download BUSI (https://scholar.cu.edu.eg/?q=afahmy/pages/dataset, CC BY 4.0) and unpack it so
  that `manual_dir` is either the `Dataset_BUSI_with_GT/` folder (holding `benign/`,
  `malignant/`, `normal/`) or its parent. An optional `busi_breastmnist_split.tsv` in either
  place adds each image's BreastMNIST split to `metadata/split`.
  """

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or busjax_tfds.FILE_FORMAT, **kwargs)

  def _class_names(self) -> tuple[str, ...]:
    return records.THREE_CLASSES if self.builder_config.name == "three" else records.BINARY_CLASSES

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "label": tfds.features.ClassLabel(names=list(self._class_names())),
          "patient_id": tfds.features.Text(),
          "metadata": tfds.features.FeaturesDict(
            {
              "split": tfds.features.Text(),  # "" when unknown.
              "medmnist_index": tfds.features.Scalar(dtype=np.int64),  # -1 when unknown.
              "mode": tfds.features.Text(),  # PIL mode on disk; RGB = colour annotations.
            }
          ),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://doi.org/10.1016/j.dib.2019.104863",
      citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    busi_dir, split_file = find_layout(os.fspath(dl_manager.manual_dir))
    return {"train": self._generate_examples(busi_dir, split_file)}

  def _generate_examples(self, busi_dir, split_file):
    classes = "three" if self.builder_config.name == "three" else "binary"
    collection = sources.busi(busi_dir, classes=classes, split_file=split_file)
    for record, image, mask in busjax_tfds.encoded_records(collection):
      yield (
        record.id,
        {
          "id": record.id,
          "image": image,
          "mask": mask,
          "label": record.label,
          "patient_id": record.patient_id,
          "metadata": {
            "split": record.meta.get("split", ""),
            "medmnist_index": record.meta.get("medmnist_index", -1),
            "mode": record.meta.get("mode", ""),
          },
        },
      )
