"""OpenCLIP text towers as frozen text encoders (`text_encoder=openclip:ARCH[:CHECKPOINT]`).

Needs open-clip-torch, which needs a torchvision that matches torch (docs/install.md, "OpenCLIP text encoders").
Hidden states are the final-layer-norm outputs of every token, as Stable Diffusion 2 uses them.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError
from ldm.text_embedding import TextEmbedding

logger = logging.getLogger(__name__)


def _import_open_clip():
    try:
        import open_clip
    except ImportError as err:
        raise UserError("OpenCLIP text encoders need open-clip-torch with a matching torchvision: see "
                        "docs/install.md, 'OpenCLIP text encoders' (`pip install -e .[openclip]` on a CUDA torch)"
                        ) from err
    return open_clip


class OpenCLIPTextEncoder(nn.Module):
    """The text half of an open_clip CLIP model, frozen, with the same `encode` contract as FrozenTextEncoder."""

    def __init__(self, model: nn.Module, tokenizer, max_length: int, name: str = "") -> None:
        super().__init__()
        for part in ("token_embedding", "positional_embedding", "transformer", "ln_final"):
            if not hasattr(model, part):
                raise UserError(f"OpenCLIP model {name} has no plain text tower ({part} missing); use a CLIP arch")
        self.token_embedding, self.transformer, self.ln_final = model.token_embedding, model.transformer, model.ln_final
        self.register_buffer("positional_embedding", model.positional_embedding.detach().clone(), persistent=False)
        self.register_buffer("causal_mask", model.attn_mask.detach().clone() if model.attn_mask is not None else None,
                             persistent=False)
        self.tokenizer, self.name = tokenizer, name
        self.max_length = min(max_length, self.positional_embedding.shape[0])
        self.eval().requires_grad_(False)
        self._warned_truncation = False

    @property
    def hidden_size(self) -> int:
        return self.positional_embedding.shape[1]

    def train(self, mode: bool = True) -> "OpenCLIPTextEncoder":
        return super().train(False)

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> TextEmbedding:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        tokens = self.tokenizer(prompts)[:, : self.max_length].to(self.positional_embedding.device)
        if not self._warned_truncation and bool((tokens[:, -1] != 0).any()):
            logger.warning("a prompt fills all %d tokens of the OpenCLIP context; longer prompts are truncated",
                           self.max_length)
            self._warned_truncation = True
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        mask = self.causal_mask[: tokens.shape[1], : tokens.shape[1]] if self.causal_mask is not None else None
        if getattr(self.transformer, "batch_first", True):
            x = self.transformer(x, attn_mask=mask)
        else:
            x = self.transformer(x.permute(1, 0, 2), attn_mask=mask).permute(1, 0, 2)
        return TextEmbedding(self.ln_final(x), (tokens != 0).long())


def load_openclip_text_encoder(spec: str, max_length: int) -> OpenCLIPTextEncoder:
    """`openclip:ARCH` (random init, for tests) or `openclip:ARCH:CHECKPOINT` (weights from a local file)."""
    open_clip = _import_open_clip()
    parts = spec.split(":", 2)
    arch = parts[1] if len(parts) > 1 else ""
    checkpoint = parts[2] if len(parts) > 2 else None
    if arch not in open_clip.list_models():
        raise UserError(f"unknown OpenCLIP architecture '{arch}'; open_clip.list_models() lists the valid ones")
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise UserError(f"OpenCLIP checkpoint {checkpoint} is not on disk (no downloads here)")
    model = open_clip.create_model(arch, pretrained=checkpoint)
    return OpenCLIPTextEncoder(model, open_clip.get_tokenizer(arch), max_length, spec)
