"""Personalisation on a tiny random SD 1.x model: textual inversion, LoRA and DreamBooth each lower the
denoising loss of the instance images, change nothing outside what they train, write a file that
latentdiff (and for LoRA, diffusers) loads with the outputs the training had, and resume exactly."""

import json
import logging

import pytest
import torch
from tiny import SD1, tiny_model

from latentdiff.checkpoint import read_state_dict
from latentdiff.formats.embeddings import read_embedding
from latentdiff.formats.lora import lora_deltas
from latentdiff.loader import load_model, save_model
from latentdiff.patches import apply_patches
from latentdiff.prompts import encode_prompts
from latentdiff.schedules import alphas_cumprod_for
from latentdiff.train import personal
from latentdiff.train.dreambooth import train_dreambooth
from latentdiff.train.lora import train_lora
from latentdiff.train.personal import Settings, denoising_mse, encode_images
from latentdiff.train.personal_data import read_examples
from latentdiff.train.shapes import make_sample
from latentdiff.train.textual_inversion import train_embedding


@pytest.fixture(scope="module")
def setup(tmp_path_factory, single_thread):
    root = tmp_path_factory.mktemp("personal")
    model = tiny_model(SD1)
    # In the random tiny U-Net the prompt barely moves the prediction (random contexts change the loss by
    # under 1%); the cross-attention path scaled 5x lets a learned embedding show in the loss (~2% in 12 steps).
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if ".attn2.to_v." in name or ".attn2.to_out." in name or ".proj_out." in name:
                p.mul_(5)
    base = save_model(model, root / "base.safetensors")
    images = root / "images"
    images.mkdir()
    for i in range(3):
        image, _, label = make_sample(0, i, 64, "heldout")
        image.save(images / f"{i}.png")
        (images / f"{i}.txt").write_text(f"a [name] on a {label['background']} background")
    return root, base, images


def settings(setup, name, token, **overrides) -> Settings:
    root, base, images = setup
    values = dict(images=images, output=root / f"{name}.safetensors", token=token, steps=12, lr=1e-2, batch_size=3,
                  base=base, mixed_precision="no", progress=False, log_every=1, save_every=4, sample_steps=1)
    return Settings(**(values | overrides))


@pytest.fixture
def captured(monkeypatch):
    """The Stage each run trained (its module holds the trained tensors and the run's model)."""
    stages = []
    run_stage = personal.run_stage

    def capture(stage, *args, **kwargs):
        stages.append(stage)
        return run_stage(stage, *args, **kwargs)

    monkeypatch.setattr(personal, "run_stage", capture)
    return stages


def fixed_loss(model, captions, images, embeddings=None, seed=0) -> float:
    """The mean denoising loss of the images under fixed noise at 8 timesteps spread over the schedule."""
    latents = encode_images(model, images, "cpu")
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    with torch.no_grad():
        context = encode_prompts(captions, model.tokenizer, model.text_encoder, 1, embeddings)
        for t in range(50, 1000, 125):
            noise = torch.randn(latents["mean"].shape, generator=generator)
            batch = {"latents": latents["mean"] * model.config.latent_scale, "noise": noise,
                     "timesteps": torch.full((len(images),), t)}
            total += float(denoising_mse(model.unet, batch, context, alphas_cumprod_for(model.config).float(),
                                         model.config.prediction).mean())
    return total / 8


def instance_data(setup, token):
    _, _, images = setup
    examples = read_examples(images, resolution=64, token=token)
    return [e.caption for e in examples], torch.stack([e.image for e in examples])


def assert_model_unchanged(model, base):
    # the run's model is fp32 on the CPU; the base file is the same fp32 weights
    saved = read_state_dict(base)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_textual_inversion_learns_the_word_and_writes_an_a1111_embedding(setup, captured):
    path = train_embedding(settings(setup, "gstar", "gstar", lr=0.2), init_word="star", vectors=2)
    (stage,) = captured
    assert_model_unchanged(stage.module.run["run"].model, setup[1])
    assert list(read_state_dict(path)) == ["emb_params"]
    embedding = read_embedding(path)  # latentdiff's loader: trigger word from the file name
    assert embedding.name == "gstar" and embedding.vectors.shape == (2, 32)
    assert torch.equal(embedding.vectors, stage.module.vectors.detach())

    model = load_model(setup[1])
    captions, images = instance_data(setup, "gstar")
    table = model.text_encoder.transformer.text_model.embeddings.token_embedding.weight
    star = model.tokenizer.token_ids(["star"])[0][0]
    initial = embedding.__class__("gstar", table[[star, star]].clone(), "a1111", "", path)
    before = fixed_loss(model, captions, images, {"gstar": initial})
    after = fixed_loss(model, captions, images, {"gstar": embedding})
    assert after < 0.99 * before, (before, after)
    record = json.loads((path.parent / "gstar-training" / "training.json").read_text())
    assert record["method"] == "embedding" and record["steps"] == 12 and record["bytes"] == path.stat().st_size
    assert (path.parent / "gstar-samples.png").is_file()
    assert len((path.parent / "gstar-training" / "logs" / "embedding.jsonl").read_text().splitlines()) == 12


