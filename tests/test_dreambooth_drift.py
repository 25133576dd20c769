"""DreamBooth's guards against drift beyond the prior loss: caption dropout (a share of samples trains the
empty prompt, which classifier-free guidance subtracts), writing the moving average of the weights, more
class images per step, the convolutions at a lower learning rate, and the identifier's embedding learned
(and written into the token table) instead of the concept going into the U-Net alone."""

import json

import pytest
import torch
from test_train_personal import captured, settings, setup  # noqa: F401 - fixtures shared with the main tests

from latentdiff.errors import InputError
from latentdiff.loader import load_model
from latentdiff.prompts import encode_prompts
from latentdiff.schedules import alphas_cumprod_for
from latentdiff.train.dreambooth import train_dreambooth
from latentdiff.train.personal import denoising_mse
from latentdiff.unet import SpatialTransformer

PROMPTS = ("a red circle", "a blue square")


def test_dropped_samples_are_conditioned_on_the_empty_prompt(setup, captured):  # noqa: F811
    train_dreambooth(settings(setup, "db-dropout", "sks", steps=1), class_word="star", class_prompts=PROMPTS,
                     class_images=2, caption_dropout=0.5, save_dtype="fp32")
    (stage,) = captured
    module, run = stage.module, stage.module.run["run"]
    batch = stage.make_batch(0, 0, 3, torch.Generator().manual_seed(1))
    dropped = batch["dropped"].tolist()
    assert len(dropped) == 6 and any(dropped[:3]) and not all(dropped)  # instance and prior samples both drop

    def losses(prompts):
        context = encode_prompts(prompts, run.model.tokenizer, run.model.text_encoder, 1)
        mse = denoising_mse(run.model.unet, batch, context, alphas_cumprod_for(run.model.config).float(),
                            run.model.config.prediction)
        return float(mse[:3].mean()), float(mse[3:].mean())

    with torch.no_grad():
        _, parts = module(batch)
        prompts = [run.captions[i] for i in batch["index"].tolist()] + [PROMPTS[i % 2] for i in
                                                                        batch["class_index"].tolist()]
        expected = losses(["" if d else p for p, d in zip(prompts, dropped)])
        undropped = losses(prompts)
    # fp32 on the CPU, the same calls in the same order: equal to rounding
    assert (float(parts["instance"]), float(parts["prior"])) == pytest.approx(expected, rel=1e-5)
    assert abs(undropped[0] - expected[0]) > 1e-5 * expected[0]  # the empty prompt changes the loss


def test_with_ema_the_checkpoint_holds_the_average_not_the_last_weights(setup, captured):  # noqa: F811
    last = train_dreambooth(settings(setup, "db-last", "sks", steps=4), class_word="star", class_images=2,
                            save_dtype="fp32")
    averaged = train_dreambooth(settings(setup, "db-ema", "sks", steps=4), class_word="star", class_images=2,
                                save_dtype="fp32", ema_decay=0.5)
    shadow = captured[1].ema.state_dict()
    last, averaged = load_model(last).unet.state_dict(), load_model(averaged).unet.state_dict()
    assert all(torch.equal(averaged[k.removeprefix("unet.")], v) for k, v in shadow.items())  # fp32 written
    differ = [k for k in averaged if not torch.equal(averaged[k], last[k])]
    assert len(differ) > len(averaged) // 2  # the same steps and draws (no dropout), the average written instead


def test_prior_batch_draws_that_many_class_images_per_instance_image(setup, captured):  # noqa: F811
    train_dreambooth(settings(setup, "db-prior-batch", "sks", steps=1), class_word="star", class_prompts=PROMPTS,
                     class_images=4, prior_batch=3, save_dtype="fp32")
    (stage,) = captured
    batch = stage.make_batch(0, 0, 2, torch.Generator().manual_seed(1))
    assert len(batch["index"]) == 2 and len(batch["class_index"]) == 6 and len(batch["latents"]) == 8
    with torch.no_grad():
        loss, parts = stage.module(batch)
    # instance mean + prior_weight (1) x the mean over the 6 class samples
    assert float(loss) == pytest.approx(float(parts["instance"] + parts["prior"]), rel=1e-6)


