"""What every frozen text encoder returns (its own module, so that each encoder's module imports only this)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TextEmbedding:
    """Per-token hidden states (B, L, D) and the tokeniser's attention mask (B, L)."""

    hidden_states: torch.Tensor
    attention_mask: torch.Tensor
