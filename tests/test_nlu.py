"""Encoder-only NLU model: word/sub-word alignment, heads, loss, persistence, decoding."""

from __future__ import annotations

import json

import pytest
import torch

from student.kinds import build_ensemble, load_nlu_model
from student.nlu import (
    IGNORE_INDEX,
    LABELS_FILE,
    EncoderNLUModel,
    NLUEnsemble,
    NLULabels,
    TokenNgrams,
    decode_predictions,
    encode_words,
    first_subword_indices,
    gather_word_logits,
    nlu_loss,
    slot_label_ids,
    word_char_spans,
)

INTENTS = ["alarm_set", "play_music", "weather_query"]
SLOTS = ["Other", "time", "date", "place_name"]

LATIN = ["wake", "me", "up", "at", "five", "am", "this", "week"]
THAI = ["ปลุกฉัน", "ตอน", "ตีห้า", "สัปดาห์นี้"]
# ja-JP is split into characters, each its own word (massive.format.CHAR_SPLIT_LOCALES).
JAPANESE = list("今週は午前五時に起こして")


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
    from data_prep.tokenizer import load_tokenizer

    return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def seq2seq(tokenizer):
    from core.models import ModelConfig, build_model

    torch.manual_seed(0)
    cfg = ModelConfig(preset="tiny", num_layers=2, num_decoder_layers=1, d_model=32, num_heads=2, d_ff=64)
    return build_model(cfg, tokenizer, seed=0)


@pytest.fixture()
def model(seq2seq, tokenizer):
    torch.manual_seed(1)
    labels = NLULabels(intents=INTENTS, slot_labels=SLOTS, max_length=32, source_model="tiny-test")
    return EncoderNLUModel.from_seq2seq(seq2seq, labels, tokenizer).eval()


# ----------------------------------------------------------------------------- alignment


def test_first_subword_indices_assigns_boundary_pieces_to_the_following_word():
    # Offsets a Metaspace tokenizer gives "ab cd" split as "▁" "a" "b" "▁" "cd" "</s>": the first,
    # prepended "▁" overlaps the first character, the second "▁" covers the space.
    _, spans = word_char_spans(["ab", "cd"])
    assert spans == [(0, 2), (3, 5)]
    offsets = [(0, 1), (0, 1), (1, 2), (2, 3), (3, 5), (0, 0)]
    assert first_subword_indices(offsets, spans) == [0, 3]
    # The second word truncated away: only the boundary piece of word 1 remained -> still word 1.
    assert first_subword_indices([(0, 2), (2, 3), (0, 0)], spans) == [0, 1]
    assert first_subword_indices([(0, 2), (0, 0)], spans) == [0, -1]


def test_word_char_spans_rejects_empty_and_spaced_words():
    with pytest.raises(ValueError, match="word 1"):
        word_char_spans(["a", ""])
    with pytest.raises(ValueError, match="whitespace"):
        word_char_spans(["a b"])


@pytest.mark.parametrize("words", [LATIN, THAI, JAPANESE], ids=["latin", "thai", "cjk"])
def test_encode_words_first_subwords_cover_each_word_exactly(tokenizer, words):
    enc = encode_words(tokenizer, [words], max_length=128)
    ids = enc["input_ids"][0].tolist()
    starts = enc["word_starts"][0].tolist()
    assert len(starts) == len(words)
    assert all(s >= 0 for s in starts)
    assert starts == sorted(starts) and len(set(starts)) == len(starts)
    # The tokens from one word's first sub-word to the next word's decode to exactly that word:
    # the alignment neither drops nor shares pieces.
    ends = starts[1:] + [ids.index(tokenizer.eos_token_id)]
    for word, start, end in zip(words, starts, ends):
        assert tokenizer.decode(ids[start:end]).strip() == word
    # Same token sequence as the plain text (what the text-to-text format feeds the model).
    assert ids == tokenizer(" ".join(words))["input_ids"]


