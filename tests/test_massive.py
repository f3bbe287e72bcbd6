"""MASSIVE loading, annot_utt parsing, the text-to-text format and bad-row handling.

Expected words/slots below were checked by hand against the real rows (file, id) of the data root.
"""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

from massive import loader, rows
from massive.format import (
    CHAR_SPLIT_LOCALES,
    MASSIVE_LOCALES,
    OTHER,
    AnnotationError,
    NLUPrediction,
    check_generation,
    parse_annot_utt,
    parse_target,
    to_text_to_text,
)
from massive.loader import (
    MassiveFormatError,
    MassiveSourceError,
    evaluation_utterances,
    load_massive,
    massive_utterances,
)

X = OTHER  # short for the tables below


def read_rows(massive_dir: Path, locale: str) -> list[dict]:
    with gzip.open(massive_dir / f"{locale}.jsonl.gz", "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def row_by_id(massive_dir: Path, locale: str, row_id: str) -> dict:
    prefix = f'{{"id": "{row_id}", '  # official rows start with their id; decode only that line
    with gzip.open(massive_dir / f"{locale}.jsonl.gz", "rt", encoding="utf-8") as f:
        return json.loads(next(line for line in f if line.startswith(prefix)))


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


@pytest.fixture(scope="module")
def sample_rows(massive_dir: Path) -> dict[str, list[dict]]:
    """The first 30 real rows of en-US, de-DE and ja-JP (all three partitions occur among them)."""
    out = {}
    for loc in ("en-US", "de-DE", "ja-JP"):
        with gzip.open(massive_dir / f"{loc}.jsonl.gz", "rt", encoding="utf-8") as f:
            out[loc] = [json.loads(next(f)) for _ in range(30)]
    return out


@pytest.fixture()
def small_dir(tmp_path: Path, sample_rows) -> Path:
    """A directory with en-US.jsonl (plain) and de-DE.jsonl.gz, 30 real rows each."""
    d = tmp_path / "massive"
    write_jsonl(d / "en-US.jsonl", [json.dumps(r, ensure_ascii=False) for r in sample_rows["en-US"]])
    write_jsonl(d / "de-DE.jsonl.gz", [json.dumps(r, ensure_ascii=False) for r in sample_rows["de-DE"]])
    return d


# ----------------------------------------------------------------------------- locales


def test_locale_list_is_the_release() -> None:
    assert len(MASSIVE_LOCALES) == 52 == len(set(MASSIVE_LOCALES))
    assert list(MASSIVE_LOCALES) == sorted(MASSIVE_LOCALES)
    assert {"cy-GB", "ka-GE", "km-KH", "sw-KE", "en-US", "zh-TW"} <= set(MASSIVE_LOCALES)
    assert CHAR_SPLIT_LOCALES == {"ja-JP", "zh-CN", "zh-TW"}


def test_unknown_locale_names_a_close_match(massive_dir: Path) -> None:
    with pytest.raises(MassiveSourceError, match=r"'en-UK' is not a MASSIVE locale; did you mean en-US"):
        load_massive(massive_dir, locales=["en-UK"], progress=False)
    with pytest.raises(MassiveSourceError, match=r"'de_de' is not a MASSIVE locale; did you mean de-DE"):
        load_massive(massive_dir, locales="de_de", progress=False)
    with pytest.raises(MassiveSourceError) as info:
        load_massive(massive_dir, locales=["klingon"], progress=False)
    assert "'klingon' is not a MASSIVE locale (MASSIVE locales: af-ZA, am-ET" in str(info.value)


def test_known_locale_missing_from_source_lists_what_it_has(massive_dir: Path, small_dir: Path) -> None:
    available = sorted(p.name.split(".")[0] for p in massive_dir.glob("*.jsonl*"))
    missing = [loc for loc in MASSIVE_LOCALES if loc not in available]
    assert missing, "the shared data is expected to lack some of the 52 locales"
    with pytest.raises(MassiveSourceError) as info:
        load_massive(massive_dir, locales=[missing[0]], progress=False)
    msg = str(info.value)
    assert f"has no file for MASSIVE locale {missing[0]}; it has {len(available)} locale(s): " in msg
    assert ", ".join(available) in msg
    with pytest.raises(
        MassiveSourceError, match=r"no file for MASSIVE locale fr-FR; it has 2 locale\(s\): de-DE, en-US"
    ):
        load_massive(small_dir, locales=["en-US", "fr-FR"], progress=False)


# ----------------------------------------------------------------------------- annot_utt on real rows

REAL_ROWS = [
    # locale, id, words, slots
    ("en-US", "0", "wake me up at five am this week".split(), [X, X, X, X, "time", "time", "date", "date"]),
    (
        "en-US",
        "790",
        ["mild", "or", "heavy", "weather"],
        ["weather_descriptor", X, "weather_descriptor", X],
    ),
    (
        "de-DE",
        "5332",
        "zeit zwischen den usa und kanada".split(),
        [X, X, X, "place_name", X, "place_name"],
    ),
    ("ar-SA", "790", ["طقس", "معتدل", "أو", "شديد"], [X, "weather_descriptor", X, "weather_descriptor"]),
    # A span boundary inside a Thai word: annot_utt has a space there, and so has utt.
    ("th-TH", "668", ["เบอ", "ร์เกอร์และ", "โค้ก"], ["food_type", X, "food_type"]),
    (
        "ru-RU",
        "3912",
        ["включи", "танцевальную", "музыку", "и", "кантри"],
        [X, "music_genre", X, "music_genre", "music_genre"],
    ),
    (
        "hi-IN",
        "1301",
        ["ट्रंप", "की", "नई", "विदेश", "नीति", "के", "बारे", "में", "बताओ"],
        ["news_topic", "news_topic", X, "news_topic", "news_topic", X, X, X, X],
    ),
    # CJK: one word per character, whitespace dropped; all-ASCII chunks stay one word (official baseline).
    (
        "ja-JP",
        "0",
        list("今週は午前五時に起こして"),
        ["date", "date", X, "time", "time", "time", "time", X, X, X, X, X],
    ),
    (
        "ja-JP",
        "19",
        ["olly", *"ベッドルームのライトを消して"],
        [X] + ["house_place"] * 6 + [X] * 8,
    ),
    (
        "ja-JP",
        "50",
        ["g.", "m.", "t.", *"プラス五の時間を教えて"],
        ["time_zone"] * 7 + [X] * 7,
    ),
    ("zh-CN", "0", list("这周五点叫我起床"), ["date", "date", "time", "time", X, X, X, X]),
    (
        "zh-CN",
        "2296",
        [*"让我知道今天的", "n.", "b.", "a.", "分", "数"],
        [X, X, X, X, "date", "date", "date"] + ["news_topic"] * 5,
    ),
    (
        "zh-TW",
        "506",
        ["播", "s.", "h.", "e.", "的", "歌", "曲"],
        [X, "artist_name", "artist_name", "artist_name", X, X, X],
    ),
]


@pytest.mark.parametrize(
    ("locale", "row_id", "words", "slots"), REAL_ROWS, ids=[f"{r[0]}-{r[1]}" for r in REAL_ROWS]
)
def test_parse_annot_utt_real_rows(massive_dir: Path, locale, row_id, words, slots) -> None:
    row = row_by_id(massive_dir, locale, row_id)
    got_words, got_slots = parse_annot_utt(row["annot_utt"], locale)
    assert got_words == words
    assert got_slots == slots
    if locale in CHAR_SPLIT_LOCALES:
        assert "".join(got_words) == "".join(row["utt"].split())
    else:
        assert " ".join(got_words) == row["utt"]


def test_cjk_ascii_chunk_after_span_gets_other(massive_dir: Path) -> None:
    """The official script forgets to reset the label after an ASCII chunk that closes a span
    (`[music_genre : jazz] playlist` would label `playlist` and the rest as music_genre); we don't."""
    row = row_by_id(massive_dir, "ja-JP", "139")
    assert row["annot_utt"] == "私の [music_genre : jazz] playlist を再生"
    words, slots = parse_annot_utt(row["annot_utt"], "ja-JP")
    assert words == ["私", "の", "jazz", "playlist", "を", "再", "生"]
    assert slots == [X, X, "music_genre", X, X, X, X]


@pytest.mark.parametrize(
    ("annot", "words", "slots"),
    [
        # Adjacent spans of the same type: the real data has none (0 of 76,129 adjacent span pairs
        # share a type), so the spacing is checked on made-up rows. Words keep their own labels;
        # the word-level format cannot tell one span from two (a run of a label is one span).
        ("[date : monday] [date : tuesday] please", ["monday", "tuesday", "please"], ["date", "date", X]),
        ("[date : monday][date : tuesday]", ["mondaytuesday"], ["date"]),
        # Span at start and end, punctuation glued to a span, extra spaces in the markup.
        ("[place_name : paris]?", ["paris?"], ["place_name"]),
        ("what about l'[place_name : italie]", ["what", "about", "l'italie"], [X, X, "place_name"]),
        ("set  [time :   five   am ]  ok", ["set", "five", "am", "ok"], [X, "time", "time", X]),
        ("[time : 5:30] alarm", ["5:30", "alarm"], ["time", X]),
        ("no slots at all", ["no", "slots", "at", "all"], [X, X, X, X]),
    ],
)
def test_parse_annot_utt_spacing(annot, words, slots) -> None:
    assert parse_annot_utt(annot, "en-US") == (words, slots)


def test_parse_annot_utt_cjk_spacing() -> None:
    assert parse_annot_utt("[date : 今週] は [artist_name : aiko]の曲", "ja-JP") == (
        [
            "今",
            "週",
            "は",
            "a",
            "i",
            "k",
            "o",
            "の",
            "曲",
        ],  # a chunk mixing ASCII and CJK is split into characters
        ["date", "date", X, "artist_name", "artist_name", "artist_name", "artist_name", X, X],
    )
    assert parse_annot_utt("播放 [media_type : youtube] 播放", "zh-CN") == (
        ["播", "放", "youtube", "播", "放"],
        [X, X, "media_type", X, X],
    )


@pytest.mark.parametrize(
    "annot",
    [
        "wake me at [time : five am",
        "wake me at time : five am]",
        "wake me at [time five am]",
        "[ : five am]",
        "[time : ]",
        "[time of day : five]",
        "[time : [date : five]]",
        "[time : five]] am",
        "",
        "   ",
    ],
)
def test_parse_annot_utt_rejects_malformed(annot) -> None:
    with pytest.raises(AnnotationError):
        parse_annot_utt(annot, "en-US")


# ----------------------------------------------------------------------------- text-to-text


def test_to_text_to_text_official_format() -> None:
    words = "wake me up at five am".split()
    slots = [X, X, X, X, "time", "time"]
    assert to_text_to_text(words, slots, "alarm_set") == (
        "Annotate: wake me up at five am",
        "Other Other Other Other time time alarm_set",
    )
    with pytest.raises(ValueError, match="2 words but 1 slot labels"):
        to_text_to_text(["a", "b"], [X], "x")


def test_whole_label_tokens_format_and_parse_back() -> None:
    words = "wake me up at five".split()
    slots = [X, X, X, X, "time"]
    source, target = to_text_to_text(words, slots, "alarm_set", intent_first=True, label_tokens=True)
    assert source == "Annotate: wake me up at five"
    assert target == "<alarm_set><Other><Other><Other><Other><time>"
    assert parse_target(target, 5, intent_first=True) == NLUPrediction("alarm_set", slots)
    # Anything between label tokens (a stray piece, a space from decoding) is ignored.
    assert parse_target(" <Other>x <time> <alarm_set>", 2) == NLUPrediction("alarm_set", [X, "time"])


def test_span_targets_write_only_slot_values_and_parse_back_onto_the_words() -> None:
    words = "wake me up at five am tomorrow".split()
    slots = [X, X, X, X, "time", "time", "date"]
    source, target = to_text_to_text(words, slots, "alarm_set", label_tokens=True, spans=True)
    assert source == "Annotate: wake me up at five am tomorrow"
    assert target == "<alarm_set><time>five am<date>tomorrow"
    assert parse_target(target, 7, words=words) == NLUPrediction("alarm_set", slots)
    # Decoded text: spaces around label tokens, other case or compatibility forms still match.
    assert parse_target("<alarm_set><time> FIVE  am <date> tomorrow", 7, words=words).slots == slots
    # No slots: the intent alone.
    assert to_text_to_text(["hi"], [X], "greet", label_tokens=True, spans=True)[1] == "<greet>"
    with pytest.raises(ValueError, match="whole label tokens"):
        to_text_to_text(words, slots, "alarm_set", spans=True)


def test_place_spans_follows_the_order_of_the_spans_and_drops_what_it_cannot_place() -> None:
    from massive.format import place_spans

    words = "play the song and then the song again".split()
    # The second "the song" is placed after the first span, not on top of it.
    labels, ok = place_spans(words, [("song_name", "the song"), ("song_name", "the song")])
    assert labels == [X, "song_name", "song_name", X, X, "song_name", "song_name", X] and ok
    # A span found only before the cursor is still placed there when those words are free.
    labels, ok = place_spans(words, [("time", "again"), ("artist_name", "play")])
    assert labels == ["artist_name", X, X, X, X, X, X, "time"] and ok
    labels, ok = place_spans(words, [("time", "never said"), ("date", "then")])
    assert labels == [X, X, X, X, "date", X, X, X] and not ok
    # The first label token is the intent only when it is a known one (or no list is given).
    pred = parse_target("<time>then", 8, intents={"play_music"}, words=words)
    assert pred == NLUPrediction("", [X, X, X, X, "time", X, X, X])
    assert parse_target("", 2, words=["a", "b"]) == NLUPrediction("", [X, X])
    with pytest.raises(ValueError, match="num_words is 3 but 2 words"):
        parse_target("<a>", 3, words=["a", "b"])


def test_span_generation_check_reports_unplaced_spans() -> None:
    words = ["wake", "me", "at", "five"]
    good = check_generation("<alarm_set><time>five", 4, {"alarm_set"}, words=words)
    assert good.stopped and good.label_count_ok and good.known_intent
    bad = check_generation("<alarm_set><time>six", 4, {"alarm_set"}, words=words, stopped=False)
    assert not bad.stopped and not bad.label_count_ok and bad.known_intent
    assert not check_generation("", 4, {"alarm_set"}, words=words).known_intent


@pytest.mark.parametrize(
    ("text", "num_words", "intent", "slots"),
    [
        ("Other time alarm_set", 2, "alarm_set", [X, "time"]),
        ("", 3, "", [X, X, X]),
        ("   \n\t ", 2, "", [X, X]),
        ("alarm_set", 2, "alarm_set", [X, X]),  # no labels at all: padded
        ("time alarm_set", 3, "alarm_set", ["time", X, X]),  # too few labels: padded
        ("time date place_name Other alarm_set", 2, "alarm_set", ["time", "date"]),  # too many: truncated
        ("  Other \t time\n\nalarm_set  ", 2, "alarm_set", [X, "time"]),  # extra whitespace
        ("Other time Other", 3, "", [X, "time", X]),  # the intent is missing: a trailing Other is a label
        ("alarm_set", 0, "alarm_set", []),
        ("Other Other", 0, "", []),
    ],
)
def test_parse_target_garbage(text, num_words, intent, slots) -> None:
    assert parse_target(text, num_words) == NLUPrediction(intent=intent, slots=slots)


def test_parse_target_with_known_intents() -> None:
    # Without the label set "date" would be read as the intent; with it, it is a slot label.
    assert parse_target("time date", 2) == NLUPrediction("date", ["time", X])
    assert parse_target("time date", 2, intents={"alarm_set"}) == NLUPrediction("", ["time", "date"])
    assert parse_target("time alarm_set", 1, intents={"alarm_set"}) == NLUPrediction("alarm_set", ["time"])
    with pytest.raises(ValueError):
        parse_target("x", -1)


def test_intent_first_format_and_parse() -> None:
    words = "wake me up at five am".split()
    slots = [X, X, X, X, "time", "time"]
    source, target = to_text_to_text(words, slots, "alarm_set", intent_first=True)
    assert (source, target) == ("Annotate: wake me up at five am", "alarm_set Other Other Other Other time time")
    assert parse_target(target, 6, intent_first=True) == NLUPrediction("alarm_set", slots)
    # Read in the other order, the same text puts the intent among the labels: the order matters.
    assert parse_target(target, 6) == NLUPrediction("time", ["alarm_set", X, X, X, X, "time"])
    # A model that loops on Other after the intent: labels truncated to the word count.
    assert parse_target("weather_query " + "Other " * 40, 3, intent_first=True) == NLUPrediction("weather_query", [X] * 3)
    # A leading Other, or an unknown first token when the label set is given, is not an intent.
    assert parse_target("Other time", 2, intent_first=True) == NLUPrediction("", [X, "time"])
    assert parse_target("time date", 2, intents={"alarm_set"}, intent_first=True) == NLUPrediction("", ["time", "date"])
    assert parse_target("", 2, intent_first=True) == NLUPrediction("", [X, X])


def test_model_intent_first_reads_config_objects_and_dicts() -> None:
    from types import SimpleNamespace

    from massive.format import INTENT_FIRST_KEY, model_intent_first

    assert model_intent_first(SimpleNamespace(**{INTENT_FIRST_KEY: True}))
    assert not model_intent_first(SimpleNamespace())
    assert model_intent_first({INTENT_FIRST_KEY: True}) and not model_intent_first({})


@pytest.fixture(scope="module")
def all_test_partitions(massive_dir: Path):
    return load_massive(massive_dir, partitions=("test",), progress=False)


@pytest.mark.slow
def test_text_to_text_round_trip_every_locale(all_test_partitions, massive_dir: Path) -> None:
    data = all_test_partitions
    available = sorted(p.name.split(".")[0] for p in massive_dir.glob("*.jsonl*"))
    assert data.locales == available and len(available) == 48
    assert data.partitions == ["test"]
    report = data.report
    assert report.num_skipped == 0
    assert report.rows_loaded == len(data) == 48 * 2974
    assert report.rows_read == report.rows_loaded + report.rows_not_requested == 48 * (11514 + 2033 + 2974)
    checked = 0
    for loc in data.locales:
        examples = data.examples(loc, "test")
        assert len(examples) == 2974
        for ex in examples:
            source, target = to_text_to_text(ex.words, ex.slots, ex.intent)
            assert source == "Annotate: " + " ".join(ex.words)
            assert parse_target(target, len(ex.words)) == NLUPrediction(ex.intent, list(ex.slots))
            assert len(target.split()) == len(ex.words) + 1
            _, first = to_text_to_text(ex.words, ex.slots, ex.intent, intent_first=True)
            assert parse_target(first, len(ex.words), intent_first=True) == NLUPrediction(ex.intent, list(ex.slots))
            checked += 1
    assert checked == 48 * 2974


def test_full_locale_label_sets(massive_dir: Path) -> None:
    data = load_massive(massive_dir, locales=["en-US"], progress=False)
    assert (len(data.intents), len(data.slot_types), len(data.scenarios)) == (60, 55, 18)
    assert {"cooking_query", "alarm_set"} <= set(data.intents)
    assert {"game_type", "sport_type", "time"} <= set(data.slot_types)
    assert data.report.split_counts == {"en-US": {"train": 11514, "dev": 2033, "test": 2974}}


@pytest.mark.slow
def test_loaded_labels(all_test_partitions) -> None:
    data = all_test_partitions
    # 60 intents in the release; cooking_query has no test rows (4 train, 2 dev per locale).
    assert len(data.intents) == 59 and data.intents == sorted(data.intents)
    assert "alarm_set" in data.intents and "cooking_query" not in data.intents
    # 55 slot types in the release; game_type and sport_type have no test spans in any locale.
    assert len(data.slot_types) == 53 and OTHER not in data.slot_types and "date" in data.slot_types
    assert data.slot_types == sorted(data.slot_types) and "game_type" not in data.slot_types
    assert len(data.scenarios) == 18
    ex = data.examples("en-US")[0]
    assert (ex.id, ex.locale, ex.partition, ex.scenario, ex.intent) == (
        "0",
        "en-US",
        "test",
        "alarm",
        "alarm_set",
    )
    assert ex.annot_utt == "wake me up at [time : five am] [date : this week]"
    with pytest.raises(MassiveSourceError, match="partition 'train' was not loaded; loaded: test"):
        data.examples("en-US", "train")
    with pytest.raises(MassiveSourceError, match="not a MASSIVE locale"):
        data.examples("english")


# ----------------------------------------------------------------------------- bad rows


def _bad_lines(good: dict) -> dict[str, str]:
    """One bad line per reason, made from a good row."""

    def row(**changes):
        r = {**good, **changes}
        return json.dumps({k: v for k, v in r.items() if v is not None}, ensure_ascii=False)

    return {
        "malformed_json": row()[:-5],
        "missing_field": row(intent=None),
        "unknown_partition": row(partition="validation", id="x1"),
        "locale_mismatch": row(locale="de-DE", id="x2"),
        "malformed_annotation": row(annot_utt="wake me up at [time : five am", id="x3"),
        "utt_mismatch": row(utt="wake me up at six am this week", id="x4"),
        "duplicate_id": row(),
    }


BAD_REASONS = list(loader.BAD_ROW_REASONS)


@pytest.mark.parametrize("reason", BAD_REASONS)
def test_bad_row_error_names_file_and_line(tmp_path: Path, sample_rows, reason) -> None:
    good = sample_rows["en-US"]
    lines = [json.dumps(r, ensure_ascii=False) for r in good[:10]]
    bad = _bad_lines(good[0])[reason]
    lines.insert(6, bad)  # line 7
    path = write_jsonl(tmp_path / "src" / "en-US.jsonl", lines)
    with pytest.raises(MassiveFormatError) as info:
        load_massive(path.parent, progress=False)
    err = info.value
    assert (err.path, err.line, err.reason) == (str(path), 7, reason)
    assert str(err).startswith(f"{path}:7: ")
    if reason == "unknown_partition":
        assert "'validation'" in str(err) and "allowed values: train, dev, test" in str(err)
    if reason == "missing_field":
        assert "intent" in str(err)


def test_bad_rows_skipped_and_counted(tmp_path: Path, sample_rows, caplog) -> None:
    good = sample_rows["en-US"][:20]
    bad = _bad_lines(good[0])
    lines = [json.dumps(r, ensure_ascii=False) for r in good] + list(bad.values()) + [""]
    path = write_jsonl(tmp_path / "src" / "en-US.jsonl.gz", lines)
    data = load_massive(path.parent, on_bad_row="skip", progress=False)
    report = data.report
    assert dict(report.skipped) == {reason: 1 for reason in BAD_REASONS}
    assert report.rows_loaded == len(data) == 20
    assert report.rows_read == 20 + len(bad)  # the blank line is not a row
    assert report.rows_read == report.rows_loaded + report.num_skipped + report.rows_not_requested
    assert {(b.reason, b.line) for b in report.bad_rows} == {(r, 21 + i) for i, r in enumerate(bad)}
    table = data.summary_table()
    assert "skipped 1 utt_mismatch" in table and f"{path}:25:" in table
    assert "skipped 7 bad row(s)" in caplog.text
    # The same file without skip fails at the first bad row.
    with pytest.raises(MassiveFormatError, match=r"en-US.jsonl.gz:21: malformed JSON"):
        load_massive(path.parent, progress=False)


def test_invalid_arguments(small_dir: Path) -> None:
    with pytest.raises(ValueError, match="allowed values: error, skip"):
        load_massive(small_dir, on_bad_row="ignore")
    with pytest.raises(
        ValueError, match="unknown MASSIVE partition 'validation'; allowed values: train, dev, test"
    ):
        load_massive(small_dir, partitions=("train", "validation"))
    with pytest.raises(ValueError, match="locales is empty"):
        load_massive(small_dir, locales=[])
    with pytest.raises(MassiveSourceError, match="neither a directory, a tarball"):
        load_massive(small_dir / "nope")


# ----------------------------------------------------------------------------- directory source


def test_directory_load_partitions_and_helpers(small_dir: Path, sample_rows) -> None:
    data = load_massive(small_dir, progress=False)
    assert data.locales == ["de-DE", "en-US"]
    for loc in ("en-US", "de-DE"):
        rows = sample_rows[loc]
        for part in ("train", "dev", "test"):
            got = data.examples(loc, part)
            want = [r for r in rows if r["partition"] == part]
            assert [e.id for e in got] == [r["id"] for r in want]
            assert [e.utt for e in got] == [r["utt"] for r in want]
    assert data.report.split_counts["en-US"] == {
        p: sum(r["partition"] == p for r in sample_rows["en-US"]) for p in ("train", "dev", "test")
    }

    table = data.summary_table().splitlines()
    en = data.report.split_counts["en-US"]
    de = data.report.split_counts["de-DE"]
    assert f"en-US   {en['train']:>9}{en['dev']:>9}{en['test']:>9}{30:>9}" in table
    totals = [en[p] + de[p] for p in ("train", "dev", "test")]
    assert f"all     {totals[0]:>9}{totals[1]:>9}{totals[2]:>9}{60:>9}" in table
    assert "rows read 60, loaded 60, skipped 0" in table[-1]
    assert json.loads(json.dumps(data.report.to_dict()))["split_counts"]["en-US"] == en

    utts = massive_utterances(data)
    assert utts["en-US"] == [r["utt"] for r in sample_rows["en-US"] if r["partition"] == "train"]
    held_out = evaluation_utterances(data)
    assert held_out == {
        r["utt"] for loc in ("en-US", "de-DE") for r in sample_rows[loc] if r["partition"] != "train"
    }
    assert not held_out & set(utts["en-US"] + utts["de-DE"])

    train_only = load_massive(small_dir, locales=["en-US"], partitions="train", progress=False)
    assert train_only.partitions == ["train"] and train_only.locales == ["en-US"]
    r = train_only.report
    assert r.rows_read == 30 and r.rows_not_requested == 30 - r.rows_loaded > 0
    with pytest.raises(MassiveSourceError, match="needs the dev and test partitions"):
        evaluation_utterances(train_only)


def test_progress_bar_per_locale(small_dir: Path, capsys) -> None:
    load_massive(small_dir, progress=True)
    err = capsys.readouterr().err
    assert "MASSIVE en-US" in err and "MASSIVE de-DE" in err


def test_import_is_light() -> None:
    code = "import sys, massive.format, massive.loader, massive.scoring; print(sorted(m for m in ('datasets', 'pyarrow', 'torch', 'tqdm') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parent.parent,
    )
    assert out.stdout.strip() == "[]"


