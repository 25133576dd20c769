"""Stage 2: the CLIP text encoder, trained contrastively against a small image tower, the CLIP recipe.

A batch of (image, caption) pairs gives a similarity matrix between normalised image and text embeddings;
a symmetric cross-entropy (InfoNCE) pulls each pair together and pushes the other captions of the batch
away, at a learned temperature. The text side is TextEncoder.pooled (the end token's features) through a
linear projection, as in CLIP. The image tower and projections are thrown away afterwards: the U-Net
conditions on the encoder's per-token features, which this training has made describe the picture.

Hard negatives: half of each batch are the other half's contrasting twins (shapes.make_sample), the same
picture with another shape or with the shape colour and background swapped. Random pairs differ mostly
in colours and place, which a tower can tell apart without ever looking at the shape; trained on those
alone (the first demo models), the encoder's caption summary moved 1.6 for another shape word and 2.9
for swapped colours, against 9.4 for another shape colour (feature norm 11.3; tools/caption_probe.py),
and the U-Net, which reads it, drew shapes at chance and often painted the background in the shape's
colour. A twin in the same batch makes exactly those two differences the ones the loss has to see.

With several processes, each one contrasts its own slice of the batch (its negatives are local).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..clip import TextEncoder, Tokenizer
from .loop import Stage, StageRecipe
from .shapes import TWINS, image_to_tensor, make_sample


def init_text_encoder(text_encoder: TextEncoder) -> None:
    """CLIP's embedding initialisation (std 0.02 for tokens, 0.01 for positions). nn.Embedding's default
    N(0, 1) would outweigh the blocks' residual updates by far in the pre-LN residual stream."""
    embeddings = text_encoder.transformer.text_model.embeddings
    nn.init.normal_(embeddings.token_embedding.weight, std=0.02)
    nn.init.normal_(embeddings.position_embedding.weight, std=0.01)


class ImageTower(nn.Module):
    """Strided convs down to a 4x4 map, flattened (not pooled: captions name positions) and projected."""

    def __init__(self, image_size: int, embed_dim: int, width: int = 32):
        super().__init__()
        layers, channels, size = [], 3, image_size
        while size > 4:
            out = min(width * 2 ** len(layers), 128)
            layers += [nn.Conv2d(channels, out, 3, stride=2, padding=1), nn.GroupNorm(8, out), nn.SiLU()]
            channels, size = out, (size + 1) // 2
        self.features = nn.Sequential(*layers)
        self.proj = nn.Linear(channels * size * size, embed_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(images).flatten(1))


class ContrastiveLoss(nn.Module):
    def __init__(self, text_encoder: TextEncoder, image_size: int, embed_dim: int):
        super().__init__()
        self.text_encoder = text_encoder
        self.image_tower = ImageTower(image_size, embed_dim)
        self.text_projection = nn.Linear(text_encoder.cfg.width, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        text = F.normalize(self.text_projection(self.text_encoder.pooled(batch["tokens"])).float(), dim=-1)
        image = F.normalize(self.image_tower(batch["images"]).float(), dim=-1)
        scale = self.logit_scale.clamp(max=math.log(100)).exp()  # CLIP caps the scale at 100
        logits = scale * image @ text.T
        labels = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        accuracy = (logits.argmax(dim=1) == labels).float().mean()
        return loss, {"accuracy": accuracy, "scale": scale.detach()}


def trim_padding(tokens: torch.Tensor, end_id: int) -> torch.Tensor:
    """Drop the columns after the batch's last first-end-token. The encoder is causal, so features up to
    each prompt's end token (all that `pooled` reads) do not depend on the padding after it: same loss,
    a fraction of the work (captions are ~15 of 77 tokens)."""
    last = int((tokens == end_id).int().argmax(dim=1).max())
    return tokens[:, :last + 1]


def text_stage(text_encoder: TextEncoder, tokenizer: Tokenizer, recipe: StageRecipe, *, seed: int,
               image_size: int, embed_dim: int) -> Stage:
    end_id = text_encoder.cfg.vocab_size - 1

    def make_batch(step: int, first: int, count: int, generator: torch.Generator) -> dict:
        originals = range(first, first + count - count // 2)
        # Twins cycle through shape, shape, swap: shapes are the subtler difference of the two.
        twins = [(i, TWINS[k % 3 // 2]) for k, i in enumerate(originals)][:count // 2]
        samples = [make_sample(seed, i, image_size) for i in originals]
        samples += [make_sample(seed, i, image_size, twin=twin) for i, twin in twins]
        images = torch.stack([image_to_tensor(image) for image, _, _ in samples])
        return {"images": images, "tokens": trim_padding(tokenizer([c for _, c, _ in samples]), end_id)}

    return Stage("text", ContrastiveLoss(text_encoder, image_size, embed_dim), make_batch, recipe)