def test_encode_words_batch_padding_and_truncation(tokenizer):
    batch = [LATIN, ["hi"], JAPANESE]
    full = encode_words(tokenizer, batch, max_length=128)
    short = encode_words(tokenizer, batch, max_length=6)
    assert full["word_starts"].shape == (3, len(JAPANESE))
    # Padding words beyond an utterance are -1; padding tokens are masked out with pad ids.
    assert full["word_starts"][1, 1:].eq(-1).all()
    lengths = full["attention_mask"].sum(1)
    assert full["input_ids"][1, lengths[1]:].eq(tokenizer.pad_token_id).all()
    # Truncated: at most 6 tokens (eos kept); words whose first piece fell off are -1, the others
    # keep the positions they had untruncated.
    assert short["input_ids"].shape[1] <= 6
    for b in range(3):
        for i, start in enumerate(short["word_starts"][b].tolist()):
            if start >= 0:
                assert start == full["word_starts"][b, i] and start < 5
            elif i < len(batch[b]):
                assert full["word_starts"][b, i] >= 5
    assert short["word_starts"][0].tolist()[-1] == -1


def test_slot_label_ids_pads_with_ignore_index_and_rejects_unknown_labels():
    ids = slot_label_ids([["Other", "time"], ["date"]], SLOTS, 3)
    assert ids.tolist() == [[0, 1, IGNORE_INDEX], [2, IGNORE_INDEX, IGNORE_INDEX]]
    with pytest.raises(KeyError, match="nonsense"):
        slot_label_ids([["nonsense"]], SLOTS, 1)


# ----------------------------------------------------------------------------- model