# ----------------------------------------------------------------------------- tarball source


def _release_tarball(path: Path, sample_rows, locales=("en-US", "de-DE")) -> Path:
    """The official layout: 1.1/LICENSE, 1.1/data/<locale>.jsonl."""
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("1.1/LICENSE", b"CC BY 4.0\n")
        for loc in locales:
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sample_rows[loc])
            add(f"1.1/data/{loc}.jsonl", text.encode("utf-8"))
    return path


def _summary(data) -> list[tuple]:
    return [(e.locale, e.partition, e.id, e.words, e.slots, e.intent) for e in data.examples()]


def test_tarball_from_path_and_file_url(tmp_path: Path, small_dir: Path, sample_rows) -> None:
    tar = _release_tarball(tmp_path / "amazon-massive-dataset-1.1.tar.gz", sample_rows)
    want = _summary(load_massive(small_dir, progress=False))
    assert _summary(load_massive(tar, progress=False)) == want
    assert _summary(load_massive(tar.as_uri(), progress=False)) == want
    only = load_massive(str(tar), locales=["de-DE"], partitions=("test",), progress=False)
    assert only.locales == ["de-DE"] and only.partitions == ["test"]
    with pytest.raises(
        MassiveSourceError, match=r"no file for MASSIVE locale ja-JP; it has 2 locale\(s\): de-DE, en-US"
    ):
        load_massive(tar, locales=["ja-JP"], progress=False)
    not_tar = write_jsonl(tmp_path / "junk.tar.gz", ["not a tarball"])
    with pytest.raises(MassiveSourceError, match="not a readable MASSIVE tarball"):
        load_massive(not_tar, progress=False)


