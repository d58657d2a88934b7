"""Calibration capture vs the full eager attention matrix (output_attentions=True) on a tiny Llama."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from heterocache.profiling.capture import (
    calibration_ids,
    capture,
    last_row_scores,
    pool_scores,
    read_texts,
    topk_set,
)

PROMPT, TOPK, NEW = 40, 8, 4


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


def reference_rows(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Pooled last rows from the eager matrix: ``(L, B, Hkv, prompt_len)``."""
    with torch.no_grad():
        attentions = model(ids, output_attentions=True).attentions  # L x (B, Hq, n, n)
    n_kv = model.config.num_key_value_heads
    rows = []
    for attn in attentions:
        batch, n_q = attn.shape[:2]
        last = attn[:, :, -1, :prompt_len].float().reshape(batch, n_kv, n_q // n_kv, prompt_len).mean(2)
        rows.append(pool_scores(last))
    return torch.stack(rows)


def assert_same_topk(found: torch.Tensor, ref_rows: torch.Tensor, k: int, tol: float = 1e-5) -> None:
    """Sets equal, except for members whose reference score ties the k-th value within ``tol``."""
    expected = topk_set(ref_rows, k)
    for idx_found, idx_ref, row in zip(found.reshape(-1, k), expected.reshape(-1, k),
                                       ref_rows.reshape(-1, ref_rows.shape[-1])):
        kth = row.topk(k).values[-1]
        differ = set(idx_found.tolist()) ^ set(idx_ref.tolist())
        assert all(abs(float(row[i]) - float(kth)) <= tol for i in differ), differ


@pytest.fixture(scope="module")
def captured(tiny_llama):
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (1, PROMPT))
    return ids, capture(tiny_llama, ids, max_new_tokens=NEW, topk=TOPK, progress=False, keep_rows=True)


def test_shapes_and_restore(tiny_llama, captured):
    _, result = captured
    assert result.topk_indices.shape == (2, NEW, 1, 2, TOPK)
    assert result.rows.shape == (2, NEW, 1, 2, PROMPT)
    assert result.generated.shape == (1, NEW)
    assert result.n_decode_steps == NEW - 1
    sets = result.topk_indices
    assert torch.equal(sets, sets.sort(-1).values)  # ascending, distinct
    assert bool((sets[..., 1:] > sets[..., :-1]).all())
    assert tiny_llama.config._attn_implementation == "eager"  # previous implementation restored


def test_prefill_matches_eager(tiny_llama, captured):
    ids, result = captured
    ref = reference_rows(tiny_llama, ids, PROMPT)
    torch.testing.assert_close(result.rows[:, 0], ref, rtol=1e-4, atol=1e-6)
    assert_same_topk(result.topk_indices[:, 0], ref, TOPK)


@pytest.mark.parametrize("step", [1, NEW - 1])
def test_decode_step_matches_eager(tiny_llama, captured, step):
    ids, result = captured
    # decode step s feeds generated tokens 0..s-1; its query is the last of prompt + s tokens
    full = torch.cat([ids, result.generated[:, :step]], dim=1)
    ref = reference_rows(tiny_llama, full, PROMPT)
    torch.testing.assert_close(result.rows[:, step], ref, rtol=1e-4, atol=1e-6)
    assert_same_topk(result.topk_indices[:, step], ref, TOPK)


def test_greedy_tokens_match_generate(tiny_llama, captured):
    ids, result = captured
    out = tiny_llama.generate(ids, max_new_tokens=NEW, do_sample=False, min_new_tokens=NEW)
    assert torch.equal(out[:, PROMPT:], result.generated)


def test_topk_capped_at_prompt_length(tiny_llama):
    ids = torch.randint(0, 128, (1, 6))
    result = capture(tiny_llama, ids, max_new_tokens=2, topk=1024, progress=False)
    assert result.topk == 6
    assert result.topk_indices.shape[-1] == 6
    assert torch.equal(result.topk_indices[0, 0, 0, 0], torch.arange(6, dtype=torch.int32))


def test_last_row_scores_masks_and_group_mean():
    torch.manual_seed(0)
    query, key = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 5, 8)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[..., -1, 1] = False
    scores = last_row_scores(query, key, mask, 0.5, prompt_len=5)
    assert torch.all(scores[:, :, 1] == 0)
    probs = torch.softmax(query[:, :, -1:] @ key.repeat_interleave(2, 1).transpose(-1, -2) * 0.5
                          + torch.where(mask[..., -1:, :], 0.0, float("-inf")), -1)[:, :, 0]
    torch.testing.assert_close(scores, probs.reshape(1, 2, 2, 5).mean(2))
    additive = torch.where(mask, 0.0, float("-inf"))
    torch.testing.assert_close(last_row_scores(query, key, additive, 0.5, prompt_len=3), scores[..., :3])


def test_pool_counts_padding():
    pooled = pool_scores(torch.ones(1, 1, 6))
    torch.testing.assert_close(pooled[0, 0], torch.tensor([0.6, 0.8, 1.0, 1.0, 0.8, 0.6]))


class CharTokenizer:
    """Character-level stand-in for a HF tokenizer (BOS = 1, ids = code points + 2)."""

    def __call__(self, text, truncation=False, max_length=None, add_special_tokens=True):
        ids = ([1] if add_special_tokens else []) + [ord(c) + 2 for c in text]
        if truncation:
            ids = ids[:max_length]
        return type("Encoding", (), {"input_ids": ids})()

    def decode(self, ids):
        return "".join(chr(i - 2) for i in ids)

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        return f"<user>{messages[0]['content']}</user><assistant>"


def test_texts_and_truncation(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first ")
    assert read_texts(tmp_path) == "first\n\nsecond"
    assert read_texts(["x", "y"]) == "x\n\ny"
    with pytest.raises(FileNotFoundError, match="not a directory"):
        read_texts(tmp_path / "missing")
    with pytest.raises(ValueError, match="non-empty list"):
        read_texts([])
    tok = CharTokenizer()
    ids = calibration_ids(tok, "abcdefghij", max_length=5)
    assert ids.tolist() == [[1, *(ord(c) + 2 for c in "abcd")]]
    chat = calibration_ids(tok, "abcdefghij", max_length=5, chat_template=True)
    text = tok.decode(chat[0].tolist())
    assert text.endswith("abcde</user><assistant>")  # truncated before the template: header intact


def test_default_essays_present():
    from heterocache.profiling.capture import essay_dir

    files = sorted(essay_dir().glob("*.txt"))
    text = read_texts(None)
    assert len(files) > 10 and len(text) > 100_000
    assert text.startswith(files[0].read_text().strip()[:200])


def test_batch_rows_recorded_separately(tiny_llama, captured):
    ids, result = captured
    other = torch.randint(0, 128, (1, PROMPT))
    both = capture(tiny_llama, torch.cat([ids, other]), max_new_tokens=2, topk=TOPK, progress=False)
    assert both.topk_indices.shape == (2, 2, 2, 2, TOPK)
    torch.testing.assert_close(both.topk_indices[:, 0, 0], result.topk_indices[:, 0, 0])  # row 0 unchanged
    assert not torch.equal(both.topk_indices[:, 0, 1], both.topk_indices[:, 0, 0])
