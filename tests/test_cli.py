"""The `latentdiff` command as a user runs it: subprocesses on a tiny model file written here.

Every command runs at least once in its own process (exit status, stdout and stderr as a user sees them).
The independent runs start together in one fixture, so their start-ups (torch import, model load) overlap
on the machine's cores. The long table of bad inputs and the rerun checks call `latentdiff.cli.main` in
this process: the same code behind `sys.exit(main())`, without a start-up per case.
"""

import hashlib
import logging
import os
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tiny import SD1, tiny_model

import latentdiff
from latentdiff.cli import main, say
from latentdiff.infotext import parse_parameters, read_png_parameters, to_fields
from latentdiff.loader import save_model
from latentdiff.pipeline import Pipeline

pytestmark = pytest.mark.usefixtures("single_thread")

# one thread per process: the tiny model gains nothing from more, and the test machine is shared
ENV = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "TRANSFORMERS_VERBOSITY": "error"}
CLI = [sys.executable, "-m", "latentdiff.cli"]
TINY = ["--steps", "2", "--quiet"]
FIRST = ["a red circle", "-n", "blurry", "-W", "64", "-H", "64", "--sampler", "DPM++ 2M Karras", "--cfg-scale", "5",
         "--seed", "7", "--dtype", "fp32", *TINY]
PROMPTS = ('a red circle\n# a comment\n\n{"prompt": "a blue square", "seed": 3, "batch_size": 2, "sampler": "DDIM"}\n'
           "a green tree\n")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def ramp_image(path: Path, size: int) -> Path:
    ramp = np.linspace(0, 255, size).round().astype(np.uint8)
    Image.fromarray(np.ascontiguousarray(np.broadcast_to(ramp[None, :, None], (size, size, 3)))).save(path)
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    return save_model(tiny_model(SD1), tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="module")
def runs(model_file, tmp_path_factory):
    """Start each independent command in its own process, all at once; wait for all of them.
    Returns (folder, {name: CompletedProcess})."""
    root = tmp_path_factory.mktemp("cli")
    # a reference PNG made in this process, for the commands that read one
    assert main(["txt2img", *FIRST, "--model", str(model_file), "-o", str(root / "reference")]) == 0
    reference = root / "reference" / "7.png"
    ramp_image(root / "in.png", 72)
    (root / "prompts.txt").write_text(PROMPTS)
    script = Path(sysconfig.get_path("scripts")) / "latentdiff"
    assert script.is_file(), f"console script missing at {script}: pip install -e ."
    m = str(model_file)
    commands = {
        "txt2img": [*CLI, "txt2img", *FIRST, "--model", m, "-o", root / "txt2img"],
        "info": [*CLI, "info", m],
        "info png": [*CLI, "info", reference],
        "from png": [*CLI, "txt2img", "--from-png", reference, "--model", m, "--dtype", "fp32", "-o", root / "from-png",
                     "--quiet"],  # the same dtype as the reference: bit-identical is promised per device and dtype,
        "img2img": [*CLI, "img2img", "a tree", "--init-image", root / "in.png", "--strength", "0.5", "--model", m,
                    "--seed", "3", "-o", root / "img2img", *TINY],
        "convert": [*CLI, "convert", m, root / "folder"],
        "samplers": [script, "samplers"],
        "missing model": [*CLI, "txt2img", "a cat", "--model", root / "nope.safetensors"],
        "missing model --debug": [*CLI, "--debug", "txt2img", "a cat", "--model", root / "nope.safetensors"],
        "batch": [*CLI, "txt2img", "--prompts-file", root / "prompts.txt", "--model", m, "--seed", "100",
                  "-o", root / "batch", *TINY],
    }
    started = {name: subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=ENV) for name, argv in commands.items()}
    done = {}
    for name, proc in started.items():
        stdout, stderr = proc.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    return root, done


def ok(runs, name) -> subprocess.CompletedProcess:
    proc = runs[1][name]
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(autouse=True)
def restore_logging():
    """main() configures the root logger for its process; undo that after in-process calls."""
    handlers = logging.root.handlers[:]
    yield
    logging.root.handlers[:] = handlers


@pytest.fixture(scope="module")
def first_image(runs) -> Path:
    ok(runs, "txt2img")
    return runs[0] / "txt2img" / "7.png"


