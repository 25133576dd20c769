"""Model architectures as frozen dataclasses, and the named presets stored as JSON (configs/presets/).

A preset's keys equal the dataclass fields; an unknown key is an error, and there are no class paths.
"""

import dataclasses
import json
from dataclasses import dataclass, field

from . import resources
from .errors import InputError

PRESET_DIR = resources.preset_dir()


@dataclass(frozen=True)
class TextEncoderConfig:
    """CLIP text transformer. SD 1.x: OpenAI ViT-L/14 text tower; SD 2.x: OpenCLIP ViT-H/14."""

    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    ff_width: int = 3072
    activation: str = "quick_gelu"  # "quick_gelu" (SD 1.x) or "gelu" (SD 2.x)
    # Which hidden state conditions the U-Net (final layer norm applied): -1 last, -2 penultimate
    # (SD 2.x single files, whose text tower keeps all 24 layers).
    output_layer: int = -1
    pad_id: int = 49407  # SD 1.x pads with the end token, SD 2.x (OpenCLIP) with id 0


@dataclass(frozen=True)
class UNetConfig:
    # in_channels > out_channels: channels joined to the latents (inpainting 9 = 4 + mask + 4 masked image)
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attention_levels: tuple[int, ...] = (0, 1, 2)  # levels (0 = full resolution) with transformers
    num_heads: int | None = 8  # SD 1.x: a fixed head count ...
    head_dim: int | None = None  # ... SD 2.x: a fixed head width (64); exactly one is set
    # transformer blocks per SpatialTransformer: one number, or one per level (SDXL: (0, 2, 10)); the
    # middle block takes the last level's. Stored canonically: an int when every level that has
    # transformers (and the last) agrees, else a tuple with 0 at the levels without transformers.
    transformer_depth: int | tuple[int, ...] = 1
    context_dim: int = 768
    use_linear_projection: bool = False  # SD 2.x: Linear proj_in/proj_out instead of 1x1 convs
    upcast_attention: bool = False  # SD 2.x-v: attention scores in fp32 even under fp16

    def heads_at(self, channels: int) -> int:
        return self.num_heads if self.num_heads is not None else channels // self.head_dim

    def depth_at(self, level: int) -> int:
        """Transformer blocks at `level` (the middle block: the last level's)."""
        depth = self.transformer_depth
        return depth if isinstance(depth, int) else depth[level]

    def __post_init__(self):
        if (self.num_heads is None) == (self.head_dim is None):
            raise InputError("UNetConfig: set exactly one of num_heads and head_dim")
        if self.in_channels < self.out_channels:
            raise InputError(f"UNetConfig: in_channels {self.in_channels} below out_channels {self.out_channels}; "
                             f"the inputs are the latents plus any conditioning channels")
        depth, levels = self.transformer_depth, len(self.channel_mult)
        if not isinstance(depth, int):
            if len(depth) != levels:
                raise InputError(f"UNetConfig: transformer_depth {list(depth)} needs one entry per level "
                                 f"({levels}, as channel_mult)")
            with_blocks = set(self.attention_levels) | {levels - 1}
            depth = tuple(d if level in with_blocks else 0 for level, d in enumerate(depth))
            uniform = {depth[level] for level in with_blocks}
            object.__setattr__(self, "transformer_depth", uniform.pop() if len(uniform) == 1 else depth)
        if any(self.depth_at(level) < 1 for level in set(self.attention_levels) | {levels - 1}):
            raise InputError(f"UNetConfig: transformer_depth {self.transformer_depth} gives no transformer "
                             f"block to a level with attention or to the middle block")


@dataclass(frozen=True)
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "sd1"
    family: str = "sd1"  # "sd1" (OpenAI CLIP text tower) or "sd2" (OpenCLIP): read from the keys, then stored
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    prediction: str = "eps"  # "eps" or "v"; not readable from tensor shapes
    latent_scale: float = 0.18215
    resolution: int = 512  # native image size
    # Training noise schedule (DDPM betas) the U-Net was trained under.
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    steps_offset: int = 1  # added to diffusers' "leading" timesteps (scheduler_config.json; SD ships 1)
    set_alpha_to_one: bool = False  # diffusers' DDIM / PNDM end at sigma 0, else at the smallest (SD: False)

    def __post_init__(self):
        if self.prediction not in ("eps", "v"):
            raise InputError(f"prediction must be 'eps' or 'v', not {self.prediction!r}")
        if self.family not in ("sd1", "sd2"):
            raise InputError(f"family must be 'sd1' or 'sd2', not {self.family!r}")


def _build(cls, data: dict, where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        sub = {"text": TextEncoderConfig, "unet": UNetConfig, "vae": VAEConfig}.get(key)
        if cls is ModelConfig and sub is not None:
            value = _build(sub, value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: dict, where: str = "config") -> ModelConfig:
    return _build(ModelConfig, data, where)


def config_to_dict(config: ModelConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config)))


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def preset(name: str) -> ModelConfig:
    path = PRESET_DIR / f"{name}.json"
    if not path.is_file():
        raise InputError(f"unknown preset {name!r}; choose one of {preset_names()}")
    return config_from_dict(json.loads(path.read_text()), where=str(path))
