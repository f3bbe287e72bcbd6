"""Cross-lingual evaluation and settings: `evaluate massive --locales all` over a data root that gains
a locale after training, the source/target roles and target mean, and the settings' leak checks."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
from fixtures_data import squash_tables

from core.config import ConfigError, load_config
from launch.cli import main

# Latin letters -> Georgian letters: a script the test tokenizer never saw, as a locale added later.
GEORGIAN = {chr(ord("a") + i): chr(0x10D0 + i) for i in range(26)}
SLOT_MARKUP = re.compile(r"(\[[a-z_]+ : |\])")


def georgian(text: str) -> str:
    return "".join(GEORGIAN.get(c, c) for c in text)


def georgian_annotation(annot: str) -> str:
    """The annotation with its words in Georgian letters; slot names and markup kept."""
    return "".join(part if SLOT_MARKUP.fullmatch(part) else georgian(part) for part in SLOT_MARKUP.split(annot))


def read_rows(path: Path, partition: str, ids: set[str] | None = None, limit: int = 0) -> list[dict]:
    rows = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["partition"] == partition and (ids is None or row["id"] in ids):
                rows.append(row)
                if limit and len(rows) == limit:
                    break
    return rows


def write_rows(path: Path, rows: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


@pytest.fixture(scope="module")
def data_root_with_new_locale(massive_dir: Path, tmp_path_factory) -> Path:
    """A MASSIVE directory with 30 shared test ids of en-US and de-DE (from the data root) and a
    synthetic ka-GE file (one of the four MASSIVE 1.1 locales the data root lacks): the en-US rows
    in official row format, their words spelt in Georgian letters."""
    root = tmp_path_factory.mktemp("massive-overlay")
    en = read_rows(massive_dir / "en-US.jsonl.gz", "test", limit=30)
    ids = {row["id"] for row in en}
    write_rows(root / "en-US.jsonl.gz", en)
    write_rows(root / "de-DE.jsonl.gz", read_rows(massive_dir / "de-DE.jsonl.gz", "test", ids))
    ka = [{**row, "locale": "ka-GE", "utt": georgian(row["utt"]), "annot_utt": georgian_annotation(row["annot_utt"])}
          for row in en]
    write_rows(root / "ka-GE.jsonl.gz", ka)
    return root


def test_locales_all_scores_a_locale_added_after_training(tiny_teacher_dir, data_root_with_new_locale, tmp_path, capsys):
    from data_prep.tokenizer import load_tokenizer

    # The tokenizer never saw Georgian: it spells it in bytes, with no unknown token.
    tokenizer = load_tokenizer(tiny_teacher_dir)
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(georgian("wake me up"), add_special_tokens=False)["input_ids"])
    assert any(re.fullmatch(r"<0x[0-9A-F]{2}>", p) for p in pieces) and tokenizer.unk_token not in pieces

    out = tmp_path / "eval"
    argv = ["evaluate", "massive", "--model", str(tiny_teacher_dir), "--out", str(out), "--locales", "all",
            "--setting", "zero-shot", "--max-examples", "8", f"massive.data={data_root_with_new_locale}",
            "device=cpu", "bootstrap_samples=50"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "zero-shot, mean over 2 target locales" in printed
    result = json.loads((out / "massive.json").read_text())
    assert set(result["per_locale"]) == {"en-US", "de-DE", "ka-GE"}
    assert all(s["n"] == 8 for s in result["per_locale"].values())
    xl = result["crosslingual"]
    assert xl["setting"] == "zero-shot" and xl["source_locales"] == ["en-US"]
    assert xl["roles"] == {"en-US": "source", "de-DE": "target", "ka-GE": "target"}
    assert sorted(xl["target_locales"]) == ["de-DE", "ka-GE"]
    # The target mean is the mean of the two targets' scores (same ids in each).
    for metric in ("em", "intent_acc", "slot_f1"):
        expected = (result["per_locale"]["de-DE"][metric] + result["per_locale"]["ka-GE"][metric]) / 2
        assert xl["target_mean"][metric] == pytest.approx(expected)
    assert result["parameters"] == sum(p.numel() for p in _load(tiny_teacher_dir).parameters())
    # The Georgian words come back one prediction per word.
    assert len(result["records"]["ka-GE"]["id"]) == 8
    table = squash_tables((out / "massive.md").read_text())
    assert "Setting: **zero-shot**" in table and "| ka-GE | 8 |" in table
    assert re.search(r"\| ka-GE \|.*\| target \|", table) and re.search(r"\| en-US \|.*\| source \|", table)
    assert "mean over 2 target locales" in table
    # The paper's zero-shot and supervised lines, each named with its setting.
    for line in (r"XLM-R base \(270M\), MASSIVE paper_ \|  \| 0.3870 \|.*\| reference, zero-shot \|",
                 r"mT5-base T2T \(580M\), MASSIVE paper_ \|  \| 0.3470 \|.*\| reference, zero-shot \|",
                 r"mT5-base T2T \(580M\), MASSIVE paper_ \|  \| 0.6660 \|.*\| reference, supervised \|"):
        assert re.search(line, table)
    assert (out / "massive_locales.png").read_bytes()[:4] == b"\x89PNG"


def _load(model_dir: Path):
    from transformers import AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM.from_pretrained(model_dir)


def test_locales_all_must_stand_alone(tiny_teacher_dir, tmp_path):
    argv = ["evaluate", "massive", "--model", str(tiny_teacher_dir), "--out", str(tmp_path), "--locales", "all", "en-US"]
    assert main(argv) != 0


def test_every_massive_locale_name_is_accepted():
    from evaluation.config import EvalConfig
    from massive.format import MASSIVE_LOCALES

    assert len(MASSIVE_LOCALES) == 52
    cfg = load_config(EvalConfig, "evaluate", None, [f"massive.locales=[{','.join(MASSIVE_LOCALES)}]",
                                                     "crosslingual.target_locales=[ka-GE,sw-KE,cy-GB,km-KH]"])
    assert cfg.massive.locales == list(MASSIVE_LOCALES)


@pytest.mark.parametrize("section,cls_path,overrides,message", [
    ("finetune", "student.config.FinetuneConfig", ["locales=[en-US,de-DE]"], "de-DE is a target locale"),
    ("finetune", "student.config.FinetuneConfig", ["locales=[]"], "empty means every locale"),
    ("nlu", "student.config.FinetuneConfig", ["locales=[en-US,de-DE]"], "de-DE is a target locale"),
    ("taskdistill", "distill.config.DistillConfig", ["task=massive", "locales=[en-US,de-DE]"], "de-DE is a target"),
])
@pytest.mark.parametrize("setting", ["zero-shot", "teacher-labelled"])
def test_settings_refuse_target_gold_labels_at_start_up(section, cls_path, overrides, message, setting):
    import importlib

    module, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    xl = [f"crosslingual.setting={setting}", "crosslingual.target_locales=[de-DE,ja-JP]"]
    with pytest.raises(ConfigError, match=message):
        load_config(cls, section, "tiny", [*xl, *overrides])
    # The same locales are fine as the supervised reference.
    load_config(cls, section, "tiny", ["crosslingual.setting=supervised", "crosslingual.target_locales=[de-DE,ja-JP]",
                                       *overrides[:-1], "locales=[en-US,de-DE]"])


def test_one_preset_section_sets_every_stage(tmp_path):
    from data_prep.config import DataConfig
    from distill.config import DistillConfig
    from evaluation.config import EvalConfig
    from student.config import FinetuneConfig

    preset = tmp_path / "preset.yaml"
    preset.write_text("crosslingual:\n  setting: teacher-labelled\n  source_locales: [en-US]\n"
                      "  target_locales: [de-DE, ja-JP]\nfinetune:\n  locales: [en-US]\n"
                      "taskdistill:\n  task: massive\n  locales: [en-US]\n"
                      "data:\n  locales: [en-US, de-DE, ja-JP]\n")
    for cls, section in ((FinetuneConfig, "finetune"), (DistillConfig, "taskdistill"), (EvalConfig, "evaluate"),
                         (DataConfig, "data")):
        cfg = load_config(cls, section, str(preset))
        assert cfg.crosslingual.setting == "teacher-labelled" and cfg.crosslingual.target_locales == ["de-DE", "ja-JP"]
    assert load_config(DistillConfig, "taskdistill", str(preset)).unlabelled_locales() == ["de-DE", "ja-JP"]
    # teacher-labelled: stage 2 reads the targets' utterances; zero-shot keeps them out.
    assert load_config(DataConfig, "data", str(preset)).massive_text_locales() == ["en-US", "de-DE", "ja-JP"]
    zero = load_config(DataConfig, "data", str(preset), ["crosslingual.setting=zero-shot"])
    assert zero.massive_text_locales() == ["en-US"]
    # The tokenizer never reads a target's MASSIVE text: both arms share it (and the stage-1 teacher).
    teacher_labelled = load_config(DataConfig, "data", str(preset))
    assert zero.tokenizer_massive_locales() == teacher_labelled.tokenizer_massive_locales() == ["en-US"]
    from data_prep.prepare import fingerprint

    for output in ("tokenizer", "data"):
        assert fingerprint(zero, output) == fingerprint(teacher_labelled, output)
    assert fingerprint(zero, "indomain") != fingerprint(teacher_labelled, "indomain")
    with pytest.raises(ConfigError, match="both a source and a target"):
        load_config(EvalConfig, "evaluate", str(preset), ["crosslingual.source_locales=[en-US,de-DE]"])


# ----------------------------------------------------------------------------- teacher-labelled distillation

SLOT_NAME = re.compile(r"\[([a-z_]+) : ")


def corrupt_labels(row: dict) -> dict:
    """The same words under other labels: another intent, every slot renamed."""
    intent = "weather_query" if row["intent"] != "weather_query" else "alarm_set"
    return {**row, "intent": intent, "scenario": intent.split("_")[0],
            "annot_utt": SLOT_NAME.sub(lambda m: "[" + ("date" if m.group(1) != "date" else "time") + " : ", row["annot_utt"])}


@pytest.fixture(scope="module")
def distill_roots(massive_dir: Path, tmp_path_factory) -> tuple[Path, Path]:
    """Two MASSIVE directories with the same en-US rows (24 train, 8 dev) and the same de-DE train
    words; in the second every de-DE row carries wrong labels."""
    roots = []
    for name, change in (("clean", lambda row: row), ("corrupt", corrupt_labels)):
        root = tmp_path_factory.mktemp(f"massive-{name}")
        en = read_rows(massive_dir / "en-US.jsonl.gz", "train", limit=24) + read_rows(
            massive_dir / "en-US.jsonl.gz", "dev", limit=8)
        write_rows(root / "en-US.jsonl.gz", en)
        write_rows(root / "de-DE.jsonl.gz", [change(r) for r in read_rows(massive_dir / "de-DE.jsonl.gz", "train", limit=12)])
        roots.append(root)
    return roots[0], roots[1]


def test_teacher_labelled_distillation_reads_no_target_gold_label(tiny_teacher_dir, distill_roots):
    import numpy as np
    from transformers import AutoModelForSeq2SeqLM

    from data_prep.tokenizer import load_tokenizer
    from distill.config import DistillConfig
    from distill.data import MassiveDistillData, teacher_targets
    from massive.loader import load_massive

    clean, corrupt = distill_roots
    assert load_massive(str(corrupt), locales=["de-DE"]).examples()[0].intent != load_massive(
        str(clean), locales=["de-DE"]).examples()[0].intent
    teacher = AutoModelForSeq2SeqLM.from_pretrained(tiny_teacher_dir).eval()
    tokenizer = load_tokenizer(tiny_teacher_dir)
    xl = ["crosslingual.setting=teacher-labelled", "crosslingual.target_locales=[de-DE]", "locales=[en-US]",
          "num_eval_examples=4", "cda=two_sided"]
    batches = []
    for root in (clean, corrupt):
        cfg = load_config(DistillConfig, "taskdistill", "tiny", [f"massive_data={root}", *xl])
        data = MassiveDistillData(cfg, tokenizer, teacher=teacher)
        assert data.num_gold == 24 and data.num_train == 36 and len(data.train_lengths) == 36
        # Mixed batches: gold en-US items and teacher-labelled de-DE items.
        pairs = [p for start in range(0, 36, 6) for p in data.pairs(list(range(36))[start::6], epoch=0)]
        batches.append([data.pad([p.train for p in pairs[k : k + 8]]) for k in range(0, len(pairs), 8)])
        unlabelled = data.unlabelled
    # Wrong de-DE labels change nothing the student trains on.
    assert len(batches[0]) == len(batches[1])
    for a, b in zip(*batches):
        assert a.keys() == b.keys() and all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    # The de-DE targets are the teacher's greedy outputs, ending in eos.
    assert [ex.target.tolist() for ex in unlabelled] == [t.tolist() for t in teacher_targets(
        teacher, tokenizer, [ex.source for ex in unlabelled], cfg.max_target_len)]
    assert all(ex.target[-1] == tokenizer.eos_token_id or len(ex.target) == cfg.max_target_len for ex in unlabelled)


def test_zero_shot_and_supervised_distil_on_no_unlabelled_targets(tiny_teacher_dir, distill_roots):
    from data_prep.tokenizer import load_tokenizer
    from distill.config import DistillConfig
    from distill.data import MassiveDistillData

    clean, _ = distill_roots
    for setting in ("zero-shot", "supervised"):
        cfg = load_config(DistillConfig, "taskdistill", "tiny", [
            f"massive_data={clean}", f"crosslingual.setting={setting}", "crosslingual.target_locales=[de-DE]",
            "locales=[en-US]", "num_eval_examples=4"])
        data = MassiveDistillData(cfg, load_tokenizer(tiny_teacher_dir))
        assert data.num_train == data.num_gold == 24 and not data.unlabelled


def test_teacher_labelled_items_train_the_student_with_crr_on(tiny_teacher_dir, distill_roots):
    """One distillation step (CDA and teacher perturbation on) over a batch of gold en-US items and
    teacher-labelled de-DE items: a finite loss whose gradient reaches the student."""
    import math

    from transformers import AutoModelForSeq2SeqLM

    from data_prep.tokenizer import load_tokenizer
    from distill.config import DistillConfig
    from distill.data import MassiveDistillData
    from distill.distill import distill_step
    from distill.perturb import build_token_map
    from distill.student_init import build_student

    clean, _ = distill_roots
    teacher = AutoModelForSeq2SeqLM.from_pretrained(tiny_teacher_dir).eval()
    tokenizer = load_tokenizer(tiny_teacher_dir)
    cfg = load_config(DistillConfig, "taskdistill", "tiny", [
        f"massive_data={clean}", "crosslingual.setting=teacher-labelled", "crosslingual.target_locales=[de-DE]",
        "locales=[en-US]", "num_eval_examples=4", "cda=two_sided", "perturb=max"])
    data = MassiveDistillData(cfg, tokenizer, teacher=teacher)
    student, _ = build_student(teacher, cfg.student, seed=0)
    pairs = data.pairs([0, 1, 2, 24, 25, 26], epoch=0)
    assert sum(p.train is p.partner for p in pairs) == 3  # the teacher-labelled items are their own partners
    step = distill_step(student, teacher, pairs, data, cfg, build_token_map(tokenizer), None, "cpu")
    assert math.isfinite(float(step.loss.detach())) and step.parts["rows"] == len(pairs)
    step.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


@pytest.mark.slow
def test_teacher_labelled_task_distillation_runs_end_to_end(tiny_teacher_dir, distill_roots, tmp_path):
    """`distill --section taskdistill` under teacher-labelled: the steps mix gold en-US items and
    teacher-labelled de-DE items (CRR on), and the student is written."""
    import os
    import subprocess
    import sys

    clean, _ = distill_roots
    run = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "launch.cli", "distill", "--run-dir", str(run), "--section", "taskdistill",
           "--teacher", str(tiny_teacher_dir), "--out", "student-xl", "--preset", "tiny", f"massive_data={clean}",
           "locales=[en-US]", "crosslingual.setting=teacher-labelled", "crosslingual.target_locales=[de-DE]",
           "num_eval_examples=8", "train.max_steps=4", "train.micro_batch_size=8", "train.global_batch_size=8",
           "train.warmup_steps=1", "train.log_every=1", "train.eval_every=4", "train.save_every=4",
           "train.num_eval_batches=1", "train.num_threads=1"]
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "teacher-labelled, without their labels: 12 train utterances of de-DE" in proc.stdout + proc.stderr
    assert (run / "student-xl" / "config.json").is_file()


# ----------------------------------------------------------------------------- the distilled NLU student


@pytest.fixture(scope="module")
def nlu_teacher_and_student(tiny_teacher_dir, massive_dir, tmp_path_factory):
    """An encoder NLU teacher on the tiny teacher's encoder (saved, as `finetune.teacher` reads it), and
    a one-layer student with a 512-bucket n-gram table on the same tokenizer."""
    from transformers import AutoModelForSeq2SeqLM

    from core.models import ModelConfig, build_model
    from data_prep.tokenizer import load_tokenizer
    from massive.format import OTHER
    from massive.loader import load_massive
    from student import nlu

    data = load_massive(str(massive_dir), locales=["en-US"], partitions=("dev",))
    tokenizer = load_tokenizer(tiny_teacher_dir)
    labels = nlu.NLULabels(intents=list(data.intents), slot_labels=[OTHER, *data.slot_types], max_length=64)
    teacher_dir = tmp_path_factory.mktemp("nlu-teacher") / "teacher-nlu"
    torch_teacher = AutoModelForSeq2SeqLM.from_pretrained(tiny_teacher_dir)
    nlu.EncoderNLUModel.from_seq2seq(torch_teacher, labels, tokenizer).save_pretrained(teacher_dir)
    small = build_model(ModelConfig(preset="tiny", num_layers=1, num_decoder_layers=1), tokenizer, seed=3)
    student = nlu.EncoderNLUModel.from_seq2seq(
        small, nlu.NLULabels(intents=labels.intents, slot_labels=labels.slot_labels, max_length=64, ngram_buckets=512),
        tokenizer)
    return teacher_dir, student, data.examples(locale="en-US", partition="dev")[:6]


def test_the_nlu_student_learns_from_the_teacher_and_target_utterances_carry_no_gold(nlu_teacher_and_student, tmp_path):
    import torch

    from student.config import FinetuneConfig
    from student.finetune import Unlabelled, load_nlu_teacher, train_loss
    from student.nlu import collate_encoder, count_parameters, nlu_loss, nlu_teacher_loss

    teacher_dir, student, examples = nlu_teacher_and_student
    cfg = load_config(FinetuneConfig, "nlu", "tiny", [
        f"teacher={teacher_dir}", "teacher_weight=0.25", "teacher_temperature=2.0", "locales=[en-US]",
        "crosslingual.setting=teacher-labelled", "crosslingual.target_locales=[de-DE]"])
    teacher = load_nlu_teacher(cfg, tmp_path, student.tokenizer, student.labels, "cpu")
    # Every parameter counts, the n-gram table included; the student is the smaller model.
    assert count_parameters(student) == sum(p.numel() for p in student.parameters()) < count_parameters(teacher)
    assert count_parameters(student.ngrams) == 512 * student.encoder.config.d_model

    gold = examples[:3]
    unlabelled = [Unlabelled(tuple(ex.words), "de-DE") for ex in examples[3:]]
    batch = collate_encoder([*gold, *unlabelled], student.tokenizer, student.labels, 64)
    assert batch["intent_labels"][3:].tolist() == [-100] * 3 and bool((batch["slot_labels"][3:] == -100).all())
    loss, parts = train_loss(student, batch, cfg, "cpu", teacher)
    # loss = 0.75 * gold CE (source items only) + 0.25 * the teacher term (every item).
    intent, slots = student(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        t_intent, t_slots = teacher(batch["input_ids"], batch["attention_mask"])
    gold_loss, _ = nlu_loss(intent[:3], slots[:3], batch["word_starts"][:3], batch["intent_labels"][:3],
                            batch["slot_labels"][:3], slot_weight=cfg.slot_loss_weight)
    kd, _ = nlu_teacher_loss(intent, slots, t_intent, t_slots, batch["word_starts"], 2.0, cfg.slot_loss_weight)
    assert float(loss) == pytest.approx(0.75 * float(gold_loss) + 0.25 * float(kd), rel=1e-4)
    assert parts["intent_kd"] > 0 and parts["slot_kd"] > 0
    loss.backward()
    assert student.intent_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())

    # A batch of target utterances alone trains on the teacher term alone.
    only = collate_encoder(unlabelled, student.tokenizer, student.labels, 64)
    alone, parts = train_loss(student, only, cfg, "cpu", teacher)
    assert parts["intent_loss"] == 0.0 and float(alone) == pytest.approx(0.25 * (parts["intent_kd"] + parts["slot_kd"]), rel=1e-4)
    # The teacher matching itself: no teacher term.
    intent_t, slots_t = teacher(batch["input_ids"], batch["attention_mask"])
    same, _ = nlu_teacher_loss(intent_t, slots_t, intent_t, slots_t, batch["word_starts"])
    assert float(same) == pytest.approx(0.0, abs=1e-6)


def test_fine_tuning_watches_no_target_dev_labels(massive_dir, tmp_path):
    from core.distributed import DistInfo
    from student.config import FinetuneConfig
    from student.finetune import load_finetune_data

    cfg = load_config(FinetuneConfig, "finetune", None, [
        "init=x", f"massive={massive_dir}", "locales=[en-US,ja-JP]", "setting=zero_shot", "num_train_examples=20",
        "num_eval_examples=10", "crosslingual.setting=zero-shot", "crosslingual.target_locales=[ja-JP]"])
    data = load_finetune_data(cfg, tmp_path, DistInfo(rank=0, local_rank=0, world_size=1, device="cpu", backend="gloo"))
    assert {ex.locale for ex in data.train} == {ex.locale for ex in data.dev} == {"en-US"} and len(data.dev) == 10


def test_a_teacher_labelled_nlu_student_needs_its_teacher():
    from student.config import FinetuneConfig

    with pytest.raises(ConfigError, match="need a teacher"):
        load_config(FinetuneConfig, "nlu", "tiny", ["locales=[en-US]", "crosslingual.setting=teacher-labelled",
                                                    "crosslingual.target_locales=[de-DE]"])
    with pytest.raises(ConfigError, match="head=encoder"):
        load_config(FinetuneConfig, "finetune", "tiny", ["teacher=teacher-nlu", "head=seq2seq", "locales=[en-US]"])


# ----------------------------------------------------------------------------- the benchmark


def test_crosslingual_benchmark_tables_pairs_and_weakest_locales(tiny_teacher_dir, data_root_with_new_locale,
                                                                 shared_root, tmp_path, capsys):
    """Two models scored with `--locales all` on the same ids: the benchmark's table, the paired
    target-mean difference (what the two results' records give) and the weakest locales' causes."""
    from transformers import AutoModelForSeq2SeqLM

    from benchmarks import crosslingual
    from data_prep.tokenizer import load_tokenizer
    from massive.format import OTHER
    from massive.loader import load_massive
    from massive.scoring import paired_difference
    from student import load_nlu_model, nlu

    data = load_massive(str(data_root_with_new_locale), partitions=("test",))
    labels = nlu.NLULabels(intents=list(data.intents), slot_labels=[OTHER, *data.slot_types], max_length=64)
    nlu_dir = tmp_path / "nlu"
    nlu.EncoderNLUModel.from_seq2seq(AutoModelForSeq2SeqLM.from_pretrained(tiny_teacher_dir), labels,
                                     load_tokenizer(tiny_teacher_dir)).save_pretrained(nlu_dir)
    out = tmp_path / "eval"
    for name, model in (("teacher", tiny_teacher_dir), ("nlu", nlu_dir)):
        assert main(["evaluate", "massive", "--model", str(model), "--out", str(out), "--name", name, "--locales", "all",
                     "--setting", "zero-shot", "--max-examples", "6", f"massive.data={data_root_with_new_locale}",
                     "device=cpu", "bootstrap_samples=20"]) == 0
    capsys.readouterr()
    result = tmp_path / "xl.json"
    assert crosslingual.main(["--results", f"teacher={out / 'teacher.json'}", f"nlu={out / 'nlu.json'}",
                              "--reference", "nlu", "--tokenizer", str(tiny_teacher_dir), "--samples", "20",
                              "--data-root", str(shared_root), "--out", str(result)]) == 0
    printed = capsys.readouterr().out
    assert "setting: zero-shot" in printed and "target mean, EM" in printed and "XLM-R base" in printed
    summary = json.loads(result.read_text())
    assert summary["target_locales"] == ["de-DE", "ka-GE"] and summary["source_locales"] == ["en-US"]
    a, b = (json.loads((out / f"{n}.json").read_text()) for n in ("nlu", "teacher"))
    expected = paired_difference({k: a["records"][k] for k in ("de-DE", "ka-GE")},
                                 {k: b["records"][k] for k in ("de-DE", "ka-GE")}, samples=20, seed=0)
    assert summary["paired_vs_reference"]["teacher"]["em"]["diff"] == pytest.approx(expected["metrics"]["em"]["diff"])
    assert summary["models"]["nlu"]["parameters"] == sum(
        p.numel() for p in load_nlu_model(nlu_dir).parameters())
    # Both targets are among the weakest; Georgian: its script, no generic corpus, more tokens per word
    # (bytes) than the source.
    weakest = {w["locale"]: w for w in summary["weakest"]}
    assert set(weakest) == {"de-DE", "ka-GE"}
    assert weakest["ka-GE"]["script"] == "GEORGIAN" and weakest["de-DE"]["script"] == "LATIN"
    assert weakest["ka-GE"]["corpus_lines"] == 0 and weakest["de-DE"]["corpus_lines"] > 0
    assert weakest["ka-GE"]["fertility"] > weakest["ka-GE"]["source_fertility"]


def test_tfidf_reference_trained_on_the_sources_scores_every_locale(massive_dir, tmp_path, capsys):
    root = tmp_path / "massive"
    root.mkdir()
    test = read_rows(massive_dir / "en-US.jsonl.gz", "test", limit=20)
    write_rows(root / "en-US.jsonl.gz", read_rows(massive_dir / "en-US.jsonl.gz", "train", limit=300) + test)
    ids = {row["id"] for row in test}
    write_rows(root / "de-DE.jsonl.gz", read_rows(massive_dir / "de-DE.jsonl.gz", "test", ids))
    out = tmp_path / "eval"
    assert main(["evaluate", "baseline", "--out", str(out), "--locales", "all", "--train-on", "sources",
                 "--max-examples", "10", f"massive.data={root}", "bootstrap_samples=20"]) == 0
    result = json.loads((out / "baseline.json").read_text())
    # One classifier, on en-US's 300 train utterances (de-DE has none here), for both locales.
    assert result["num_train"] == {"de-DE": 300, "en-US": 300}
    assert result["predictor"].endswith("trained on en-US only")
    xl = result["crosslingual"]
    assert xl["setting"] == "zero-shot" and xl["roles"] == {"de-DE": "target", "en-US": "source"}
    assert xl["target_mean"]["intent_acc"] == pytest.approx(result["per_locale"]["de-DE"]["intent_acc"])


@pytest.mark.slow
def test_distilled_nlu_student_end_to_end(tiny_teacher_dir, distill_roots, tmp_path):
    """`finetune --head encoder`: the teacher's NLU model, then a one-layer student with the teacher
    term and teacher-labelled de-DE utterances; the student records both parameter counts."""
    import os
    import subprocess
    import sys

    from fixtures_models import save_model_dir

    from core.models import ModelConfig, build_model
    from data_prep.tokenizer import load_tokenizer
    from student.nlu import NLULabels

    clean, _ = distill_roots
    tokenizer = load_tokenizer(tiny_teacher_dir)
    student_start = save_model_dir(build_model(ModelConfig(preset="tiny", num_layers=1, num_decoder_layers=1),
                                               tokenizer, seed=1), tokenizer, tmp_path / "student")
    run = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    common = ["--head", "encoder", "--section", "nlu", "--preset", "tiny", f"massive={clean}", "locales=[en-US]",
              "num_eval_examples=4", "train.max_steps=3", "train.micro_batch_size=4", "train.global_batch_size=4",
              "train.warmup_steps=1", "train.log_every=1", "train.eval_every=3", "train.save_every=3",
              "train.num_threads=1", "ngram_buckets=256"]
    repo = Path(__file__).resolve().parents[1]
    for model, out, extra in ((tiny_teacher_dir, "teacher-nlu", []),
                              (student_start, "student-nlu", [f"teacher={run / 'teacher-nlu'}", "ngram_buckets=128",
                                                              "crosslingual.setting=teacher-labelled",
                                                              "crosslingual.target_locales=[de-DE]"])):
        cmd = [sys.executable, "-m", "launch.cli", "finetune", "--run-dir", str(run), "--model", str(model),
               "--out", out, *common, *extra]
        proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "12 teacher-labelled utterances" in proc.stdout
    extra = NLULabels.read(run / "student-nlu").extra
    assert extra["crosslingual_setting"] == "teacher-labelled" and extra["teacher_weight"] == 0.5
    assert 0 < extra["parameters"] < extra["teacher_parameters"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("stage") == "finetune/student-nlu" and "intent_kd" in r]
    assert steps and all(r["intent_kd"] >= 0 for r in steps)