def test_txt2img_writes_the_pipeline_image_with_a1111_parameters(first_image, model_file):
    prompt, negative, params = parse_parameters(read_png_parameters(first_image))
    assert (prompt, negative) == ("a red circle", "blurry")
    assert params["Steps"] == "2" and params["Sampler"] == "DPM++ 2M Karras" and params["CFG scale"] == "5"
    assert params["Seed"] == "7" and params["Size"] == "64x64" and params["Model"] == "tiny"
    assert params["Model hash"] == sha256(model_file)[:10]  # A1111's short hash of the file
    assert params["Version"] == f"latentdiff {latentdiff.__version__}"
    pipe = Pipeline.from_pretrained(model_file, device="cpu", dtype=torch.float32)
    expected = pipe.txt2img("a red circle", "blurry", steps=2, sampler="DPM++ 2M Karras", cfg_scale=5, seed=7,
                            progress=False)
    assert np.array_equal(pixels(first_image), np.asarray(expected.images[0]))


def test_info_prints_png_parameters(runs):
    assert ok(runs, "info png").stdout.strip() == read_png_parameters(runs[0] / "reference" / "7.png")


def test_info_describes_a_checkpoint(runs, model_file):
    shown = ok(runs, "info").stdout
    model = tiny_model(SD1)
    assert "SD 1.x" in shown and "eps-prediction" in shown and "native 64px" in shown
    for part, module in (("unet", model.unet), ("vae", model.vae), ("text_encoder", model.text_encoder)):
        count = sum(p.numel() for p in module.parameters())
        assert f"{part}:".ljust(13) + f"{count / 1e6:.1f}M parameters" in shown
    assert sha256(model_file)[:10] in shown


def test_from_png_regenerates_the_same_image(runs, first_image):
    ok(runs, "from png")
    reference, again = runs[0] / "reference" / "7.png", runs[0] / "from-png" / "7.png"
    assert np.array_equal(pixels(again), pixels(reference))
    # the same fields: the replay records "DPM++ 2M Karras" split, as sampler DPM++ 2M + Schedule type
    assert to_fields(parse_parameters(read_png_parameters(again))) == \
        to_fields(parse_parameters(read_png_parameters(reference)))
    assert np.array_equal(pixels(first_image), pixels(reference))  # in-process main() == the command


def test_successful_commands_keep_stderr_clean(runs):
    """--quiet runs print nothing on stderr: no warnings from the libraries underneath, no progress bars."""
    for name in ("txt2img", "info", "info png", "from png", "img2img", "convert", "samplers", "batch"):
        assert ok(runs, name).stderr == "", name


def test_second_run_never_overwrites(first_image, model_file):
    before = sha256(first_image)
    assert main(["txt2img", *FIRST, "--model", str(model_file), "-o", str(first_image.parent)]) == 0
    assert sha256(first_image) == before
    assert np.array_equal(pixels(first_image.with_name("7-1.png")), pixels(first_image))


def test_img2img_crops_to_the_model_multiple(runs):
    assert "cropped from 72x72 to 64x64" in ok(runs, "img2img").stdout
    _, _, params = parse_parameters(read_png_parameters(runs[0] / "img2img" / "3.png"))
    assert params["Denoising strength"] == "0.5" and params["Size"] == "64x64"


def test_convert_single_file_to_folder_and_back(runs, model_file, tmp_path):
    ok(runs, "convert")
    folder = runs[0] / "folder"
    assert (folder / "model_index.json").is_file()
    assert main(["convert", str(folder), str(tmp_path / "back.safetensors")]) == 0
    original, back = load_file(model_file), load_file(tmp_path / "back.safetensors")
    assert original.keys() == back.keys() and all(torch.equal(original[k], back[k]) for k in original)


def test_samplers_lists_names_through_the_console_script(runs):
    shown = ok(runs, "samplers").stdout
    for name in ("Euler a", "DPM++ 2M", "DDIM", "karras"):
        assert name in shown


def test_bad_input_is_one_line_and_status_2_and_debug_shows_the_traceback(runs):
    proc, debug = runs[1]["missing model"], runs[1]["missing model --debug"]
    assert proc.returncode == 2
    missing = runs[0] / "nope.safetensors"
    assert proc.stderr.strip() == f"latentdiff: error: model not found: {missing} (pass --model PATH)"
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "InputError: model not found" in debug.stderr


@pytest.fixture()
def bad_files(tmp_path):
    (tmp_path / "not-an-image.png").write_text("hello")
    Image.new("RGB", (64, 64), (128, 128, 128)).save(tmp_path / "gray.png")
    (tmp_path / "bad-json.txt").write_text('a cat\n{"prompt": "a dog", "steps": }\n')
    (tmp_path / "bad-key.txt").write_text('{"prompt": "a dog", "stepz": 3}\n')
    (tmp_path / "bad-type.txt").write_text('{"prompt": "a dog", "steps": "three"}\n')
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    return tmp_path


