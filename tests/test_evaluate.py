"""The evaluation tool counts what it should: a model that draws exactly what the caption asks scores
(nearly) everything, one that ignores the prompt scores what chance gives, and seen / held-out labels
come from their own splits."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from PIL import Image, ImageFilter

from latentdiff.images import pil_to_tensor, tensor_to_pil
from latentdiff.train.evaluate import ATTRIBUTES, EVAL_SEED, evaluate, full_caption, shape_by
from latentdiff.train.shapes import HELD_OUT, make_sample

ROOT = Path(__file__).resolve().parent.parent


class FakePipeline:
    """Answers txt2img(caption, seed=i) with evaluation item i's ground-truth rendering (`faithful`),
    or with the same flat grey picture whatever the prompt."""

    def __init__(self, split: str, faithful: bool):
        self.config = SimpleNamespace(resolution=64)
        self.split, self.faithful, self.captions = split, faithful, []

    def txt2img(self, caption, *, seed, **settings):
        self.captions.append(caption)
        image = make_sample(EVAL_SEED, seed, 64, self.split)[0] if self.faithful else Image.new("RGB", (64, 64), (128,) * 3)
        return SimpleNamespace(images=[image])


def test_a_faithful_model_scores_near_everything_and_captions_name_every_attribute():
    pipeline = FakePipeline("train", faithful=True)
    scores = evaluate(pipeline, count=40, split="train")
    # The analyzer reads clean renderings right (tests/test_shapes.py); allow one miss in 40 per attribute.
    assert all(scores[a] >= 39 / 40 for a in ATTRIBUTES), scores
    for caption, item in zip(pipeline.captions, scores["items"]):
        label = item["label"]
        for word in (label["shape"], label["color"], label["background"], label["size"]):
            assert word in caption, (word, caption)


def test_a_model_that_ignores_the_prompt_scores_low():
    scores = evaluate(FakePipeline("train", faithful=False), count=40, split="train")
    assert scores["color"] == scores["shape"] == scores["position"] == 0.0  # no shape found at all
    assert scores["background"] <= 0.25  # grey is no named colour: at most the nearest one, by chance


def test_first_seed_samples_the_same_prompts_with_other_seeds():
    seeds = []
    pipeline = FakePipeline("train", faithful=False)
    txt2img = pipeline.txt2img
    pipeline.txt2img = lambda caption, *, seed, **settings: seeds.append(seed) or txt2img(caption, seed=seed)
    evaluate(pipeline, count=3, split="train", first_seed=1000)
    evaluate(pipeline, count=3, split="train")
    assert seeds == [1000, 1001, 1002, 0, 1, 2]
    assert pipeline.captions[:3] == pipeline.captions[3:]  # the same labels, whatever the seeds


class FakeAutoencoder:
    """The two pipeline methods the autoencoder evaluation uses: encode_image keeps the pixels as
    "latents" (blurred by `blur` pixels, as an autoencoder that loses outlines would), decode returns them."""

    def __init__(self, blur: float):
        self.config = SimpleNamespace(resolution=64)
        self.blur, self.encoded = blur, []

    def encode_image(self, image, gens):
        self.encoded.append(image)
        return pil_to_tensor(image.filter(ImageFilter.GaussianBlur(self.blur)) if self.blur else image)

    def decode(self, latents):
        return tensor_to_pil(latents), []


def test_autoencoder_evaluation_scores_reconstructions_of_the_labels_renderings():
    exact = FakeAutoencoder(blur=0)
    scores = evaluate(exact, count=40, split="train", autoencoder=True)
    assert all(scores[a] >= 39 / 40 for a in ATTRIBUTES), scores
    for i, (image, item) in enumerate(zip(exact.encoded, scores["items"])):  # each item's own rendering
        rendering, _, label = make_sample(EVAL_SEED, i, 64, "train")
        assert image.tobytes() == rendering.tobytes() and item["label"] == label
    # A blurring autoencoder keeps backgrounds and places but loses outlines, small shapes first.
    blurred = evaluate(FakeAutoencoder(blur=3), count=40, split="train", autoencoder=True)
    assert min(blurred["background"], blurred["position"]) >= 39 / 40, blurred
    assert blurred["shape"] <= scores["shape"] - 0.2, blurred
    by_size = shape_by(blurred["items"], "size")
    assert by_size["small"][0] / by_size["small"][1] < by_size["big"][0] / by_size["big"][1], by_size


def test_shape_by_counts_right_shapes_per_label_value():
    items = [{"label": {"size": size}, "correct": {"shape": right}}
             for size, right in (("small", True), ("small", False), ("big", True))]
    assert shape_by(items, "size") == {"big": (1, 1), "small": (1, 2)}


def test_held_out_split_asks_only_for_held_out_pairs():
    scores = evaluate(FakePipeline("heldout", faithful=True), count=20, split="heldout")
    assert {(item["label"]["shape"], item["label"]["color"]) for item in scores["items"]} <= HELD_OUT
    assert all(item["caption"] == full_caption(item["label"]) for item in scores["items"])


def test_command_reports_a_missing_model_in_one_line(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), str(tmp_path / "none.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "none.safetensors" in done.stderr and "Traceback" not in done.stderr