def unet_outputs(model, context_seed=1):
    g = torch.Generator().manual_seed(context_seed)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    tokens = torch.randint(0, 1000, (2, 77), generator=g)
    with torch.no_grad():
        return model.unet(x, torch.tensor([500, 20]), context), model.text_encoder(tokens)


def test_lora_trains_only_adapters_and_its_file_loads_with_the_trained_outputs(setup, captured, tmp_path):
    path = train_lora(settings(setup, "lora", "sks star", lr=2e-2), rank=4, alpha=2.0,
                      targets=("attention", "ff", "conv", "text"))
    (stage,) = captured
    assert_model_unchanged(stage.module.run["run"].model, setup[1])
    network = stage.module.network
    assert any(k.startswith("lora_te_") for k in network.adapters) and any("conv" in k for k in network.adapters)

    # the network as trained (hooks on a fresh base model) against the file merged by latentdiff's loader
    hooked = load_model(setup[1])
    handles = network.attach(hooked)
    trained = unet_outputs(hooked)
    for handle in handles:
        handle.remove()
    merged = load_model(setup[1])
    plain = unet_outputs(merged)
    apply_patches(merged, lora_deltas(path, merged))
    ours = unet_outputs(merged)
    for a, b, p in zip(trained, ours, plain):
        assert (a - b).abs().max() <= 1e-4  # fp32; the merge reorders the sums
        assert (a - p).abs().max() > 1e-3  # the adapters learned something: the comparison means something

    captions, images = instance_data(setup, "sks star")
    assert fixed_loss(merged, captions, images) < 0.97 * fixed_loss(load_model(setup[1]), captions, images)


def test_diffusers_load_lora_weights_reads_the_trained_file(setup, tmp_path):
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft (the `test` extra)")
    from diffusers import StableDiffusionPipeline
    path = train_lora(settings(setup, "lora-diffusers", "sks star", lr=2e-2, steps=4), rank=4,
                      targets=("attention", "ff", "conv", "text"))
    folder = save_model(load_model(setup[1]), tmp_path / "folder")
    theirs = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                     local_files_only=True)
    theirs.load_lora_weights(str(path))
    g = torch.Generator().manual_seed(1)
    x, context = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    tokens = torch.randint(0, 1000, (2, 77), generator=g)
    with torch.no_grad():
        want = (theirs.unet(x, torch.tensor([500, 20]), encoder_hidden_states=context).sample,
                theirs.text_encoder(tokens).last_hidden_state)
    model = load_model(setup[1])
    plain = unet_outputs(model)
    apply_patches(model, lora_deltas(path, model))
    for ours, theirs_, before in zip(unet_outputs(model), want, plain):
        assert (ours - theirs_).abs().max() <= 1e-4  # fp32 activations
        assert (ours - before).abs().max() > 1e-3


