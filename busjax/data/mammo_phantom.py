"""Synthetic mammograms paired with the ultrasound phantoms of the same synthetic patients.

We know of no public paired mammography + ultrasound set, so the multimodal method is developed
on this pair of phantoms. Each synthetic patient has one label, one ultrasound lesion
(`busjax.data.phantom`, its BI-RADS ultrasound lexicon) and one mammographic finding seen in a
craniocaudal (CC) and a mediolateral-oblique (MLO) view:

* a breast outline against the chest wall (MLO: with the pectoral muscle), fibroglandular tissue
  as thresholded power-law (1/f^3) noise at one of four BI-RADS densities (a-d), quantum noise;
* a mass from the BI-RADS mammography lexicon (shape, margin, density) with class-dependent,
  overlapping probabilities: circumscribed / obscured / microlobulated / indistinct edges, or
  spicules radiating from the mass;
* calcifications: none, scattered benign ones, an amorphous cluster or a fine pleomorphic cluster.

``shared`` in [0, 1] sets how much of the signal the two modalities share: with that probability
each of the mass's shape and margin is copied from the ultrasound lesion (the same lesion seen
twice: redundant evidence), otherwise it is drawn afresh from its class-conditional row
(conditionally independent evidence); calcifications and density are mammography's own. At
``shared=1`` fusion can add little beyond the better modality; at 0 each modality carries
evidence the other lacks. Labels: benign 0, malignant 1 (no normal class: every patient has a
finding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage, special

from busjax.data import paired, phantom, records

VIEWS = ("CC", "MLO")

# Mammography lexicon: categories with (benign, malignant) probabilities at difficulty 0.
MAMMO_LEXICON: dict[str, tuple[tuple[str, ...], tuple[float, ...], tuple[float, ...]]] = {
  "shape": (("oval", "round", "irregular"), (0.65, 0.22, 0.13), (0.12, 0.10, 0.78)),
  "margin": (
    ("circumscribed", "obscured", "microlobulated", "indistinct", "spiculated"),
    (0.62, 0.20, 0.08, 0.07, 0.03),
    (0.06, 0.10, 0.18, 0.30, 0.36),
  ),
  "mass_density": (("low", "equal", "high"), (0.35, 0.45, 0.20), (0.10, 0.35, 0.55)),
  "calcifications": (
    ("none", "scattered", "amorphous_cluster", "pleomorphic_cluster"),
    (0.70, 0.22, 0.06, 0.02),
    (0.45, 0.05, 0.20, 0.30),
  ),
}
BREAST_DENSITIES = ("a", "b", "c", "d")  # Share of fibroglandular tissue, rising.
_DENSE_FRACTION = {"a": 0.12, "b": 0.3, "c": 0.5, "d": 0.7}

# Ultrasound margin -> the mammographic category it would be read as.
_US_TO_MAMMO_MARGIN = {
  "circumscribed": "circumscribed",
  "indistinct": "indistinct",
  "angular": "indistinct",
  "microlobulated": "microlobulated",
  "spiculated": "spiculated",
}


def _probabilities(feature: str, label: int, difficulty: float) -> np.ndarray:
  _, benign, malignant = MAMMO_LEXICON[feature]
  rows = np.asarray([benign, malignant], np.float64)
  mixed = (1.0 - difficulty) * rows[label] + difficulty * rows.mean(axis=0)
  return mixed / mixed.sum()


def _draw(rng: np.random.Generator, feature: str, label: int, difficulty: float) -> str:
  names = MAMMO_LEXICON[feature][0]
  return names[int(rng.choice(len(names), p=_probabilities(feature, label, difficulty)))]


def sample_finding(
  rng: np.random.Generator,
  label: int,
  us_lesion: dict[str, Any],
  *,
  shared: float,
  difficulty: float,
) -> dict[str, Any]:
  """The mammographic finding of a patient whose ultrasound lesion is `us_lesion`."""
  us = us_lesion["features"]
  features = {}
  copied = []
  for name, from_us in (
    ("shape", us["shape"]),
    ("margin", _US_TO_MAMMO_MARGIN[us["margin"]]),
  ):
    if rng.random() < shared:
      features[name] = from_us
      copied.append(name)
    else:
      features[name] = _draw(rng, name, label, difficulty)
  features["mass_density"] = _draw(rng, "mass_density", label, difficulty)
  features["calcifications"] = _draw(rng, "calcifications", label, difficulty)
  features["breast_density"] = BREAST_DENSITIES[int(rng.choice(4, p=(0.1, 0.4, 0.4, 0.1)))]
  return {
    "features": features,
    "copied_from_us": tuple(copied),
    # The same lesion size as in ultrasound (mammography magnifies a little).
    "radius": float(us_lesion["radius"] * rng.uniform(0.9, 1.15)),
    "aspect": float(np.clip(us_lesion["aspect"], 0.7, 1.6)),
    "harmonics": us_lesion["harmonics"],
    "tilt": float(rng.uniform(0, math.pi)),
    # Position in the breast: depth from the nipple (0) to the chest wall (1), height (-1..1).
    "depth": float(rng.uniform(0.3, 0.75)),
    "height": float(rng.uniform(-0.45, 0.45)),
    "texture_seed": int(rng.integers(2**31)),
    "spicules": rng.uniform(0, 2 * math.pi, int(rng.integers(8, 16))),
  }


def _power_noise(rng: np.random.Generator, size: int, beta: float = 3.0) -> np.ndarray:
  """Zero-mean, unit-sd noise with a 1/f^beta power spectrum (anatomical background)."""
  fy = np.fft.fftfreq(size)[:, None]
  fx = np.fft.rfftfreq(size)[None, :]
  f = np.sqrt(fx**2 + fy**2)
  f[0, 0] = 1.0
  spectrum = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) * f ** (-beta / 2)
  spectrum[0, 0] = 0.0
  field = np.fft.irfft2(spectrum, s=(size, size))
  return (field - field.mean()) / max(field.std(), 1e-12)


def render_view(
  rng: np.random.Generator, finding: dict[str, Any], view: str, image_size: int
) -> tuple[np.ndarray, np.ndarray]:
  """One mammographic view: uint8 image (dense = bright, air = 0) and the mass mask {0, 1}."""
  if view not in VIEWS:
    raise ValueError(f"mammography view must be one of {VIEWS}, got {view!r}")
  size = int(image_size)
  yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(0, 1, size), indexing="ij")
  # Breast: half-ellipse from the chest wall (x = 0) towards the nipple.
  extent = rng.uniform(0.72, 0.92)
  half_height = rng.uniform(0.78, 0.95)
  breast = (xx / extent) ** 2 + (yy / half_height) ** 2 < 1.0
  # Tissue: fat + thresholded power-law texture, denser near the chest wall.
  features = finding["features"]
  texture = _power_noise(rng, size)
  dense_fraction = _DENSE_FRACTION[features["breast_density"]]
  threshold = np.quantile(texture, 1.0 - dense_fraction)
  gland = special.expit((texture - threshold) * 3.0) * (1.15 - 0.5 * xx / extent)
  attenuation = 0.35 + 0.35 * gland
  if view == "MLO":
    muscle = xx < 0.32 * (1.0 - (yy + 1.0) / 1.3)
    attenuation = np.where(muscle, 0.85, attenuation)
  # Mass: the ultrasound boundary (harmonics) at this view's position and orientation.
  depth = finding["depth"] + (rng.normal(0, 0.04) if view == "MLO" else 0.0)
  height = finding["height"] * (0.8 if view == "MLO" else 1.0) + rng.normal(0, 0.05)
  cx, cy = (1.0 - depth) * extent, height * half_height
  angle = finding["tilt"] + (math.pi / 4 if view == "MLO" else 0.0)
  dx, dy = xx - cx, (yy - cy) / 2.0  # y spans 2 units for 1 of x.
  u = dx * math.cos(angle) + dy * math.sin(angle)
  v = -dx * math.sin(angle) + dy * math.cos(angle)
  radius = finding["radius"]
  r = np.sqrt((u * math.sqrt(finding["aspect"])) ** 2 + (v / math.sqrt(finding["aspect"])) ** 2)
  theta = np.arctan2(v, u)
  boundary = 1.0 + sum(
    amp * np.cos(order * theta + phase) for order, amp, phase in finding["harmonics"]
  )
  margin = features["margin"]
  if margin == "microlobulated":
    boundary = boundary + 0.08 * np.cos(14 * theta + finding["tilt"])
  distance = r / (radius * boundary)  # < 1 inside the mass
  edge = {"circumscribed": 0.03, "obscured": 0.05, "microlobulated": 0.05}.get(margin, 0.16)
  mass = special.expit((1.0 - distance) / edge)
  if margin == "spiculated":
    for spoke in finding["spicules"]:
      along = dx * math.cos(spoke) + dy * math.sin(spoke)
      across = np.abs(-dx * math.sin(spoke) + dy * math.cos(spoke))
      line = (along > 0) & (along < radius * 2.0) & (across < 0.005 + 0.004 * (along < radius))
      mass = np.maximum(mass, 0.4 * line)
  contrast = {"low": 0.12, "equal": 0.22, "high": 0.36}[features["mass_density"]]
  if margin == "obscured":  # Hidden by overlying dense tissue on one side.
    cover = np.clip((u * math.cos(finding["tilt"]) + 0.5 * radius) / radius, 0, 1)
    attenuation = attenuation + 0.25 * cover * (distance < 1.6)
  attenuation = attenuation + contrast * mass
  mask = (distance < 1.0) & breast
  # Calcifications: bright specks.
  calcs = features["calcifications"]
  if calcs != "none":
    n = {"scattered": 6, "amorphous_cluster": 14, "pleomorphic_cluster": 18}[calcs]
    spread = {"scattered": 0.5, "amorphous_cluster": 0.06, "pleomorphic_cluster": 0.07}[calcs]
    bright = {"scattered": 0.55, "amorphous_cluster": 0.22, "pleomorphic_cluster": 0.6}[calcs]
    specks = np.zeros((size, size))
    for _ in range(n):
      py = int(np.clip((cy + rng.normal(0, 2 * spread) + 1) / 2 * (size - 1), 0, size - 1))
      px = int(np.clip((cx + rng.normal(0, spread)) * (size - 1), 0, size - 1))
      specks[py, px] = bright * (rng.uniform(0.5, 1.5) if calcs == "pleomorphic_cluster" else 1)
    specks = ndimage.gaussian_filter(specks, 0.6) * 3.0
    attenuation = attenuation + specks
  # Projection blur, quantum noise, air outside the breast.
  attenuation = ndimage.gaussian_filter(attenuation, 0.7)
  attenuation = attenuation + rng.normal(0, 0.025, attenuation.shape)
  image = np.where(breast, np.clip(attenuation, 0.05, 1.2) / 1.2, 0.0)
  return (image * 255 + 0.5).astype(np.uint8), mask.astype(np.uint8)


def make_paired(
  *,
  counts: Sequence[int] = (300, 150),
  image_size: int = 64,
  seed: int = 0,
  shared: float = 0.5,
  difficulty: float = phantom.DEFAULT_DIFFICULTY,
  us_images_per_patient: int | Sequence[int] = (1, 2),
  mammo_difficulty: float | None = None,
) -> paired.PairedData:
  """Synthetic patients with an ultrasound phantom and a CC + MLO mammography phantom each.

  Args:
    counts: patients per class (benign, malignant).
    image_size: side of every image, 64..512.
    seed: non-negative; same seed, same arrays.
    shared: probability that the mass's shape and margin are copied from the ultrasound lesion
      (see the module docstring).
    difficulty: the ultrasound lexicon's class overlap (`busjax.data.phantom`).
    us_images_per_patient: (low, high) ultrasound views per patient, or one integer.
    mammo_difficulty: the mammography lexicon's class overlap; default `difficulty`.

  Returns:
    PairedData(us, mammo) with synthetic collections named "paired-phantom/us" and ".../mammo".
  """
  if not 0.0 <= shared <= 1.0:
    raise ValueError(f"paired phantom: shared must lie in [0, 1], got {shared}")
  if not 64 <= int(image_size) <= 512:
    raise ValueError(f"paired phantom: image_size must be in [64, 512], got {image_size}")
  if len(counts) != 2 or min(counts) < 0:
    raise ValueError(f"paired phantom: counts must be (benign, malignant) >= 0, got {counts}")
  if isinstance(us_images_per_patient, int | np.integer):
    us_images_per_patient = (int(us_images_per_patient),) * 2
  low, high = (int(v) for v in us_images_per_patient)
  mammo_difficulty = difficulty if mammo_difficulty is None else mammo_difficulty
  scanner = phantom._scanner_config({})
  us_records, mammo_records = [], []
  for label, class_name in enumerate(records.BINARY_CLASSES):
    for index in range(int(counts[label])):
      rng = np.random.default_rng([int(seed), 1000 + label, index])
      patient_id = f"paired-{class_name}-{index:04d}"
      patient = phantom._sample_patient(rng, label, float(difficulty), scanner)
      for view in range(int(rng.integers(low, high + 1))):
        image, mask, info = phantom._render_view(rng, patient, int(image_size), scanner, 0.0)
        meta = phantom._features(patient, mask, info)
        meta.update(modality="us", view=view, shared=float(shared), seed=int(seed))
        us_records.append(
          records.Record(f"us/{patient_id}-v{view}", label, patient_id, image, mask, meta)
        )
      finding = sample_finding(
        rng, label, patient["lesion"], shared=float(shared), difficulty=float(mammo_difficulty)
      )
      for view in VIEWS:
        image, mask = render_view(rng, finding, view, int(image_size))
        meta = dict(finding["features"], modality="mammo", view=view, shared=float(shared))
        meta.update(copied_from_us=list(finding["copied_from_us"]), seed=int(seed))
        mammo_records.append(
          records.Record(f"mammo/{patient_id}-{view}", label, patient_id, image, mask, meta)
        )
  name = f"paired-phantom(shared={shared:g})"
  return paired.PairedData(
    us=records.Collection(f"{name}/us", tuple(us_records), synthetic=True),
    mammo=records.Collection(f"{name}/mammo", tuple(mammo_records), synthetic=True),
    name=name,
  )


def save_grid(path: str, *, per_class: int = 3, image_size: int = 128, seed: int = 0, **kwargs):
  """A PNG of paired patients: ultrasound, CC and MLO side by side, mass outlines, SYNTHETIC."""
  import matplotlib

  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  data = make_paired(
    counts=(per_class, per_class), image_size=image_size, seed=seed, us_images_per_patient=1,
    **kwargs,
  )  # fmt: skip
  mammo = {(r.patient_id, r.meta["view"]): r for r in data.mammo.records}
  fig, axes = plt.subplots(
    2 * per_class // 2, 6, figsize=(9.6, 1.75 * per_class + 0.6), dpi=100, squeeze=False
  )
  for i, us in enumerate(data.us.records):
    row, col = i % per_class, 3 * (i // per_class)
    panels = [("US", us), ("CC", mammo[us.patient_id, "CC"]), ("MLO", mammo[us.patient_id, "MLO"])]
    for j, (view, record) in enumerate(panels):
      ax = axes[row, col + j]
      ax.imshow(record.image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
      if record.mask.any():
        ax.contour(record.mask, levels=[0.5], colors=["#ff5050"], linewidths=0.5)
      m = record.meta
      detail = f"{m['shape'][:5]} {m['margin'][:7]}"
      if view != "US":
        detail += f"\n{m['calcifications'].replace('_cluster', '')[:10]} d={m['breast_density']}"
      ax.set_title(f"{records.BINARY_CLASSES[record.label]} {view}\n{detail}", fontsize=6, pad=2)
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle(
    f"SYNTHETIC paired phantoms (shared={kwargs.get('shared', 0.5):g}, seed {seed}): "
    "not patient data",
    fontsize=9,
  )
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


if __name__ == "__main__":
  import argparse

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", required=True, help="PNG path")
  parser.add_argument("--shared", type=float, default=0.5)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  save_grid(args.out, seed=args.seed, shared=args.shared)
