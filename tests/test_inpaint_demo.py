"""Inpainting and outpainting on the bundled demo model, scored by the procedural analyzer (issue 23, items 2, 3).

The full measurement is `python tools/inpaint_demo.py --count 50` (latentdiff.train.inpaint_eval), committed
in benchmarks/inpaint-demo-50.txt / .json: new colour read in 49 of 50 cases, background continued in 50 of
50. Here its first cases run (the same seeds and settings, the pipeline's default dtype, as the tool uses),
held to the issue's thresholds: >= 80 % of the inpainted shapes read in the prompted colour (4 of 5), the
pixels beyond the blur band within 3/255 of the original on average, and the background colour continuing
into the new area in >= 90 % of outpaintings (4 of 4).
"""

import numpy as np
import pytest

from latentdiff.pipeline import Pipeline
from latentdiff.train import inpaint_eval

pytestmark = pytest.mark.usefixtures("single_thread")
INPAINT_CASES, OUTPAINT_CASES = 5, 4


@pytest.fixture(scope="module")
def runs(single_thread):
    pipe = Pipeline.from_pretrained(device="cpu")
    settings = inpaint_eval.SETTINGS
    originals = [inpaint_eval.original_case(pipe, i, settings) for i in range(max(INPAINT_CASES, OUTPAINT_CASES))]
    inpainted = [inpaint_eval.inpaint_case(pipe, i, settings, originals[i]) for i in range(INPAINT_CASES)]
    outpainted = [inpaint_eval.outpaint_case(pipe, i, settings, originals[i]) for i in range(OUTPAINT_CASES)]
    return inpainted, outpainted


def test_inpainting_paints_the_prompted_colour_and_keeps_the_rest(runs):
    inpainted, _ = runs
    assert sum(case["color_right"] for case in inpainted) >= 0.8 * INPAINT_CASES, inpainted
    assert np.mean([case["kept_change"] for case in inpainted]) <= 3.0


def test_outpainting_continues_the_background(runs):
    _, outpainted = runs
    assert sum(case["continues"] for case in outpainted) >= 0.9 * OUTPAINT_CASES, outpainted
