"""Leakage-aware splits: near-duplicate detection, patient/duplicate groups, stratified k-fold.

BUSI holds many scans saved twice, re-cropped or rescaled (and some filed under two classes).
A split that puts two copies of one scan on both sides of train/test leaks, so records are
grouped by patient AND by near-duplicate cluster before folds are drawn.

Near duplicates are found by content, in two stages:

1. Candidates: every ordered pair (i, j) is scored by normalised cross-correlation (NCC) of a
   central crop of image i, rescaled over a range of scales, slid over image j, at a coarse
   resolution (longest side 32). The best few partners of each image are kept.
2. Verification: the same search at a finer resolution (longest side 80, slow intensity trend
   removed) over the full scale grid, both directions. At the best alignment the template is cut
   into 3 x 3 tiles and the pair's score is min(global NCC, second-lowest tile NCC): every part
   of the overlap must agree, so the rim of a large dark cyst cannot carry the match alone.
   Measured on BUSI (624 images): copies of one scan score 0.72-1.0, adjacent frames of one
   lesion 0.55-0.8, distinct scans below ~0.62; default threshold 0.65.

Central crops make the match blind to the frame, rulers and text that re-cropped copies gain or
lose, and containment in either direction covers "one is a crop of the other"; scales below 1
cover "one is a zoomed-out copy of the other" once both are normalised to the same longest side.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os

import numpy as np
import scipy.fft
import scipy.ndimage
from PIL import Image

from busjax.data import records

# Fraction of each side kept in the template (0.7 x 0.7 ~ half the area). Smaller tolerates
# more cropping, larger is more specific; borders carry scanner text, so never 1.0.
_CROP = 0.7
# Relative scales (template image content -> target content) searched. Below 1: the template
# image is a tighter crop (or the target a zoomed-out copy). Slightly above 1 allows for
# aspect changes and partial overlaps.
_SCALE_MIN, _SCALE_MAX = 0.5, 1.12
_COARSE_SIDE, _COARSE_STEP = 32, 1.12
_FINE_SIDE, _FINE_STEP = 80, 1.035
# Windows flatter than this (grey levels, std) are background; NCC there is meaningless.
_MIN_STD = 2.0
# Gaussian sigma of the subtracted trend, as a fraction of the longest side.
_HIGH_PASS_SIGMA = 1 / 16
# Templates smaller than this many pixels (at the fine level) are not specific enough:
# at 150, tiny templates (scale 0.5 of a portrait BUS-BRA image) matched unrelated scans.
_MIN_TEMPLATE_PIXELS = 600


def _scales(step: float) -> np.ndarray:
  """Geometric grid of scales in [_SCALE_MIN, _SCALE_MAX] that contains 1.0."""
  lo = int(np.floor(np.log(_SCALE_MIN) / np.log(step)))
  hi = int(np.ceil(np.log(_SCALE_MAX) / np.log(step)))
  return step ** np.arange(lo, hi + 1, dtype=np.float64)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """Area-aware (antialiased) bilinear resize of a uint8 image to float32."""
  pil = Image.fromarray(image).resize((max(1, width), max(1, height)), Image.Resampling.BILINEAR)
  return np.asarray(pil, np.float32)


def _high_pass(image: np.ndarray, side: int) -> np.ndarray:
  """Removes the slow intensity trend (bright skin, dark depth) that every scan shares.

  Without this, NCC between unrelated scans is ~0.9: their large-scale brightness
  profiles agree. What remains (tissue edges, texture) is specific to one scan.
  """
  return image - scipy.ndimage.gaussian_filter(image, _HIGH_PASS_SIGMA * side, mode="reflect")


def _fit_side(shape: tuple[int, int], side: int) -> tuple[int, int]:
  """(h, w) with the longest side equal to `side`, aspect kept."""
  h, w = shape
  f = side / max(h, w)
  return max(1, round(h * f)), max(1, round(w * f))


class _Level:
  """Targets (FFTs, integral images) of all images at one resolution; templates on demand."""

  def __init__(self, images: list[np.ndarray], side: int):
    self.side = side
    self.images = images
    n = len(images)
    self.shapes = np.zeros((n, 2), np.int64)
    padded = np.zeros((n, side, side), np.float32)
    for k, image in enumerate(images):
      h, w = _fit_side(image.shape, side)
      self.shapes[k] = (h, w)
      padded[k, :h, :w] = _high_pass(_resize(image, h, w), side)
    self.padded = padded
    self.target_fft = scipy.fft.rfft2(padded)
    # Integral images (with a zero first row/column) give window sums in four lookups.
    p64 = padded.astype(np.float64)
    self.sum1 = np.pad(p64.cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    self.sum2 = np.pad((p64 * p64).cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
    self._templates: dict[tuple[int, float], tuple[np.ndarray, int, int] | None] = {}

  def template(self, i: int, scale: float):
    """FFT of the zero-mean, unit-norm central crop of image i rescaled by `scale`, or None."""
    key = (i, scale)
    if key not in self._templates:
      h, w = self.shapes[i]
      sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
      th, tw = min(self.side, round(sh * _CROP)), min(self.side, round(sw * _CROP))
      result = None
      min_pixels = _MIN_TEMPLATE_PIXELS * (self.side / _FINE_SIDE) ** 2
      if th >= 4 and tw >= 4 and th * tw >= min_pixels:
        scaled = _high_pass(_resize(self.images[i], sh, sw), self.side)
        y0, x0 = (sh - th) // 2, (sw - tw) // 2
        crop = scaled[y0 : y0 + th, x0 : x0 + tw].astype(np.float64)
        crop -= crop.mean()
        norm = np.sqrt((crop * crop).sum())
        if norm > _MIN_STD * np.sqrt(crop.size):
          padded = np.zeros((self.side, self.side), np.float32)
          padded[:th, :tw] = crop / norm
          result = (np.conj(scipy.fft.rfft2(padded)), th, tw, crop.astype(np.float32))
      self._templates[key] = result
    return self._templates[key]

  def inverse_denominator(self, th: int, tw: int, targets: np.ndarray | None = None):
    """1 / (window std * sqrt(n)) for a th x tw window at every shift; 0 where invalid.

    Invalid: the window leaves the target (into zero padding) or covers flat background.
    """
    sel = slice(None) if targets is None else targets
    s1, s2 = self.sum1[sel], self.sum2[sel]
    ny, nx = self.side - th + 1, self.side - tw + 1
    n = th * tw
    win1 = (
      s1[:, th : th + ny, tw : tw + nx]
      - s1[:, :ny, tw : tw + nx]
      - s1[:, th : th + ny, :nx]
      + s1[:, :ny, :nx]
    )
    win2 = (
      s2[:, th : th + ny, tw : tw + nx]
      - s2[:, :ny, tw : tw + nx]
      - s2[:, th : th + ny, :nx]
      + s2[:, :ny, :nx]
    )
    var_n = win2 - win1 * win1 / n
    h, w = self.shapes[sel, 0], self.shapes[sel, 1]
    ys, xs = np.arange(ny), np.arange(nx)
    valid = (
      (ys[None, :, None] <= (h - th)[:, None, None])
      & (xs[None, None, :] <= (w - tw)[:, None, None])
      & (var_n >= n * _MIN_STD**2)
    )
    return np.where(valid, 1.0 / np.sqrt(np.maximum(var_n, n * _MIN_STD**2)), 0.0).astype(
      np.float32
    )

  def best_ncc(
    self,
    t_fft: np.ndarray,
    th: int,
    tw: int,
    inv_den: np.ndarray,
    targets: np.ndarray | None = None,
    with_shift: bool = False,
  ):
    """Max NCC over all shifts of one template inside each target (0 if it fits nowhere)."""
    sel = slice(None) if targets is None else targets
    corr = scipy.fft.irfft2(self.target_fft[sel] * t_fft, s=(self.side, self.side))
    ny, nx = self.side - th + 1, self.side - tw + 1
    ncc = corr[:, :ny, :nx] * inv_den
    flat = ncc.reshape(ncc.shape[0], -1)
    if not with_shift:
      return flat.max(axis=1)
    where = flat.argmax(axis=1)
    return flat[np.arange(len(where)), where], where // nx, where % nx

  def block_ncc(self, crop: np.ndarray, j: int, y: int, x: int, blocks: int) -> np.ndarray:
    """NCC of each of blocks x blocks tiles of a template placed at (y, x) in target j.

    A single global NCC can be carried by one strong structure (the rim of a large cyst);
    requiring every tile to agree demands that the whole overlap is the same picture.
    Tiles flat in both images (a cyst's inside) agree trivially and are left out (NaN).
    """
    th, tw = crop.shape
    window = self.padded[j, y : y + th, x : x + tw]
    ys = np.linspace(0, th, blocks + 1).round().astype(int)
    xs = np.linspace(0, tw, blocks + 1).round().astype(int)
    out = np.full(blocks * blocks, np.nan, np.float32)
    for a in range(blocks):
      for b in range(blocks):
        t = crop[ys[a] : ys[a + 1], xs[b] : xs[b + 1]].astype(np.float64)
        w = window[ys[a] : ys[a + 1], xs[b] : xs[b + 1]].astype(np.float64)
        t, w = t - t.mean(), w - w.mean()
        tn, wn = np.sqrt((t * t).mean()), np.sqrt((w * w).mean())
        if tn < _MIN_STD and wn < _MIN_STD:
          continue
        out[a * blocks + b] = (t * w).mean() / max(tn, _MIN_STD * 0.5) / max(wn, _MIN_STD * 0.5)
    return out


def _coarse_scores(level: _Level, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(n, n) best NCC of template i in target j over `scales`, and the best scale index."""
  n = len(level.images)
  best = np.zeros((n, n), np.float32)
  arg = np.zeros((n, n), np.int16)
  by_size: dict[tuple[int, int], list[tuple[int, int]]] = {}
  for i in range(n):
    for k, scale in enumerate(scales):
      tmpl = level.template(i, float(scale))
      if tmpl is not None:
        by_size.setdefault((tmpl[1], tmpl[2]), []).append((i, k))
  for (th, tw), members in by_size.items():
    inv_den = level.inverse_denominator(th, tw)
    for i, k in members:
      t_fft = level.template(i, float(scales[k]))[0]
      score = level.best_ncc(t_fft, th, tw, inv_den)
      better = score > best[i]
      best[i, better] = score[better]
      arg[i, better] = k
  np.fill_diagonal(best, 0.0)
  return best, arg


def _fine_match(level: _Level, i: int, targets: list[tuple[int, list[float]]]) -> dict:
  """Best (NCC, scale, y, x) of image i's template in each target over that target's scales."""
  by_scale: dict[float, list[int]] = {}
  for j, scales in targets:
    for scale in scales:
      by_scale.setdefault(round(float(scale), 6), []).append(j)
  best = {j: (0.0, None, 0, 0) for j, _ in targets}
  for scale, js in sorted(by_scale.items()):
    tmpl = level.template(i, scale)
    if tmpl is None:
      continue
    t_fft, th, tw, _ = tmpl
    js = np.asarray(sorted(set(js)))
    inv_den = level.inverse_denominator(th, tw, js)
    score, ys, xs = level.best_ncc(t_fft, th, tw, inv_den, js, with_shift=True)
    for j, sc, y, x in zip(js.tolist(), score.tolist(), ys.tolist(), xs.tolist(), strict=True):
      if sc > best[j][0]:
        best[j] = (sc, scale, y, x)
  return best


def _tile_score(level: _Level, a: int, b: int, match: tuple) -> float:
  """min(global NCC, second-lowest tile NCC) of a's template at its best place in b."""
  global_ncc, scale, y, x = match
  if scale is None:
    return 0.0
  tiles = level.block_ncc(level.template(a, scale)[3], b, y, x, 3)
  tiles = np.sort(tiles[~np.isnan(tiles)])
  # The second-lowest tile: one tile may differ (text or calipers burnt into one copy).
  return float(min(global_ncc, tiles[1])) if len(tiles) >= 5 else 0.0


def _images_of(collection: records.Collection) -> list[np.ndarray]:
  """Every record's image, decoded in threads as the loaders do (in a job, the loader's check
  has usually decoded them already: `records.decoded_files_kept`)."""
  with concurrent.futures.ThreadPoolExecutor(records.decode_threads()) as pool:
    return list(pool.map(records.load_image, collection.records))


def cache_dir() -> str | None:
  """busjax's on-disk cache of derived data (near-duplicate pairs; `busjax.main`'s compiled
  programs in its jax/ folder): $BUSJAX_CACHE_DIR, else
  $XDG_CACHE_HOME/busjax, else ~/.cache/busjax; None when BUSJAX_CACHE_DIR is "none"."""
  folder = os.environ.get("BUSJAX_CACHE_DIR")
  if folder == "none":
    return None
  if folder:
    return folder
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "busjax")


