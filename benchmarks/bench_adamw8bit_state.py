"""Optimizer state bytes of Step 3's AdamW8bit against torch AdamW on the same LoRA / DoRA weights (target <= 0.30).

    python benchmarks/bench_adamw8bit_state.py
    python benchmarks/bench_adamw8bit_state.py --ranks 16 --targets to_q to_k to_v to_out.0 proj_in proj_out

The UNet has SD 1.5's channel widths (320/640/1280/1280), attention heads and text width, with one layer per
block instead of two, so every adapter tensor has a real SD 1.5 shape. Each optimizer takes one step with
unit gradients, then every tensor in its state is counted once (the quantisation maps are shared).
bitsandbytes' default `min_8bit_size` is shown too: it keeps 32-bit state for the small tensors.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import bitsandbytes as bnb
import torch
from diffusers import UNet2DConditionModel

from neu_det_pipeline.config import LoraConfigSection
from neu_det_pipeline.training.lora import (
    lora_config,
    make_optimizer,
    optimizer_state_bits,
)


def sd15_like_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=1,
        cross_attention_dim=768,
        attention_head_dim=8,
        sample_size=64,
    )


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    tensors = {t.data_ptr(): t for state in optimizer.state.values() for t in _tensors(state)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _tensors(state: dict) -> list[torch.Tensor]:
    return [v for v in state.values() if isinstance(v, torch.Tensor)]


def one_step(make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    optimizer = make(params)
    for param in params:
        param.grad = torch.ones_like(param)
    optimizer.step()
    return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--targets", nargs="+", default=LoraConfigSection().target_modules)
    args = parser.parse_args()

    for rank, use_dora in ((rank, use_dora) for rank in args.ranks for use_dora in (False, True)):
        section = LoraConfigSection(rank=rank, alpha=rank, target_modules=args.targets, use_dora=use_dora)
        unet = sd15_like_unet().requires_grad_(False)
        unet.add_adapter(lora_config(section, section.target_modules))
        params = [p for p in unet.parameters() if p.requires_grad]
        small = sum(p.numel() < 4096 for p in params)
        results = {
            "torch AdamW": one_step(lambda ps: make_optimizer(section.model_copy(update={"optimizer": "adamw"}), ps), params),
            "AdamW8bit (step 3)": one_step(lambda ps: make_optimizer(section.model_copy(update={"optimizer": "adamw8bit"}), ps), params),
            "AdamW8bit default": one_step(lambda ps: bnb.optim.AdamW8bit(ps, lr=section.learning_rate), params),
        }
        reference = state_bytes(results["torch AdamW"])
        print(f"{'DoRA' if use_dora else 'LoRA'} rank {rank} on {', '.join(args.targets)}: {len(params)} tensors, "
              f"{sum(p.numel() for p in params):,} weights, {small} tensors under 4096 elements")
        for name, optimizer in results.items():
            size = state_bytes(optimizer)
            bits = dict(sorted(optimizer_state_bits(optimizer).items()))
            print(f"  {name:20s} {size / 2**20:8.2f} MiB  ratio {size / reference:.3f}  tensors by state bits {bits}")


if __name__ == "__main__":
    main()