def test_dreambooth_fits_the_instances_and_writes_a_checkpoint(setup, captured, tmp_path):
    folder = tmp_path / "db-diffusers"
    path = train_dreambooth(settings(setup, "db", "sks", lr=2e-3), class_word="star", class_images=2,
                            save_dtype="fp32", diffusers_folder=folder)
    (stage,) = captured
    root = path.parent
    assert sorted(p.name for p in (root / "db-training" / "class-images").iterdir()) == [
        "0000.png", "0000.txt", "0001.png", "0001.txt"]  # each image with its prompt
    trained, base = load_model(path), load_model(setup[1])
    for part in ("vae", "text_encoder"):  # not trained
        for (name, a), b in zip(getattr(trained, part).state_dict().items(), getattr(base, part).state_dict().values()):
            assert torch.equal(a, b), name
    from_folder = load_model(folder)
    assert all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(), from_folder.state_dict().values()))
    captions, images = instance_data(setup, "sks star")
    assert fixed_loss(trained, captions, images) < 0.97 * fixed_loss(base, captions, images)
    log = root / "db-training" / "logs" / "dreambooth.jsonl"
    logged = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"instance", "prior"} <= set(logged[0])  # both parts of the loss, logged


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method", ["embedding", "lora", "dreambooth"])
def test_resumed_run_equals_uninterrupted(setup, monkeypatch, method):
    # DreamBooth with everything a resume must restore: the prior's class images and draws, the EMA, dropout,
    # the optimizer's learning-rate groups and the identifier's vectors
    train = {"embedding": lambda s: train_embedding(s, init_word="star"), "lora": train_lora,
             "dreambooth": lambda s: train_dreambooth(s, class_word="star", class_images=2, prior_batch=2,
                                                      ema_decay=0.9, caption_dropout=0.3, save_dtype="fp32",
                                                      conv_lr_scale=0.5, train_identifier=True)}[method]

    def token(name):  # an embedding's token is its file name; a LoRA's is text in the captions: the same in both
        return name if method == "embedding" else "sks"

    whole = train(settings(setup, f"{method}-whole", token(f"{method}-whole"), steps=6))
    run_stage = personal.run_stage

    def crash_after_the_checkpoint(stage, *args, **kwargs):
        make_batch = stage.make_batch

        def batch(step, *rest):
            if step == 5:  # after the checkpoint at step 4
                raise Interrupt
            return make_batch(step, *rest)

        stage.make_batch = batch
        return run_stage(stage, *args, **kwargs)

    name = f"{method}-resumed"
    with monkeypatch.context() as patch:
        patch.setattr(personal, "run_stage", crash_after_the_checkpoint)
        with pytest.raises(Interrupt):
            train(settings(setup, name, token(name), steps=6))
    with pytest.raises(Exception, match="pass --resume"):
        train(settings(setup, name, token(name), steps=6))
    resumed = train(settings(setup, name, token(name), steps=6, resume=True))
    a, b = read_state_dict(whole), read_state_dict(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same ops, same data: bit for bit
    logs = [[json.loads(line)["loss"] for line in (p.parent / f"{p.stem}-training" / "logs" / f"{method}.jsonl")
             .read_text().splitlines()] for p in (whole, resumed)]
    assert logs[0] == logs[1] and len(logs[0]) == 6


# -- input checks -----------------------------------------------------------------------------------------

def test_input_folder_errors(setup, tmp_path):
    with pytest.raises(Exception, match="holds no images"):
        read_examples(tmp_path, resolution=64, token="x")
    (tmp_path / "a.png").write_bytes(b"not a png")
    with pytest.raises(Exception, match=r"a\.png is not an image PIL can read"):
        read_examples(tmp_path, resolution=64, token="x")
    (tmp_path / "a.png").unlink()
    make_sample(0, 0, 64)[0].save(tmp_path / "b.png")
    with pytest.raises(Exception, match=r"b\.png: the caption template '\[filewords\]' uses \[filewords\] but b\.txt"):
        read_examples(tmp_path, resolution=64, token="x", template="[filewords]")
    (tmp_path / "b.txt").write_text("a red circle")
    with pytest.raises(Exception, match=r"b\.png: its caption 'a red circle' does not contain 'x'"):
        read_examples(tmp_path, resolution=64, token="x")
    with pytest.raises(Exception, match="does not contain 'red c'"):  # a word of its own, as triggers are found
        read_examples(tmp_path, resolution=64, token="red c")
    (example,) = read_examples(tmp_path, resolution=64, token="x", template="[filewords], by [name]")
    assert example.caption == "a red circle, by x"


def test_images_of_other_sizes_are_scaled_and_centre_cropped(tmp_path, caplog):
    from PIL import Image
    wide = Image.new("RGB", (96, 48), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 12, 48))  # the left eighth blue: the centre crop (x 16-80 of 96) drops it
    wide.save(tmp_path / "wide.png")
    make_sample(0, 0, 64)[0].save(tmp_path / "square.png")
    with caplog.at_level(logging.INFO, logger="latentdiff"):
        examples = read_examples(tmp_path, resolution=64, token="x", template="a [name]")
    assert [e.image.shape for e in examples] == [(3, 64, 64)] * 2
    assert "1 of 2 images are not 64x64 (wide.png 96x48)" in caplog.text
    red = examples[1].image
    assert red[0].min() > 0.9 and red[1:].max() < -0.9  # all red, no blue left (LANCZOS rings a little)
    assert examples[0].caption == "a x"


