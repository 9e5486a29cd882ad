"""A Grain dataset wrapper that dies mid-training like a killed process (for resume tests)."""

import grain


class Crash(Exception):
  """Stands for the kill."""


class _CrashingIterator(grain.DatasetIterator):
  """The real iterator, state and all, that raises `Crash` instead of its batch number
  ``after + 1``."""

  def __init__(self, parent, after: int):
    super().__init__(parent)
    self.count = 0
    self.after = after

  def __next__(self):
    self.count += 1
    if self.count > self.after:
      raise Crash()
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class CrashingDataset:
  """Wraps a dataset whose iterators yield `after` batches, then raise `Crash`."""

  def __init__(self, dataset, after: int):
    self.dataset = dataset
    self.after = after

  def __iter__(self):
    return _CrashingIterator(iter(self.dataset), self.after)