def _pairs_cache_path(images, threshold: float, candidates_per_image: int) -> str | None:
  """Where the pairs of exactly these images (by content) under these settings are kept."""
  folder = cache_dir()
  if folder is None:
    return None
  digest = hashlib.sha256()
  settings = (threshold, candidates_per_image, _CROP, _SCALE_MIN, _SCALE_MAX, _COARSE_SIDE,
              _COARSE_STEP, _FINE_SIDE, _FINE_STEP, _MIN_STD, _HIGH_PASS_SIGMA,
              _MIN_TEMPLATE_PIXELS)  # fmt: skip
  digest.update(repr(("near_duplicate_pairs/1", settings)).encode())
  for image in images:
    digest.update(repr((image.shape, image.dtype.str)).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
  return os.path.join(folder, "near_duplicates", digest.hexdigest() + ".json")


def _read_cached_pairs(path: str | None) -> list[tuple[int, int, float]] | None:
  if path is None or not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      return [(int(i), int(j), float(s)) for i, j, s in json.load(f)["pairs"]]
  except (OSError, ValueError, KeyError, TypeError):
    return None  # Unreadable or from elsewhere: recompute (and overwrite it).


def _write_cached_pairs(path: str | None, pairs) -> None:
  if path is None:
    return
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
      json.dump({"pairs": [[i, j, s] for i, j, s in pairs]}, f)
    os.replace(tmp, path)
  except OSError:
    pass  # A read-only home only costs the next run the search again.


def near_duplicate_pairs(
  collection: records.Collection,
  *,
  threshold: float = 0.65,
  candidates_per_image: int = 8,
  images: list[np.ndarray] | None = None,
) -> list[tuple[int, int, float]]:
  """Pairs of records that show the same scan (re-cropped, rescaled or re-saved).

  The search takes ~50 s for BUSI's 513 images on 2 cores, so its result is cached on disk
  (`cache_dir`, JSON) under a hash of the decoded images' content and every setting: a later
  run on the same images reads it back; any changed pixel, image or setting searches again.

  Args:
    collection: the records; images are read with `records.load_image`.
    threshold: minimum score. The score is the second-lowest NCC of the 3 x 3 tiles of the best
      alignment (at longest side 80, trend removed), so every part of the overlap must agree,
      not just a lesion rim. Copies of one scan score 0.75-1.0; adjacent frames of one lesion
      0.55-0.8; distinct scans mostly below 0.5, large cysts up to ~0.62 (measured on BUSI).
    candidates_per_image: partners per image, by coarse score, that are verified.
    images: the decoded images, if the caller already has them (same order as records).

  Returns:
    (i, j, score) with i < j indices into `collection.records`, sorted by (i, j).
  """
  if images is None:
    images = _images_of(collection)
  n = len(images)
  if n < 2:
    return []
  cache_path = _pairs_cache_path(images, threshold, candidates_per_image)
  cached = _read_cached_pairs(cache_path)
  if cached is not None:
    return cached
  coarse = _Level(images, _COARSE_SIDE)
  coarse_scales = _scales(_COARSE_STEP)
  coarse_best, _ = _coarse_scores(coarse, coarse_scales)
  both = np.maximum(coarse_best, coarse_best.T)
  k = min(candidates_per_image, n - 1)
  # Stable sort on (-score, index) keeps candidate choice deterministic under ties.
  nearest = np.argsort(-both, axis=1, kind="stable")[:, :k]
  candidates = sorted(
    {(min(i, int(j)), max(i, int(j))) for i in range(n) for j in nearest[i] if i != j}
  )
  # Fine search over the whole scale grid: centring it on the coarse best scale missed copies
  # (a re-crop without its frame scored 0.68 instead of 0.98) for a ~2x saving.
  fine_scales = [float(s) for s in _scales(_FINE_STEP)]
  partners: dict[int, list[tuple[int, list[float]]]] = {}
  for i, j in candidates:
    partners.setdefault(i, []).append((j, fine_scales))
    partners.setdefault(j, []).append((i, fine_scales))
  fine = _Level(images, _FINE_SIDE)
  matches = {}
  for a in sorted(partners):
    for b, found in _fine_match(fine, a, partners[a]).items():
      matches[(a, b)] = found
  pairs = []
  for i, j in candidates:
    # Both directions are tiled: the better global alignment can be the wrong one (a small
    # template matching texture by chance) while the other direction holds the real copy.
    score = max(_tile_score(fine, a, b, matches[(a, b)]) for a, b in ((i, j), (j, i)))
    if score >= threshold:
      pairs.append((i, j, score))
  _write_cached_pairs(cache_path, pairs)
  return pairs


def _union_find_labels(n: int, pairs) -> np.ndarray:
  """Component label (smallest member index) of each of n nodes joined by `pairs`."""
  parent = list(range(n))

  def find(x: int) -> int:
    while parent[x] != x:
      parent[x] = parent[parent[x]]
      x = parent[x]
    return x

  for i, j in pairs:
    ri, rj = find(int(i)), find(int(j))
    if ri != rj:
      parent[max(ri, rj)] = min(ri, rj)
  return np.asarray([find(x) for x in range(n)], np.int64)


def near_duplicate_clusters(
  collection: records.Collection,
  *,
  threshold: float = 0.65,
  pairs: list[tuple[int, int, float]] | None = None,
  **kwargs,
) -> list[list[int]]:
  """Connected groups (size >= 2) of near-duplicate records, sorted, indices into records.

  Args:
    collection: the records.
    threshold: see `near_duplicate_pairs`.
    pairs: precomputed `near_duplicate_pairs` output (skips the search).
    **kwargs: passed to `near_duplicate_pairs`.
  """
  if pairs is None:
    pairs = near_duplicate_pairs(collection, threshold=threshold, **kwargs)
  labels = _union_find_labels(len(collection), [(i, j) for i, j, _ in pairs])
  clusters: dict[int, list[int]] = {}
  for index, label in enumerate(labels.tolist()):
    clusters.setdefault(label, []).append(index)
  return sorted([c for c in clusters.values() if len(c) >= 2])


# ---------------------------------------------------------------------------------------------
# Groups and folds
# ---------------------------------------------------------------------------------------------


def group_ids(
  collection: records.Collection,
  *,
  near_duplicates: bool = True,
  pairs: list[tuple[int, int, float]] | None = None,
) -> np.ndarray:
  """Group index per record: records sharing a patient or a near-duplicate cluster share one.

  Args:
    collection: the records.
    near_duplicates: also join near-duplicate pairs (content search; see `near_duplicate_pairs`).
    pairs: precomputed near-duplicate pairs (used when `near_duplicates`; searched if None).

  Returns:
    int64 array (n,), groups numbered 0, 1, ... in order of first appearance.
  """
  n = len(collection)
  links = []
  first_of_patient: dict[str, int] = {}
  for index, record in enumerate(collection.records):
    first = first_of_patient.setdefault(str(record.patient_id), index)
    if first != index:
      links.append((first, index))
  if near_duplicates:
    if pairs is None:
      pairs = near_duplicate_pairs(collection)
    links.extend((i, j) for i, j, _ in pairs)
  # Roots are each component's smallest index, so sorted roots number groups by first appearance.
  _, inverse = np.unique(_union_find_labels(n, links), return_inverse=True)
  return inverse.reshape(-1).astype(np.int64)


def grouped_stratified_kfold(labels, groups, k: int, seed: int) -> np.ndarray:
  """Fold index (0..k-1) per record; whole groups per fold, class ratios balanced across folds.

  Greedy: groups, largest first (ties in a seeded random order), go to the fold where the
  per-class fold shares deviate least from 1/k, with fold size as the tie-breaker.

  Args:
    labels: int class per record.
    groups: group id per record (e.g. from `group_ids`).
    k: number of folds (>= 2).
    seed: shuffles the order of equal-size groups; same seed, same folds.
  """
  labels = np.asarray(labels, np.int64)
  groups = np.asarray(groups)
  if labels.shape != groups.shape or labels.ndim != 1:
    raise ValueError(f"labels {labels.shape} and groups {groups.shape} must be equal 1-D shapes")
  if k < 2:
    raise ValueError(f"k must be >= 2, got {k}")
  unique_groups, group_of = np.unique(groups, return_inverse=True)
  if len(unique_groups) < k:
    raise ValueError(f"{len(unique_groups)} groups cannot fill {k} folds")
  num_classes = int(labels.max()) + 1 if len(labels) else 1
  counts = np.zeros((len(unique_groups), num_classes), np.int64)
  np.add.at(counts, (group_of, labels), 1)
  totals = np.maximum(counts.sum(0), 1).astype(np.float64)
  rng = np.random.default_rng(seed)
  shuffled = rng.permutation(len(unique_groups))
  order = shuffled[np.argsort(-counts[shuffled].sum(1), kind="stable")]
  fold_counts = np.zeros((k, num_classes), np.int64)
  fold_of_group = np.zeros(len(unique_groups), np.int64)
  for g in order:
    trial = fold_counts[None, :, :] + np.eye(k, dtype=np.int64)[:, :, None] * counts[g][None, None]
    # cost[f]: squared deviation of every fold's class shares from 1/k if g goes to fold f.
    cost = ((trial / totals - 1.0 / k) ** 2).sum(axis=(1, 2))
    sizes = fold_counts.sum(1)
    f = int(np.lexsort((np.arange(k), sizes, np.round(cost, 12)))[0])
    fold_counts[f] += counts[g]
    fold_of_group[g] = f
  return fold_of_group[group_of]


def fraction_parts(fraction: float) -> int:
  """How many grouped parts a `fraction` cuts the records into (one of them is the fraction)."""
  return max(2, round(1.0 / fraction))


def _split_fraction(labels, groups, fraction: float, seed: int, part: int = 0) -> np.ndarray:
  """Boolean mask of a grouped, stratified ~`fraction` of the records: part `part` of the
  `fraction_parts(fraction)` grouped folds (the parts are disjoint and cover every record)."""
  if fraction <= 0 or len(labels) == 0:
    return np.zeros(len(labels), bool)
  k = fraction_parts(fraction)
  if not 0 <= part < k:
    raise ValueError(f"val_fold {part} is outside 0..{k - 1} (val_fraction {fraction})")
  if len(np.unique(groups)) < k:
    raise ValueError(f"{len(np.unique(groups))} groups are too few for a fraction of {fraction}")
  return grouped_stratified_kfold(labels, groups, k, seed) == part


def with_groups(
  collection: records.Collection, groups: np.ndarray, train_groups: set[int] | None = None
) -> records.Collection:
  """The records with ``meta["cluster"]`` (and, given `train_groups`, ``meta["copy_in_train"]``).

  ``cluster`` is the bootstrap's resampling unit: images of one patient or copies of one scan are
  not independent evidence, so every interval resamples them together. ``copy_in_train`` marks an
  evaluated image whose group (same patient or a near-duplicate) also has training images: its
  score measures memory as much as diagnosis, and reports give the AUC without such images too.
  """
  annotated = []
  for record, group in zip(collection.records, groups, strict=True):
    meta = dict(record.meta, cluster=f"g{int(group)}")
    if train_groups is not None:
      meta["copy_in_train"] = int(group) in train_groups
    annotated.append(dataclasses.replace(record, meta=meta))
  return dataclasses.replace(collection, records=tuple(annotated))


def annotate_groups(
  collection: records.Collection,
  *,
  near_duplicates: bool,
  pairs: list[tuple[int, int, float]] | None = None,
) -> records.Collection:
  """`with_groups` for a collection evaluated as a whole (an external test set)."""
  return with_groups(
    collection, group_ids(collection, near_duplicates=near_duplicates, pairs=pairs)
  )


def _named(
  collection: records.Collection, tag: str, indices, groups: np.ndarray
) -> dict[str, records.Collection]:
  """Train/val/test subsets named '<source>/<tag>/<part>', annotated by `with_groups`."""
  train_groups = {int(g) for g in groups[np.asarray(indices["train"], np.int64)]}
  parts = {}
  for part, idx in indices.items():
    idx = np.asarray(idx, np.int64)
    subset = collection.subset(idx, name=f"{collection.name}/{tag}/{part}")
    parts[part] = with_groups(subset, groups[idx], None if part == "train" else train_groups)
  return parts


def _strata(collection: records.Collection) -> np.ndarray:
  """What folds are stratified on: the label, or the finer original class where records keep one
  (under classes='malignant_vs_rest' normal and benign share label 0 but should each spread
  evenly over the folds)."""
  original = [r.meta.get("original_class") for r in collection.records]
  if any(o is None for o in original):
    return collection.labels
  keys = [f"{label}/{o}" for label, o in zip(collection.labels.tolist(), original, strict=True)]
  return np.unique(keys, return_inverse=True)[1].reshape(-1).astype(np.int64)


def label_subset(train: records.Collection, fraction: float, seed: int) -> np.ndarray:
  """Positions of a `fraction` of `train`'s images: whole groups (``meta["cluster"]``), per class.

  Each class's groups are shuffled with `seed` and taken in that order until the class has at
  least ``ceil(fraction * its images)`` images (one group at least), so the subsets of one seed
  are nested: 10% lies inside 25%. A group counts for the class most of its images have.
  """
  if not 0 < fraction <= 1:
    raise ValueError(f"label fraction {fraction!r} is outside (0, 1]")
  if fraction == 1 or len(train) == 0:
    return np.arange(len(train))
  clusters = np.asarray([r.meta["cluster"] for r in train.records])
  labels = train.labels
  names, group_of = np.unique(clusters, return_inverse=True)
  group_label = np.asarray([np.bincount(labels[group_of == g]).argmax() for g in range(len(names))])
  group_size = np.bincount(group_of, minlength=len(names))
  rng = np.random.default_rng(seed)
  keep = np.zeros(len(names), bool)
  for label in np.unique(labels):
    candidates = np.flatnonzero(group_label == label)
    candidates = candidates[rng.permutation(len(candidates))]
    target = math.ceil(fraction * int((labels == label).sum()))
    taken = int(np.searchsorted(np.cumsum(group_size[candidates]), target) + 1)
    keep[candidates[: max(1, taken)]] = True
  return np.flatnonzero(keep[group_of])


def make_splits(
  collection: records.Collection,
  split_config,
  *,
  fold: int | None = None,
  pairs: list[tuple[int, int, float]] | None = None,
) -> dict[str, records.Collection]:
  """Train / val / test collections for one split (then `split_config.label_fraction` of train).

  With ``label_fraction`` < 1 only that share of the train part's labelled images is kept
  (`label_subset`, seed ``label_fraction_seed``); val and test stay whole, and their
  ``copy_in_train`` refers to the images actually kept.
  """
  parts = _make_splits(collection, split_config, fold=fold, pairs=pairs)
  fraction = float(split_config.get("label_fraction", 1.0) or 1.0)
  if fraction >= 1:
    return parts
  train = parts["train"]
  kept = label_subset(train, fraction, int(split_config.get("label_fraction_seed", 0)))
  parts["train"] = train.subset(kept, name=f"{train.name}-{fraction:.0%}labels")
  kept_groups = {r.meta["cluster"] for r in parts["train"].records}
  for part in ("val", "test"):
    parts[part] = dataclasses.replace(
      parts[part],
      records=tuple(
        dataclasses.replace(r, meta=dict(r.meta, copy_in_train=r.meta["cluster"] in kept_groups))
        for r in parts[part].records
      ),
    )
  return parts


def _make_splits(
  collection: records.Collection,
  split_config,
  *,
  fold: int | None = None,
  pairs: list[tuple[int, int, float]] | None = None,
) -> dict[str, records.Collection]:
  """Train / val / test collections for one split.

  Args:
    collection: all records.
    split_config: ConfigDict (or dict) with
      kind: "kfold" (test = fold `fold` of `k`; val = a grouped stratified `val_fraction` of the
        rest), "predefined" (record.meta["split"] in train/val/test; a missing part is empty;
        with `val_from_train`, the given val part becomes test and val is a grouped stratified
        `val_fraction` of train),
        "official_folds" (test = records whose meta["fold5"] is the `fold`-th distinct value,
        e.g. BUS-BRA; val from the rest), "holdout" (grouped stratified `val_fraction` and
        `test_fraction`).
      k, fold, val_fraction, test_fraction, seed, near_duplicates (group copies of one scan; for
        kfold/official_folds/holdout), val_fold (which of the round(1 / val_fraction) grouped
        parts is val, 0 by default: members of a fold ensemble take 0, 1, ...).
    fold: overrides split_config.fold.
    pairs: precomputed near-duplicate pairs (otherwise searched when near_duplicates is set).

  Returns:
    {"train", "val", "test"}: Collections named like "busi/kfold5-fold0/test" (parts may be empty).
  """
  cfg = split_config
  kind = cfg.get("kind", "kfold")
  seed = int(cfg.get("seed", 0))
  val_fraction = float(cfg.get("val_fraction", 0.0) or 0.0)
  fold = int(cfg.get("fold", 0) if fold is None else fold)
  val_fold = int(cfg.get("val_fold", 0) or 0)
  labels = _strata(collection)
  # Groups over the whole collection, every kind: k-fold keeps them whole, and on a predefined
  # split they tell which evaluated images have a copy in train (BUSI's BreastMNIST split has 38
  # such pairs).
  groups = group_ids(
    collection, near_duplicates=bool(cfg.get("near_duplicates", True)), pairs=pairs
  )
  if kind == "predefined":
    parts = {"train": [], "val": [], "test": []}
    for index, record in enumerate(collection.records):
      part = record.meta.get("split")
      if part not in parts:
        raise records.DataError(f"{record.id}: meta['split'] is {part!r}, expected train/val/test")
      parts[part].append(index)
    if not cfg.get("val_from_train", False):
      return _named(collection, "predefined", parts, groups)
    # The given val part is reported as the test set; a grouped val is carved from train.
    if parts["test"]:
      raise ValueError(
        "split.val_from_train needs a predefined split without a test part "
        f"({len(parts['test'])} records are marked test)"
      )
    train = np.asarray(parts["train"], np.int64)
    val_in_train = _split_fraction(labels[train], groups[train], val_fraction, seed + 1, val_fold)
    indices = {"train": train[~val_in_train], "val": train[val_in_train], "test": parts["val"]}
    return _named(collection, "predefined-valtest", indices, groups)
  if kind == "kfold":
    k = int(cfg.get("k", 5))
    if not 0 <= fold < k:
      raise ValueError(f"fold {fold} is outside 0..{k - 1}")
    test = grouped_stratified_kfold(labels, groups, k, seed) == fold
    tag = f"kfold{k}-fold{fold}"
  elif kind == "official_folds":
    values = []
    for record in collection.records:
      if "fold5" not in record.meta:
        raise records.DataError(f"{record.id}: no meta['fold5'] for split kind 'official_folds'")
      values.append(record.meta["fold5"])
    distinct = sorted(set(values))
    if not 0 <= fold < len(distinct):
      raise ValueError(f"fold {fold} is outside 0..{len(distinct) - 1} (folds {distinct})")
    test = np.asarray([v == distinct[fold] for v in values])
    tag = f"official-fold{distinct[fold]}"
  elif kind == "holdout":
    test = _split_fraction(labels, groups, float(cfg.get("test_fraction", 0.2)), seed)
    tag = "holdout"
  else:
    raise ValueError(f"unknown split kind {kind!r}")
  rest = np.flatnonzero(~test)
  val_in_rest = _split_fraction(labels[rest], groups[rest], val_fraction, seed + 1, val_fold)
  return _named(
    collection,
    tag,
    {"train": rest[~val_in_rest], "val": rest[val_in_rest], "test": np.flatnonzero(test)},
    groups,
  )


def leakage_report(
  collection: records.Collection,
  splits: dict[str, records.Collection],
  *,
  pairs: list[tuple[int, int, float]] | None = None,
) -> dict:
  """Near-duplicate pairs, clusters and patients that straddle split boundaries.

  Args:
    collection: the full collection the splits were drawn from (record ids must be unique).
    splits: part name -> Collection (e.g. from `make_splits`); records matched by id.
    pairs: precomputed `near_duplicate_pairs(collection)` (searched if None).

  Returns:
    JSON-ready dict: counts and the straddling pairs / clusters / patients with record ids.
  """
  if pairs is None:
    pairs = near_duplicate_pairs(collection)
  part_of: dict[str, str] = {}
  for part, subset in splits.items():
    for record in subset.records:
      part_of[record.id] = part
  ids = [r.id for r in collection.records]
  where = [part_of.get(i) for i in ids]
  straddling_pairs = [
    {"a": ids[i], "b": ids[j], "score": round(float(s), 4), "parts": [where[i], where[j]]}
    for i, j, s in pairs
    if where[i] and where[j] and where[i] != where[j]
  ]
  straddling_clusters = []
  for cluster in near_duplicate_clusters(collection, pairs=pairs):
    parts = sorted({where[i] for i in cluster if where[i]})
    if len(parts) > 1:
      straddling_clusters.append({"records": [ids[i] for i in cluster], "parts": parts})
  by_patient: dict[str, set] = {}
  for record, part in zip(collection.records, where, strict=True):
    if part:
      by_patient.setdefault(str(record.patient_id), set()).add(part)
  straddling_patients = sorted(p for p, parts in by_patient.items() if len(parts) > 1)
  return {
    "split_sizes": {part: len(subset) for part, subset in splits.items()},
    "pairs": len(pairs),
    "straddling_pairs": len(straddling_pairs),
    "straddling_clusters": len(straddling_clusters),
    "straddling_patients": len(straddling_patients),
    "pair_details": straddling_pairs,
    "cluster_details": straddling_clusters,
    "patient_details": straddling_patients,
  }
