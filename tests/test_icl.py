"""In-context learning: rank-classification scoring (toy model with known log-probs, tiny T5),
prompt construction, demonstration sampling, and an end-to-end run on the tiny teacher."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch

from evaluation.icl import (
    build_prompt,
    encode_prompt,
    intent_label_text,
    label_token_ids,
    sample_demos,
    score_candidates,
)

# ----------------------------------------------------------------------------- toy model with known scores

# Vocabulary: 0 = pad/decoder start, 1 = eos, 2 = "a", 3 = "b", 4 = "c", 5 = "d".
# Next-token probabilities given the previous decoder token, for prompts whose first token is 2 ...
PROBS_A = {
    0: [0.01, 0.01, 0.38, 0.40, 0.01, 0.19],
    2: [0.01, 0.95, 0.01, 0.01, 0.01, 0.01],
    3: [0.01, 0.05, 0.01, 0.01, 0.90, 0.02],
    4: [0.01, 0.95, 0.01, 0.01, 0.01, 0.01],
    5: [0.01, 0.50, 0.01, 0.01, 0.01, 0.46],
}
# ... and for every other prompt: "d d" becomes the clear favourite.
PROBS_B = {**PROBS_A, 0: [0.01, 0.01, 0.05, 0.05, 0.01, 0.87]}


class ToyModel(torch.nn.Module):
    """`model(input_ids, attention_mask, decoder_input_ids) -> logits [R, L, V]` with hand-set
    log-probs: a bigram table over decoder tokens, chosen by the prompt's first token."""

    def __init__(self) -> None:
        super().__init__()

        def table(probs: dict[int, list[float]]) -> torch.Tensor:
            rows = torch.full((6, 6), 1.0 / 6)
            for prev, p in probs.items():
                rows[prev] = torch.tensor(p)
            return rows.log()

        self.register_buffer("table_a", table(PROBS_A))
        self.register_buffer("table_b", table(PROBS_B))
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the module a device
        self.calls: list[int] = []

    def forward(self, input_ids, attention_mask, decoder_input_ids):
        self.calls.append(input_ids.shape[0])
        use_a = (input_ids[:, 0] == 2)[:, None, None]
        return torch.where(use_a, self.table_a[decoder_input_ids], self.table_b[decoder_input_ids])


CANDIDATES = [[2, 1], [3, 4, 1], [5, 5, 1]]  # "a", "b c", "d d", each followed by eos


def expected_logp(probs: dict[int, list[float]], tokens: list[int]) -> list[float]:
    prev, out = 0, []
    for t in tokens:
        out.append(math.log(probs[prev][t]))
        prev = t
    return out


def test_toy_model_scores_equal_hand_computed_log_probs():
    model = ToyModel()
    prompts = [[2, 9, 9], [7]]  # first uses table A, second table B
    for normalize in ("sum", "mean"):
        scores = score_candidates(model, prompts, CANDIDATES, pad_id=0, decoder_start_id=0, normalize=normalize)
        assert scores.shape == (2, 3)
        for row, probs in enumerate((PROBS_A, PROBS_B)):
            for col, cand in enumerate(CANDIDATES):
                logps = expected_logp(probs, cand)
                expected = sum(logps) / (len(logps) if normalize == "mean" else 1)
                assert scores[row, col].item() == pytest.approx(expected, abs=1e-5)


def test_sum_and_mean_rank_differently_as_designed():
    model = ToyModel()
    # Table A: "a" has the best summed log-prob (one likely token), "b c" the best mean.
    by_sum = score_candidates(model, [[2]], CANDIDATES, pad_id=0, decoder_start_id=0, normalize="sum")
    by_mean = score_candidates(model, [[2]], CANDIDATES, pad_id=0, decoder_start_id=0, normalize="mean")
    assert by_sum.argmax(-1).item() == 0
    assert by_mean.argmax(-1).item() == 1
    # Table B: "d d" wins either way.
    assert score_candidates(model, [[8]], CANDIDATES, pad_id=0, decoder_start_id=0).argmax(-1).item() == 2


