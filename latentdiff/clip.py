"""CLIP text side of Stable Diffusion: the BPE tokenizer wrapper and the text transformer.

The module tree equals the SD 1.x checkpoint keys after `cond_stage_model.`
(`transformer.text_model.encoder.layers.0.self_attn.q_proj.weight`, ...), so an SD 1.x file loads with
one strict `load_state_dict`. SD 2.x's OpenCLIP layout is converted by latentdiff/formats/clip_keys.py.
"""

import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import TextEncoderConfig
from .errors import CheckpointError, InputError
from .layers import attention

PACKAGE_TOKENIZER = Path(__file__).parent / "tokenizer"  # vocab.json + merges.txt, see tools/make_clip_vocab.py
START_ID, END_ID = 49406, 49407  # <|startoftext|>, <|endoftext|> in CLIP's vocabulary


class Tokenizer:
    """Prompts -> (B, max_length) token ids: start, BPE ids, end, truncated, then padded with `pad_id`.

    The BPE itself is transformers' CLIPTokenizer (the tokenizer dependency of the package); this class
    fixes the conventions SD needs on top of it: fixed length, and the pad id of the model family
    (SD 1.x pads with the end token 49407, SD 2.x / OpenCLIP with 0).
    """

    def __init__(self, pad_id: int | None = END_ID, max_length: int = 77, folder: str | Path = PACKAGE_TOKENIZER):
        """pad_id=None takes the folder's own pad token."""
        from transformers import CLIPTokenizer  # imported here: a slow import only tokenizing needs

        folder = Path(folder)
        # Older folders carry vocab.json + merges.txt; transformers 5 writes a single tokenizer.json.
        missing = [name for name in ("vocab.json", "merges.txt") if not (folder / name).is_file()]
        if missing and not (folder / "tokenizer.json").is_file():
            raise CheckpointError(f"tokenizer folder {folder} lacks {', '.join(missing)} (or tokenizer.json); point "
                                  "to a diffusers model's tokenizer/ folder, or leave it out to use the bundled CLIP "
                                  "vocabulary")
        if max_length < 2:
            raise InputError(f"Tokenizer: max_length={max_length} leaves no room for the start and end tokens; use 77")
        self.bpe = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        folder_pad_id = self.bpe.pad_token_id
        if self.bpe.pad_token != self.bpe.eos_token:
            # diffusers' SD 2.x folders name "!" (id 0) as pad token, which makes transformers turn every "!"
            # of a prompt into a pad token (diffusers issue #4153). OpenCLIP, which SD 2.x was trained with,
            # keeps "!" as text and pads with id 0: load the BPE with the end token as its pad instead.
            self.bpe = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, pad_token=self.bpe.eos_token)
        self.pad_id = folder_pad_id if pad_id is None else pad_id
        self.max_length = max_length
        self.folder = folder

    @classmethod
    def from_folder(cls, path: str | Path, pad_id: int | None = None, max_length: int = 77) -> "Tokenizer":
        """A model folder's own tokenizer files (diffusers `tokenizer/`); pad_id=None takes its pad token."""
        return cls(pad_id, max_length, folder=path)

    def save(self, folder: str | Path) -> None:
        """Write a tokenizer folder that transformers and diffusers load with this pad convention."""
        from transformers import CLIPTokenizer

        pad_token = self.bpe.convert_ids_to_tokens(self.pad_id)
        CLIPTokenizer.from_pretrained(str(self.folder), local_files_only=True, pad_token=pad_token,
                                      model_max_length=self.max_length).save_pretrained(str(folder))
        for name in ("vocab.json", "merges.txt"):  # what older transformers versions read
            if (self.folder / name).is_file():
                shutil.copyfile(self.folder / name, Path(folder) / name)

    def _ids(self, prompts: list[str]) -> list[list[int]]:
        """Untruncated ids with start and end tokens, one list per prompt."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise InputError(f"Tokenizer expects a list of prompt strings, got {type(prompts).__name__}"
                             f"{'' if isinstance(prompts, str) else ' with non-string items'}; pass [prompt]")
        # verbose=False: over-long prompts are expected here; dropped_words() is how callers warn.
        return self.bpe(list(prompts), add_special_tokens=True, verbose=False)["input_ids"]

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """BPE ids of each text, without start, end or padding: the pieces latentdiff/prompts.py chunks."""
        return self.bpe(list(texts), add_special_tokens=False, verbose=False)["input_ids"]

    @property
    def start_id(self) -> int:
        return self.bpe.bos_token_id

    @property
    def end_id(self) -> int:
        return self.bpe.eos_token_id

    def __call__(self, prompts: list[str]) -> torch.LongTensor:
        rows = []
        for ids in self._ids(prompts):
            # Keep the end token when truncating: CLIP was trained on sequences that end with it, and pools there.
            if len(ids) > self.max_length:
                ids = ids[:self.max_length - 1] + [ids[-1]]
            rows.append(ids + [self.pad_id] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(rows), self.max_length)

    def dropped_words(self, prompt: str) -> str:
        """The text that truncation to max_length removes from `prompt` ("" if it fits), to warn users."""
        content = self._ids([prompt])[0][1:-1]
        dropped = content[self.max_length - 2:]
        return self.bpe.decode(dropped) if dropped else ""


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that OpenAI CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class SelfAttention(nn.Module):
    qkv_names = ("q_proj", "k_proj", "v_proj")  # the projections speedups.fuse_projections fuses into `qkv`

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(width, width) for _ in range(4))
        self.qkv = None  # speedups.fuse_projections: the three projections in one matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x) if self.qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        # Causal: CLIP's text tower was trained left-to-right, so token i never sees tokens after it.
        return self.out_proj(attention(q, k, v, self.heads, causal=True))


class MLP(nn.Module):
    def __init__(self, width: int, ff_width: int, activation: str):
        super().__init__()
        self.fc1 = nn.Linear(width, ff_width)
        self.fc2 = nn.Linear(ff_width, width)
        self.activation = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class EncoderLayer(nn.Module):
    """Pre-LN residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.self_attn = SelfAttention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg.width, cfg.ff_width, cfg.activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Embeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)

    def forward(self, tokens: torch.Tensor, vectors: list[tuple[int, int, torch.Tensor]] = ()) -> torch.Tensor:
        """`vectors`: (row, position, (n, width) vectors) put in place of the token embeddings of positions
        position..position+n-1 of that row (textual-inversion embeddings; their ids there are placeholders)."""
        x = self.token_embedding(tokens)
        for row, position, vecs in vectors:
            x[row, position:position + len(vecs)] = vecs.to(x.device, x.dtype)
        # Positions are always 0..T-1: slicing the table needs no position_ids buffer in the state dict.
        return x + self.position_embedding.weight[:tokens.shape[1]]


class Encoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))


class TextModel(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class Transformer(nn.Module):
    """Holds `text_model` only so that parameter names carry the checkpoint's `transformer.text_model.`."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.text_model = TextModel(cfg)


class TextEncoder(nn.Module):
    """CLIP text transformer: token + position embeddings, pre-LN causal blocks, final layer norm."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        if cfg.activation not in ACTIVATIONS:
            raise InputError(f"TextEncoderConfig.activation={cfg.activation!r} is not one of {sorted(ACTIVATIONS)}")
        if cfg.width % cfg.heads:
            raise InputError(f"TextEncoderConfig: width {cfg.width} is not divisible by heads {cfg.heads}")
        self.cfg = cfg
        self.transformer = Transformer(cfg)

    def _check(self, tokens: torch.Tensor) -> None:
        if tokens.ndim != 2 or tokens.dtype not in (torch.int32, torch.int64):
            raise InputError(f"TextEncoder expects integer token ids of shape (batch, tokens), got "
                             f"{tuple(tokens.shape)} {tokens.dtype}; use Tokenizer to make them")
        if tokens.shape[1] > self.cfg.max_length:
            raise InputError(f"TextEncoder: {tokens.shape[1]} tokens exceed max_length {self.cfg.max_length}; "
                             "truncate the prompt (Tokenizer does)")

    def forward(self, tokens: torch.Tensor, layer: int | None = None,
                vectors: list[tuple[int, int, torch.Tensor]] = ()) -> torch.Tensor:
        """(B, T) ids -> (B, T, width): the output of block `layer` (-1 last, -2 penultimate, ...,
        default cfg.output_layer) with the final layer norm applied, as SD 2.x and "clip skip" use it.
        `vectors`: token embeddings given directly, for textual inversion (see Embeddings.forward)."""
        layer = self.cfg.output_layer if layer is None else layer
        n = self.cfg.layers
        if not -n <= layer <= -1:
            raise InputError(f"TextEncoder: layer={layer} must be a negative index into the {n} layer outputs "
                             f"(-1 = last ... {-n} = first)")
        self._check(tokens)
        model = self.transformer.text_model
        x = model.embeddings(tokens, vectors)
        for block in model.encoder.layers[:n + 1 + layer]:  # layers after the requested one are never run
            x = block(x)
        return model.final_layer_norm(x)

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, width): last-layer features (final LN) at each prompt's first end token."""
        # The end token is the last vocabulary entry in every CLIP vocabulary (49407 of 49408); padding
        # may repeat it (SD 1.x), hence the first occurrence, as OpenAI CLIP and transformers take it.
        is_end = tokens == self.cfg.vocab_size - 1
        if not bool(is_end.any(dim=1).all()):
            raise InputError(f"TextEncoder.pooled: a row has no end-of-text token (id {self.cfg.vocab_size - 1}); "
                             "tokenize prompts with Tokenizer")
        features = self(tokens, layer=-1)
        first_end = is_end.int().argmax(dim=1)
        return features[torch.arange(tokens.shape[0], device=tokens.device), first_end]
