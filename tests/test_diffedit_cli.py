"""`latentdiff diffedit` and Pipeline.diffedit on a tiny model: the image and its mask written once with the
options in the PNG, --from-png replaying them, and bad input stopped with one line naming the flag, exit 2,
nothing written. (Parity with diffusers: test_diffedit.py; the demo model: test_diffedit_demo.py.)"""

import numpy as np
import pytest
import torch
from PIL import Image
from test_pipeline_parity import init_image
from tiny import SD1, tiny_model, with_inputs

from latentdiff.cli import main
from latentdiff.errors import FieldError, InputError, UnsupportedModelError
from latentdiff.infotext import parse_parameters, read_png_parameters
from latentdiff.loader import save_model
from latentdiff.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

SOURCE, TARGET = "a red circle", "a yellow circle"
QUICK = ["--steps", "4", "--num-maps-per-mask", "2", "--seed", "9", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffedit-cli")
    image = root / "in.png"
    init_image().save(image)
    not_image = root / "notes.png"
    not_image.write_text("not an image")
    return dict(model=save_model(tiny_model(SD1), root / "tiny.safetensors"), image=image, not_image=not_image,
                ip2p=save_model(tiny_model(with_inputs(SD1, 8)), root / "ip2p.safetensors"))


def test_writes_image_mask_and_options_and_from_png_replays(files, tmp_path, capsys):
    out, mask = tmp_path / "out", tmp_path / "mask.png"
    args = ["diffedit", str(files["image"]), "--source", SOURCE, "--target", TARGET, "--model", str(files["model"])]
    assert main([*args, *QUICK, "--inverse-cfg-scale", "2", "--save-mask", str(mask), "-o", str(out)]) == 0
    (first,) = out.glob("*.png")
    info = parse_parameters(read_png_parameters(first))
    assert info.prompt == TARGET
    assert {k: info.params[k] for k in ("Steps", "Seed", "DiffEdit source", "Maps per mask", "Inverse CFG scale",
                                        "Inpaint strength", "Mask encode strength")} == {
        "Steps": "4", "Seed": "9", "DiffEdit source": SOURCE, "Maps per mask": "2", "Inverse CFG scale": "2",
        "Inpaint strength": "0.8", "Mask encode strength": "0.5"}
    with Image.open(mask) as m:
        assert m.size == (64, 64) and set(np.unique(np.asarray(m))) <= {0, 255}
    replay = tmp_path / "replay"
    assert main(["diffedit", str(files["image"]), "--from-png", str(first), "--model", str(files["model"]),
                 "--dtype", "fp32", "-o", str(replay)]) == 0
    (second,) = replay.glob("*.png")
    assert read_png_parameters(second) == read_png_parameters(first)
    assert np.array_equal(np.asarray(Image.open(second)), np.asarray(Image.open(first)))
    assert "saved mask" in capsys.readouterr().out


def test_python_api_and_the_cli_agree(files, tmp_path):
    pipe = Pipeline.from_pretrained(files["model"], device="cpu", dtype=torch.float32)
    result = pipe.diffedit(files["image"], SOURCE, TARGET, steps=4, num_maps_per_mask=2, seed=9)
    out = tmp_path / "out"
    assert main(["diffedit", str(files["image"]), "--source", SOURCE, "--target", TARGET,
                 "--model", str(files["model"]), *QUICK, "-o", str(out)]) == 0
    (written,) = out.glob("*.png")
    assert np.array_equal(np.asarray(Image.open(written)), np.asarray(result.image))
    with pytest.raises(InputError, match=r"unknown parameter\(s\) \['strength'\]"):
        pipe.diffedit(files["image"], SOURCE, TARGET, strength=0.5)
    with pytest.raises(FieldError, match="target_prompt is empty"):
        pipe.diffedit(files["image"], SOURCE, " ")
    same = pipe.diffedit(files["image"], SOURCE, SOURCE, steps=4, num_maps_per_mask=2, seed=9)
    assert np.asarray(same.mask).max() == 0 and "the mask found is empty" in same.notes[0]
    ip2p = Pipeline.from_pretrained(files["ip2p"], device="cpu", dtype=torch.float32)
    with pytest.raises(UnsupportedModelError, match="DiffEdit runs on text-to-image checkpoints"):
        ip2p.diffedit(files["image"], SOURCE, TARGET)


@pytest.mark.parametrize("case, extra, message", [
    ("no target", ["--source", SOURCE], "diffedit needs --target"),
    ("empty source", ["--source", "", "--target", TARGET], "--source is empty"),
    ("strength that runs no step", ["--source", SOURCE, "--target", TARGET, "--inpaint-strength", "0.1"],
     "--inpaint-strength 0.1 must be in (0, 1] and leave at least one of the 4 steps"),
    ("maps", ["--source", SOURCE, "--target", TARGET, "--num-maps-per-mask", "0"], "--num-maps-per-mask must be"),
    ("ratio", ["--source", SOURCE, "--target", TARGET, "--mask-thresholding-ratio", "0"],
     "--mask-thresholding-ratio must be > 0"),
    ("not an image", ["--source", SOURCE, "--target", TARGET, "IMAGE=not_image"],
     "notes.png is not an image PIL can read"),
    ("instruct-pix2pix model", ["--source", SOURCE, "--target", TARGET, "MODEL=ip2p"],
     "DiffEdit runs on text-to-image checkpoints; this one is an InstructPix2Pix U-Net"),
    ("mask path taken", ["--source", SOURCE, "--target", TARGET, "--save-mask", "IMAGE"], "exists; latentdiff never "
                                                                                          "overwrites"),
    ("png without diffedit options", ["--from-png", "IMAGE"], "carries no"),
])
def test_bad_input_is_one_line_status_2_and_nothing_written(files, tmp_path, capsys, case, extra, message):
    image, model = str(files["image"]), str(files["model"])
    args = []
    for arg in extra:
        if arg == "IMAGE=not_image":
            image = str(files["not_image"])
        elif arg == "MODEL=ip2p":
            model = str(files["ip2p"])
        else:
            args.append(image if arg == "IMAGE" else arg)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["diffedit", image, "--model", model, *QUICK, *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()
