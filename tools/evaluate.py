"""Score a shapes model's prompt adherence on seen and held-out (shape, colour) pairs.

    python tools/evaluate.py weights/demo/model.safetensors --count 100 --json scores.json

The work is latentdiff.train.evaluate's (importable, tested); this is its command-line entry point.
"""

import sys

from latentdiff.train.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
