"""The bundle's entry script (PyInstaller runs a file, not a console-script entry point)."""

import multiprocessing
import sys

if __name__ == "__main__":
    multiprocessing.freeze_support()  # a frozen app must not re-run main() in worker processes
    from tugboat.cli import main

    sys.exit(main())
