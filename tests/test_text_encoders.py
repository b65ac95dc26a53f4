import json
import logging

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from core.errors import UserError
from ldm.text_encoders import load_text_encoder, minilm_path


def _mean_pooled(embedding, i):
    mask = embedding.attention_mask[i, :, None].float()
    return (embedding.hidden_states[i] * mask).sum(0) / mask.sum()


def test_minilm_is_the_real_pretrained_model():
    encoder = load_text_encoder("minilm", max_length=77)
    embedding = encoder.encode(["a cat", "a dog", "a red car"])
    assert embedding.hidden_states.shape == (3, 77, 384)
    cos = torch.nn.functional.cosine_similarity
    # sentence-transformers/all-MiniLM-L6-v2 similarities, as listed in shared/ASSETS.md
    assert cos(_mean_pooled(embedding, 0), _mean_pooled(embedding, 1), 0).item() == pytest.approx(0.52, abs=0.01)
    assert cos(_mean_pooled(embedding, 0), _mean_pooled(embedding, 2), 0).item() == pytest.approx(0.27, abs=0.01)


def test_frozen(text_encoder):
    assert not any(p.requires_grad for p in text_encoder.parameters())
    text_encoder.train()
    assert not text_encoder.training and not text_encoder.model.training


def test_padding_is_masked_and_fixed_length(text_encoder):
    embedding = text_encoder.encode(["a cat", ""])
    assert embedding.hidden_states.shape == (2, 16, 384)
    assert embedding.attention_mask.sum(1).tolist() == [4, 2]  # [CLS] a cat [SEP] / [CLS] [SEP]
    alone = text_encoder.encode("a cat").hidden_states
    torch.testing.assert_close(alone[0], embedding.hidden_states[0], atol=1e-5, rtol=0)  # batch-independent


def test_long_prompts_are_truncated_with_one_warning(caplog):
    encoder = load_text_encoder("minilm", max_length=8)
    with caplog.at_level(logging.WARNING):
        encoder.encode(["word " * 30])
        encoder.encode(["word " * 30])
    assert [r.message for r in caplog.records if "truncated" in r.message] == [
        f"prompt {'word ' * 30!r} has 32 tokens; the text encoder keeps the first 8 (truncated)"]


def _save_with_bert_tokenizer(model, folder):
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def test_clip_text_model_from_a_local_folder(tmp_path):
    config = CLIPTextConfig(vocab_size=30522, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, eos_token_id=102)
    torch.manual_seed(0)
    folder = _save_with_bert_tokenizer(CLIPTextModel(config), tmp_path / "clip")
    encoder = load_text_encoder(str(folder), max_length=12)
    assert type(encoder.model).__name__ == "CLIPTextModel" and not encoder.uses_attention_mask
    assert encoder.hidden_size == 32
    assert encoder.encode(["a cat", "a dog"]).hidden_states.shape == (2, 12, 32)


def test_t5_encoder_from_a_diffusers_layout_folder(tmp_path):
    config = T5Config(vocab_size=30522, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    model = T5EncoderModel(config)
    model.save_pretrained(tmp_path / "text_encoder")
    _save_with_bert_tokenizer(model, tmp_path / "tokenizer")
    encoder = load_text_encoder(str(tmp_path), max_length=10)
    assert type(encoder.model).__name__ == "T5EncoderModel" and encoder.uses_attention_mask
    out = encoder.encode(["a cat"])
    assert out.hidden_states.shape == (1, 10, 32) and torch.isfinite(out.hidden_states).all()


@pytest.mark.parametrize("name, message", [
    ("openai/clip-vit-large-patch14", "not on disk and cannot be downloaded"),
    ("/nonexistent/encoder", "not on disk"),
])
def test_missing_encoders_fail_clearly(name, message):
    with pytest.raises(UserError, match=message):
        load_text_encoder(name)


def test_folder_without_config(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_text_encoder(str(tmp_path))


@pytest.mark.openclip
def test_openclip_text_tower_from_config(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    tiny = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}}
    (tmp_path / "ldm-tiny-clip.json").write_text(json.dumps(tiny))
    open_clip.add_model_config(tmp_path / "ldm-tiny-clip.json")
    torch.manual_seed(0)
    encoder = load_text_encoder("openclip:ldm-tiny-clip", max_length=77)
    out = encoder.encode(["a cat", ""])
    assert out.hidden_states.shape == (2, 77, 32) and torch.isfinite(out.hidden_states).all()
    assert out.attention_mask.sum(1).tolist() == [4, 2]
    assert not any(p.requires_grad for p in encoder.parameters())


def test_openclip_without_the_package_says_how_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_open_clip(name, *args, **kwargs):
        if name == "open_clip":
            raise ImportError("No module named 'open_clip'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_open_clip)
    with pytest.raises(UserError, match="open-clip-torch"):
        load_text_encoder("openclip:ViT-B-32")
