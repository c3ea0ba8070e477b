"""`python -m lib.report RUN_DIR` (the OOF table of a run) and `python -m lib.report --compare RUN ...` (the
experiment table); the code lives in `lib.evaluate.report`."""
import sys

from lib.evaluate.report import main

if __name__ == "__main__":
    sys.exit(main())
