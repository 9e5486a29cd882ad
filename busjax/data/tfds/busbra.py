"""TFDS builder for BUS-BRA (Gómez-Flores et al., Medical Physics 2024) from the user's copy.

One split, ``train``, holds every image; the official patient-grouped partitions are kept in
``metadata/fold5`` and ``metadata/fold10`` (-1 when the fold files are absent), with the
reader's BI-RADS and the scanner in ``metadata/birads`` and ``metadata/device``.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from busjax.data import records, sources
from busjax.data import tfds as busjax_tfds

_CITATION = """
@article{gomez2024busbra,
  title={BUS-BRA: A breast ultrasound dataset for assessing computer-aided diagnosis systems},
  author={G{\\'o}mez-Flores, Wilfrido and Gregorio-Calas, Maria Julia and
          Coelho de Albuquerque Pereira, Wagner},
  journal={Medical Physics}, volume={51}, number={4}, year={2024}
}"""


class Busbra(tfds.core.GeneratorBasedBuilder):
  """BUS-BRA breast ultrasound (benign/malignant, four scanners), from a manual download."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Grayscale PNG images and masks, official folds in metadata."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Download BUS-BRA (https://doi.org/10.5281/zenodo.8231412) and unpack it so that `manual_dir`
  holds `Images/`, `Masks/`, `bus_data.csv` and, for the official folds, `5-fold-cv.csv` and
  `10-fold-cv.csv`.
  """

  def __init__(self, *, file_format=None, **kwargs):
    super().__init__(file_format=file_format or busjax_tfds.FILE_FORMAT, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "id": tfds.features.Text(),
          "image": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
          "label": tfds.features.ClassLabel(names=list(records.BINARY_CLASSES)),
          "patient_id": tfds.features.Text(),
          "metadata": tfds.features.FeaturesDict(
            {
              "birads": tfds.features.Scalar(dtype=np.int64),
              "device": tfds.features.Text(),
              "histology": tfds.features.Text(),
              "side": tfds.features.Text(),
              "fold5": tfds.features.Scalar(dtype=np.int64),
              "fold10": tfds.features.Scalar(dtype=np.int64),
            }
          ),
        }
      ),
      supervised_keys=("image", "label"),
      homepage="https://doi.org/10.1002/mp.16812",
      citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, root):
    collection = sources.busbra(root)
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
            "birads": record.meta["birads"],
            "device": record.meta["device"],
            "histology": record.meta.get("histology", ""),
            "side": record.meta.get("side", ""),
            "fold5": record.meta.get("fold5", -1),
            "fold10": record.meta.get("fold10", -1),
          },
        },
      )
