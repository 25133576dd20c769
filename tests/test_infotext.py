"""A1111 infotext: the grammar, the mapping to request fields, PNG text chunks, and foreign files.

The infotexts here are written from the published format (what A1111's PNG Info tab shows, what
stable-diffusion.cpp and prompt-template extensions add); expected values follow from the format,
never from our own output. PNG chunks are built byte by byte from the PNG specification.
"""

import json
import random
import re
import struct
import zlib

import pytest
import torch
from PIL import Image

from latentdiff.errors import InputError
from latentdiff.images import save_png
from latentdiff.infotext import (
    Infotext, format_parameters, from_fields, parse_parameters, read_png_parameters, to_fields,
)
from latentdiff.sampling import resolve_sampler
from latentdiff.schedules import make_sigmas

A1111 = ("masterpiece, 1girl, <lora:add_detail:0.5>\n"
         "second line of prompt\n"
         "Negative prompt: lowres, (worst quality:1.4)\n"
         "second negative line\n"
         "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 123, Size: 512x768, "
         'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "add_detail: 7c6bad76eb54", '
         "Version: v1.10.1")
A1111_OLD = ("a castle on a hill\nNegative prompt: blurry\n"
             "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 3607441060, Size: 768x512, "
             "Model hash: 6ce0161689, Clip skip: 2")
HIRES = ("a fox in snow\n"
         "Steps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, Seed: 5, Size: 512x512, "
         "Model: v1-5, Denoising strength: 0.7, Hires upscale: 2, Hires steps: 10, "
         'Hires upscaler: Latent, TI hashes: "easynegative: c74b4e810b03", Version: v1.10.1')
IMG2IMG = "a cat\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 9, Size: 512x512, Denoising strength: 0.4"
TEMPLATE = ("a red cat\nNegative prompt: ugly\n"
            "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512\n"
            "Template: a {red|blue}\ncat\nNegative Template: {ugly|bad}")
SD_CPP = ("a lighthouse\nNegative prompt: ugly\n"
          "Steps: 20, CFG scale: 7.000000, Guidance: 3.500000, Eta: 0.000000, Seed: 42, Size: 512x512, "
          "Model: v1-5-pruned-emaonly, RNG: cuda, Sampler: dpm++2m karras, Version: stable-diffusion.cpp")
MINIMAL = "just a prompt\nSteps: 12, Seed: 3, Model: x"  # no Size, Sampler or CFG scale
FOOOCUS = json.dumps({"Prompt": "a cat", "Negative Prompt": "", "Styles": "['Fooocus V2']",
                      "Resolution": "(1152, 896)", "Guidance Scale": 4, "Sampler": "dpmpp_2m_sde_gpu",
                      "Scheduler": "karras", "Seed": "123", "Version": "Fooocus v2.5.5",
                      "metadata_scheme": "fooocus"})
REAL = (A1111, A1111_OLD, HIRES, IMG2IMG, TEMPLATE, SD_CPP, MINIMAL)


# ------------------------------------------------------------------------------------ grammar

def test_format_parameters_follows_a1111_layout_and_order():
    text = format_parameters(
        "a cat, sitting", "blurry",
        {"Version": "latentdiff 0.1.0", "Seed": 42, "Model": "my,model", "Custom thing": "x",
         "Steps": 20, "Size": "512x768", "CFG scale": 7.0, "Sampler": "DPM++ 2M", "Clip skip": None,
         "Denoising strength": 0.75},
    )
    assert text == (
        "a cat, sitting\n"
        "Negative prompt: blurry\n"
        'Steps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 42, Size: 512x768, Model: "my,model", '
        "Denoising strength: 0.75, Custom thing: x, Version: latentdiff 0.1.0"
    )


def test_format_parameters_leaves_out_an_empty_negative_prompt():
    text = format_parameters("dog", "", {"Steps": 1, "Sampler": "Euler", "Seed": 3})
    assert text == "dog\nSteps: 1, Sampler: Euler, Seed: 3"


def test_parse_reads_an_a1111_infotext():
    prompt, negative, params = parse_parameters(A1111)
    assert prompt == "masterpiece, 1girl, <lora:add_detail:0.5>\nsecond line of prompt"
    assert negative == "lowres, (worst quality:1.4)\nsecond negative line"
    assert params == {
        "Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7",
        "Seed": "123", "Size": "512x768", "Model hash": "6ce0161689",
        "Model": "v1-5-pruned-emaonly", "Lora hashes": "add_detail: 7c6bad76eb54", "Version": "v1.10.1",
    }


