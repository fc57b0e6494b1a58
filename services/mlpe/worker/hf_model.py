"""A Hugging Face causal LM as the worker's model: built from a config (inline or a local
config.json) with random initialisation, or loaded from a local pretrained folder, and
patched with mlpe.kernels (`mlpe.kernels.hf.apply_mlpe_kernels`) unless the job says not.
Local files only: nothing is downloaded at run time.

`HFCausalLM` gives it the built-in GPT's interface: forward(tokens) -> logits and
forward(tokens, targets) -> mean cross-entropy, where targets are already the next
tokens (passed to HF as `shift_labels`, so HF does not shift them again); `blocks` are
the decoder layers, the units FSDP2 shards.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger("mlpe.worker")


def hf_config(hf: dict):
    """The transformers config the job names (inline JSON, config.json, or a folder's)."""
    from transformers import AutoConfig

    if hf["config"] is not None:
        options = dict(hf["config"])
        return AutoConfig.for_model(options.pop("model_type"), **options)
    path = Path(hf["pretrained"] or hf["config_path"])
    if path.is_file():
        options = json.loads(path.read_text())
        return AutoConfig.for_model(options.pop("model_type"), **options)
    return AutoConfig.from_pretrained(str(path), local_files_only=True)


class HFCausalLM(nn.Module):
    def __init__(self, hf: dict):
        super().__init__()
        from transformers import AutoModelForCausalLM

        config = hf_config(hf)
        if hf["pretrained"]:
            self.hf = AutoModelForCausalLM.from_pretrained(
                hf["pretrained"], config=config, local_files_only=True,
                torch_dtype=torch.float32)
        else:
            self.hf = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
        self.hf.train()  # from_pretrained hands it over in eval mode (no dropout, and
        # the patched forward would compute full logits instead of the fused loss)
        self.vocab = config.vocab_size
        self.patched: list[str] = []
        if hf["mlpe_kernels"]:
            from mlpe.kernels.hf import apply_mlpe_kernels

            self.patched = apply_mlpe_kernels(self.hf)
        log.info("Hugging Face %s, %.1f M parameters, mlpe.kernels: %s", config.model_type,
                 sum(p.numel() for p in self.parameters()) / 1e6,
                 ", ".join(self.patched) or "none")

    @property
    def blocks(self) -> nn.ModuleList:
        return self.hf.model.layers

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None):
        if targets is None:
            return self.hf(input_ids=tokens, use_cache=False).logits
        targets = targets.contiguous()  # HF's own loss views it flat
        return self.hf(input_ids=tokens, labels=targets, shift_labels=targets,
                       use_cache=False).loss