def test_bad_values_are_refused_before_any_work(setup):  # noqa: F811
    for kwargs, message in (({"caption_dropout": 1.0}, "caption_dropout=1.0"), ({"ema_decay": 1.5}, "ema_decay=1.5"),
                            ({"prior_batch": 0}, "prior_batch=0"), ({"conv_lr_scale": -1}, "conv_lr_scale=-1"),
                            ({"identifier_lr": 0}, "identifier_lr=0"),
                            ({"train_identifier": True, "train_text_encoder": True}, "choose one")):
        with pytest.raises(InputError, match=message):
            train_dreambooth(settings(setup, "db-bad", "sks"), class_word="star", **kwargs)


def test_cli_flags_reach_the_run_and_bad_values_are_one_line(setup, tmp_path, capsys):  # noqa: F811
    from latentdiff.cli import main
    root, base, images = setup
    common = ["train", "dreambooth", str(images), "--model", str(base), "--token", "sks", "--class-word", "star",
              "--class-images", "2", "--steps", "1", "--batch-size", "3", "--mixed-precision", "no",
              "--sample-steps", "1", "--no-progress"]
    out = tmp_path / "cli-guarded.safetensors"
    assert main([*common, "-o", str(out), "--caption-dropout", "0.1", "--ema-decay", "0.99",
                 "--prior-batch", "2", "--conv-lr-scale", "0.25", "--train-identifier", "--identifier-lr", "0.01"]) == 0
    record = json.loads((tmp_path / "cli-guarded-training" / "training.json").read_text())
    assert (record["caption_dropout"], record["ema_decay"], record["prior_batch"]) == (0.1, 0.99, 2)
    assert (record["conv_lr_scale"], record["train_identifier"], record["identifier_lr"]) == (0.25, True, 0.01)
    capsys.readouterr()
    assert main([*common, "-o", str(tmp_path / "bad.safetensors"), "--ema-decay", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ema_decay=1.0" in err


def transformer_parameters(unet) -> set[str]:
    return {f"{name}.{p}" for name, m in unet.named_modules() if isinstance(m, SpatialTransformer)
            for p, _ in m.named_parameters()}


def test_conv_lr_scale_zero_trains_only_the_transformer_blocks(setup):  # noqa: F811
    out = train_dreambooth(settings(setup, "db-conv0", "sks", steps=2), class_word="star", class_images=2,
                           conv_lr_scale=0, save_dtype="fp32")
    base_model = load_model(setup[1])
    base, trained = base_model.unet.state_dict(), load_model(out).unet.state_dict()
    attention = transformer_parameters(base_model.unet)
    assert 0 < len(attention) < len(base)  # both groups hold parameters
    assert all(torch.equal(trained[k], base[k]) for k in base if k not in attention)  # AdamW at lr 0: untouched
    assert sum(not torch.equal(trained[k], base[k]) for k in attention) > len(attention) // 2


def test_a_learned_identifier_changes_its_token_rows_and_nothing_else_in_the_text_encoder(setup, captured):  # noqa: F811
    out = train_dreambooth(settings(setup, "db-identifier", "sks", steps=2), class_word="star", class_images=2,
                           train_identifier=True, identifier_lr=0.1, save_dtype="fp32")
    base_model, trained_model = load_model(setup[1]), load_model(out)
    base, trained = base_model.text_encoder.state_dict(), trained_model.text_encoder.state_dict()
    table = next(k for k in base if k.endswith("token_embedding.weight"))
    assert all(torch.equal(trained[k], base[k]) for k in base if k != table)
    ids = base_model.tokenizer.token_ids(["sks"])[0]
    changed = (trained[table] != base[table]).any(dim=1).nonzero().flatten().tolist()
    assert changed == sorted(ids)
    assert torch.equal(trained[table][ids], captured[0].module.identifier.detach())  # the vectors trained, written
    with torch.no_grad():  # a prompt without the identifier reads as before
        plain = [encode_prompts(["a red circle"], m.tokenizer, m.text_encoder, 1) for m in (base_model, trained_model)]
    assert torch.equal(*plain)
