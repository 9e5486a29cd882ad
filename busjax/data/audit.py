"""Data audit: near-duplicate clusters, cross-class copies, and what a split leaks.

  python -m busjax.data.audit --source=busi --root=DIR [--split_file=TSV] [--out=report.json]
  python -m busjax.data.audit --source=busi --root=DIR --kfold=5 --fold=0
  python -m busjax.data.audit --source=busbra --root=DIR

The split audited is, in this order: BUSI's per-image split from --split_file (e.g. BreastMNIST's
split of BUSI), BUS-BRA's official 5 folds (--fold is the test fold), or --kfold grouped folds.
Prints a short summary; --out writes the full JSON report.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import ml_collections
import numpy as np

from busjax.data import records, splits


def load_collection(source: str, root: str, split_file: str | None) -> records.Collection:
  """The collection to audit; sources is imported lazily so this module stays light."""
  from busjax.data import sources  # noqa: PLC0415 (lazy: heavy, and optional for the API)

  if source == "busi":
    return sources.busi(root, classes="three", split_file=split_file)
  if source == "busbra":
    if split_file:
      raise SystemExit("--split_file applies to --source=busi only")
    return sources.busbra(root)
  raise SystemExit(f"unknown --source {source!r} (busi or busbra)")


def cross_class_clusters(collection: records.Collection, clusters: list[list[int]]) -> list[dict]:
  """Clusters whose members carry different labels: one scan filed under two classes."""
  out = []
  for cluster in clusters:
    labels = sorted({collection.records[i].label for i in cluster})
    if len(labels) > 1:
      out.append(
        {
          "records": [collection.records[i].id for i in cluster],
          "classes": [collection.class_names[label] for label in labels],
        }
      )
  return out


def audit(
  collection: records.Collection,
  *,
  split_kind: str | None = None,
  k: int = 5,
  fold: int = 0,
  seed: int = 0,
  threshold: float = 0.65,
) -> dict:
  """Full audit report (JSON-ready) of `collection` and, if `split_kind`, of that split."""
  start = time.perf_counter()
  pairs = splits.near_duplicate_pairs(collection, threshold=threshold)
  search_seconds = time.perf_counter() - start
  clusters = splits.near_duplicate_clusters(collection, pairs=pairs)
  ids = [r.id for r in collection.records]
  report = {
    "collection": collection.describe(),
    "threshold": threshold,
    "search_seconds": round(search_seconds, 2),
    "near_duplicate_pairs": len(pairs),
    "near_duplicate_clusters": len(clusters),
    "images_in_clusters": int(sum(len(c) for c in clusters)),
    "largest_cluster": int(max((len(c) for c in clusters), default=0)),
    "cross_class": cross_class_clusters(collection, clusters),
    "clusters": [[ids[i] for i in c] for c in clusters],
    "pairs": [{"a": ids[i], "b": ids[j], "score": round(s, 4)} for i, j, s in pairs],
  }
  if split_kind:
    config = ml_collections.ConfigDict(
      {
        "kind": split_kind,
        "k": k,
        "fold": fold,
        "val_fraction": 0.0,
        "seed": seed,
        "near_duplicates": True,
      }
    )
    parts = splits.make_splits(collection, config, pairs=pairs)
    report["split"] = {
      "kind": split_kind,
      "fold": fold,
      **splits.leakage_report(collection, parts, pairs=pairs),
    }
  return report


def summary(report: dict) -> str:
  """Human-readable lines for the terminal."""
  lines = [
    f"{report['collection']['source']}: {report['collection']['images']} images "
    f"{report['collection']['per_class']}",
    f"near duplicates (score >= {report['threshold']}): {report['near_duplicate_pairs']} pairs, "
    f"{report['near_duplicate_clusters']} clusters, {report['images_in_clusters']} images, "
    f"largest {report['largest_cluster']} ({report['search_seconds']} s)",
  ]
  for cluster in report["clusters"]:
    lines.append("  cluster: " + ", ".join(cluster))
  lines.append(f"cross-class clusters: {len(report['cross_class'])}")
  for item in report["cross_class"]:
    lines.append(f"  {'/'.join(item['classes'])}: " + ", ".join(item["records"]))
  if "split" in report:
    split = report["split"]
    lines.append(
      f"split {split['kind']} (fold {split['fold']}) sizes {split['split_sizes']}: "
      f"{split['straddling_pairs']} straddling pairs, "
      f"{split['straddling_clusters']} straddling clusters, "
      f"{split['straddling_patients']} straddling patients"
    )
    for pair in split["pair_details"]:
      lines.append(
        f"  {pair['a']} ({pair['parts'][0]}) ~ {pair['b']} ({pair['parts'][1]}) "
        f"score {pair['score']}"
      )
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m busjax.data.audit",
    description=__doc__,
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("--source", required=True, choices=("busi", "busbra"))
  parser.add_argument("--root", required=True, help="dataset folder")
  parser.add_argument("--split_file", default=None, help="BUSI split TSV (meta['split'])")
  parser.add_argument("--kfold", type=int, default=0, help="audit grouped k-fold with this k")
  parser.add_argument("--fold", type=int, default=0, help="test fold (kfold / official folds)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threshold", type=float, default=0.65)
  parser.add_argument("--out", default=None, help="write the full JSON report here")
  args = parser.parse_args(argv)
  try:
    collection = load_collection(args.source, args.root, args.split_file)
  except records.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if args.split_file:
    kind = "predefined"
  elif args.kfold:
    kind = "kfold"
  elif args.source == "busbra":
    kind = "official_folds"
  else:
    kind = None
  report = audit(
    collection,
    split_kind=kind,
    k=args.kfold or 5,
    fold=args.fold,
    seed=args.seed,
    threshold=args.threshold,
  )
  print(summary(report))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1, default=lambda o: o.item() if isinstance(o, np.generic) else o)
  return 0


if __name__ == "__main__":
  sys.exit(main())
