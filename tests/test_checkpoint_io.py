"""Checkpoint file layer: safe reading of every format, each error path, strict loading, atomic saving."""

import builtins
import json
import logging
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import latentdiff.checkpoint as ckpt
from latentdiff.checkpoint import (ORIGINAL_PREFIXES, checkpoint_format, load_strict, read_state_dict,
                                   safetensors_metadata, save_safetensors, split_prefixed)
from latentdiff.errors import CheckpointError, InputError


def tensors():
    g = torch.Generator().manual_seed(0)
    return {"a.weight": torch.randn(4, 3, generator=g), "a.bias": torch.randn(4, generator=g),
            "steps": torch.arange(5)}


def assert_same(got, want):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def raises(path, *fragments):
    """read_state_dict(path) raises a CheckpointError whose message names the file and each fragment."""
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- reading: the good formats ------------------------------------------------------------------


def test_safetensors_read_back_equal_with_metadata(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file(tensors(), path, metadata={"format": "pt", "note": "hi"})
    assert checkpoint_format(path) == "safetensors"
    assert_same(read_state_dict(path), tensors())
    assert safetensors_metadata(path) == {"format": "pt", "note": "hi"}


def test_content_decides_not_extension(tmp_path):
    path = tmp_path / "actually_safetensors.ckpt"
    save_file(tensors(), path)
    assert checkpoint_format(path) == "safetensors"
    assert_same(read_state_dict(path), tensors())


@pytest.mark.parametrize("wrapped", [True, False])
def test_zip_ckpt_with_and_without_state_dict_wrapper(tmp_path, wrapped):
    path = tmp_path / "m.ckpt"
    obj = {"state_dict": tensors(), "global_step": 470000, "epoch": 3} if wrapped else tensors()
    torch.save(obj, path)
    assert checkpoint_format(path) == "torch-zip"
    assert_same(read_state_dict(path), tensors())
    assert safetensors_metadata(path) == {}


def test_top_level_non_tensor_entries_are_dropped(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({**tensors(), "global_step": 7, "name": "x"}, path)
    assert_same(read_state_dict(path), tensors())


def test_legacy_pickle(tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": tensors(), "global_step": 1}, path, _use_new_zipfile_serialization=False)
    assert checkpoint_format(path) == "torch-pickle"
    assert_same(read_state_dict(path), tensors())


@pytest.mark.parametrize("name", ["m.safetensors", "m.ckpt"])
def test_dtype_casts_floats_only(tmp_path, name):
    path = tmp_path / name
    (save_file if name.endswith("safetensors") else torch.save)(tensors(), path)
    got = read_state_dict(path, dtype=torch.float16)
    assert got["a.weight"].dtype == torch.float16 and got["steps"].dtype == torch.int64
    assert torch.equal(got["a.weight"], tensors()["a.weight"].half())
    with pytest.raises(InputError, match="floating-point"):
        read_state_dict(path, dtype=torch.int8)


# --- reading: error paths -----------------------------------------------------------------------


def test_missing_file(tmp_path):
    raises(tmp_path / "nope.safetensors", "does not exist")


def test_folder_instead_of_file(tmp_path):
    raises(tmp_path, "folder")


def test_empty_file(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"")
    raises(path, "empty")


def test_git_lfs_pointer(tmp_path):
    path = tmp_path / "v1-5.safetensors"
    path.write_text("version https://git-lfs.github.com/spec/v1\n"
                    "oid sha256:" + "0" * 64 + "\nsize 4265380512\n")
    raises(path, "git-LFS pointer", "git lfs pull")


@pytest.mark.parametrize("keep", ["half the data", "half the header"])
def test_truncated_safetensors(tmp_path, keep):
    full = tmp_path / "full.safetensors"
    save_file(tensors(), full)
    data = full.read_bytes()
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    cut = header_end + (len(data) - header_end) // 2 if keep == "half the data" else header_end // 2
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    raises(path, "truncated", "download")


def test_safetensors_with_garbage_header(tmp_path):
    path = tmp_path / "m.safetensors"
    junk = b"{not json at all}"
    path.write_bytes(struct.pack("<Q", len(junk)) + junk)
    raises(path, "damaged safetensors header")


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_ckpt(tmp_path, zip_format):
    full = tmp_path / "full.ckpt"
    torch.save({"state_dict": tensors()}, full, _use_new_zipfile_serialization=zip_format)
    path = tmp_path / "cut.ckpt"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    raises(path, "damaged", "truncated")


@pytest.mark.parametrize("zip_format", [True, False])
def test_pickle_disguised_as_safetensors_is_refused(tmp_path, zip_format):
    path = tmp_path / "model.safetensors"
    torch.save(tensors(), path, _use_new_zipfile_serialization=zip_format)
    raises(path, "named .safetensors but holds a PyTorch pickle")


def test_disguised_malicious_pickle_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.safetensors"
    path.write_bytes(pickle.dumps({"w": Payload(builtins.open, (str(marker), "w"))}, protocol=2))
    raises(path, "named .safetensors but holds a PyTorch pickle")
    assert not marker.exists()


@pytest.mark.parametrize("content,what", [
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "png"),
    (b"hello, this is a text file and not weights\n", "text"),
    (b"<!DOCTYPE html><html>404</html>", "html")])
def test_neither_format(tmp_path, content, what):
    path = tmp_path / f"{what}.ckpt"
    path.write_bytes(content)
    raises(path, "is not a checkpoint", ".safetensors", "torch.save")


def test_safetensors_without_tensors(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, path)
    raises(path, "holds no tensors")


def test_ckpt_without_tensors(tmp_path):
    path = tmp_path / "steps.ckpt"
    torch.save({"global_step": 5, "state_dict": {}}, path)
    raises(path, "holds no tensors")


def test_ckpt_that_is_not_a_dict(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([torch.ones(2)], path)
    raises(path, "holds a list", "state dict")


# --- malicious pickles ----------------------------------------------------------------------------


class Payload:
    """Pickles as a call of `function(*args)`: what a malicious checkpoint runs on an unsafe load."""

    def __init__(self, function, args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


PAYLOADS = {  # name in the refusal message: the payload
    "open": lambda marker: (builtins.open, (str(marker), "w")),
    "eval": lambda marker: (builtins.eval, (f"open({str(marker)!r}, 'w')",)),
    "system": lambda marker: (os.system, (f"touch '{marker}'",)),
}


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload, zip_format):
    # The payload is real: an unsafe load does create the marker.
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Payload(*PAYLOADS[payload](proof))))
    assert proof.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    evil = {"state_dict": {"w": torch.ones(2)}, "x": Payload(*PAYLOADS[payload](marker))}
    torch.save(evil, path, _use_new_zipfile_serialization=zip_format)
    message = raises(path, "refused", payload, "safetensors")
    assert not marker.exists()
    assert "\x1b" not in message  # torch's terminal colour codes are not passed on


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("zip_format", [True, False])
def test_code_calling_pickle_is_refused_at_any_protocol_without_warnings(tmp_path, protocol, zip_format, recwarn):
    """torch's weights-only reader stops at protocol 4's FRAME opcode before it sees the global, and warns on
    every protocol but 2; the refusal still names what the pickle calls, and no warning reaches the user."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    evil = {"state_dict": {"w": torch.ones(2)}, "x": Payload(*PAYLOADS["system"](marker))}
    torch.save(evil, path, _use_new_zipfile_serialization=zip_format, pickle_protocol=protocol)
    raises(path, "refused to load: this pickle calls posix.system", "safetensors")
    assert not marker.exists()
    assert not recwarn.list, [str(w.message) for w in recwarn.list]


def test_protocol_4_pickle_without_code_says_why_it_cannot_be_read(tmp_path, recwarn):
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors()}, path, _use_new_zipfile_serialization=False, pickle_protocol=4)
    message = raises(path, "cannot read this PyTorch checkpoint safely", "protocol (4 or later)", "safetensors")
    assert "damaged" not in message and not recwarn.list


# --- memory: reading safetensors maps the file, it does not copy it ------------------------------


def resident_bytes():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RSS via /proc is Linux only")
def test_safetensors_read_is_lazy(tmp_path):
    # A 200 MiB file written by hand in 1 MiB chunks, so the test itself never holds it in memory.
    count, numel = 50, 1 << 20  # 50 tensors of 4 MiB (fp32)
    header = {f"t{i}": {"dtype": "F32", "shape": [numel], "data_offsets": [i * 4 * numel, (i + 1) * 4 * numel]}
              for i in range(count)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "big.safetensors"
    chunk = torch.full((1 << 18,), 1.5).numpy().tobytes()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in range(count * 4):
            f.write(chunk)
    size = path.stat().st_size

    before = resident_bytes()
    sd = read_state_dict(path)
    grown = resident_bytes() - before
    # An eager read would add the whole 200 MiB; 32 MiB leaves room for the parsed header, Python
    # objects and allocator noise while still failing if even a sixth of the file were copied.
    assert grown < 32 * 2**20, f"reading grew RSS by {grown / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB file"

    # Control: touching every tensor does show up in RSS, so the measurement above can see a copy.
    assert all(float(t.sum()) == 1.5 * numel for t in sd.values())
    assert resident_bytes() - before > size // 2


# --- load_strict ----------------------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.register_buffer("ids", torch.arange(5))


def tiny_state():
    g = torch.Generator().manual_seed(1)
    return {"proj.weight": torch.randn(4, 3, generator=g), "proj.bias": torch.randn(4, generator=g),
            "norm.weight": torch.randn(4, generator=g), "norm.bias": torch.randn(4, generator=g),
            "ids": torch.arange(5) + 10}


def test_load_strict_loads_all_and_assigns_without_copy():
    model, sd = Tiny(), tiny_state()
    load_strict(model, sd, where="tiny.safetensors")
    for key, value in model.state_dict().items():
        assert torch.equal(value, sd[key])
        assert value.data_ptr() == sd[key].data_ptr(), f"{key} was copied"


def test_load_strict_into_meta_module_with_dtype():
    with torch.device("meta"):
        model = Tiny()
    sd = tiny_state()
    load_strict(model, sd, where="tiny", dtype=torch.float16)
    assert model.proj.weight.device.type == "cpu" and model.proj.weight.dtype == torch.float16
    assert isinstance(model.proj.weight, nn.Parameter) and model.proj.weight.requires_grad
    assert torch.equal(model.proj.weight, sd["proj.weight"].half())
    assert model.ids.dtype == torch.int64 and torch.equal(model.ids, sd["ids"])  # integers never cast


def test_load_strict_casts_to_the_module_dtype_by_default():
    model, sd = Tiny(), {k: v.half() if v.is_floating_point() else v for k, v in tiny_state().items()}
    load_strict(model, sd, where="tiny")
    assert model.norm.bias.dtype == torch.float32 and torch.equal(model.norm.bias, sd["norm.bias"].float())


def test_load_strict_missing_key_names_first_key_and_shapes():
    model, sd = Tiny(), tiny_state()
    before = model.proj.bias.clone()
    del sd["proj.bias"], sd["norm.weight"]
    with pytest.raises(CheckpointError) as info:
        load_strict(model, sd, where="v1-5.safetensors (unet)")
    message = str(info.value)
    assert "v1-5.safetensors (unet)" in message and "'proj.bias'" in message and "(4,)" in message
    assert "norm.weight" not in message and "2 of 5" in message
    assert torch.equal(model.proj.bias, before)  # nothing was loaded


def test_load_strict_wrong_shape_names_key_and_both_shapes():
    model, sd = Tiny(), tiny_state()
    sd["norm.weight"] = torch.zeros(8)
    sd["proj.weight"] = torch.zeros(4, 7)
    with pytest.raises(CheckpointError) as info:
        load_strict(model, sd, where="x.ckpt")
    message = str(info.value)
    assert "x.ckpt" in message and "'proj.weight'" in message
    assert "expected (4, 3)" in message and "found (4, 7)" in message


def test_load_strict_hints_at_a_wrong_prefix():
    sd = {"model.diffusion_model." + k: v for k, v in tiny_state().items()}
    with pytest.raises(CheckpointError, match="keys look like 'model.diffusion_model.proj.weight'"):
        load_strict(Tiny(), sd, where="x")


def test_load_strict_ignores_extras_with_one_log_line(caplog):
    sd = tiny_state()
    sd.update({f"model_ema.w{i}": torch.zeros(1) for i in range(7)})
    sd["position_ids"] = torch.arange(3)
    caplog.set_level(logging.INFO, logger="latentdiff")
    model = Tiny()
    load_strict(model, sd, where="full-ema.ckpt")
    records = [r for r in caplog.records if r.name == "latentdiff"]
    assert len(records) == 1
    line = records[0].getMessage()
    assert "full-ema.ckpt" in line and " 8 " in line and "model_ema.w0" in line
    assert torch.equal(model.proj.weight, sd["proj.weight"])


def test_load_strict_rejects_integer_dtype():
    with pytest.raises(InputError, match="floating-point"):
        load_strict(Tiny(), tiny_state(), where="x", dtype=torch.int32)


# --- save_safetensors -----------------------------------------------------------------------------


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def test_save_round_trip_with_metadata(tmp_path):
    path = tmp_path / "out.safetensors"
    sd = tensors()
    sd["t"] = torch.randn(3, 5).t()  # non-contiguous
    assert save_safetensors(sd, str(path), metadata={"source": "test"}) == path
    assert_same(read_state_dict(path), {k: v.contiguous() for k, v in sd.items()})
    assert safetensors_metadata(path) == {"source": "test"}
    assert listing(tmp_path) == ["out.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not a private temp file


def test_save_tensors_sharing_memory(tmp_path):
    fused = torch.randn(6, 2)
    q, k, v = fused.chunk(3)
    sd = {"q": q, "k": k, "v": v, "tied_a": fused, "tied_b": fused}
    path = tmp_path / "shared.safetensors"
    save_safetensors(sd, path)
    assert_same(read_state_dict(path), {key: t.clone() for key, t in sd.items()})


def test_save_never_overwrites(tmp_path):
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"precious")
    with pytest.raises(CheckpointError, match="already exists.*overwrite=True"):
        save_safetensors(tensors(), path)
    assert path.read_bytes() == b"precious" and listing(tmp_path) == ["out.safetensors"]
    save_safetensors(tensors(), path, overwrite=True)
    assert_same(read_state_dict(path), tensors())


def test_save_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    def failing_writer(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", failing_writer)
    path = tmp_path / "out.safetensors"
    with pytest.raises(CheckpointError, match="No space left"):
        save_safetensors(tensors(), path)
    assert listing(tmp_path) == []


def test_save_interrupted_leaves_nothing(tmp_path, monkeypatch):
    def interrupted_writer(tensors, filename, metadata=None):
        open(filename, "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "save_file", interrupted_writer)
    with pytest.raises(KeyboardInterrupt):
        save_safetensors(tensors(), tmp_path / "out.safetensors")
    assert listing(tmp_path) == []


def test_save_does_not_clobber_a_file_that_appears_while_writing(tmp_path, monkeypatch):
    path = tmp_path / "out.safetensors"

    def racing_writer(tensors, filename, metadata=None):
        save_file(tensors, filename, metadata=metadata)
        path.write_bytes(b"someone else's")

    monkeypatch.setattr(ckpt, "save_file", racing_writer)
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_safetensors(tensors(), path)
    assert path.read_bytes() == b"someone else's" and listing(tmp_path) == ["out.safetensors"]


def test_save_bad_arguments(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        save_safetensors(tensors(), tmp_path / "no" / "such" / "dir.safetensors")
    with pytest.raises(InputError, match="'step'"):
        save_safetensors(tensors(), tmp_path / "a.safetensors", metadata={"step": 5})
    with pytest.raises(InputError, match="'n'.*int"):
        save_safetensors({"n": 5}, tmp_path / "b.safetensors")
    assert listing(tmp_path) == []


# --- split_prefixed -------------------------------------------------------------------------------


def test_split_prefixed():
    t = torch.zeros(1)
    sd = {"model.diffusion_model.out.2.weight": t, "first_stage_model.decoder.conv_in.bias": t,
          "cond_stage_model.transformer.text_model.final_layer_norm.weight": t,
          "model_ema.decay": t, "alphas_cumprod": t}
    parts = split_prefixed(sd, ORIGINAL_PREFIXES)
    assert parts == {"unet": {"out.2.weight": t}, "vae": {"decoder.conv_in.bias": t},
                     "text": {"transformer.text_model.final_layer_norm.weight": t},
                     "unused": {"model_ema.decay": t, "alphas_cumprod": t}}


def test_split_prefixed_longest_prefix_wins_and_reserved_name():
    t = torch.zeros(1)
    parts = split_prefixed({"a.b.x": t, "a.y": t}, {"outer": "a.", "inner": "a.b."})
    assert parts == {"outer": {"y": t}, "inner": {"x": t}, "unused": {}}
    with pytest.raises(InputError, match="'unused' is reserved"):
        split_prefixed({}, {"unused": "x."})


# --- meta reading (shapes and stored dtypes, no data) --------------------------------------------------


@pytest.mark.parametrize("kind", ["safetensors", "torch-zip"])
def test_meta_read_gives_stored_shapes_and_dtypes(tmp_path, kind):
    sd = tensors() | {"h": torch.ones(2, 2, dtype=torch.float16), "b": torch.ones(3, dtype=torch.bfloat16)}
    path = tmp_path / ("m.safetensors" if kind == "safetensors" else "m.ckpt")
    save_file(sd, path) if kind == "safetensors" else torch.save({"state_dict": sd}, path)
    got = read_state_dict(path, meta=True)
    assert got.keys() == sd.keys()
    assert all(t.device.type == "meta" and (t.shape, t.dtype) == (sd[k].shape, sd[k].dtype) for k, t in got.items())


def test_meta_read_refuses_an_unknown_header_dtype(tmp_path):
    header = json.dumps({"w": {"dtype": "F12", "shape": [2], "data_offsets": [0, 4]}}).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    with pytest.raises(CheckpointError, match=r"odd\.safetensors: tensor 'w' has an unknown or damaged dtype"):
        read_state_dict(path, meta=True)