def test_common_word_warns_and_a_rare_token_does_not(setup, caplog):
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        train_lora(settings(setup, "star", "star", steps=1, save_every=1))
    assert "the token 'star' is a common word" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="latentdiff"):
        train_lora(settings(setup, "sks", "sks", steps=1, save_every=1))
    assert "common word" not in caplog.text


def test_refusals(setup, tmp_path):
    root, base, images = setup
    inpaint = tiny_model(SD1.__class__(**{**SD1.__dict__, "unet": SD1.unet.__class__(**{**SD1.unet.__dict__,
                                                                                       "in_channels": 9})}))
    inpaint_file = save_model(inpaint, tmp_path / "inpaint.safetensors")
    with pytest.raises(Exception, match="takes 9 input channels .* use the base model"):
        train_lora(settings(setup, "x", "x", base=inpaint_file))
    with pytest.raises(Exception, match=r"name the output gstar\.safetensors"):
        train_embedding(settings(setup, "other", "gstar"))
    (root / "exists.safetensors").write_bytes(b"")
    with pytest.raises(Exception, match="already exists; latentdiff never overwrites"):
        train_lora(settings(setup, "exists", "x"))
    with pytest.raises(Exception, match="targets=mlp: choose among attention, ff, conv, text"):
        train_lora(settings(setup, "t", "x"), targets=("mlp",))


def test_cli_runs_and_maps_errors_to_one_line(setup, capsys):
    from latentdiff.cli import main
    root, base, images = setup
    out = root / "cli-lora.safetensors"
    assert main(["train", "lora", str(images), "-o", str(out), "--model", str(base), "--steps", "2",
                 "--batch-size", "3", "--mixed-precision", "no", "--sample-steps", "1", "--no-progress"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and out.is_file()
    assert main(["train", "embedding", str(root / "missing"), "-o", str(root / "m.safetensors"),
                 "--model", str(base)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a folder" in err
    with pytest.raises(SystemExit) as exit_:
        main(["train", "lora", str(images)])  # no -o
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "-o/--output" in err


def test_v_models_learn_diffusers_velocity():
    """SD 2.x 768-v models regress v = sqrt(abar) eps - sqrt(1 - abar) x0, diffusers' get_velocity."""
    from diffusers import DDPMScheduler
    from tiny import SD2_V
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=SD2_V.beta_start, beta_end=SD2_V.beta_end)
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(3, 4, 8, 8, generator=g), "noise": torch.randn(3, 4, 8, 8, generator=g),
             "timesteps": torch.tensor([0, 500, 999])}
    v = scheduler.get_velocity(batch["latents"], batch["noise"], batch["timesteps"])
    predicts_v = lambda x, t, context: v  # noqa: E731 - a "network" whose output is diffusers' v
    mse = denoising_mse(predicts_v, batch, None, alphas_cumprod_for(SD2_V).float(), "v")
    assert mse.max() < 1e-10
    eps_mse = denoising_mse(predicts_v, batch, None, alphas_cumprod_for(SD2_V).float(), "eps")
    assert eps_mse[2] > 0.5  # at t = 999, v is about -x0, far from eps: the target depends on the kind


def test_dreambooth_can_train_the_text_encoder_without_prior(setup, tmp_path):
    path = train_dreambooth(settings(setup, "db-text", "sks", lr=2e-3, steps=2), class_word="star", prior_weight=0,
                            train_text_encoder=True, save_dtype="fp32")
    assert not (path.parent / "db-text-training" / "class-images").exists()  # no prior loss, no class images
    trained, base = load_model(path), load_model(setup[1])
    changed = {part: any(not torch.equal(a, b) for a, b in zip(getattr(trained, part).state_dict().values(),
                                                                getattr(base, part).state_dict().values()))
               for part in ("unet", "text_encoder", "vae")}
    assert changed == {"unet": True, "text_encoder": True, "vae": False}


def test_lora_text_targets_skip_layers_the_model_never_runs():
    from tiny import SD2_V
    from latentdiff.train.lora import LoRANetwork
    network = LoRANetwork(tiny_model(SD2_V), ("text",), rank=2, alpha=2, seed=0)
    layers = {int(name.split("_layers_")[1].split("_")[0]) for name in network.adapters}
    assert layers == {0, 1}  # 3 layers, SD 2.x reads the penultimate: the last gets no gradient, no adapter
    assert len(network.adapters) == 2 * 6  # q, k, v, out, fc1, fc2
