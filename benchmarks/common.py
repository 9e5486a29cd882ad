"""Pieces the quality benchmarks share: command-line config overrides and resumable JSON."""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterable
from typing import Any


def apply_overrides(config, overrides: Iterable[str]):
  """Applies `a.b=value` overrides (the value a Python literal) to `config` in place."""
  for override in overrides:
    key, _, value = override.partition("=")
    *parents, leaf = key.split(".")
    target = config
    for parent in parents:
      target = target[parent]
    target[leaf] = ast.literal_eval(value)
  return config


def write_json_atomic(path: str | None, data: Any) -> None:
  """Writes `data` to `path` (nothing if None) via a temporary file, so a kill mid-write never
  leaves a truncated file where the finished runs were recorded."""
  if not path:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(data, f, indent=2)
  os.replace(tmp, path)
