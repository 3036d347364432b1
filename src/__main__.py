"""`lmkiln` (the console script) and `python -m lmkiln`.

Importing the CLI (typer, rich) takes ~0.3 s before it can install its own signal handlers;
a Ctrl-C or SIGTERM in that time has nothing to clean up yet, so it exits quietly with the
usual code and one line instead of an import traceback."""

import signal
import sys


def _starting(signum, frame):
    sys.stderr.write(("terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted") + "; nothing was written yet\n")
    sys.exit(128 + signum)


def run() -> None:
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, _starting)
    from lmkiln.cli import main

    main()


if __name__ == "__main__":
    run()