def test_chunking_of_rows_does_not_change_scores():
    model = ToyModel()
    prompts = [[2, 3], [4], [2], [5, 5, 5, 5]]
    reference = score_candidates(model, prompts, CANDIDATES, pad_id=0, decoder_start_id=0, score_batch_size=1000)
    for chunk in (1, 2, 5):
        model.calls.clear()
        chunked = score_candidates(model, prompts, CANDIDATES, pad_id=0, decoder_start_id=0, score_batch_size=chunk)
        assert torch.equal(chunked, reference)
        assert max(model.calls) <= chunk and sum(model.calls) == len(prompts) * len(CANDIDATES)


def test_bad_arguments_fail_loudly():
    with pytest.raises(ValueError, match="normalize"):
        score_candidates(ToyModel(), [[2]], CANDIDATES, pad_id=0, decoder_start_id=0, normalize="max")
    with pytest.raises(ValueError, match="at least one token"):
        score_candidates(ToyModel(), [[2]], [[2], []], pad_id=0, decoder_start_id=0)


# ----------------------------------------------------------------------------- prompts and demos


@dataclass
class Ex:
    id: str
    utt: str
    intent: str


def test_label_text_and_prompt_construction():
    assert intent_label_text("alarm_set") == "alarm set"
    assert intent_label_text("iot_hue_lightoff") == "iot hue lightoff"
    demos = [Ex("1", "wake me up at nine", "alarm_set"), Ex("2", "is it raining", "weather_query")]
    prompt = build_prompt("play some jazz", demos, "{demos}Utterance: {utt} Intent:", "Utterance: {utt} Intent: {label}\n")
    assert prompt == (
        "Utterance: wake me up at nine Intent: alarm set\n"
        "Utterance: is it raining Intent: weather query\n"
        "Utterance: play some jazz Intent:"
    )
    assert build_prompt("hi", [], "{demos}Q: {utt} A:", "{utt}={label};") == "Q: hi A:"


def test_demo_sampling_is_seeded_never_includes_the_query_and_nests():
    pool = [Ex(str(i), f"utterance {i}", "alarm_set") for i in range(50)]
    query = Ex("7", "utterance 7", "alarm_set")  # the query itself is in the pool (same id, same text)
    seen_ids = set()
    for seed in range(40):
        demos = sample_demos(pool, query, 5, seed, "en-US")
        assert len(demos) == 5 and len({d.id for d in demos}) == 5
        assert all(d.id != query.id and d.utt != query.utt for d in demos)
        assert sample_demos(pool, query, 5, seed, "en-US") == demos  # deterministic
        assert sample_demos(pool, query, 1, seed, "en-US") == demos[:1]  # k=1 is a prefix of k=5
        seen_ids.update(d.id for d in demos)
    assert "7" not in seen_ids and len(seen_ids) > 30  # spread over the pool
    # A parallel translation of the query (same MASSIVE id, other text) is excluded as well.
    other_text_query = Ex("7", "Äußerung 7", "alarm_set")
    assert all(d.id != "7" for s in range(40) for d in sample_demos(pool, other_text_query, 5, s, "de-DE"))
    assert sample_demos(pool, query, 0, 0, "en-US") == []
    with pytest.raises(ValueError, match="too small"):
        sample_demos(pool[:3], query, 5, 0, "en-US")


# ----------------------------------------------------------------------------- tiny T5


@pytest.fixture(scope="module")
def tiny_t5(tiny_teacher_dir):
    from data_prep.tokenizer import special_ids
    from evaluation.massive import load_seq2seq

    model, tokenizer = load_seq2seq(tiny_teacher_dir, device="cpu")
    return model, tokenizer, special_ids(tokenizer)


def test_encode_prompt_clm_prefix_eos_and_left_truncation(tiny_t5):
    _, tokenizer, ids = tiny_t5
    text = "Utterance: wake me up Intent: alarm set\nUtterance: play jazz Intent:"
    plain = encode_prompt(tokenizer, text, None, 512)
    clm = encode_prompt(tokenizer, text, ids.clm, 512)
    assert plain == list(tokenizer(text)["input_ids"]) and plain[-1] == ids.eos
    assert clm == [ids.clm] + plain
    short = encode_prompt(tokenizer, text, ids.clm, 6)
    assert len(short) == 6 and short[0] == ids.clm and short[1:] == plain[-5:]