def test_heads_shapes_and_encoder_weights_come_from_the_seq2seq_model(model, seq2seq, tokenizer):
    enc = encode_words(tokenizer, [LATIN, THAI], max_length=32)
    intent_logits, slot_logits = model(enc["input_ids"], enc["attention_mask"])
    batch, length = enc["input_ids"].shape
    assert intent_logits.shape == (batch, len(INTENTS))
    assert slot_logits.shape == (batch, length, len(SLOTS))
    seq2seq.eval()
    with torch.no_grad():
        expected = seq2seq.get_encoder()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
        got = model.encoder(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
    torch.testing.assert_close(got, expected)


def test_outputs_at_real_tokens_do_not_depend_on_padding(model, tokenizer):
    alone = encode_words(tokenizer, [["hi", "there"]], max_length=32)
    padded = encode_words(tokenizer, [["hi", "there"], LATIN], max_length=32)
    assert padded["input_ids"].shape[1] > alone["input_ids"].shape[1]
    with torch.no_grad():
        a_intent, a_slots = model(alone["input_ids"], alone["attention_mask"])
        p_intent, p_slots = model(padded["input_ids"], padded["attention_mask"])
    torch.testing.assert_close(p_intent[0], a_intent[0], atol=1e-5, rtol=1e-5)
    a_words = gather_word_logits(a_slots, alone["word_starts"])[0]
    p_words = gather_word_logits(p_slots, padded["word_starts"][:1, :2])[0]
    torch.testing.assert_close(p_words, a_words, atol=1e-5, rtol=1e-5)


def test_loss_ignores_padding_words_and_truncated_words():
    torch.manual_seed(0)
    intent_logits = torch.randn(2, 3)
    slot_logits = torch.randn(2, 5, 4)
    word_starts = torch.tensor([[0, 2, 3], [1, -1, -1]])  # row 1: one word, the others padding/truncated
    intent_labels = torch.tensor([2, 0])
    slot_labels = torch.tensor([[1, 0, 3], [2, IGNORE_INDEX, IGNORE_INDEX]])
    loss, parts = nlu_loss(intent_logits, slot_logits, word_starts, intent_labels, slot_labels)
    # Garbage labels at positions whose word_start is -1 change nothing.
    garbage = slot_labels.clone()
    garbage[1, 1:] = torch.tensor([3, 1])
    loss_garbage, _ = nlu_loss(intent_logits, slot_logits, word_starts, intent_labels, garbage)
    torch.testing.assert_close(loss_garbage, loss)
    # Reference: mean CE over the 4 real words (token positions 0, 2, 3 of row 0 and 1 of row 1).
    logp = slot_logits.log_softmax(-1)
    expected_slot = -(logp[0, 0, 1] + logp[0, 2, 0] + logp[0, 3, 3] + logp[1, 1, 2]) / 4
    expected_intent = torch.nn.functional.cross_entropy(intent_logits, intent_labels)
    torch.testing.assert_close(parts["slot_loss"], expected_slot)
    torch.testing.assert_close(parts["intent_loss"], expected_intent)
    torch.testing.assert_close(loss, expected_intent + expected_slot)
    weighted, _ = nlu_loss(intent_logits, slot_logits, word_starts, intent_labels, slot_labels, slot_weight=0.5)
    torch.testing.assert_close(weighted, expected_intent + 0.5 * expected_slot)


def test_loss_backpropagates_into_encoder_and_both_heads(model, tokenizer):
    model.train()
    enc = encode_words(tokenizer, [LATIN, JAPANESE], max_length=32)
    slot_labels = slot_label_ids([["Other"] * len(LATIN), ["time"] * len(JAPANESE)], SLOTS, enc["word_starts"].shape[1])
    intent_logits, slot_logits = model(enc["input_ids"], enc["attention_mask"])
    loss, _ = nlu_loss(intent_logits, slot_logits, enc["word_starts"], torch.tensor([0, 1]), slot_labels)
    loss.backward()
    for name in ("intent_head.weight", "slot_head.weight", "encoder.shared.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- hashed n-grams


def _reference_bucket(window: list[int], num_buckets: int) -> int:
    h = len(window)
    for token in window:
        h = (h * 1_000_003 + token) % (2**31 - 1)
    return h % num_buckets


def test_token_ngrams_hash_each_window_inside_the_utterance_once():
    torch.manual_seed(0)
    ngrams = TokenNgrams(num_buckets=101, orders=[2, 3], hidden=4)
    input_ids = torch.tensor([[5, 9, 2, 7, 1], [3, 4, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert ngrams.buckets(input_ids, 3)[0].tolist() == [_reference_bucket(input_ids[0, i : i + 3].tolist(), 101)
                                                         for i in range(3)]
    features, count = ngrams(input_ids, mask)
    assert count.squeeze(-1).tolist() == [4 + 3, 2 + 1]  # bigrams + trigrams inside each utterance
    table = ngrams.embed.weight
    # Position t holds the n-grams that end at t; the first token ends none.
    expected = table[_reference_bucket([9, 2], 101)] + table[_reference_bucket([5, 9, 2], 101)]
    torch.testing.assert_close(features[0, 2], expected)
    assert torch.equal(features[0, 0], torch.zeros(4))
    # Windows that reach into the padding contribute nothing.
    torch.testing.assert_close(features[1, 2], table[_reference_bucket([4, 1], 101)] + table[_reference_bucket([3, 4, 1], 101)])
    assert torch.equal(features[1, 3:], torch.zeros(2, 4))


def test_ngram_features_reach_both_heads_and_ignore_padding(seq2seq, tokenizer):
    torch.manual_seed(1)
    labels = NLULabels(intents=INTENTS, slot_labels=SLOTS, max_length=32, ngram_buckets=64, ngram_inputs=True)
    model = EncoderNLUModel.from_seq2seq(seq2seq, labels, tokenizer).eval()
    alone = encode_words(tokenizer, [["hi", "there", "friend"]], max_length=32)
    padded = encode_words(tokenizer, [["hi", "there", "friend"], LATIN], max_length=32)
    with torch.no_grad():
        a_intent, a_slots = model(alone["input_ids"], alone["attention_mask"])
        p_intent, p_slots = model(padded["input_ids"], padded["attention_mask"])
        torch.testing.assert_close(p_intent[0], a_intent[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(p_slots[0, : a_slots.shape[1]], a_slots[0], atol=1e-5, rtol=1e-5)
        model.ngrams.embed.weight.add_(1.0)
        moved_intent, moved_slots = model(alone["input_ids"], alone["attention_mask"])
    assert not torch.allclose(moved_intent, a_intent) and not torch.allclose(moved_slots, a_slots)
    with pytest.raises(ValueError, match="ngram_orders"):
        NLULabels(intents=INTENTS, slot_labels=SLOTS, ngram_buckets=8, ngram_orders=[1, 2])


# ----------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("ngram_buckets", [0, 64], ids=["plain", "ngrams"])
def test_save_load_round_trip_gives_identical_outputs(model, seq2seq, tokenizer, tmp_path, ngram_buckets):
    if ngram_buckets:
        labels = NLULabels(intents=INTENTS, slot_labels=SLOTS, max_length=32, source_model="tiny-test",
                           ngram_buckets=ngram_buckets, ngram_inputs=True)
        model = EncoderNLUModel.from_seq2seq(seq2seq, labels, tokenizer).eval()
    out = model.save_pretrained(tmp_path / "nlu")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", LABELS_FILE, "tokenizer.json"} <= names
    saved = json.loads((out / LABELS_FILE).read_text())
    assert saved["intents"] == INTENTS and saved["slot_labels"] == SLOTS and saved["max_length"] == 32
    assert saved["source_model"] == "tiny-test"
    assert json.loads((out / "config.json").read_text())["architectures"] == ["T5EncoderModel"]

    loaded = EncoderNLUModel.from_pretrained(out)
    assert not loaded.training and loaded.labels == model.labels
    enc = encode_words(loaded.tokenizer, [LATIN, THAI, JAPANESE], max_length=32)
    with torch.no_grad():
        before = model(enc["input_ids"], enc["attention_mask"])
        after = loaded(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    # The tied embedding stays tied after loading.
    assert loaded.encoder.shared.weight.data_ptr() == loaded.encoder.encoder.embed_tokens.weight.data_ptr()


def test_from_pretrained_rejects_broken_directories(model, tmp_path):
    out = model.save_pretrained(tmp_path / "nlu")
    (out / LABELS_FILE).write_text('{"intents": ["a"], "slot_labels": ["Other"], "colour": 1}')
    with pytest.raises(ValueError, match="colour"):
        EncoderNLUModel.from_pretrained(out)
    (out / LABELS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=LABELS_FILE):
        EncoderNLUModel.from_pretrained(out)


def _member(seq2seq, tokenizer, seed: int, ngram_buckets: int = 0, slots: list[str] = SLOTS) -> EncoderNLUModel:
    torch.manual_seed(seed)
    labels = NLULabels(intents=INTENTS, slot_labels=slots, max_length=32, source_model=f"member-{seed}",
                       ngram_buckets=ngram_buckets, ngram_inputs=bool(ngram_buckets))
    member = EncoderNLUModel.from_seq2seq(seq2seq, labels, tokenizer).eval()
    with torch.no_grad():  # members that differ in their encoders too, not only in their heads
        for p in member.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return member


def test_ensemble_averages_member_log_probabilities(seq2seq, tokenizer):
    members = [_member(seq2seq, tokenizer, 1), _member(seq2seq, tokenizer, 2, ngram_buckets=64)]
    ensemble = NLUEnsemble(members, members[0].labels, tokenizer).eval()
    enc = encode_words(tokenizer, [LATIN, THAI, JAPANESE], max_length=32)
    with torch.no_grad():
        intent, slots = ensemble(enc["input_ids"], enc["attention_mask"])
        outs = [m(enc["input_ids"], enc["attention_mask"]) for m in members]
    expected_intent = (outs[0][0].log_softmax(-1) + outs[1][0].log_softmax(-1)) / 2
    expected_slots = (outs[0][1].log_softmax(-1) + outs[1][1].log_softmax(-1)) / 2
    torch.testing.assert_close(intent, expected_intent)
    torch.testing.assert_close(slots, expected_slots)
    assert not torch.allclose(outs[0][0], outs[1][0])  # the members really differ
    preds = ensemble.predict_words([LATIN, JAPANESE])
    assert [len(p.slots) for p in preds] == [len(LATIN), len(JAPANESE)]
    assert preds[0].intent == INTENTS[int(intent[0].argmax())]


def test_ensemble_directory_round_trip_and_member_checks(seq2seq, tokenizer, tmp_path):
    dirs = [_member(seq2seq, tokenizer, seed, ngram_buckets=64 * seed).save_pretrained(tmp_path / f"m{seed}")
            for seed in (0, 1)]
    out = build_ensemble(dirs, tmp_path / "ensemble")
    saved = json.loads((out / LABELS_FILE).read_text())
    assert saved["members"] == ["member-0", "member-1"] and saved["intents"] == INTENTS
    assert (out / "member-1" / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    loaded = load_nlu_model(out)
    assert isinstance(loaded, NLUEnsemble) and not loaded.training and len(loaded.members) == 2
    assert isinstance(load_nlu_model(dirs[0]), EncoderNLUModel)
    enc = encode_words(loaded.tokenizer, [LATIN, THAI], max_length=32)
    with torch.no_grad():
        direct = NLUEnsemble([load_nlu_model(d) for d in dirs], loaded.labels)(enc["input_ids"], enc["attention_mask"])
        again = loaded(enc["input_ids"], enc["attention_mask"])
    assert torch.equal(direct[0], again[0]) and torch.equal(direct[1], again[1])

    with pytest.raises(ValueError, match="at least 2"):
        build_ensemble(dirs[:1], tmp_path / "one")
    with pytest.raises(ValueError, match="itself an ensemble"):
        build_ensemble([out, dirs[0]], tmp_path / "nested")
    other = _member(seq2seq, tokenizer, 3, slots=["Other", "time"]).save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="member 1 has other intents, slot labels"):
        build_ensemble([dirs[0], other], tmp_path / "mixed")
    # A member path that leaves the ensemble directory is refused, not followed.
    saved["members"] = ["member-0", "../m1"]
    (out / LABELS_FILE).write_text(json.dumps(saved))
    with pytest.raises(Exception, match="escapes"):
        load_nlu_model(out)


def test_labels_must_start_with_other_and_be_unique():
    with pytest.raises(ValueError, match="Other"):
        NLULabels(intents=INTENTS, slot_labels=["time", "Other"])
    with pytest.raises(ValueError, match="duplicates"):
        NLULabels(intents=["a", "a"], slot_labels=SLOTS)


# ----------------------------------------------------------------------------- decoding


def test_decode_predictions_maps_argmax_to_labels_and_truncated_words_to_other():
    labels = NLULabels(intents=INTENTS, slot_labels=SLOTS)
    intent_logits = torch.tensor([[0.0, 0.0, 5.0], [3.0, 0.0, 0.0]])
    slot_logits = torch.zeros(2, 4, len(SLOTS))
    slot_logits[0, 0, 1] = 9  # token 0 -> time
    slot_logits[0, 2, 3] = 9  # token 2 -> place_name
    slot_logits[1, 1, 2] = 9  # token 1 -> date
    slot_logits[1, 3, 1] = 9  # token 3 belongs to no word (the word was truncated)
    word_starts = torch.tensor([[0, 2, -1], [1, -1, -1]])
    preds = decode_predictions(intent_logits, slot_logits, word_starts, [2, 3], labels)
    assert [p.intent for p in preds] == ["weather_query", "alarm_set"]
    assert preds[0].slots == ["time", "place_name"]
    assert preds[1].slots == ["date", "Other", "Other"]


def test_predict_words_returns_one_label_per_word_and_keeps_training_mode(model):
    model.train()
    batch = [LATIN, THAI, JAPANESE, ["x"] * 40]  # the last is truncated at max_length 32
    preds = model.predict_words(batch, batch_size=3)
    assert model.training
    assert [len(p.slots) for p in preds] == [len(w) for w in batch]
    assert all(p.intent in INTENTS and set(p.slots) <= set(SLOTS) for p in preds)
    # Words past the truncation point are "Other" whatever the head says.
    assert preds[3].slots[-1] == "Other"
    # Deterministic in eval mode: the same batch gives the same predictions.
    assert model.predict_words(batch) == preds


def test_bare_boundary_piece_is_not_a_words_first_subword():
    from student.alignment import first_subword_indices, word_char_spans

    # "明 日": tokens "▁" "明" "▁" "日"; offsets of a bare "▁" cover the space before its word.
    _, spans = word_char_spans(["明", "日"])
    offsets = [(0, 1), (0, 1), (1, 2), (2, 3), (0, 0)]
    tokens = ["\u2581", "明", "\u2581", "日", "</s>"]
    assert first_subword_indices(offsets, spans, tokens) == [1, 3]
    # Without token strings the old rule (first piece) applies; a word with only "▁" keeps it.
    assert first_subword_indices(offsets, spans) == [0, 2]
    assert first_subword_indices([(0, 1), (1, 2), (0, 0)], spans, ["\u2581", "\u2581", "</s>"]) == [0, 1]


def test_cjk_words_start_on_their_character(tiny_tokenizer_dir):
    from data_prep.tokenizer import load_tokenizer
    from student.nlu import encode_words

    tok = load_tokenizer(tiny_tokenizer_dir)
    words = list("明日の天気")
    enc = encode_words(tok, [words], 64)
    pieces = tok.convert_ids_to_tokens(enc["input_ids"][0].tolist())
    for i, t in enumerate(enc["word_starts"][0].tolist()):
        assert pieces[t] != "\u2581" and words[i] in pieces[t]