def test_parse_without_a_parameters_line():
    assert parse_parameters("just a prompt, nothing else") == ("just a prompt, nothing else", "", {})
    assert parse_parameters("p\nNegative prompt: n\n") == ("p", "n", {})
    assert parse_parameters("") == ("", "", {})


def test_parse_reads_template_lines_after_the_parameters_line():
    prompt, negative, params = parse_parameters(TEMPLATE)
    assert (prompt, negative) == ("a red cat", "ugly")
    assert params["Size"] == "512x512"
    assert params["Template"] == "a {red|blue}\ncat" and params["Negative Template"] == "{ugly|bad}"
    only_negative = parse_parameters("p\nSteps: 1, Sampler: x, Seed: 2\nNegative Template: n, m: 1")
    assert only_negative.params["Negative Template"] == "n, m: 1" and only_negative.prompt == "p"
    assert format_parameters(*parse_parameters(TEMPLATE)) == TEMPLATE


def test_a_long_line_without_pairs_reads_in_linear_time():
    """Not a speed claim, a hang guard: with A1111's unbounded key pattern this 200 kB line takes ~10 minutes
    (quadratic: 80 kB took 100 s on the 2-core AMD); keys bounded to 64 characters make it ~0.3 s."""
    import time
    start = time.perf_counter()
    assert parse_parameters("a " * 100_000).params == {}
    assert time.perf_counter() - start < 30


def test_a_repeated_key_keeps_its_last_value():
    assert parse_parameters("p\nSteps: 1, Seed: 2, Steps: 3").params == {"Steps": "3", "Seed": "2"}


@pytest.mark.parametrize("prompt, negative", [
    ("a, b: c", "x, y"),
    ('he said "hi", then: bye\nsecond line\n\n  indented third', "neg line 1\nneg: line 2"),
    ("  leading and trailing spaces  ", " neg with leading space"),
    ("", "only a negative"),
    ("", ""),
    ("unicode 猫, émigré \\ backslash", ""),
    ("ends with a newline\n", "Negative prompt"),
    ("{red|blue} cat", ""),  # starts like JSON, is not
])
def test_infotext_round_trip(prompt, negative):
    params = {"Steps": 30, "Sampler": "Euler a", "Seed": 7, "Size": "64x64",
              "Model": 'quote " inside, comma', "Note": "colon: here", "Tricky": '"starts with quote',
              "Multi line": "one\ntwo", "Padded": " pad ", "Empty": "", "Path/like-key": "a\\b",
              "CFG scale": 7.5, "Template": "a {b|c}\nd", "Negative Template": "e"}
    text = format_parameters(prompt, negative, params)
    assert parse_parameters(text) == (prompt, negative, {k: str(v) for k, v in params.items()})
    assert format_parameters(*parse_parameters(text)) == text  # and back again


@pytest.mark.parametrize("params, message", [
    ({"Steps": 1, "Seed": 2}, "at least 3"),
    ({"Steps": 1, "Seed": 2, "Template": "t"}, "at least 3"),  # templates are not pairs
    ({"Steps": 1, "Seed": 2, "Sampler": "x", "Bad: key": 1}, "Bad: key"),
    ({"Steps": 1, "Seed": 2, "Sampler": "x", "X": 1}, "'X'"),
    ({"Steps": 1, "Seed": 2, "Sampler": "x", "trailing ": 1}, "trailing "),
    ({"Steps": 1, "Seed": 2, "Sampler": "x", "K" * 65: 1}, "2 to 64 characters"),
    ({"Steps": 1, "Seed": 2, "Sampler": "x", "Template": "a\nNegative Template: b"}, "line 2 of the Template"),
])
def test_format_parameters_refuses_what_cannot_round_trip(params, message):
    with pytest.raises(InputError, match=message):
        format_parameters("p", "", params)


@pytest.mark.parametrize("prompt, negative, where", [
    ("fine\nNegative prompt: sneaky", "", "line 2 of the prompt"),
    ("fine", "ok\n  Negative prompt: twice", "line 2 of the negative prompt"),
])
def test_format_parameters_refuses_a_negative_prompt_marker_inside_a_prompt(prompt, negative, where):
    with pytest.raises(InputError, match=where):
        format_parameters(prompt, negative, {"Steps": 1, "Seed": 2, "Sampler": "x"})


