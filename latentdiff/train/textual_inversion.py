"""Textual inversion (Gal et al. 2022): learn the token embedding(s) of a new word; the model stays frozen.

The word's N vectors start as the token embeddings of an initial word (cycled when N is larger than its
token count) and are the only trained tensor: captions go through the generation path's own prompt
encoder (prompts.encode_prompts), which puts the vectors in place of the word, so the gradient reaches
them through the frozen text encoder and U-Net, and training sees exactly what generation will.

Written as `{"emb_params": (N, width)}` in a .safetensors file, the single-tensor form A1111 and ComfyUI
load (and formats/embeddings.py reads); as in A1111, the trigger word is the file name's stem, so the
output's stem must be the token.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import save_safetensors
from ..errors import InputError
from ..formats.embeddings import Embedding, read_embedding
from ..loader import load_model
from ..pipeline import Pipeline
from ..schedules import alphas_cumprod_for
from .loop import Stage
from .personal import Run, Settings, denoising_mse, stage_recipe, train_personal


def token_table(run: Run) -> torch.Tensor:
    """The text encoder's (vocabulary, width) token embeddings."""
    return run.model.text_encoder.transformer.text_model.embeddings.token_embedding.weight


def initial_vectors(run: Run, init_word: str, count: int) -> torch.Tensor:
    ids = run.model.tokenizer.token_ids([init_word])[0]
    if not ids:
        raise InputError(f"init_word={init_word!r} has no tokens; give a word close to the concept, e.g. 'star'")
    return token_table(run)[[ids[i % len(ids)] for i in range(count)]].detach().float().clone()


def training_embedding(run: Run, vectors: torch.Tensor) -> Embedding:
    """The run's token made of `vectors`, for run.encode: the gradient reaches them through the encoder."""
    return Embedding(run.settings.token, vectors, "training", "", run.settings.output)


class EmbeddingLoss(nn.Module):
    """The denoising loss of the instance images with the caption's token made of `vectors`, the one
    parameter. The frozen model is held in a plain dict, not as submodules: checkpoints, DDP and the
    optimizer see the vectors alone."""

    def __init__(self, run: Run, vectors: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(vectors)
        self.run = {"run": run}
        self.alphas_cumprod = alphas_cumprod_for(run.model.config).float()

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        run = self.run["run"]
        captions = [run.captions[i] for i in batch["index"].tolist()]
        context = run.encode(captions, {run.settings.token: training_embedding(run, self.vectors)})
        mse = denoising_mse(run.model.unet, batch, context, self.alphas_cumprod, run.model.config.prediction)
        return mse.mean(), {}


@dataclass(frozen=True)
class TextualInversion:
    init_word: str = "*"  # A1111's default initialisation text
    vectors: int = 1  # vectors per token (A1111's default; Gal et al. use 1)
    name = "embedding"
    require_token = True

    def caption_token(self, settings: Settings) -> str:
        if Path(settings.output).stem != settings.token:
            raise InputError(f"output {settings.output}: A1111, ComfyUI and latentdiff take an embedding's trigger "
                             f"word from its file name; name the output {settings.token}.safetensors (or use the "
                             f"token {Path(settings.output).stem!r})")
        if not 1 <= self.vectors <= 75:
            raise InputError(f"vectors={self.vectors}: use 1 to 75 vectors per token (a prompt chunk holds 75)")
        return settings.token

    def stage(self, run: Run) -> Stage:
        module = EmbeddingLoss(run, initial_vectors(run, self.init_word, self.vectors))
        return Stage(self.name, module, run.draw, stage_recipe(run.settings))

    def write(self, run: Run, stage: Stage) -> Path:
        vectors = stage.module.vectors.detach().float().cpu()
        metadata = {"name": run.settings.token, "step": str(run.settings.steps), "init_word": self.init_word,
                    "method": "textual inversion (latentdiff)"}
        return save_safetensors({"emb_params": vectors}, run.settings.output, metadata=metadata)

    def sample_pipeline(self, run: Run) -> Pipeline:
        embedding = read_embedding(run.settings.output)
        pipeline = Pipeline(load_model(run.settings.base), device=run.accelerator.device, dtype=torch.float32)
        pipeline.embeddings = {embedding.name: embedding}
        return pipeline


def train_embedding(settings: Settings, *, init_word: str = "*", vectors: int = 1) -> Path:
    method = TextualInversion(init_word, vectors)
    return train_personal(method, settings, {"init_word": init_word, "vectors": vectors})
