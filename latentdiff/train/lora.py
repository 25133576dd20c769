"""LoRA training (Hu et al. 2021, as kohya's sd-scripts apply it to Stable Diffusion): low-rank adapters
beside chosen layers, everything else frozen; written as a kohya `.safetensors` file.

An adapter adds `up(down(x)) * alpha / rank` to a layer's output: `down` takes the layer's input to `rank`
channels (a Linear, or a convolution with the layer's kernel, stride and padding: LoCon), `up` (a Linear or
1x1 convolution) brings it to the output. `down` starts kaiming-uniform and `up` at zero, so training starts
from the base model exactly. Adapters are attached as forward hooks on the model's own layers, whose names
and weights stay untouched; their kohya names come from formats/lora.py's `kohya_names`, the table the LoRA
loader matches files with, so the file written is the network trained: merged by the loader
(`up @ down * alpha / rank`), it gives the outputs the hooks gave.

Targets (`targets`, any of): "attention" (to_q, to_k, to_v, to_out.0 of every transformer block's self- and
cross-attention: the default, as diffusers' LoRA scripts), "ff" (the transformer blocks' feed-forward
layers), "conv" (the 3x3 convolutions of the residual, down- and upsampling blocks), "text" (the text
encoder's attention and MLP layers that the model uses; SD 2.x skips the last).
"""

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..checkpoint import save_safetensors
from ..errors import InputError
from ..formats.lora import kohya_names
from ..loader import load_model
from ..model import StableDiffusion
from ..pipeline import Pipeline
from ..schedules import alphas_cumprod_for
from .loop import Stage
from .personal import Run, Settings, denoising_mse, stage_recipe, train_personal

TARGETS = {
    "attention": re.compile(r"^lora_unet_.*_attn[12]_(to_q|to_k|to_v|to_out_0)$"),
    "ff": re.compile(r"^lora_unet_.*_ff_net_(0_proj|2)$"),
    "conv": re.compile(r"^lora_unet_.*(resnets_\d+_conv[12]|downsamplers_0_conv|upsamplers_0_conv)$"),
    "text": re.compile(r"^lora_te_text_model_encoder_layers_(\d+)_(self_attn_(q|k|v|out)_proj|mlp_fc[12])$"),
}


class Adapter(nn.Module):
    def __init__(self, layer: nn.Module, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.down = nn.Linear(layer.in_features, rank, bias=False)
            self.up = nn.Linear(rank, layer.out_features, bias=False)
        else:
            self.down = nn.Conv2d(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding,
                                  layer.dilation, bias=False)
            self.up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        with torch.no_grad():  # kohya's initialisation, drawn from the run's seed
            bound = 1 / math.sqrt(self.down.weight[0].numel())  # kaiming_uniform_(a=sqrt(5))
            self.down.weight.copy_(torch.rand(self.down.weight.shape, generator=generator) * 2 * bound - bound)
            nn.init.zeros_(self.up.weight)
        self.rank, self.alpha = rank, alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x)) * (self.alpha / self.rank)


class LoRANetwork(nn.Module):
    """Adapters by kohya layer name (an nn.ModuleDict: kohya names hold no dots)."""

    def __init__(self, model: StableDiffusion, targets: tuple[str, ...], rank: int, alpha: float, seed: int):
        super().__init__()
        unknown = sorted(set(targets) - set(TARGETS))
        if unknown or not targets:
            raise InputError(f"targets={','.join(targets)}: choose among {', '.join(TARGETS)} (default: attention)")
        if rank < 1:
            raise InputError(f"rank={rank}: the adapters' rank must be at least 1 (4-32 are usual)")
        used_layers = model.config.text.layers + 1 + model.config.text.output_layer  # text layers the model runs
        self.paths = {}
        for kohya, param in sorted(kohya_names(model).items()):
            match = next((m for t in targets if (m := TARGETS[t].match(kohya))), None)
            if match and (not kohya.startswith("lora_te_") or int(match.group(1)) < used_layers):
                self.paths[kohya] = param[: -len(".weight")]
        generator = torch.Generator().manual_seed(seed)
        self.adapters = nn.ModuleDict({kohya: Adapter(model.get_submodule(path), rank, alpha, generator)
                                       for kohya, path in self.paths.items()})

    def attach(self, model: StableDiffusion) -> list:
        """Hook every adapter onto its layer; returns the handles (`handle.remove()` detaches)."""
        def hook(adapter):
            return lambda layer, inputs, output: output + adapter(inputs[0])
        return [model.get_submodule(path).register_forward_hook(hook(self.adapters[kohya]))
                for kohya, path in self.paths.items()]

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for kohya, adapter in self.adapters.items():
            sd[f"{kohya}.lora_down.weight"] = adapter.down.weight.detach().float().cpu()
            sd[f"{kohya}.lora_up.weight"] = adapter.up.weight.detach().float().cpu()
            sd[f"{kohya}.alpha"] = torch.tensor(float(adapter.alpha))
        return sd


class LoRALoss(nn.Module):
    """The denoising loss with the adapters hooked in. The frozen model is held in a plain dict, not as a
    submodule: checkpoints, DDP and the optimizer see the adapters alone."""

    def __init__(self, run: Run, network: LoRANetwork):
        super().__init__()
        self.network = network
        self.run = {"run": run}
        self.alphas_cumprod = alphas_cumprod_for(run.model.config).float()
        self.text_trained = any(k.startswith("lora_te_") for k in network.adapters)
        self.handles = network.attach(run.model)
        if not self.text_trained:  # the text side is fixed: each caption's features once
            with torch.no_grad():
                self.context = run.encode(run.captions)

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        run = self.run["run"]
        index = batch["index"]
        context = (self.context[index.to(self.context.device)] if not self.text_trained
                   else run.encode([run.captions[i] for i in index.tolist()]))
        mse = denoising_mse(run.model.unet, batch, context, self.alphas_cumprod, run.model.config.prediction)
        return mse.mean(), {}


@dataclass(frozen=True)
class LoRATraining:
    rank: int = 4  # diffusers' LoRA scripts and kohya's network_dim default
    alpha: float | None = None  # None: the rank (scale 1, diffusers' choice; kohya's default is 1)
    targets: tuple[str, ...] = ("attention",)
    name = "lora"
    require_token = False  # a LoRA may be trained without a trigger word

    def caption_token(self, settings: Settings) -> str:
        return settings.token

    def stage(self, run: Run) -> Stage:
        network = LoRANetwork(run.model, self.targets, self.rank, self.alpha or self.rank, run.settings.seed)
        module = LoRALoss(run, network)
        return Stage(self.name, module, run.draw, stage_recipe(run.settings))

    def write(self, run: Run, stage: Stage) -> Path:
        for handle in stage.module.handles:
            handle.remove()
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                    "ss_network_alpha": str(self.alpha or self.rank), "ss_steps": str(run.settings.steps),
                    "ss_targets": ",".join(self.targets), "method": "LoRA (latentdiff)"}
        return save_safetensors(stage.module.network.kohya_state_dict(), run.settings.output, metadata=metadata)

    def sample_pipeline(self, run: Run) -> Pipeline:
        pipeline = Pipeline(load_model(run.settings.base), device=run.accelerator.device, dtype=torch.float32)
        pipeline.set_loras([(run.settings.output, 1.0)])
        return pipeline


def train_lora(settings: Settings, *, rank: int = 4, alpha: float | None = None,
               targets: tuple[str, ...] = ("attention",)) -> Path:
    method = LoRATraining(rank, alpha, tuple(targets))
    return train_personal(method, settings, {"rank": rank, "alpha": alpha or rank, "targets": list(targets)})