def test_tarball_bad_row_names_member_and_line(tmp_path: Path, sample_rows) -> None:
    rows = {"en-US": [*sample_rows["en-US"][:4], {**sample_rows["en-US"][4], "partition": "eval"}]}
    tar = _release_tarball(tmp_path / "m.tar.gz", rows, locales=("en-US",))
    with pytest.raises(MassiveFormatError) as info:
        load_massive(tar, progress=False)
    assert str(info.value).startswith(f"{tar}[1.1/data/en-US.jsonl]:5: unknown partition 'eval'")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_tarball_from_http_url(tmp_path: Path, small_dir: Path, sample_rows) -> None:
    serve = tmp_path / "www"
    serve.mkdir()
    _release_tarball(serve / "amazon-massive-dataset-1.1.tar.gz", sample_rows)
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(serve))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/amazon-massive-dataset-1.1.tar.gz"
        want = _summary(load_massive(small_dir, progress=False))
        assert _summary(load_massive(url, progress=False)) == want
        cache = tmp_path / "cache"
        assert _summary(load_massive(url, cache_dir=cache, progress=False)) == want
        downloads = list((cache / "downloads").glob("*/amazon-massive-dataset-1.1.tar.gz"))
        assert len(downloads) == 1
        with pytest.raises(MassiveSourceError, match="cannot download"):
            load_massive(url.replace(".tar.gz", "-2.tar.gz"), progress=False)
    finally:
        server.shutdown()
        server.server_close()
    # Served from the cache now that the server is gone.
    again = load_massive(url, cache_dir=cache, locales=["en-US", "de-DE"], progress=False)
    assert _summary(again) == want
    assert len(again.report.cached_splits) == 6


