"""How far a shapes model's text features move when a caption changes in one attribute.

    python tools/caption_probe.py weights/demo/model.safetensors

The work is latentdiff.train.caption_probe's (importable, tested); this is its command-line entry point.
"""

import sys

from latentdiff.train.caption_probe import main

if __name__ == "__main__":
    sys.exit(main())
