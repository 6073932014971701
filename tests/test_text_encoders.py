"""Text encoders: the offline MiniLM default and a local T5 folder, the null prompt, padding and the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

from walt.conditioning import MiniLMTextEncoder, T5TextEncoder
from walt.conditioning.text import minilm_path

PROMPTS = ["a red circle moving left", "hi", "", "a blue square moving up and then down again"]


@pytest.fixture(scope="session")
def minilm() -> MiniLMTextEncoder:
    return MiniLMTextEncoder()


def reference_states(model_cls, folder: Path, text: str) -> torch.Tensor:
    """Token states of one text straight from transformers, unpadded: (L, D)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = model_cls.from_pretrained(folder).eval()
    ids = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state[0]


def test_minilm_tokens_match_transformers_and_do_not_depend_on_padding(minilm):
    tokens, mask = minilm.encode(PROMPTS)
    assert minilm.dim == 384 and tokens.dtype == torch.float32 and mask.dtype == torch.bool
    assert tokens.shape == (4, mask.sum(1).max(), 384)
    again, mask_again = minilm.encode(PROMPTS)
    assert torch.equal(tokens, again) and torch.equal(mask, mask_again)  # deterministic
    for i, text in enumerate(PROMPTS):
        if not text:
            continue
        ref = reference_states(transformers.AutoModel, minilm_path(), text)  # (L_i, 384), no padding
        n = int(mask[i].sum())
        assert n == ref.shape[0] and mask[i, :n].all() and not mask[i, n:].any()  # real tokens, then padding
        # Padding in the batch (up to 7 extra tokens here) must not change a text's own tokens.
        torch.testing.assert_close(tokens[i, :n], ref, rtol=0, atol=2e-5)
        assert not tokens[i, n:].any()
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["TRANSFORMERS_OFFLINE"] == "1"


def test_the_empty_prompt_is_null_and_a_batch_of_them_still_has_one_masked_token(minilm):
    tokens, mask = minilm.encode(["", "  "])
    assert tokens.shape == (2, 1, 384) and not mask.any() and not tokens.any()
    with pytest.raises(TypeError, match="list of texts"):
        minilm.encode("a red circle")


def test_t5_from_a_local_folder_matches_transformers(tiny_t5):
    encoder = T5TextEncoder(str(tiny_t5), max_length=8)
    assert encoder.dim == 16
    texts = ["a red circle moving left", "blue", "a red circle moving left up up up up"]
    tokens, mask = encoder.encode(texts)
    assert mask.sum(1).tolist() == [6, 2, 8]  # words + </s>; the long text is truncated to max_length
    ref = reference_states(transformers.T5EncoderModel, tiny_t5, texts[0])
    torch.testing.assert_close(tokens[0, :6], ref, rtol=0, atol=1e-5)


def test_a_missing_t5_folder_says_what_to_give(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no text encoder at .*save_pretrained"):
        T5TextEncoder(str(tmp_path / "t5-v1_1-xxl"))


def test_a_cache_hit_returns_exactly_what_the_encoder_returned(tmp_path, tiny_t5):
    first = T5TextEncoder(str(tiny_t5), cache_dir=str(tmp_path / "cache"))
    texts = ["a red circle", "blue square moving up", "", "a red circle"]
    tokens, mask = first.encode(texts)
    files = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 2  # one per distinct non-empty text; the null prompt needs no entry
    second = T5TextEncoder(str(tiny_t5), cache_dir=str(tmp_path / "cache"))
    cached, cached_mask = second.encode(texts)
    assert second._model is None  # every text came from disk: the model was never loaded
    assert torch.equal(cached, tokens) and torch.equal(cached_mask, mask)
    # A different setting is a different encoder: its key differs, so nothing is reused.
    other = T5TextEncoder(str(tiny_t5), max_length=3, cache_dir=str(tmp_path / "cache"))
    _, short_mask = other.encode(texts[1:2])
    assert other._model is not None and short_mask.sum() == 3
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 3


def test_the_memory_cache_keeps_at_most_memory_items(tiny_t5):
    encoder = T5TextEncoder(str(tiny_t5), memory_items=2)
    encoder.encode(["a", "red", "blue"])
    assert len(encoder._memory) == 2


def test_bfloat16_runs_the_model_in_bfloat16_and_is_a_different_cache_identity(tiny_t5):
    full = T5TextEncoder(str(tiny_t5), precision="float32")
    half = T5TextEncoder(str(tiny_t5), precision="bfloat16")
    texts = ["a red circle moving left", "blue square"]
    (a, mask_a), (b, mask_b) = full.encode(texts), half.encode(texts)
    assert next(half._model.parameters()).dtype == torch.bfloat16 and b.dtype == torch.float32
    assert torch.equal(mask_a, mask_b) and not torch.equal(a, b)
    torch.testing.assert_close(b, a, rtol=0.05, atol=0.05)  # bf16 keeps ~3 significant digits
    assert full.identity != half.identity
    with pytest.raises(ValueError, match="precision must be"):
        T5TextEncoder(str(tiny_t5), precision="float16")
