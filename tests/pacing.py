"""A `StepPacer` that records the metric names of every step it paces and marks what it hands
back, for tests that check a trainer's step loop keeps one step ahead of the devices and logs the
metrics the pacer returned (busjax/trainers/state_utils.py)."""

import json

import numpy as np

from busjax.trainers import state_utils

MARK = "paced"  # A metric the recording pacer adds to what it returns.


def recording_pacer(log: list) -> type:
  """A `state_utils.StepPacer` subclass appending each paced step's metric names to `log`; patch
  it over `state_utils.StepPacer` for the run under test."""

  class RecordingPacer(state_utils.StepPacer):
    def __call__(self, outputs):
      log.append(frozenset(outputs))
      return {**super().__call__(outputs), MARK: np.float32(1.0)}

  return RecordingPacer


def logged_all_paced(metrics_file, split: str) -> bool:
  """Whether `split`'s lines in a run's metrics.jsonl exist and all came through the pacer: the
  loop logged what `pace` returned (its host copies, when steps run inline), not the step's own
  outputs."""
  with open(metrics_file) as f:
    lines = [json.loads(line) for line in f]
  logged = [line for line in lines if line["split"] == split]
  return bool(logged) and all(line.get(MARK) == 1.0 for line in logged)
