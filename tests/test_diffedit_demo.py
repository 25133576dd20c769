"""DiffEdit on the bundled demo model, seeded and small enough for the default suite.

The issue's measure is 50 seeds (tools/diffedit_demo.py, output in benchmarks/diffedit-demo.txt): asked,
the analyzer reads the target colour in >= 70 % and an unchanged background in >= 90 %; measured 50/50 and
50/50. Here the first three of
those seeds, the same run, must each keep its background, and at least two of three turn yellow: a model
edit that ignored the target (or repainted everything) fails this.
"""

import numpy as np
import pytest
import torch

from latentdiff.pipeline import Pipeline
from latentdiff.train.analyze import analyze

pytestmark = pytest.mark.usefixtures("single_thread")

SOURCE, TARGET = "a red circle on a blue background", "a yellow circle on a blue background"


def test_red_circle_turns_yellow_and_the_background_stays():
    pipe = Pipeline.from_pretrained(device="cpu", dtype=torch.float32)
    colours, kept, masks = [], [], []
    for seed in range(3):
        before = pipe.txt2img(SOURCE, seed=seed, progress=False).images[0]
        after = pipe.diffedit(before, SOURCE, TARGET, seed=seed, steps=20)
        a, b = analyze(before), analyze(after.image)
        assert a["color"] == "red", f"seed {seed}: the model drew {a['color']}, not the source's red"
        colours.append(b["color"])
        kept.append(a["background"] == b["background"])
        masks.append((np.asarray(after.mask) > 0).mean())
    assert sum(c == "yellow" for c in colours) >= 2, colours
    assert all(kept), kept
    assert all(0.02 < m < 0.5 for m in masks), masks  # a region was found, not the whole picture
