"""MASSIVE fine-tuning: config, data pipeline (fast) and end-to-end runs of `polyteacher finetune` (slow)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.config import ConfigError, load_config
from core.distributed import DistInfo
from student.config import FinetuneConfig
from student.finetune import load_finetune_data, output_name
from student.nlu import collate_encoder
from student.text_to_text import collate_seq2seq, encode_seq2seq

REPO_ROOT = Path(__file__).resolve().parent.parent
ONE_PROCESS = DistInfo(rank=0, local_rank=0, world_size=1, device="cpu", backend="gloo")


# ----------------------------------------------------------------------------- config and CLI


def test_tiny_preset_loads_and_fits_one_or_two_processes():
    cfg = load_config(FinetuneConfig, section="finetune", preset="tiny")
    assert cfg.locales and len(cfg.locales) <= 3
    for world in (1, 2):
        assert cfg.train.grad_accum_steps(world) >= 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["init=scratch:huge"], "scratch:tiny"),
        (["init='scratch:'"], "size preset"),
        (["locales=[english]"], "locale"),
        (["setting=zero_shot", "locales=[de-DE,fr-FR]"], "en-US"),
        (["out=../elsewhere"], "plain directory name"),
        (["head=tagger"], "'seq2seq', 'encoder'"),
        (["dropout=1.5"], "dropout"),
    ],
)
def test_config_rejects_bad_values_naming_key_and_allowed_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(FinetuneConfig, section="finetune", overrides=overrides)


def test_output_name_derives_from_init_and_head():
    assert output_name(FinetuneConfig(init="runs/x/teacher-indomain/")) == "teacher-indomain-ft"
    assert output_name(FinetuneConfig(init="student", head="encoder")) == "student-nlu"
    assert output_name(FinetuneConfig(init="scratch:small")) == "scratch-small-ft"
    assert output_name(FinetuneConfig(init="student", out="mine")) == "mine"


def test_cli_flags_override_preset_and_overrides():
    from launch.cli import build_parser
    from student.cli import build_config

    args = build_parser().parse_args(
        ["finetune", "--run-dir", "r", "--model", "scratch:tiny", "--head", "encoder", "--preset", "tiny",
         "head=seq2seq", "train.max_steps=70"]
    )
    cfg = build_config(args)
    assert (cfg.init, cfg.head, cfg.train.max_steps, cfg.locales) == ("scratch:tiny", "encoder", 70, ["en-US", "de-DE", "ja-JP"])
    with pytest.raises(ConfigError, match="--model"):
        build_config(build_parser().parse_args(["finetune", "--run-dir", "r"]))


def test_help_documents_every_config_key():
    out = subprocess.run([sys.executable, "-m", "launch.cli", "finetune", "--help"], capture_output=True, text=True,
                         cwd=REPO_ROOT, check=True).stdout
    for key in ("--model", "--resume", "setting (one of 'full', 'zero_shot'", "num_train_examples", "train.max_steps",
                "model.num_layers"):
        assert key in out


# ----------------------------------------------------------------------------- data pipeline


def test_collate_seq2seq_pads_inputs_and_masks_label_padding():
    batch = collate_seq2seq([([5, 6, 1], [7, 1]), ([5, 1], [8, 9, 10, 1])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 1], [5, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[7, 1, -100, -100], [8, 9, 10, 1]]


@pytest.fixture(scope="module")
def two_locale_data(massive_dir, tmp_path_factory):
    cfg = FinetuneConfig(init="x", massive=str(massive_dir), locales=["en-US", "ja-JP"], setting="zero_shot",
                         num_train_examples=50, num_eval_examples=20)
    return cfg, load_finetune_data(cfg, tmp_path_factory.mktemp("run"), ONE_PROCESS)


def test_zero_shot_trains_on_en_us_only_and_evaluates_every_locale(two_locale_data):
    _, data = two_locale_data
    assert data.train_locales == ["en-US"]
    assert len(data.train) == 50 and {ex.locale for ex in data.train} == {"en-US"}
    assert {ex.partition for ex in data.train} == {"train"}
    assert len(data.dev) == 20 and {ex.locale for ex in data.dev} == {"en-US", "ja-JP"}
    assert {ex.partition for ex in data.dev} == {"dev"}
    assert len(data.intents) == 60 and data.slot_labels[0] == "Other" and "time" in data.slot_labels


def test_full_setting_caps_each_locale_with_a_seeded_subset(massive_dir, tmp_path):
    cfg = FinetuneConfig(init="x", massive=str(massive_dir), locales=["en-US", "ja-JP"], num_train_examples=30,
                         num_eval_examples=0)
    first = load_finetune_data(cfg, tmp_path, ONE_PROCESS)
    again = load_finetune_data(cfg, tmp_path, ONE_PROCESS)  # the second load reads the Arrow cache
    assert (tmp_path / ".cache" / "massive").is_dir()
    assert [ex.locale for ex in first.train].count("ja-JP") == 30 and len(first.train) == 60
    assert [ex.id for ex in first.train] == [ex.id for ex in again.train]
    assert first.dev == []


def test_text_to_text_encoding_truncates_keeping_eos(two_locale_data, tiny_tokenizer_dir):
    from data_prep.tokenizer import load_tokenizer
    from massive.format import to_text_to_text

    _, data = two_locale_data
    tokenizer = load_tokenizer(tiny_tokenizer_dir)
    roomy = FinetuneConfig(init="x", max_source_len=1024, max_target_len=1024)
    pairs, counts = encode_seq2seq(tokenizer, data.dev, roomy)
    assert counts == {"num_truncated_sources": 0, "num_truncated_targets": 0}
    src, tgt = pairs[0]
    expected_src, expected_tgt = to_text_to_text(data.dev[0].words, data.dev[0].slots, data.dev[0].intent)
    assert tokenizer.decode(src, skip_special_tokens=True) == expected_src
    assert tokenizer.decode(tgt, skip_special_tokens=True) == expected_tgt
    first_pairs, _ = encode_seq2seq(tokenizer, data.dev, FinetuneConfig(init="x", max_target_len=1024, intent_first=True))
    ex = data.dev[0]
    assert tokenizer.decode(first_pairs[0][1], skip_special_tokens=True) == " ".join([ex.intent, *ex.slots])
    short = FinetuneConfig(init="x", max_source_len=8, max_target_len=6)
    cut, counts = encode_seq2seq(tokenizer, data.dev, short)
    assert counts["num_truncated_sources"] > 0 and counts["num_truncated_targets"] > 0
    assert all(len(s) <= 8 and len(t) <= 6 and s[-1] == t[-1] == tokenizer.eos_token_id for s, t in cut)


def test_encoder_batches_carry_intent_and_per_word_slot_ids(two_locale_data, tiny_tokenizer_dir):
    from data_prep.tokenizer import load_tokenizer
    from student.nlu import IGNORE_INDEX, NLULabels

    _, data = two_locale_data
    labels = NLULabels(intents=data.intents, slot_labels=data.slot_labels)
    examples = data.dev[:4]
    batch = collate_encoder(examples, load_tokenizer(tiny_tokenizer_dir), labels, max_length=64)
    assert [labels.intents[i] for i in batch["intent_labels"].tolist()] == [ex.intent for ex in examples]
    for b, ex in enumerate(examples):
        row = batch["slot_labels"][b].tolist()
        assert [labels.slot_labels[i] for i in row[: len(ex.slots)]] == list(ex.slots)
        assert all(i == IGNORE_INDEX for i in row[len(ex.slots) :])


# ----------------------------------------------------------------------------- end to end (slow)


def _run_finetune(run_dir: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "launch.cli", "finetune", "--run-dir", str(run_dir), *args],
        capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _records(run_dir: Path, name: str, key: str) -> list[dict]:
    from core.fsutil import read_jsonl

    return [r for r in read_jsonl(run_dir / "metrics.jsonl") if r["stage"] == f"finetune/{name}" and key in r]


@pytest.mark.slow
def test_seq2seq_finetune_end_to_end_then_score_with_the_evaluation_scorer(tmp_path, tiny_teacher_dir, massive_dir):
    from evaluation.massive import load_predictor
    from massive.loader import load_massive
    from massive.scoring import score

    run_dir = tmp_path / "run"
    _run_finetune(
        run_dir, "--model", str(tiny_teacher_dir), "--preset", "tiny", "--out", "teacher-ft",
        f"massive={massive_dir}", "locales=[en-US,ja-JP]", "num_train_examples=400", "num_eval_examples=16",
        "train.max_steps=30", "train.eval_every=15", "train.save_every=15", "train.log_every=10", "intent_first=true",
        "spans=false",  # one label per word: the fixture tokenizer has no whole label tokens
    )
    # The target order travels with the model, so every predictor parses it the same way.
    assert json.loads((run_dir / "teacher-ft" / "config.json").read_text())["massive_intent_first"] is True
    evals = _records(run_dir, "teacher-ft", "dev_loss")
    assert [r["step"] for r in evals] == [15, 30]
    assert evals[1]["dev_loss"] < evals[0]["dev_loss"]
    assert all(0.0 <= r[k] <= 1.0 for r in evals for k in ("dev_em", "dev_intent_acc", "dev_slot_f1"))
    # Generated dev targets are checked for form (stop, label count, known intent), as shares.
    generation = ("dev_stop_rate", "dev_label_count_rate", "dev_known_intent_rate")
    assert all(0.0 <= r[k] <= 1.0 for r in evals for k in generation)
    assert all(r["dev_known_intent_rate"] >= r["dev_intent_acc"] for r in evals)
    losses = [r["loss"] for r in _records(run_dir, "teacher-ft", "lr")]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert (run_dir / "checkpoints" / "teacher-ft" / "step_00000030" / "COMPLETE").is_file()
    assert "locales:\n- en-US\n- ja-JP" in (run_dir / "config.yaml").read_text()

    # The exported directory is a self-contained Hugging Face model the evaluation stage can score.
    dev = load_massive(str(massive_dir), locales=["en-US", "ja-JP"], partitions=("dev",), progress=False)
    golds = dev.examples(locale="en-US", partition="dev")[:8] + dev.examples(locale="ja-JP", partition="dev")[:8]
    predictor = load_predictor(run_dir / "teacher-ft", device="cpu")
    assert predictor.intent_first
    preds = predictor.predict_words([list(ex.words) for ex in golds])
    assert [len(p.slots) for p in preds] == [len(ex.words) for ex in golds]
    result = score(golds, preds)
    assert set(result["per_locale"]) == {"en-US", "ja-JP"}
    assert 0.0 <= result["em"] <= result["intent_acc"] <= 1.0

    # A second run on top of the checkpoints without --resume is refused (it would mix two runs).
    env_run = subprocess.run(
        [sys.executable, "-m", "launch.cli", "finetune", "--run-dir", str(run_dir), "--model", str(tiny_teacher_dir),
         "--out", "teacher-ft", f"massive={massive_dir}", "locales=[en-US]"],
        capture_output=True, text=True, cwd=REPO_ROOT, env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=300,
    )
    assert env_run.returncode == 2 and "--resume" in env_run.stderr


@pytest.mark.slow
def test_span_targets_finetune_then_predict_through_the_span_parser(tmp_path, massive_dir):
    from data_prep.config import TokenizerConfig
    from data_prep.tokenizer import train_tokenizer
    from evaluation.massive import load_predictor
    from massive.format import label_token, t2t_source
    from massive.loader import load_massive
    from massive.scoring import score

    data = load_massive(str(massive_dir), locales=["en-US", "ja-JP"], partitions=("train", "dev"), progress=False)
    train = [ex for loc in ("en-US", "ja-JP") for ex in data.examples(locale=loc, partition="train")]
    labels = sorted({ex.intent for ex in train} | {s for ex in train for s in ex.slots})
    run_dir = tmp_path / "run"
    train_tokenizer([t2t_source(ex.words) for ex in train] * 3, run_dir / "tokenizer",
                    TokenizerConfig(vocab_size=2000, num_sentinels=4), label_tokens=[label_token(x) for x in labels])
    _run_finetune(
        run_dir, "--model", "scratch:tiny", "--preset", "tiny", "--out", "ft", f"massive={massive_dir}",
        "locales=[en-US,ja-JP]", "num_train_examples=200", "num_eval_examples=16", "model.num_layers=1",
        "model.num_decoder_layers=1", "model.d_model=32", "model.num_heads=2", "model.d_ff=64",
        "train.max_steps=20", "train.warmup_steps=5", "train.eval_every=20", "train.save_every=20", "train.log_every=10",
    )
    # The format travels with the model; its dev targets are checked for form as span targets.
    assert json.loads((run_dir / "ft" / "config.json").read_text())["massive_spans"] is True
    evals = _records(run_dir, "ft", "dev_loss")
    assert [r["step"] for r in evals] == [20]
    assert all(0.0 <= evals[0][k] <= 1.0 for k in ("dev_em", "dev_stop_rate", "dev_label_count_rate"))
    predictor = load_predictor(run_dir / "ft", device="cpu")
    assert predictor.spans
    golds = data.examples(locale="en-US", partition="dev")[:8] + data.examples(locale="ja-JP", partition="dev")[:8]
    preds = predictor.predict_words([list(ex.words) for ex in golds])
    assert [len(p.slots) for p in preds] == [len(ex.words) for ex in golds]
    result = score(golds, preds)
    assert 0.0 <= result["em"] <= result["intent_acc"] <= 1.0


@pytest.mark.slow
def test_encoder_finetune_resumes_exactly_from_a_mid_run_checkpoint(tmp_path, tiny_teacher_dir, massive_dir):
    from safetensors.torch import load_file

    from student.nlu import EncoderNLUModel

    run_dir = tmp_path / "run"
    common = [
        "--model", str(tiny_teacher_dir), "--head", "encoder", "--preset", "tiny", f"massive={massive_dir}",
        "locales=[en-US,th-TH]", "num_train_examples=200", "num_eval_examples=16", "train.max_steps=12", "train.warmup_steps=2",
        "train.save_every=6", "train.eval_every=0", "train.log_every=3", "dropout=0.1",
        "ngram_buckets=64",  # a sparse-gradient table: RowSparseAdafactor's state resumes too
    ]
    _run_finetune(run_dir, *common, "--out", "straight")
    # Continue a copy of the step-6 checkpoint under another name: it must end where the
    # uninterrupted run ended (same data order, dropout RNG, optimizer and LR schedule).
    shutil.copytree(run_dir / "checkpoints" / "straight" / "step_00000006", run_dir / "checkpoints" / "resumed" / "step_00000006")
    proc = _run_finetune(run_dir, *common, "--out", "resumed", "--resume")
    assert "resumed from" in proc.stderr and "step 6" in proc.stderr

    straight = load_file(str(run_dir / "straight" / "model.safetensors"))
    resumed = load_file(str(run_dir / "resumed" / "model.safetensors"))
    assert straight.keys() == resumed.keys() and "ngrams.embed.weight" in straight
    for key in straight:
        assert (straight[key] == resumed[key]).all(), key
    straight_loss = {r["step"]: r["loss"] for r in _records(run_dir, "straight", "lr")}
    resumed_loss = {r["step"]: r["loss"] for r in _records(run_dir, "resumed", "lr")}
    assert sorted(straight_loss) == [3, 6, 9, 12] and sorted(resumed_loss) == [9, 12]
    assert all(resumed_loss[step] == straight_loss[step] for step in (9, 12))

    # The encoder directory loads as an NLU predictor with the MASSIVE label inventory.
    model = EncoderNLUModel.from_pretrained(run_dir / "resumed")
    assert len(model.labels.intents) == 60 and model.labels.extra["locales"] == ["en-US", "th-TH"]
    preds = model.predict_words([["wake", "me", "up", "at", "nine"], ["ปลุกฉัน", "ตอน", "ตีห้า"]])
    assert [len(p.slots) for p in preds] == [5, 3]


@pytest.mark.parametrize("tied", [True, False])
def test_label_tokens_start_from_their_words_in_both_embeddings(tmp_path, tied):
    import copy

    import torch

    from core.models import ModelConfig, build_model
    from data_prep.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
    from student.text_to_text import init_label_embeddings

    texts = [f"set an alarm at {i} and tell me the date of the party {i % 7}" for i in range(300)]
    out = train_tokenizer(texts, tmp_path / "t", TokenizerConfig(vocab_size=300, num_sentinels=4),
                          label_tokens=["<Other>", "<date>", "<alarm_set>"])
    tok = load_tokenizer(out)
    model = build_model(ModelConfig(preset="tiny", d_model=32, d_ff=64, num_heads=2, d_kv=16,
                                    tie_word_embeddings=tied), tok, seed=0)
    vocab = tok.get_vocab()
    tables = [model.get_input_embeddings().weight, model.get_output_embeddings().weight]
    assert (tables[0].data_ptr() == tables[1].data_ptr()) == tied
    with torch.no_grad():  # what pretraining does to never-seen tokens: rows pushed far from the rest
        for table in tables:
            table[vocab["<alarm_set>"]] = -5.0

    missing = init_label_embeddings(model, tok, ["alarm_set", "date", "Other", "weather_query"])

    assert missing == ["weather_query"]  # no whole token for it in this vocabulary: left alone
    words = tok("alarm set", add_special_tokens=False)["input_ids"]
    assert len(words) >= 2 and vocab["<alarm_set>"] not in words
    for table in tables:
        torch.testing.assert_close(table[vocab["<alarm_set>"]], table[words].mean(dim=0))
        torch.testing.assert_close(table[vocab["<date>"]],
                                   table[tok("date", add_special_tokens=False)["input_ids"]].mean(dim=0))

    # random: fresh rows at the table's scale, the same for a seed, none equal to its words' mean.
    before = [t.detach().clone() for t in tables]
    twin = copy.deepcopy(model)
    init_label_embeddings(model, tok, ["alarm_set", "date"], "random", seed=3)
    rows = [vocab["<alarm_set>"], vocab["<date>"]]
    for table, old in zip(tables, before):
        assert not torch.allclose(table[rows], old[rows])
        assert 0.5 < float(table[rows].std() / table.std()) < 2.0
    init_label_embeddings(twin, tok, ["alarm_set", "date"], "random", seed=3)
    torch.testing.assert_close(twin.get_input_embeddings().weight[rows], tables[0][rows])


def test_label_rows_are_set_only_for_a_model_not_yet_trained_on_massive_targets(tmp_path):
    import torch

    from core.models import ModelConfig, build_model
    from data_prep.tokenizer import TokenizerConfig, load_tokenizer, train_tokenizer
    from massive.format import INTENT_FIRST_KEY
    from student.finetune import build_backbone
    from student.text_to_text import prepare_text_to_text
    from tests.fixtures_models import save_model_dir

    texts = [f"set an alarm at {i} and tell me the date of the party {i % 7}" for i in range(300)]
    tok = load_tokenizer(train_tokenizer(texts, tmp_path / "t", TokenizerConfig(vocab_size=300, num_sentinels=4),
                                         label_tokens=["<Other>", "<alarm_set>"]))
    row = tok.get_vocab()["<alarm_set>"]
    words = tok("alarm set", add_special_tokens=False)["input_ids"]
    loaded = {}
    for name, trained in (("pretrained", False), ("finetuned", True)):
        model = build_model(ModelConfig(preset="tiny", d_model=32, d_ff=64, num_heads=2, d_kv=16), tok, seed=0)
        with torch.no_grad():
            model.get_input_embeddings().weight[row] = -5.0
        if trained:
            setattr(model.config, INTENT_FIRST_KEY, True)
        cfg = FinetuneConfig(init=str(save_model_dir(model, tok, tmp_path / name)), intent_first=True)
        model = prepare_text_to_text(build_backbone(cfg, tmp_path, tok), cfg, tok, ["alarm_set", "Other"])
        loaded[name] = model.get_input_embeddings().weight
    pretrained, finetuned = loaded["pretrained"], loaded["finetuned"]
    torch.testing.assert_close(pretrained[row], pretrained[words].mean(dim=0))
    assert torch.all(finetuned[row] == -5.0)  # learnt label rows are kept