def test_t5_batched_equals_unbatched_and_encoder_reuse_equals_full_forward(tiny_t5):
    model, tokenizer, ids = tiny_t5
    texts = ["Utterance: wake me up at nine Intent:", "Utterance: spiele Musik Intent:", "今週は午前五時に起こして"]
    prompts = [encode_prompt(tokenizer, t, ids.clm, 512) for t in texts]
    labels = ["alarm set", "play music", "weather query", "iot hue lightoff"]
    cands = label_token_ids(tokenizer, labels, ids.eos)
    assert all(c[-1] == ids.eos for c in cands)
    kwargs = dict(pad_id=ids.pad, decoder_start_id=model.config.decoder_start_token_id)
    batched = score_candidates(model, prompts, cands, **kwargs)
    single = torch.cat([score_candidates(model, [p], cands, **kwargs) for p in prompts])
    assert torch.allclose(batched, single, atol=1e-5)

    class NoEncoderReuse(torch.nn.Module):  # same model, but without get_encoder(): full forward per row
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, decoder_input_ids):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)

    full = score_candidates(NoEncoderReuse(model), prompts, cands, **kwargs)
    assert torch.allclose(batched, full, atol=1e-5)


def test_t5_sum_score_equals_the_models_own_loss(tiny_t5):
    model, tokenizer, ids = tiny_t5
    prompt = encode_prompt(tokenizer, "Utterance: is it raining Intent:", ids.clm, 512)
    cand = label_token_ids(tokenizer, ["weather query"], ids.eos)[0]
    total = score_candidates(model, [prompt], [cand], pad_id=ids.pad, decoder_start_id=0, normalize="sum")[0, 0]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([prompt]), labels=torch.tensor([cand])).loss  # mean token NLL
    assert total.item() == pytest.approx(-loss.item() * len(cand), rel=1e-4)


# ----------------------------------------------------------------------------- end to end


def test_evaluate_icl_on_the_tiny_teacher_writes_results(tiny_teacher_dir, massive_dir, tmp_path):
    from evaluation.config import EvalConfig
    from evaluation.icl import evaluate_icl
    from evaluation.massive import load_split
    from launch.config import load_config

    cfg = load_config(
        EvalConfig,
        overrides=[f"icl.data={massive_dir}", "icl.locales=[en-US, ja-JP]", "icl.shots=[0, 2]", "icl.max_examples=4", "icl.batch_size=3", "device=cpu"],
    )
    result = evaluate_icl(cfg, tiny_teacher_dir, tmp_path, name="icl-tiny")
    saved = json.loads((tmp_path / "icl-tiny.json").read_text())
    assert saved["per_locale"].keys() == {"en-US", "ja-JP"}
    assert saved["shots"] == [0, 2] and saved["num_labels"] == 60 and saved["chance"] == pytest.approx(1 / 60)
    for s in saved["per_locale"].values():
        assert s["n"] == 4
        for k in ("0", "2"):
            assert s["accuracy"][k] in (0.0, 0.25, 0.5, 0.75, 1.0)
            lo, hi = s["accuracy_ci"][k]
            assert 0.0 <= lo <= s["accuracy"][k] <= hi <= 1.0
    assert saved["accuracy"]["0"] == pytest.approx(sum(s["accuracy"]["0"] for s in saved["per_locale"].values()) / 2)
    # The queries are the same 4 sampled test ids in both locales (massive.load_split's sample).
    _, queries = load_split(str(massive_dir), ["en-US", "ja-JP"], "test", 4, seed=0)
    # The 2-shot prompt holds two demonstrations and the query, the first query of en-US in id order.
    prompt = saved["example_prompts"]["en-US"]
    assert prompt.count("Utterance:") == 3 and prompt.endswith(f"Utterance: {queries['en-US'][0].utt} Intent:")
    assert saved["config"]["icl"]["normalize"] == "mean" and saved["clm_prompt"] is True
    assert result["accuracy"] == saved["accuracy"]
    assert (tmp_path / "icl-tiny.md").read_text().count("\n| ") >= 3
    assert (tmp_path / "icl-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