@pytest.mark.parametrize("text, tool", [
    (FOOOCUS, "Fooocus"),
    (json.dumps({"sui_image_params": {"prompt": "a cat", "seed": 1}}), "SwarmUI"),
    ('  {"prompt": "a cat", "steps": 20}', "a tool that is not A1111"),
    ('{"seed": ' + "9" * 5000 + "}", "a tool that is not A1111"),  # more digits than Python's int() takes
    ('{"a": ' + "[" * 100000 + "]" * 100000 + "}", None),  # deeper than Python's json goes: read as text
])
def test_json_parameters_are_named_never_read_as_a_prompt(text, tool):
    if tool is None:
        assert parse_parameters(text).prompt == text
        return
    with pytest.raises(InputError, match=f"JSON object written by {tool}, not A1111 text"):
        parse_parameters(text)


# ------------------------------------------------------------------------------------ fields

def test_to_fields_of_an_a1111_infotext():
    fields, unhonoured = to_fields(parse_parameters(A1111))
    assert fields == {
        "prompt": "masterpiece, 1girl, <lora:add_detail:0.5>\nsecond line of prompt",
        "negative_prompt": "lowres, (worst quality:1.4)\nsecond negative line",
        "steps": 20, "sampler": "DPM++ 2M", "schedule": "karras", "cfg_scale": 7.0, "seed": 123,
        "width": 512, "height": 768,
    }
    assert unhonoured == ["Lora hashes"]  # Model hash, Model, Version describe; they direct nothing
    assert isinstance(fields["cfg_scale"], float) and isinstance(fields["steps"], int)


def test_an_old_combined_sampler_name_is_split():
    fields, unhonoured = to_fields(parse_parameters(A1111_OLD))
    assert (fields["sampler"], fields["schedule"]) == ("DPM++ 2M", "karras")
    assert (fields["cfg_scale"], fields["seed"], fields["clip_skip"]) == (6.5, 3607441060, 2)
    assert (fields["width"], fields["height"]) == (768, 512) and unhonoured == []


def test_hires_fields_and_their_denoising_strength_are_replayed():
    fields, unhonoured = to_fields(parse_parameters(HIRES))
    assert fields["sampler"] == "Euler a" and fields["schedule"] is None  # Automatic
    assert fields["strength"] == 0.7  # the second pass's
    assert (fields["enable_hr"], fields["hr_scale"], fields["hr_second_pass_steps"], fields["hr_upscaler"]) == \
        (True, 2.0, 10, "Latent")
    assert unhonoured == ["TI hashes"]


def test_denoising_strength_without_hires_is_the_img2img_strength():
    fields, unhonoured = to_fields(parse_parameters(IMG2IMG))
    assert fields["strength"] == 0.4 and fields["sampler"] == "DDIM" and unhonoured == []


def test_template_lines_describe_and_are_not_warned_about():
    fields, unhonoured = to_fields(parse_parameters(TEMPLATE))
    assert fields["prompt"] == "a red cat" and fields["negative_prompt"] == "ugly" and unhonoured == []


def test_stable_diffusion_cpp_infotext():
    fields, unhonoured = to_fields(parse_parameters(SD_CPP))
    assert (fields["sampler"], fields["schedule"]) == ("DPM++ 2M", "karras")
    assert (fields["cfg_scale"], fields["eta"], fields["seed"]) == (7.0, 0.0, 42)
    assert unhonoured == ["Guidance", "RNG"]


def test_missing_keys_leave_their_fields_to_the_request_defaults():
    fields, unhonoured = to_fields(parse_parameters(MINIMAL))
    assert fields == {"prompt": "just a prompt", "negative_prompt": "", "steps": 12, "seed": 3}
    assert unhonoured == []


@pytest.mark.parametrize("written, sampler", [
    ("euler_a", "Euler a"), ("euler", "Euler"), ("heun", "Heun"), ("dpm2", "DPM2"),
    ("dpm++2s_a", "DPM++ 2S a"), ("dpm++2m", "DPM++ 2M"), ("lcm", "LCM"),
    ("dpm++ 2m", "DPM++ 2M"), ("EULER A", "Euler a"),  # A1111's names in another case
])
def test_sampler_names_of_other_tools_become_a1111_names(written, sampler):
    fields, _ = to_fields(parse_parameters(f"p\nSteps: 1, Sampler: {written}, Seed: 2"))
    assert (fields["sampler"], fields["schedule"]) == (sampler, None)