# ----------------------------------------------------------------------------- hub source


def test_hub_offline_error_is_actionable() -> None:
    assert os.environ.get("HF_HUB_OFFLINE") == "1"
    with pytest.raises(MassiveSourceError) as info:
        load_massive("hub", locales=["en-US"], progress=False)
    msg = str(info.value)
    assert "cannot reach the Hugging Face hub for AmazonScience/massive" in msg
    assert "directory of <locale>.jsonl[.gz] files" in msg and "tarball" in msg


def test_hub_rows_map_class_labels_to_names(sample_rows) -> None:
    import datasets

    rows = sample_rows["en-US"][:5]
    intents = sorted({r["intent"] for r in rows} | {"weather_query"})
    scenarios = sorted({r["scenario"] for r in rows} | {"weather"})
    features = datasets.Features(
        {
            **{k: datasets.Value("string") for k in ("id", "locale", "partition", "utt", "annot_utt")},
            "scenario": datasets.ClassLabel(names=scenarios),
            "intent": datasets.ClassLabel(names=intents),
        }
    )
    table = {k: [r[k] for r in rows] for k in ("id", "locale", "partition", "utt", "annot_utt")}
    table["scenario"] = [scenarios.index(r["scenario"]) for r in rows]
    table["intent"] = [intents.index(r["intent"]) for r in rows]
    ds = datasets.Dataset.from_dict(table, features=features)
    assert isinstance(ds[0]["intent"], int)
    mapped = list(loader.hub_rows(ds))
    assert [(m["intent"], m["scenario"], m["utt"]) for m in mapped] == [
        (r["intent"], r["scenario"], r["utt"]) for r in rows
    ]