@pytest.mark.parametrize("args, message", [
    (["txt2img", "a cat", "-W", "72"], "--width 72: must be a multiple of 16"),
    (["txt2img", "a cat", "--sampler", "Eulerr"], "unknown sampler 'Eulerr'"),
    (["txt2img", "a cat", "--steps", "0"], "--steps must be at least 1"),
    (["txt2img", "a cat", "--eta", "0.5", "--sampler", "Euler"], "--eta: sampler 'Euler' takes no eta"),
    (["txt2img", "a cat", "--n-iter", "0"], "--n-iter must be at least 1"),
    (["txt2img"], "no prompt"),
    (["img2img", "a cat", "--init-image", "{tmp}/not-an-image.png"], "not-an-image.png is not an image"),
    (["img2img", "a cat", "--init-image", "{tmp}/missing.png"], "missing.png does not exist"),
    (["img2img", "a cat", "--init-image", "{tmp}/gray.png", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["txt2img", "--prompts-file", "{tmp}/missing.txt"], "missing.txt: no such file"),
    (["txt2img", "--prompts-file", "{tmp}/bad-json.txt"], "bad-json.txt:2: invalid JSON"),
    (["txt2img", "--prompts-file", "{tmp}/bad-key.txt"], "unknown ['stepz']"),
    (["txt2img", "--prompts-file", "{tmp}/bad-type.txt"], "bad-type.txt:1: 'steps' must be an integer"),
    (["txt2img", "--prompts-file", "{tmp}/empty.txt"], "no prompts in it"),
    (["txt2img", "--from-png", "{tmp}/gray.png"], "no 'parameters' text chunk"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_message(args, message, bad_files, model_file, capsys):
    argv = [a.format(tmp=bad_files) for a in args] + ["--model", str(model_file), "-o", str(bad_files / "out")]
    before = sorted(bad_files.rglob("*"))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("latentdiff: error: ") and message in err[0], err
    assert sorted(bad_files.rglob("*")) == before  # nothing written


def test_batch_mode_generates_every_line_and_a_rerun_skips_them(runs, model_file):
    ok(runs, "batch")
    out = runs[0] / "batch"
    expected = {"00001-000.png": ("a red circle", "100", "Euler a"), "00004-000.png": ("a blue square", "3", "DDIM"),
                "00004-001.png": ("a blue square", "4", "DDIM"), "00005-000.png": ("a green tree", "100", "Euler a")}
    assert sorted(p.name for p in out.iterdir()) == sorted(expected)
    for name, (prompt, seed, sampler) in expected.items():
        got_prompt, _, params = parse_parameters(read_png_parameters(out / name))
        assert (got_prompt, params["Seed"], params["Sampler"]) == (prompt, seed, sampler)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["txt2img", "--prompts-file", str(runs[0] / "prompts.txt"), "--model", str(model_file),
                 "--seed", "100", "-o", str(out), *TINY]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_batch_mode_under_accelerate_splits_prompts_across_two_processes(model_file, tmp_path):
    """`accelerate launch --cpu` alone starts ONE process (accelerate runs CPU jobs in parallel only through
    mpirun); --multi_gpu starts torchrun's processes, which, without a GPU, the CLI joins over gloo."""
    (tmp_path / "prompts.txt").write_text("a red circle\na blue square\na green tree\n")
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
         "--main_process_port", str(free_port()), "-m", "latentdiff.cli", "txt2img", "--prompts-file",
         str(tmp_path / "prompts.txt"), "--model", str(model_file), "--seed", "1", "-o", str(tmp_path / "out"),
         *TINY], capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr
    saved = [line for line in proc.stdout.splitlines() if "saved" in line]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["00001-000.png", "00002-000.png",
                                                                     "00003-000.png"]
    assert len(saved) == 3 and "skip" not in proc.stdout  # each prompt ran exactly once
    assert {line.split("]")[0] + "]" for line in saved} == {"[process 1/2]", "[process 2/2]"}


def test_output_lines_are_written_whole(monkeypatch):
    """Processes under accelerate share stdout: a line and its newline must go out in one write, or another
    process's line can land between them (print() writes the newline separately)."""
    writes = []

    class Recorder:
        def write(self, text):
            writes.append(text)

        def flush(self):
            pass
    monkeypatch.setattr(sys, "stdout", Recorder())
    say("[process 1/2] saved out/00001-000.png (seed 1)")
    assert writes == ["[process 1/2] saved out/00001-000.png (seed 1)\n"]