@pytest.mark.parametrize("written", ["dpm++2mv2", "ipndm", "ipndm_v", "tcd", "DPM++ 3M SDE Karras"])
def test_sampler_names_without_an_a1111_twin_are_kept_for_the_registry_to_name(written):
    fields, _ = to_fields(parse_parameters(f"p\nSteps: 1, Sampler: {written}, Seed: 2"))
    assert fields["sampler"] == written
    with pytest.raises(InputError, match=re.escape(repr(written))):
        resolve_sampler(fields["sampler"])


@pytest.mark.parametrize("label, schedule", [
    ("Karras", "karras"), ("Exponential", "exponential"), ("SGM Uniform", "sgm_uniform"),
    ("Simple", "simple"), ("Normal", "normal"), ("Uniform", "normal"), ("DDIM", "ddim_uniform"),
    ("Automatic", None), ("karras", "karras"),
])
def test_schedule_type_labels(label, schedule):
    fields, _ = to_fields(parse_parameters(f"p\nSteps: 1, Sampler: Euler, Schedule type: {label}, Seed: 2"))
    assert fields["schedule"] == schedule


def test_an_unknown_schedule_is_kept_for_the_registry_to_name():
    fields, _ = to_fields(parse_parameters("p\nSteps: 1, Sampler: Euler, Schedule type: Align Your Steps"))
    assert fields["schedule"] == "Align Your Steps"
    with pytest.raises(InputError, match="unknown schedule 'Align Your Steps'"):
        make_sigmas(fields["schedule"], 4, torch.linspace(0.99, 0.01, 1000))


