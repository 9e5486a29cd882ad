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

  Python's own exit first waits for the threads that are not daemons (after telling idle
  thread-pool workers to stop), then runs the atexit handlers (logging's flush, JAX's and
  multiprocessing's clean-up), then flushes stdout and stderr and tears down every imported
  module one by one: 0.40 s after importing `busjax.main` and its trainer, 0.55 s at the end of
  the supervised BUSI job (measured launch to exit). This does the first three with CPython's
  own functions, then leaves with `os._exit`. Off the main thread, or where those functions are
  missing, Python's own exit runs.
  """
  if code is None:
    status = 0
  elif isinstance(code, int):
    status = code
  else:  # sys.exit("message"): the message on stderr, status 1.
    print(code, file=sys.stderr)
    status = 1
  wait_for_threads = getattr(threading, "_shutdown", None)
  run_handlers = getattr(atexit, "_run_exitfuncs", None)
  if wait_for_threads is None or run_handlers is None:
    sys.exit(status)
  if threading.current_thread() is not threading.main_thread():
    sys.exit(status)
  wait_for_threads()
  run_handlers()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # Closed, or a pipe whose reader has gone.
      pass
  os._exit(status)