# ----------------------------------------------------------------------------- cache


def test_cache_reused_and_invalidated_by_mtime(tmp_path: Path, small_dir: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    parsed: list[str] = []
    real_parse = rows._parse_stream  # the parser massive.rows._Loader calls

    def counting_parse(stream, path, locale, *args, **kwargs):
        parsed.append(locale)
        return real_parse(stream, path, locale, *args, **kwargs)

    monkeypatch.setattr(rows, "_parse_stream", counting_parse)
    first = load_massive(small_dir, cache_dir=cache, progress=False)
    assert sorted(parsed) == ["de-DE", "en-US"] and first.report.cached_splits == []
    entries = sorted(p.name for p in cache.iterdir())
    assert len(entries) == 2 and all((cache / e / "file.json").is_file() for e in entries)

    parsed.clear()
    second = load_massive(small_dir, cache_dir=cache, progress=False)
    assert parsed == []  # nothing re-parsed
    assert len(second.report.cached_splits) == 6
    assert _summary(second) == _summary(first)
    assert second.report.split_counts == first.report.split_counts
    assert second.report.rows_read == first.report.rows_read == 60

    # A touched file gets a new key: parsed again, its stale entry removed.
    en = small_dir / "en-US.jsonl"
    st = en.stat()
    os.utime(en, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    parsed.clear()
    third = load_massive(small_dir, cache_dir=cache, progress=False)
    assert parsed == ["en-US"]
    assert sorted(third.report.cached_splits) == [("de-DE", p) for p in ("dev", "test", "train")]
    assert len(list(cache.iterdir())) == 2 and sorted(p.name for p in cache.iterdir()) != entries


def test_cache_keeps_bad_rows(tmp_path: Path, sample_rows) -> None:
    good = sample_rows["en-US"][:10]
    lines = [json.dumps(r, ensure_ascii=False) for r in good]
    lines.insert(3, _bad_lines(good[0])["utt_mismatch"])
    src = write_jsonl(tmp_path / "src" / "en-US.jsonl", lines)
    cache = tmp_path / "cache"
    first = load_massive(src.parent, on_bad_row="skip", cache_dir=cache, progress=False)
    again = load_massive(src.parent, on_bad_row="skip", cache_dir=cache, progress=False)
    assert len(again.report.cached_splits) == 3
    assert dict(again.report.skipped) == dict(first.report.skipped) == {"utt_mismatch": 1}
    # Error mode served from the cache still fails on the bad row, with its line.
    with pytest.raises(MassiveFormatError, match=r"en-US.jsonl:4: id x4: annot_utt without markup"):
        load_massive(src.parent, cache_dir=cache, progress=False)


def test_cache_consistent_across_partition_sets(tmp_path: Path, sample_rows) -> None:
    """A bad train row is reported the same whether train was parsed with the other partitions or not."""
    rows = sample_rows["en-US"]
    train_row = next(i for i, r in enumerate(rows) if r["partition"] == "train")
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    lines[train_row] = lines[train_row][:-5]  # truncated JSON, but its partition is readable
    src = write_jsonl(tmp_path / "src" / "en-US.jsonl", lines)
    cache = tmp_path / "cache"
    test_only = load_massive(src.parent, partitions="test", cache_dir=cache, progress=False)
    assert test_only.report.num_skipped == 0  # the bad row belongs to train, which was not asked for
    load_massive(src.parent, partitions=("train", "dev"), on_bad_row="skip", cache_dir=cache, progress=False)
    everything = load_massive(src.parent, on_bad_row="skip", cache_dir=cache, progress=False)
    r = everything.report
    assert len(r.cached_splits) == 3
    assert dict(r.skipped) == {"malformed_json": 1}
    assert [(b.line, b.reason) for b in r.bad_rows] == [(train_row + 1, "malformed_json")]
    assert r.rows_read == 30 == r.rows_loaded + r.num_skipped + r.rows_not_requested
    with pytest.raises(MassiveFormatError, match=rf"en-US.jsonl:{train_row + 1}: malformed JSON"):
        load_massive(src.parent, cache_dir=cache, progress=False)


def test_data_root_prefix(massive_dir: Path) -> None:
    via_prefix = load_massive("@data/massive/data", locales=["en-US"], partitions="dev", progress=False)
    direct = load_massive(massive_dir, locales=["en-US"], partitions="dev", progress=False)
    assert len(via_prefix) == 2033 and _summary(via_prefix) == _summary(direct)


# ----------------------------------------------------------------------------- unreadable and empty files


@pytest.mark.parametrize("damage", ["truncated", "corrupt"])
@pytest.mark.parametrize("on_bad_row", ["error", "skip"])
def test_unreadable_gzip_names_the_file(tmp_path: Path, sample_rows, damage, on_bad_row) -> None:
    lines = [json.dumps(r, ensure_ascii=False) for r in sample_rows["en-US"]]
    path = write_jsonl(tmp_path / "src" / "en-US.jsonl.gz", lines)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:
        path.write_bytes(data[:10] + bytes(b ^ 0x5A for b in data[10:40]) + data[40:])
    with pytest.raises(loader.MassiveSourceError, match=re.escape(str(path)) + ": cannot be read as gzip") as info:
        load_massive(path.parent, on_bad_row=on_bad_row, progress=False)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_empty_locale_file_is_an_error_or_a_counted_skip(tmp_path: Path, sample_rows, content) -> None:
    src = tmp_path / "src"
    write_jsonl(src / "de-DE.jsonl", [json.dumps(r, ensure_ascii=False) for r in sample_rows["de-DE"][:5]])
    empty = src / "en-US.jsonl.gz"
    empty.write_bytes(gzip.compress(content.encode()))
    with pytest.raises(loader.MassiveSourceError, match=re.escape(str(empty)) + ": the file holds no rows"):
        load_massive(src, progress=False)
    data = load_massive(src, on_bad_row="skip", progress=False)
    assert data.report.skipped == {"empty_file": 1}
    assert "skipped 1 empty_file: the locale file holds no rows" in data.summary_table()
    assert str(empty) in data.summary_table()


def test_missing_data_root_shows_the_resolved_path(tmp_path: Path, monkeypatch) -> None:
    # Issue 14, case 10: POLYTEACHER_DATA=/nonexistent named only '@data/massive/data'.
    monkeypatch.setenv("POLYTEACHER_DATA", str(tmp_path / "nonexistent"))
    with pytest.raises(MassiveSourceError) as info:
        load_massive("@data/massive/data", progress=False)
    message = str(info.value)
    assert str(tmp_path / "nonexistent" / "massive" / "data") in message and "from POLYTEACHER_DATA" in message
    assert "does not exist" in message


def test_cache_entries_of_an_older_version_are_replaced(tmp_path: Path, small_dir: Path) -> None:
    # The cache owns its entries: one without the artifact marker (written before markers existed) must
    # not make the output-path guard fail a load.
    from core.fsutil import ARTIFACT_MARKER

    cache = tmp_path / "cache"
    load_massive(small_dir, locales=["en-US"], cache_dir=cache, progress=False)
    markers = list(cache.rglob(ARTIFACT_MARKER))
    assert markers
    for marker in markers:
        marker.unlink()
    for info in cache.rglob("file.json"):
        info.unlink()  # forces a rewrite of the entry
    data = load_massive(small_dir, locales=["en-US"], cache_dir=cache, progress=False)
    assert len(data) > 0 and list(cache.rglob(ARTIFACT_MARKER))