@pytest.mark.parametrize("pair, message", [
    ("Steps: twenty", "'Steps' is 'twenty': expected a whole number"),
    ("Steps: ", "'Steps' is '': expected a whole number"),
    ("Seed: 12.5", "'Seed' is '12.5': expected a whole number"),
    ("CFG scale: nan", "'CFG scale' is 'nan': expected a number"),
    ('CFG scale: "7,5"', "'CFG scale' is '7,5': expected a number"),
    ("Clip skip: ٣", "'Clip skip' is '٣'"),  # a digit to Python's int(), not to the format
    ("Size: 512", "'Size' is '512': expected WIDTHxHEIGHT"),
    ("Size: 512x", "'Size' is '512x'"),
    ("Size: 0x512", "'Size' is '0x512'"),
    ("Sampler: ", "'Sampler' is empty"),
    ("Schedule type: ", "'Schedule type' is empty"),
    ("Denoising strength: 1e999", "'Denoising strength' is '1e999'"),
    ("Steps: " + "9" * 5000, "'Steps' is '9999"),  # int() itself would raise ValueError past 4300 digits
    ("Size: 1x" + "9" * 5000, "'Size' is '1x9999"),
])
def test_malformed_values_name_the_key_and_the_value(pair, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(")):
        to_fields(parse_parameters(f"p\nSteps: 1, Seed: 2, Model: m, {pair}"))


def test_from_fields_writes_a1111_text():
    text = from_fields({"prompt": "a cat", "negative_prompt": "", "steps": 20, "sampler": "DPM++ 2M",
                        "schedule": "karras", "cfg_scale": 7.0, "seed": 1, "width": 512, "height": 768,
                        "clip_skip": 1, "eta": None},
                       {"Model hash": "6ce0161689", "Version": "latentdiff 0.1"})
    assert text == ("a cat\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, "
                    "Size: 512x768, Model hash: 6ce0161689, Version: latentdiff 0.1")


@pytest.mark.parametrize("text", REAL)
def test_fields_survive_writing_and_reading_again(text):
    fields, _ = to_fields(parse_parameters(text))
    assert to_fields(parse_parameters(from_fields(fields, {"Version": "test"}))) == (fields, [])


@pytest.mark.parametrize("fields, message", [
    ({"steps": 1, "seed": 2, "sampler": "x", "batch_size": 2}, r"unknown field\(s\) \['batch_size'\]"),
    ({"steps": 1, "seed": 2, "sampler": "x", "width": 64}, "width and height together"),
])
def test_from_fields_refuses(fields, message):
    with pytest.raises(InputError, match=message):
        from_fields(fields)


# ------------------------------------------------------------------------------------ fuzz

TOKENS = [",", ", ", '"', '\\"', ":", ": ", "\n", "\r\n", "Negative prompt:", "Template: ", "Negative Template:",
          "Steps: ", "Size: ", "x", "Sampler: ", "Schedule type: ", "CFG scale: ", "Hires upscale: 2, ",
          "é", "猫", "\u202e", "\x00", "\t", "{", "}", "[", "1e309", "-", ".", "0", "9" * 30, "9" * 5000, " Karras", "Automatic"]


def mutate(text: str, rng: random.Random) -> str:
    for _ in range(rng.randint(1, 4)):
        at = rng.randint(0, len(text))
        kind = rng.randrange(5)
        if kind == 0:  # delete a span
            text = text[:at] + text[at + rng.randint(1, 12):]
        elif kind == 1:  # insert a token
            text = text[:at] + rng.choice(TOKENS) + text[at:]
        elif kind == 2:  # truncate
            text = text[:at]
        elif kind == 3:  # duplicate a pair of the parameters line
            pairs = text.rsplit("\n", 1)[-1].split(", ")
            text = text + ", " + rng.choice(pairs)
        else:  # a random unicode character
            text = text[:at] + chr(rng.randint(1, 0x2FFFF)) + text[at:]
    return text


FIELD_TYPES = {"prompt": str, "negative_prompt": str, "steps": int, "sampler": str, "schedule": (str, type(None)),
               "cfg_scale": float, "seed": int, "width": int, "height": int, "clip_skip": int, "eta": float,
               "strength": float, "enable_hr": bool, "hr_scale": float, "hr_resize_x": int, "hr_resize_y": int,
               "hr_upscaler": str, "hr_second_pass_steps": int, "hr_sampler_name": str, "hr_scheduler": str, "hr_prompt": str,
               "hr_negative_prompt": str}


def test_mutated_infotexts_give_fields_or_an_input_error_and_nothing_else():
    """3000 seeded mutations of the real infotexts above (and the Fooocus JSON): parsing and mapping return
    typed fields or raise InputError, never another exception; fields that can be written read back equal."""
    rng = random.Random(20261201)
    outcomes = {"fields": 0, "refused": 0, "round trips": 0}
    for case in range(3000):
        text = mutate(rng.choice(REAL + (FOOOCUS,)), rng)
        try:
            fields, unhonoured = to_fields(parse_parameters(text))
        except InputError:
            outcomes["refused"] += 1
            continue
        outcomes["fields"] += 1
        assert all(isinstance(fields[name], FIELD_TYPES[name]) for name in fields), (case, text, fields)
        assert all(isinstance(key, str) for key in unhonoured)
        try:
            again = from_fields(fields, {"Version": "test"})
        except InputError:
            continue  # e.g. a prompt line now starts with "Negative prompt:" after leading spaces
        assert to_fields(parse_parameters(again))[0] == fields, (case, text)
        outcomes["round trips"] += 1
    assert min(outcomes.values()) > 300, outcomes  # every path exercised, not only one


# ------------------------------------------------------------------------------------ PNG files

def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with(tmp_path, name: str, *chunks: bytes, after_pixels: bool = False) -> str:
    """A plain PNG with extra chunks spliced in right after IHDR (or just before IEND)."""
    plain = save_png(Image.new("RGB", (8, 8)), tmp_path / "plain", name, None).read_bytes()
    assert plain[12:16] == b"IHDR" and plain.endswith(b"IEND\xaeB`\x82")
    extra = b"".join(chunks)
    data = plain[:-12] + extra + plain[-12:] if after_pixels else plain[:33] + extra + plain[33:]
    path = tmp_path / f"{name}.png"
    path.write_bytes(data)
    return path


PARAMS = "a red fox, snow\nNegative prompt: blurry\nSteps: 20, Sampler: Euler, Seed: 1"


def test_reads_what_save_png_writes(tmp_path):
    for text in (PARAMS, "一只猫, ☃\nSteps: 1, Sampler: x, Seed: 2"):  # tEXt, then iTXt
        assert read_png_parameters(save_png(Image.new("RGB", (8, 8)), tmp_path, "x", text)) == text


@pytest.mark.parametrize("kind, body", [
    ("tEXt", b"parameters\x00" + PARAMS.encode("latin-1")),
    ("zTXt", b"parameters\x00\x00" + zlib.compress(PARAMS.encode("latin-1"))),
    ("iTXt", b"parameters\x00\x00\x00\x00\x00" + PARAMS.encode("utf-8")),
    ("iTXt", b"parameters\x00\x01\x00en\x00parameters\x00" + zlib.compress(PARAMS.encode("utf-8"))),
])
def test_every_text_chunk_kind_is_read(tmp_path, kind, body):
    assert read_png_parameters(png_with(tmp_path, kind, png_chunk(kind.encode(), body))) == PARAMS


def test_parameters_after_the_pixel_data_are_found_too(tmp_path):
    # Some writers put text chunks after IDAT; plain PIL finds them, so must we.
    path = png_with(tmp_path, "late", png_chunk(b"tEXt", b"parameters\x00" + PARAMS.encode("latin-1")),
                    after_pixels=True)
    assert path.read_bytes().index(b"IDAT") < path.read_bytes().index(b"tEXtparameters")
    assert read_png_parameters(path) == PARAMS


def test_utf8_bytes_in_a_text_chunk_are_read_as_utf8_and_latin1_stays_latin1(tmp_path):
    utf8 = png_with(tmp_path, "utf8", png_chunk(b"tEXt", "parameters\x00猫 café".encode("utf-8")))
    assert read_png_parameters(utf8) == "猫 café"
    latin1 = png_with(tmp_path, "latin1", png_chunk(b"tEXt", "parameters\x00café".encode("latin-1")))
    assert read_png_parameters(latin1) == "café"


COMFY_PROMPT = json.dumps({"3": {"class_type": "KSampler", "inputs": {"seed": 1, "steps": 20}}})


@pytest.mark.parametrize("chunks, message", [
    ([(b"prompt", COMFY_PROMPT), (b"workflow", json.dumps({"nodes": [], "links": []}))],
     "was made by ComfyUI; its workflow cannot be replayed as A1111 parameters"),
    ([(b"workflow", json.dumps({"nodes": []}))], "made by ComfyUI"),
    ([(b"invokeai_metadata", json.dumps({"positive_prompt": "a cat"}))], "made by InvokeAI"),
    ([(b"Software", "NovelAI"), (b"Description", "a cat")], "made by NovelAI; its metadata"),
    ([(b"prompt", "a plain-text prompt chunk")], "carries no 'parameters' text chunk"),
    ([], "carries no 'parameters' text chunk"),
    ([(b"parameters", "")], "carries an empty 'parameters' text chunk"),
])
def test_pngs_without_a1111_parameters_say_why(tmp_path, chunks, message):
    path = png_with(tmp_path, "foreign", *(png_chunk(b"tEXt", key + b"\x00" + value.encode()) for key, value in chunks))
    with pytest.raises(InputError, match=message):
        read_png_parameters(path)


def test_a_comfyui_png_that_also_carries_a1111_parameters_is_read(tmp_path):
    path = png_with(tmp_path, "both", png_chunk(b"tEXt", b"prompt\x00" + COMFY_PROMPT.encode()),
                    png_chunk(b"tEXt", b"parameters\x00" + PARAMS.encode()))
    assert read_png_parameters(path) == PARAMS


def test_read_png_parameters_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_png_parameters(tmp_path / "missing.png")
    text_file = tmp_path / "text.png"
    text_file.write_text("hello")
    with pytest.raises(InputError, match="not an image"):
        read_png_parameters(text_file)
    with pytest.raises(InputError, match="is a folder"):
        read_png_parameters(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "photo.jpg")
    with pytest.raises(InputError) as error:
        read_png_parameters(tmp_path / "photo.jpg")
    assert str(error.value).startswith(f"{tmp_path / 'photo.jpg'} is a JPEG image, not a PNG: ")
    bomb = png_chunk(b"zTXt", b"parameters\x00\x00" + zlib.compress(b"a" * 50_000_000))  # 49 kB -> 50 MB
    with pytest.raises(InputError, match="bomb.png .*MAX_TEXT_CHUNK"):
        read_png_parameters(png_with(tmp_path, "bomb", bomb))
    good = save_png(Image.new("RGB", (8, 8)), tmp_path, "cut", PARAMS).read_bytes()
    (tmp_path / "cut.png").write_bytes(good[:40])  # cut inside the text chunk
    with pytest.raises(InputError, match="cut.png"):
        read_png_parameters(tmp_path / "cut.png")


def test_infotext_is_a_tuple_of_three():
    info = parse_parameters(MINIMAL)
    assert isinstance(info, Infotext) and info == ("just a prompt", "", {"Steps": "12", "Seed": "3", "Model": "x"})


# ------------------------------------------------------------------------------------ the CLI's replay

@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from tiny import SD1, tiny_model

    from latentdiff.loader import save_model
    return save_model(tiny_model(SD1), tmp_path_factory.mktemp("model") / "tiny.safetensors")


def cli(argv, capsys):
    from latentdiff.cli import main
    status = main([str(a) for a in argv])
    out = capsys.readouterr()
    return status, out.out.splitlines(), out.err.splitlines()


@pytest.mark.usefixtures("single_thread")
def test_from_png_replays_a_foreign_infotext_and_names_what_it_cannot_honour_once(tmp_path, model_file, capsys):
    foreign = ("a red circle\nNegative prompt: blurry\nSteps: 2, Sampler: dpm++2m karras, CFG scale: 5.000000, "
               "Seed: 7, Size: 64x64, Model: other, Hires upscale: 2, Hires steps: 4, Denoising strength: 0.5, "
               'Lora hashes: "add_detail: 7c6bad76eb54", Version: v1.10.1')
    source = save_png(Image.new("RGB", (64, 64)), tmp_path, "foreign", foreign)
    status, out, err = cli(["txt2img", "--from-png", source, "--model", model_file, "--dtype", "fp32", "--quiet",
                            "-o", tmp_path / "out"], capsys)
    assert status == 0 and err == []
    notes = [line for line in out if line.startswith("note:")]
    assert notes == ["note: --from-png: not replayed (latentdiff cannot honour them): Lora hashes"]
    fields, _ = to_fields(parse_parameters(read_png_parameters(tmp_path / "out" / "7.png")))
    assert fields["schedule"] == "karras"  # split from the combined name, replayed
    assert (fields["prompt"], fields["negative_prompt"], fields["sampler"], fields["steps"]) == \
        ("a red circle", "blurry", "DPM++ 2M", 2)
    assert (fields["cfg_scale"], fields["seed"], fields["width"], fields["height"]) == (5.0, 7, 64, 64)
    assert (fields["hr_scale"], fields["hr_second_pass_steps"], fields["strength"]) == (2.0, 4, 0.5)  # hires replayed
    with Image.open(tmp_path / "out" / "7.png") as made:
        assert made.size == (128, 128)


@pytest.mark.parametrize("make, message", [
    (lambda d: png_with(d, "comfy", png_chunk(b"tEXt", b"prompt\x00" + COMFY_PROMPT.encode())),
     "comfy.png was made by ComfyUI; its workflow cannot be replayed as A1111 parameters"),
    (lambda d: save_png(Image.new("RGB", (8, 8)), d, "fooocus", FOOOCUS),
     "fooocus.png: the parameters are a JSON object written by Fooocus"),
    (lambda d: save_png(Image.new("RGB", (8, 8)), d, "size", "p\nSteps: 2, Seed: 1, Size: 64"),
     "size.png: parameter 'Size' is '64': expected WIDTHxHEIGHT"),
    (lambda d: save_png(Image.new("RGB", (8, 8)), d, "cfg", "p\nSteps: 2, Seed: 1, CFG scale: x"),
     "cfg.png: parameter 'CFG scale' is 'x': expected a number"),
])
def test_from_png_of_a_foreign_png_is_one_clear_line(tmp_path, model_file, capsys, make, message):
    status, out, err = cli(["txt2img", "--from-png", make(tmp_path), "--model", model_file, "-o", tmp_path / "out"],
                           capsys)
    assert status == 2 and len(err) == 1 and err[0].startswith("latentdiff: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_info_of_a_comfyui_png_says_so(tmp_path, capsys):
    path = png_with(tmp_path, "comfy", png_chunk(b"tEXt", b"workflow\x00" + b'{"nodes": []}'))
    status, _, err = cli(["info", path], capsys)
    assert status == 2 and err == [f"latentdiff: error: {path} was made by ComfyUI; its workflow cannot be "
                                   "replayed as A1111 parameters"]
