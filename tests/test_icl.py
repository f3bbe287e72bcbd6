"""In-context learning: rank-classification scoring (toy model with known log-probs, tiny T5),
contextual calibration, prompt construction, demonstration sampling, an end-to-end run on the tiny
teacher, and the harness proven on a small T5 trained on a task only demonstrations can solve."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from fixtures_data import squash_tables

from evaluation.icl import (
    build_prompt,
    contextual_calibration,
    encode_prompt,
    label_token_ids,
    sample_demos,
    score_candidates,
)
from massive.format import label_text as intent_label_text

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


# ----------------------------------------------------------------------------- contextual calibration


def test_contextual_calibration_removes_a_strong_label_prior():
    # Three labels; the template and demos make the model favour label 0 (prior 0.90, 0.07, 0.03)
    # whatever the query; the query itself carries a weaker signal: likelihood 0.6 for its true label,
    # 0.2 for the others. Scores are log p(label | prompt) up to a per-prompt constant.
    prior = torch.tensor([0.90, 0.07, 0.03])
    truth = torch.tensor([0, 1, 2, 1, 2, 0, 2, 1])
    likelihood = torch.full((len(truth), 3), 0.2)
    likelihood[torch.arange(len(truth)), truth] = 0.6
    scores = (prior * likelihood).log() + torch.arange(len(truth)).float()[:, None]  # any row offset
    assert (scores.argmax(-1) == 0).all()  # uncalibrated: label 0 everywhere, accuracy 3/8
    # The content-free query "N/A" with the same demos carries no signal: p_cf is the prior.
    content_free = prior.log().expand(len(truth), 3) - 5.0
    calibrated = contextual_calibration(scores, content_free)
    assert torch.equal(calibrated.argmax(-1), truth)  # calibrated: 8/8
    # The values: log p(label | prompt) - log p_cf(label), both normalised over the labels.
    expected = (prior * likelihood / (prior * likelihood).sum(-1, keepdim=True)).log() - prior.log()
    assert torch.allclose(calibrated, expected, atol=1e-5)


def test_contextual_calibration_uniform_reference_and_several_content_free_queries():
    scores = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -0.1, -0.2]])
    # A uniform content-free distribution changes no ranking: the result is log_softmax + log C.
    uniform = torch.zeros(2, 3)
    assert torch.allclose(contextual_calibration(scores, uniform), scores.log_softmax(-1) + math.log(3), atol=1e-6)
    # Several content-free queries (Zhao et al.: "N/A", "", "[MASK]") are averaged in probability:
    # [0.8, 0.1, 0.1] and [0.4, 0.3, 0.3] give p_cf = [0.6, 0.2, 0.2].
    cf = torch.tensor([[0.8, 0.1, 0.1], [0.4, 0.3, 0.3]]).log()[:, None, :].expand(2, 2, 3) + 7.0
    expected = scores.log_softmax(-1) - torch.tensor([0.6, 0.2, 0.2]).log()
    assert torch.allclose(contextual_calibration(scores, cf), expected, atol=1e-5)
    # A content-free distribution far below float range in probability does not turn into log(0).
    extreme = torch.tensor([[0.0, -2000.0, -2000.0]]).expand(2, 3)
    assert torch.isfinite(contextual_calibration(scores, extreme)).all()
    with pytest.raises(ValueError, match="do not match"):
        contextual_calibration(scores, torch.zeros(3, 3))
    with pytest.raises(ValueError, match="do not match"):
        contextual_calibration(scores, torch.zeros(2, 1, 3))


def test_icl_config_calibration_and_label_eos_defaults():
    from core.config import ConfigError, load_config
    from evaluation.config import EvalConfig

    cfg = load_config(EvalConfig)
    assert cfg.icl.label_eos is False and cfg.icl.calibration == "none" and cfg.icl.content_free == ["N/A"]
    cfg = load_config(EvalConfig, overrides=["icl.calibration=contextual", 'icl.content_free=["N/A", "", "[MASK]"]'])
    assert cfg.icl.calibration == "contextual" and cfg.icl.content_free == ["N/A", "", "[MASK]"]
    with pytest.raises(ConfigError, match="content_free"):
        load_config(EvalConfig, overrides=["icl.calibration=contextual", "icl.content_free=[]"])
    with pytest.raises(ConfigError, match="calibration"):
        load_config(EvalConfig, overrides=["icl.calibration=platt"])


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
    from student import load_text_to_text

    model, tokenizer = load_text_to_text(tiny_teacher_dir, device="cpu")
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


@pytest.mark.slow
def test_evaluate_icl_on_the_tiny_teacher_writes_results(tiny_teacher_dir, massive_dir, tmp_path):
    from core.config import load_config
    from evaluation.config import EvalConfig
    from evaluation.icl import evaluate_icl
    from evaluation.massive import load_split

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
    assert saved["label_eos"] is False and saved["calibration"] == "none" and "accuracy_uncalibrated" not in saved
    assert result["accuracy"] == saved["accuracy"]
    assert (tmp_path / "icl-tiny.md").read_text().count("\n| ") >= 3
    assert (tmp_path / "icl-tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------- the harness proven on a task only demos solve

# Every utterance of a locale carries that locale's one intent; utterances are random nonsense words
# drawn the same way in every locale. Nothing in a query tells its locale, so without demonstrations
# the label can only be guessed, while any one demonstration reveals it.
SYNTHETIC_LOCALES = ["en-US", "de-DE", "fr-FR", "es-ES", "it-IT", "nl-NL"]
# One-word intents (label text = the intent), the first six that are one token of the tiny tokenizer
# (whose 2000 pieces hold few whole words), so that a label is a single scored token.
SYNTHETIC_LABEL_WORDS = ["the", "you", "and", "for", "that", "what", "with", "not", "was", "von", "und", "les"]
SYNTHETIC_TRAIN, SYNTHETIC_TEST = 120, 40  # ids per locale, the same ids in every locale
SYNTHETIC_SHOTS = [0, 1, 2, 3]
SYNTHETIC_STEPS = 300


def _nonsense_utterance(rng) -> str:
    syllables = [c + v for c in "bdfgkmnprstvz" for v in "aeiou"]
    return " ".join("".join(rng.choices(syllables, k=rng.randint(1, 2))) for _ in range(rng.randint(2, 3)))


def write_synthetic_massive(out_dir, tokenizer) -> dict[str, str]:
    """MASSIVE-format <locale>.jsonl files of the synthetic task; returns {locale: intent}."""
    import random

    labels = [w for w in SYNTHETIC_LABEL_WORDS if len(tokenizer(w, add_special_tokens=False)["input_ids"]) == 1]
    assert len(labels) >= len(SYNTHETIC_LOCALES), labels
    intent_of = dict(zip(SYNTHETIC_LOCALES, labels))
    out_dir.mkdir(parents=True, exist_ok=True)
    for loc, intent in intent_of.items():
        rng = random.Random(f"synthetic:{loc}")
        utts: list[str] = []
        while len(utts) < SYNTHETIC_TRAIN + SYNTHETIC_TEST:
            utt = _nonsense_utterance(rng)
            if utt not in utts:
                utts.append(utt)
        with open(out_dir / f"{loc}.jsonl", "w", encoding="utf-8") as f:
            for i, utt in enumerate(utts):
                row = {"id": str(i), "locale": loc, "partition": "train" if i < SYNTHETIC_TRAIN else "test",
                       "scenario": intent, "intent": intent, "utt": utt, "annot_utt": utt}
                f.write(json.dumps(row) + "\n")
    return intent_of


def train_synthetic_icl_model(out, tokenizer, data_dir, icfg):
    """A small T5 trained on the harness's own prompts (`build_prompt`, `encode_prompt`, k in 0..3
    demos from `sample_demos`) with the label text (no eos, as `label_eos: false` scores it) as target."""
    import random

    from fixtures_models import save_model_dir

    from core.models import ModelConfig, build_model
    from data_prep.tokenizer import special_ids
    from evaluation.massive import pad_right
    from massive.loader import load_massive

    data = load_massive(str(data_dir), locales=SYNTHETIC_LOCALES, partitions=("train",), progress=False)
    pools = {loc: data.examples(locale=loc, partition="train") for loc in SYNTHETIC_LOCALES}
    clm_id = special_ids(tokenizer).clm if icfg.clm_prompt else None
    model = build_model(ModelConfig(preset="tiny", d_model=64, d_ff=256, num_heads=4, d_kv=16), tokenizer, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    model.train()
    for step in range(SYNTHETIC_STEPS):
        sources, targets = [], []
        for _ in range(32):
            loc = rng.choice(SYNTHETIC_LOCALES)
            query = rng.choice(pools[loc])
            demos = sample_demos(pools[loc], query, rng.choice(SYNTHETIC_SHOTS), seed=step, locale=loc)
            text = build_prompt(query.utt, demos, icfg.prompt_template, icfg.demo_template)
            sources.append(encode_prompt(tokenizer, text, clm_id, icfg.max_prompt_tokens))
            targets.append(label_token_ids(tokenizer, [intent_label_text(query.intent)], None)[0])
        input_ids, attention_mask = pad_right(sources, tokenizer.pad_token_id)
        labels, label_mask = pad_right(targets, tokenizer.pad_token_id)
        labels = labels.masked_fill(label_mask == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return save_model_dir(model, tokenizer, out)


@pytest.fixture(scope="module")
def synthetic_icl(tiny_tokenizer_dir, tmp_path_factory):
    """(data directory, trained model directory, {locale: intent}) of the synthetic task."""
    from data_prep.tokenizer import load_tokenizer
    from evaluation.config import ICLConfig

    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    root = tmp_path_factory.mktemp("synthetic_icl")
    intent_of = write_synthetic_massive(root / "data", tokenizer)
    model_dir = train_synthetic_icl_model(root / "model", tokenizer, root / "data", ICLConfig())
    return root / "data", model_dir, intent_of


@pytest.mark.slow
def test_harness_solves_a_task_only_demonstrations_reveal(synthetic_icl, tmp_path):
    from core.config import load_config
    from evaluation.config import EvalConfig
    from evaluation.icl import evaluate_icl

    data_dir, model_dir, intent_of = synthetic_icl
    cfg = load_config(EvalConfig, overrides=[
        f"icl.data={data_dir}", f"icl.locales=[{', '.join(SYNTHETIC_LOCALES)}]", f"icl.shots={SYNTHETIC_SHOTS}",
        "icl.max_examples=0", "device=cpu", "bootstrap_samples=200",
    ])
    result = evaluate_icl(cfg, model_dir, tmp_path, name="synthetic")
    print("synthetic ICL accuracy per k:", result["accuracy"])
    assert result["num_labels"] == len(SYNTHETIC_LOCALES) and result["chance"] == pytest.approx(1 / 6)
    assert result["label_eos"] is False and result["calibration"] == "none" and "accuracy_uncalibrated" not in result
    assert all(s["n"] == SYNTHETIC_TEST for s in result["per_locale"].values())
    # k = 0: the query says nothing about the label, so the model can only guess (chance 1/6).
    assert result["accuracy"]["0"] < 0.5
    # k >= 1: one demonstration names the label, and the harness reads it off.
    for k in ("1", "2", "3"):
        assert result["accuracy"][k] > 0.9, (k, result["accuracy"])
        assert all(s["top_prediction"][k][0] == intent_of[loc] for loc, s in result["per_locale"].items())


@pytest.mark.slow
def test_contextual_calibration_through_the_cli_on_the_synthetic_model(synthetic_icl, tmp_path, capsys):
    from launch.cli import main

    data_dir, model_dir, _ = synthetic_icl
    common = ["evaluate", "icl", "--model", str(model_dir), "--locales", *SYNTHETIC_LOCALES,
              "--shots", *map(str, SYNTHETIC_SHOTS), "--max-examples", "0",
              f"icl.data={data_dir}", "device=cpu", "bootstrap_samples=200"]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "cal"), "--calibration", "contextual",
                 'icl.content_free=["N/A", "", "[MASK]"]']) == 0
    assert "calibrated k=0" in capsys.readouterr().out
    plain = json.loads((tmp_path / "plain" / "icl.json").read_text())
    cal = json.loads((tmp_path / "cal" / "icl.json").read_text())
    print("calibrated:", cal["accuracy"], "uncalibrated:", cal["accuracy_uncalibrated"])
    assert cal["calibration"] == "contextual" and cal["content_free"] == ["N/A", "", "[MASK]"]
    assert plain["calibration"] == "none" and plain["content_free"] is None
    # The uncalibrated ranking of the calibrated run is the plain run, value for value.
    assert cal["accuracy_uncalibrated"] == plain["accuracy"]
    assert cal["accuracy_uncalibrated_ci"] == plain["accuracy_ci"]
    for loc, s in cal["per_locale"].items():
        assert s["accuracy_uncalibrated"] == plain["per_locale"][loc]["accuracy"]
        assert s["top_prediction_uncalibrated"] == plain["per_locale"][loc]["top_prediction"]
    # Contextual calibration assumes the label prior comes from the prompt and the label from the query.
    # Here the demonstrations alone give the label, so the content-free query with the same demos
    # predicts it just as surely, and dividing by p_cf cancels the signal: that is why calibration is
    # opt-in (icl.calibration: none by default) and always reported beside the raw scores.
    assert cal["accuracy"]["0"] < 0.5  # still nothing to go on at k=0
    for k in ("1", "2", "3"):
        assert cal["accuracy"][k] < plain["accuracy"][k] - 0.3, (k, cal["accuracy"], plain["accuracy"])
    md = squash_tables((tmp_path / "cal" / "icl.md").read_text())
    assert "| acc k=0 | uncal. k=0 | acc k=1 | uncal. k=1 |" in md
    assert 'content-free queries "N/A", "", "[MASK]"' in md and "uncal." not in (tmp_path / "plain" / "icl.md").read_text()
