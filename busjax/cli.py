"""What busjax's command-line entry points share: `run(main)` is absl's `app.run` ending in
`exit_without_teardown`."""

import atexit
import os
import sys
import threading

from absl import app


def run(main, **kwargs) -> None:
  """``app.run(main, **kwargs)``, then `exit_without_teardown` with its exit status (app.run ends
  every run with SystemExit; an exception keeps its traceback and Python's own exit)."""
  try:
    app.run(main, **kwargs)
  except SystemExit as e:
    exit_without_teardown(e.code)


def exit_without_teardown(code) -> None:
  """Ends the process as `sys.exit(code)` would, without the interpreter's teardown.

  Python's own exit first joins the threads that are not daemons, then runs the atexit handlers
  (logging's flush, JAX's and multiprocessing's clean-up), then flushes stdout and stderr and
  tears down every imported module one by one: 0.40 s after importing `busjax.main` and its
  trainer, 0.55 s at the end of the supervised BUSI job (`os._exit` after the handlers, measured
  launch to exit). This does the first three, then leaves with `os._exit`. Where CPython's
  atexit runner is missing, Python's own exit runs.
  """
  if code is None:
    status = 0
  elif isinstance(code, int):
    status = code
  else:  # sys.exit("message"): the message on stderr, status 1.
    print(code, file=sys.stderr)
    status = 1
  run_handlers = getattr(atexit, "_run_exitfuncs", None)
  if run_handlers is None:
    sys.exit(status)
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and not thread.daemon:
      thread.join()
  run_handlers()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # Closed, or a pipe whose reader has gone.
      pass
  os._exit(status)
