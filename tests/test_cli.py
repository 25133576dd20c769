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
from latentdiff.images import parse_parameters, read_png_parameters
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
    assert read_png_parameters(again) == read_png_parameters(reference)
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
    (["txt2img", "a cat", "-W", "0"], "--width 0: must be between 64 and 4096"),
    (["txt2img", "a cat", "--steps", "0"], "--steps must be >= 1"),
    (["txt2img", "a cat", "--cfg-scale", "nan"], "--cfg-scale must be a finite number, not nan"),
    (["txt2img", "a cat", "--seed", "-2"], "--seed must be >= -1"),
    (["txt2img", "a cat", "--eta", "0.5", "--sampler", "Euler"], "--eta is not taken by sampler 'Euler'"),
    (["txt2img", "a cat", "--n-iter", "0"], "--n-iter must be >= 1"),
    (["txt2img", "a cat", "--schedule", "often"], "--schedule unknown schedule 'often'"),
    (["txt2img", "a cat", "--clip-skip", "9"], "--clip-skip must be between 1 and 2"),
    (["txt2img", "a cat", "--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "--device cuda"),
    (["txt2img", "a cat", "--seed", "abc"], "argument --seed: invalid int value: 'abc'"),
    (["txt2img", "a cat", "-o", "{tmp}/gray.png/out"], "gray.png is a file, not a folder"),
    (["txt2img", "a cat", "-o", "/proc/latentdiff-out"], "cannot write in /proc"),
    (["img2img", "a cat"], "img2img needs --init-image"),
    (["txt2img"], "no prompt"),
    (["img2img", "a cat", "--init-image", "{tmp}/not-an-image.png"], "not-an-image.png is not an image"),
    (["img2img", "a cat", "--init-image", "{tmp}/missing.png"], "missing.png does not exist"),
    (["img2img", "a cat", "--init-image", "{tmp}/gray.png", "--strength", "1.5"], "--strength must be in (0, 1]"),
    (["txt2img", "--prompts-file", "{tmp}/missing.txt"], "missing.txt: no such file"),
    (["txt2img", "--prompts-file", "{tmp}/bad-json.txt"], "bad-json.txt:2: invalid JSON"),
    (["txt2img", "--prompts-file", "{tmp}/bad-key.txt"], "unknown ['stepz']"),
    (["txt2img", "--prompts-file", "{tmp}/bad-type.txt"], "bad-type.txt:1: steps must be an integer, not 'three'"),
    (["txt2img", "--prompts-file", "{tmp}/empty.txt"], "no prompts in it"),
    (["txt2img", "--from-png", "{tmp}/gray.png"], "no 'parameters' text chunk"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_input_message(args, message, bad_files, model_file, capsys, monkeypatch):
    """Bad input is one line and status 2, found before sampling starts, and nothing is written."""
    monkeypatch.setattr(Pipeline, "_sample", lambda *a, **k: pytest.fail("sampling started"))
    argv = [a.format(tmp=bad_files) for a in args] + ["--model", str(model_file)]
    if "-o" not in argv:
        argv += ["-o", str(bad_files / "out")]
    before = sorted(bad_files.rglob("*"))
    assert exit_status(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("latentdiff") and "error: " in err[0] and message in err[0], err
    assert sorted(bad_files.rglob("*")) == before  # nothing written


def exit_status(argv) -> int:
    """main()'s status, also where argparse ends the process itself (usage errors)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def made(folder: Path) -> dict[str, tuple]:
    """{file name: (prompt, seed, sampler)} of the PNGs in a folder."""
    found = {}
    for path in folder.glob("*.png"):
        prompt, _, params = parse_parameters(read_png_parameters(path))
        found[path.name] = (prompt, params["Seed"], params["Sampler"])
    return found


def test_batch_mode_generates_every_line_and_a_rerun_skips_them(runs, model_file):
    ok(runs, "batch")
    out = runs[0] / "batch"
    images = made(out)
    assert sorted(images.values()) == [("a blue square", "3", "DDIM"), ("a blue square", "4", "DDIM"),
                                       ("a green tree", "100", "Euler a"), ("a red circle", "100", "Euler a")]
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["txt2img", "--prompts-file", str(runs[0] / "prompts.txt"), "--model", str(model_file),
                 "--seed", "100", "-o", str(out), *TINY]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_batch_mode_resumes_by_content_not_line_number(model_file, tmp_path):
    """Inserting a line and editing another makes exactly those two images; the others are found by content."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("a red circle\na blue square\na red circle\n")  # the same line twice: two images
    argv = ["txt2img", "--prompts-file", str(prompts), "--model", str(model_file), "-o", str(out), *TINY]
    assert main(argv) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert sorted(prompt for prompt, _, _ in made(out).values()) == ["a blue square", "a red circle", "a red circle"]
    prompts.write_text("a green tree\na red circle\na blue square at night\na red circle\n")
    assert main(argv) == 0
    now = made(out)
    new = sorted(now[name][0] for name in set(now) - set(first))
    assert new == ["a blue square at night", "a green tree"]
    assert all((out / name).stat().st_mtime_ns == stamp for name, stamp in first.items())  # nothing redone


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
    assert sorted(prompt for prompt, _, _ in made(tmp_path / "out").values()) == ["a blue square", "a green tree",
                                                                                  "a red circle"]
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


def test_version_and_help(capsys):
    assert exit_status(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"latentdiff {latentdiff.__version__}"
    assert exit_status(["txt2img", "--help"]) == 0
    shown = capsys.readouterr().out
    assert "(default: 20)" in shown and "(default: Euler a)" in shown and "(default: 7)" in shown
    from latentdiff.cli import build_parser
    parsers = [build_parser()]
    parsers += [p for action in parsers[0]._actions if action.choices and isinstance(action.choices, dict)
                for p in action.choices.values()]
    undocumented = [(p.prog, a.dest) for p in parsers for a in p._actions if not a.help]
    assert undocumented == []


def test_from_png_flags_override_the_png(runs, model_file, tmp_path):
    reference = runs[0] / "reference" / "7.png"
    assert main(["txt2img", "--from-png", str(reference), "--steps", "3", "--seed", "9", "--model", str(model_file),
                 "--dtype", "fp32", "-o", str(tmp_path), "--quiet"]) == 0
    prompt, negative, params = parse_parameters(read_png_parameters(tmp_path / "9.png"))
    assert (prompt, negative, params["Steps"], params["Seed"]) == ("a red circle", "blurry", "3", "9")
    assert params["Sampler"] == "DPM++ 2M Karras" and params["CFG scale"] == "5"  # the rest from the PNG


def test_an_img2img_png_replays_as_img2img(runs, model_file, tmp_path, capsys):
    made_by_img2img = runs[0] / "img2img" / "3.png"
    assert main(["txt2img", "--from-png", str(made_by_img2img), "--model", str(model_file)]) == 2
    err = capsys.readouterr().err
    assert "made by img2img (Denoising strength 0.5)" in err and "--init-image IMAGE" in err
    assert main(["img2img", "--from-png", str(made_by_img2img), "--init-image", str(runs[0] / "in.png"),
                 "--model", str(model_file), "-o", str(tmp_path), "--quiet"]) == 0
    assert np.array_equal(pixels(tmp_path / "3.png"), pixels(made_by_img2img))


def test_img2img_takes_a_size_and_a_resize_mode(runs, model_file, tmp_path):
    assert main(["img2img", "a tree", "--init-image", str(runs[0] / "in.png"), "-W", "128", "-H", "64",
                 "--resize-mode", "resize and fill", "--seed", "1", "--model", str(model_file), "-o", str(tmp_path),
                 *TINY]) == 0
    with Image.open(tmp_path / "1.png") as image:
        assert image.size == (128, 64)


def test_info_into_a_closed_pipe_ends_quietly(model_file):
    """`latentdiff info X | head -1`: the reader goes away; no BrokenPipeError traceback."""
    proc = subprocess.Popen([*CLI, "info", str(model_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    proc.stdout.close()
    assert proc.wait(timeout=120) == 141  # 128 + SIGPIPE, as a shell reports a command that a pipe ended
    assert b"Traceback" not in proc.stderr.read()
