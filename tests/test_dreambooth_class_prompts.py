"""DreamBooth's prior over several class prompts (--class-prompts): the class images are shared out among
the prompts in turn, each class image's prior loss is conditioned on its own prompt, and a changed prompt
list redraws only the images whose prompt changed."""

from types import SimpleNamespace

import pytest
import torch
from test_train_personal import captured, settings, setup  # noqa: F401 - fixtures shared with the main tests

from latentdiff.errors import InputError
from latentdiff.prompts import encode_prompts
from latentdiff.schedules import alphas_cumprod_for
from latentdiff.train import dreambooth
from latentdiff.train.dreambooth import class_images, read_class_prompts, train_dreambooth
from latentdiff.train.personal import denoising_mse

PROMPTS = ("a red circle", "a blue square")


def test_each_class_image_is_of_its_prompt_and_its_loss_conditioned_on_it(setup, captured):  # noqa: F811
    path = train_dreambooth(settings(setup, "db-prompts", "sks", lr=2e-3, steps=2), class_word="star",
                            class_prompts=PROMPTS, class_images=3, save_dtype="fp32")
    folder = path.parent / "db-prompts-training" / "class-images"
    assert [(folder / f"{i:04d}.txt").read_text() for i in range(3)] == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    (stage,) = captured
    module, run = stage.module, stage.module.run["run"]
    batch = stage.make_batch(0, 0, 3, torch.Generator().manual_seed(5))
    assert len(batch["class_index"]) == 3
    with torch.no_grad():
        _, parts = module(batch)

        def prior_loss(prompts):
            context = encode_prompts(list(run.captions[i] for i in batch["index"].tolist()) + prompts,
                                     run.model.tokenizer, run.model.text_encoder, 1)
            mse = denoising_mse(run.model.unet, batch, context, alphas_cumprod_for(run.model.config).float(),
                                run.model.config.prediction)
            return float(mse[3:].mean())

    own = [PROMPTS[i % 2] for i in batch["class_index"].tolist()]
    other = [PROMPTS[1 - i % 2] for i in batch["class_index"].tolist()]
    # fp32 on the CPU, the same calls in the same order: equal to rounding
    assert float(parts["prior"]) == pytest.approx(prior_loss(own), rel=1e-5)
    assert abs(prior_loss(other) - prior_loss(own)) > 1e-5 * prior_loss(own)  # the prompt matters to the loss


def test_a_changed_prompt_list_redraws_only_what_differs(setup, tmp_path, monkeypatch):  # noqa: F811
    drawn = []
    txt2img = dreambooth.Pipeline.txt2img

    def recording(self, prompt, **kwargs):
        drawn.append((prompt, kwargs["seed"]))
        return txt2img(self, prompt, **kwargs)

    monkeypatch.setattr(dreambooth.Pipeline, "txt2img", recording)
    accelerator = SimpleNamespace(is_main_process=True, device=torch.device("cpu"), wait_for_everyone=lambda: None)
    run = SimpleNamespace(work=tmp_path, accelerator=accelerator, settings=SimpleNamespace(base=setup[1]))
    first = class_images(run, PROMPTS, 2, 1, 7.0)
    assert drawn == [(PROMPTS[0], 0), (PROMPTS[1], 1)]
    again = class_images(run, PROMPTS, 2, 1, 7.0)
    assert len(drawn) == 2 and torch.equal(first, again)  # reused
    class_images(run, (PROMPTS[0], "a green heart"), 2, 1, 7.0)
    assert drawn[2:] == [("a green heart", 1)]
    assert (tmp_path / "class-images" / "0001.txt").read_text() == "a green heart"


def test_class_prompts_file_and_its_errors(setup, tmp_path):  # noqa: F811
    good = tmp_path / "prompts.txt"
    good.write_text("a red circle\n\n  a blue square  \n")
    assert read_class_prompts(good) == PROMPTS
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(InputError, match="empty.txt holds no prompt"):
        read_class_prompts(empty)
    with pytest.raises(InputError, match="missing.txt: cannot read it"):
        read_class_prompts(tmp_path / "missing.txt")
    with pytest.raises(InputError, match="either one class_prompt or several class_prompts"):
        train_dreambooth(settings(setup, "db-both", "sks"), class_word="star", class_prompt="a star",
                         class_prompts=PROMPTS)


def test_cli_takes_a_class_prompts_file(setup, tmp_path, capsys):  # noqa: F811
    from latentdiff.cli import main
    root, base, images = setup
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "cli-db.safetensors"
    assert main(["train", "dreambooth", str(images), "-o", str(out), "--model", str(base), "--token", "sks",
                 "--class-word", "star", "--class-prompts", str(prompts), "--class-images", "2", "--steps", "1",
                 "--batch-size", "3", "--mixed-precision", "no", "--sample-steps", "1", "--no-progress"]) == 0
    assert out.is_file()
    assert (tmp_path / "cli-db-training" / "class-images" / "0001.txt").read_text() == PROMPTS[1]
    assert main(["train", "dreambooth", str(images), "-o", str(tmp_path / "x.safetensors"), "--model", str(base),
                 "--token", "sks", "--class-word", "star", "--class-prompts", str(tmp_path / "none.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "none.txt: cannot read it" in err


def test_with_the_text_encoder_trained_the_class_prompts_pass_through_it(setup, captured):  # noqa: F811
    train_dreambooth(settings(setup, "db-prompts-text", "sks", lr=2e-3, steps=1), class_word="star",
                     class_prompts=PROMPTS, class_images=2, train_text_encoder=True, save_dtype="fp32")
    (stage,) = captured
    module, run = stage.module, stage.module.run["run"]
    batch = stage.make_batch(0, 0, 3, torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, parts = module(batch)
        prompts = [run.captions[i] for i in batch["index"].tolist()] + [PROMPTS[i % 2] for i in
                                                                        batch["class_index"].tolist()]
        context = encode_prompts(prompts, run.model.tokenizer, module.text_encoder, 1)
        mse = denoising_mse(run.model.unet, batch, context, alphas_cumprod_for(run.model.config).float(),
                            run.model.config.prediction)
    assert float(parts["prior"]) == pytest.approx(float(mse[3:].mean()), rel=1e-5)  # fp32, the same calls
