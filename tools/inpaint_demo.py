"""Inpainting and outpainting on the bundled demo model, scored by the procedural analyzer (issue 23 items 2, 3).

    python tools/inpaint_demo.py --count 50 --json benchmarks/inpaint-demo.json

The work is latentdiff.train.inpaint_eval's (importable, tested); this is its command-line entry point.
"""

import sys

from latentdiff.train.inpaint_eval import main

if __name__ == "__main__":
    sys.exit(main())
