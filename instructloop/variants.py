"""Model versions whose greedy outputs differ, for tests and benchmarks: full-weight
variants and LoRA adapters of a model (the tiny default). Their logits are peaked (large
random weights), so greedy decoding does not hinge on near-ties and a version's output is
a stable fingerprint of its weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def full_variant(base_dir: Path, out_dir: Path, seed: int, std: float = 0.3) -> Path:
    from transformers import AutoModelForCausalLM

    shutil.copytree(base_dir, out_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, std, generator=gen)
    model.save_pretrained(out_dir)
    return out_dir


def lora_variant(base_dir: Path, out_dir: Path, seed: int, rank: int = 8) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    # peft finds the linear layers in the model itself, whatever the family names them.
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, init_lora_weights=False, target_modules="all-linear"
    )  # fmt: skip
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5, generator=gen)
    peft_model.save_pretrained(out_dir)
    return out_dir
