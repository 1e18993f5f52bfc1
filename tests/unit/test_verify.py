"""The verification gates' own logic: the evaluation windows, the figures, the thresholds, the reference file
llama-perplexity reads, and the GGUF header reader. The gates on real artifacts are in tests/e2e/test_verification.py."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from job import llamacpp, verify


def evaluation(n_tokens: int, bos_id=None) -> verify.EvaluationSet:
    return verify.EvaluationSet(stream=list(range(100, 100 + n_tokens)), window=8, bos_id=bos_id, texts=[], sources={})


def test_windows_move_by_half_a_window_and_score_every_later_token_once():
    ev = evaluation(32)
    windows = ev.windows()
    assert len(windows) == 7 and all(len(w) == 8 for w in windows)
    assert windows[1][0] == 104  # moved by half a window
    scored = [w[i + 1] for w in windows for i in range(ev.first, ev.window - 1)]  # the tokens predicted
    assert len(scored) == len(set(scored)) == ev.scored_tokens == 7 * 3


def test_windows_start_with_bos_where_the_gguf_adds_one():
    assert {w[0] for w in evaluation(32, bos_id=1).windows()} == {1}
    assert evaluation(32, bos_id=1).stream[0] == 100  # the stream itself is as trained


def test_identical_distributions_diverge_by_nothing_and_agree_on_every_top_token():
    ref = torch.log_softmax(torch.randn(3, 5, 50), dim=-1)
    figures = verify.compare(ref, ref.clone())
    assert figures.mean_kld == pytest.approx(0, abs=1e-6) and figures.same_top_rate == 1 and figures.tokens == 15


def test_a_shifted_distribution_diverges_and_nan_fails_the_gate():
    ref = torch.log_softmax(torch.randn(2, 4, 50) * 3, dim=-1)
    other = torch.log_softmax(torch.randn(2, 4, 50) * 3, dim=-1)
    assert verify.compare(ref, other).mean_kld > 0.1
    broken = other.clone()
    broken[0, 0, :] = float("nan")
    figures = verify.compare(ref, broken)
    assert math.isinf(figures.mean_kld)
    verdict = verify.judge(verify.Verdict("gguf/q8_0", "ref"), figures, reference_confidence=0.9)
    assert not verdict.passed and "KL divergence" in verdict.problems[0]


def test_the_same_top_rate_is_not_gated_for_a_near_uniform_reference():
    figures = verify.Figures(mean_kld=1e-5, p99_kld=1e-4, max_kld=1e-3, same_top_rate=0.4, tokens=900)
    near_uniform = verify.judge(verify.Verdict("gguf/q8_0", "ref"), figures, reference_confidence=0.001)
    assert near_uniform.passed and not near_uniform.same_top_gated
    confident = verify.judge(verify.Verdict("gguf/q8_0", "ref"), figures, reference_confidence=0.6)
    assert not confident.passed and "same top token" in confident.problems[0]


@pytest.mark.parametrize(("artifact", "family"), [
    ("merged", "merged"), ("q8_0", "q8_0"), ("bf16", "bf16"), ("q4_k_m", "q4"), ("q4_0", "q4"), ("iq4_xs", "q4"),
    ("q5_k_s", "q5"), ("q3_k_l", "q3"), ("q2_k", "q2"), ("tq1_0", "q2"), ("q6_k", "q6_k")])
def test_every_gguf_type_has_a_threshold_by_family(artifact, family):
    assert verify.threshold_for(artifact) == verify.THRESHOLDS[family]


def test_thresholds_loosen_with_fewer_bits():
    order = ["bf16", "q8_0", "q6_k", "q5", "q4", "q3", "q2"]
    limits = [verify.THRESHOLDS[name] for name in order]
    assert all(a.max_mean_kld < b.max_mean_kld and a.min_same_top > b.min_same_top for a, b in zip(limits, limits[1:]))


def test_the_reference_file_holds_the_log_probs_as_llama_perplexity_decodes_them(tmp_path):
    """Decoded as tools/perplexity/perplexity.cpp does: scale * step + minimum, for log-probs above max - 16."""
    ev = evaluation(32)
    ref = torch.log_softmax(torch.randn(len(ev.windows()), ev.window - 1 - ev.first, 51) * 4, dim=-1)
    path = tmp_path / "ref.kld"
    verify.write_kld_base(path, ev, ref)
    data = path.read_bytes()
    assert data[:8] == b"_logits_"
    n_ctx, n_vocab, n_chunk = struct.unpack_from("<Iii", data, 8)
    assert (n_ctx, n_vocab, n_chunk) == (8, 51, 7)
    offset = 20
    tokens = np.frombuffer(data, dtype=np.int32, count=n_ctx * n_chunk, offset=offset)
    assert tokens.reshape(n_chunk, n_ctx).tolist() == ev.windows()
    offset += tokens.nbytes
    row_width = 2 * ((n_vocab + 1) // 2) + 4
    rows = np.frombuffer(data, dtype=np.uint16, offset=offset).reshape(n_chunk, n_ctx - 1 - n_ctx // 2, row_width)
    assert offset + rows.nbytes == len(data)
    scale_min = rows[..., :4].copy().view(np.float32)
    decoded = scale_min[..., :1] * rows[..., 4:4 + n_vocab] + scale_min[..., 1:2]
    expected = ref.numpy()
    kept = expected > expected.max(-1, keepdims=True) - 16
    assert np.abs(decoded - expected)[kept].max() < 16 / 65535 + 1e-4


def test_the_gguf_header_reader_agrees_with_gguf_py(tmp_path):
    from gguf import GGUFReader, GGUFWriter

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(path, "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(["<s>", "</s>", "a", "b"])
    writer.add_token_types([3, 3, 1, 1])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(False)
    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    meta = llamacpp.gguf_metadata(path)
    reader = GGUFReader(path)
    assert meta["tokenizer.ggml.tokens"] == 4 and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.eos_token_id"] == reader.get_field("tokenizer.ggml.eos_token_id").contents() == 1
    assert meta["tokenizer.ggml.add_bos_token"] is False
    vocab = verify.read_gguf_vocab(path)
    assert (vocab.n_vocab, vocab.bos_id, vocab.eos_id, vocab.add_bos, vocab.end_ids) == (4, 0, 1, False, {1})


def _tiny_gguf(path, *, name: str, tokens: list[str], file_type: int = 1):
    import numpy as np
    from gguf import GGUFWriter

    writer = GGUFWriter(path, "llama")
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_tensor("t", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_quants_of_one_conversion_share_a_tokenizer_digest_and_another_vocabulary_does_not(tmp_path):
    """What lets verify tokenize the texts once for all quants of one conversion."""
    first = _tiny_gguf(tmp_path / "q4.gguf", name="run", tokens=["<s>", "a", "b"], file_type=15)
    second = _tiny_gguf(tmp_path / "q8.gguf", name="run-q8", tokens=["<s>", "a", "b"], file_type=7)
    other = _tiny_gguf(tmp_path / "other.gguf", name="run", tokens=["<s>", "a", "c"], file_type=15)
    assert llamacpp.tokenizer_digest(first) == llamacpp.tokenizer_digest(second)
    assert llamacpp.tokenizer_digest(first) != llamacpp.tokenizer_digest(other)


def test_a_gguf_whose_end_ids_miss_the_templates_end_of_turn_is_named(smoke_tokenizer):
    im_end = smoke_tokenizer.convert_tokens_to_ids("<|im_end|>")
    ordinary = smoke_tokenizer.convert_tokens_to_ids("Ġthe")
    assert verify.turn_end_id(smoke_tokenizer) == im_end
    good = verify.GgufVocab(n_vocab=49152, bos_id=1, add_bos=False, eos_id=im_end, eot_id=None, eom_id=None, pre="smollm")
    assert verify.end_of_turn_problems(good, smoke_tokenizer) == []
    bad = verify.GgufVocab(n_vocab=49152, bos_id=1, add_bos=False, eos_id=ordinary, eot_id=None, eom_id=None, pre="smollm")
    problems = verify.end_of_turn_problems(bad, smoke_tokenizer)
    assert any("eos id" in p and "Ġthe" in p for p in problems) and any("<|im_end|>" in p for p in problems)


def test_the_table_shows_each_artifact_its_figures_and_the_merge_finding():
    body = {"artifacts": [
        {"artifact": "merged", "reference": "the adapter on the 16-bit base", "mean_kld": 0.0004, "same_top_rate": 0.99,
         "same_top_gated": True, "threshold": {"max_mean_kld": 0.01, "min_same_top_rate": 0.95}, "verdict": "pass"},
        {"artifact": "gguf/q8_0", "reference": "the merged weights (PyTorch)", "mean_kld": 0.5, "same_top_rate": 0.3,
         "same_top_gated": False, "threshold": {"max_mean_kld": 0.02, "min_same_top_rate": 0.93}, "verdict": "fail",
         "problems": ["mean KL divergence 0.5 > 0.02"]}],
        "adapter_effect": {"kept": 0.3, "finding": "the merged 16-bit weights carry 30% of the adapter's shift"}}
    text = "\n".join(verify.table(body))
    assert "4.00e-04" in text and "99.0%" in text and "fail" in text and "mean KL divergence 0.5 > 0.02" in text
    assert "30.0%*" in text and "not gated" in text and "keep 30%" in text
