"""A `StepPacer` that records the metric names of every step it paces, for tests that check a
trainer's step loop keeps one step ahead of the devices (busjax/trainers/state_utils.py)."""

from busjax.trainers import state_utils


def recording_pacer(log: list) -> type:
  """A `state_utils.StepPacer` subclass appending each paced step's metric names to `log`; patch
  it over `state_utils.StepPacer` for the run under test."""

  class RecordingPacer(state_utils.StepPacer):
    def __call__(self, outputs):
      log.append(frozenset(outputs))
      super().__call__(outputs)

  return RecordingPacer
