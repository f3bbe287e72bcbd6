"""Distillation stage: a real 2-process DeepSpeed run (gloo, CPU) of the tiny teacher into a student,
with CDA and teacher perturbation on; plus fast checks of the counterfactual row swap."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def test_counterfactual_row_keeps_unchanged_documents(tiny_tokenizer_dir):
    from data_prep.tokenizer import load_tokenizer, special_ids
    from distill.data import Swapper, counterfactual_row

    tok = load_tokenizer(tiny_tokenizer_dir)
    sep = special_ids(tok).sep
    docs = ["The weather is nice today.", "He is the father of the bride.", "Der Tisch ist groß."]
    ids: list[int] = []
    for doc in docs:
        ids += tok(doc, add_special_tokens=False)["input_ids"] + [sep]
    row = np.asarray(ids, dtype=np.int64)
    out = counterfactual_row(row, tok, sep, Swapper([]))
    pieces = [tok.decode(p.tolist()) for p in np.split(out, np.flatnonzero(out == sep)) if p.size]
    pieces = [p.replace("<sep>", "").strip() for p in pieces]
    assert pieces[:3] == ["The weather is nice today.", "She is the mother of the groom.", "Der Tisch ist groß."]
    # The unchanged documents keep their exact token ids.
    first = tok(docs[0], add_special_tokens=False)["input_ids"]
    assert out[: len(first)].tolist() == first
    # Restricting the languages switches the swap off.
    assert np.array_equal(counterfactual_row(row, tok, sep, Swapper(["de"])), row)


@pytest.mark.slow
def test_two_process_distillation_loss_falls(tmp_path, tiny_teacher_dir, tiny_tokenizer_dir, tiny_packed_dir):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(tiny_packed_dir, run / "data")
    shutil.copytree(tiny_tokenizer_dir, run / "tokenizer")
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "launch.cli", "launch", "--nproc-per-node", "2", "--",
        "distill", "--run-dir", str(run), "--teacher", str(tiny_teacher_dir), "--out", "student-crr",
        "--preset", "tiny",
        "cda=two_sided", "perturb=max", "hidden_loss_weight=0.1",
        "train.max_steps=16", "train.micro_batch_size=4", "train.global_batch_size=8",
        "train.warmup_steps=2", "train.log_every=1", "train.eval_every=8", "train.save_every=8",
        "train.num_eval_batches=1",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["stage"] == "distill" and "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 17))
    first = np.mean([r["loss"] for r in train[:4]])
    last = np.mean([r["loss"] for r in train[-4:]])
    assert last < first * 0.9, (first, last)
    # CDA doubled the rows that hold gendered words; perturbation ran on aligned rows.
    assert all(r["rows_per_micro_batch"] >= 4 for r in train)
    assert any(r["rows_swapped_fraction"] > 0 for r in train)
    assert all("perturb_aligned_fraction" in r and "hidden" in r and "kd" in r and "ce" in r for r in train)
    evals = [r for r in records if "heldout_student_ce" in r]
    assert [r["step"] for r in evals] == [8, 16]
    assert evals[-1]["heldout_student_ce"] < evals[0]["heldout_student_ce"]

    # The exported student loads as a plain HF model with the teacher's tokenizer and half its layers.
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    student = AutoModelForSeq2SeqLM.from_pretrained(run / "student-crr")
    teacher = AutoModelForSeq2SeqLM.from_pretrained(tiny_teacher_dir)
    assert student.config.num_layers == max(1, teacher.config.num_layers // 2)
    assert len(AutoTokenizer.from_pretrained(run / "student-crr")) == len(AutoTokenizer.from_pretrained(tiny_teacher_dir))
    summary = json.loads((run / "student-crr" / "distillation.json").read_text())
    assert summary["final_step"] == 16 and summary["student_init"]["from_teacher"]
    assert (run / "checkpoints" / "student-crr" / "step_00000016" / "COMPLETE").is_file()


@pytest.mark.slow
def test_task_distillation_on_massive_with_length_grouped_batches(tmp_path, tiny_teacher_dir, massive_dir):
    """`distill --section taskdistill`: MASSIVE pairs from the fine-tuned teacher, one process, batches
    grouped by length, counterfactual logit pairing on; the loss falls and the student is a seq2seq
    model with half the layers."""
    from core.config import load_config
    from core.data import ResumableSampler
    from data_prep.tokenizer import load_tokenizer
    from distill.config import DistillConfig
    from distill.data import MassiveDistillData

    cfg = load_config(DistillConfig, section="taskdistill", preset="tiny",
                      overrides=[f"massive_data={massive_dir}", "locales=[en-US]", "num_train_examples=256"])
    data = MassiveDistillData(cfg, load_tokenizer(tiny_teacher_dir))
    assert cfg.group_by_length and len(data.train_lengths) == data.num_train == 256
    sampler = ResumableSampler(data.num_train, 8, 1, 0, 1, seed=0, lengths=data.train_lengths)
    spans = [max(data.train_lengths[i] for i in b) - min(data.train_lengths[i] for i in b)
             for step in range(8) for b in sampler.micro_batches(0, step * 8)]
    assert max(spans) <= 3  # 256 utterances of 1-20 words, sorted in runs of 64 batches

    run = tmp_path / "run"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "launch.cli", "distill", "--run-dir", str(run), "--section", "taskdistill",
        "--teacher", str(tiny_teacher_dir), "--out", "student-task", "--preset", "tiny",
        # de-DE: the first 128 utterances of the two locales hold one that sigma changes (paired 8 times).
        f"massive_data={massive_dir}", "locales=[en-US,de-DE]", "num_train_examples=128", "num_eval_examples=8",
        "train.max_steps=12", "train.micro_batch_size=8", "train.global_batch_size=8", "train.warmup_steps=1",
        "train.log_every=1", "train.eval_every=12", "train.save_every=12", "train.num_eval_batches=1",
        "counterfactual_pairing_weight=1.0",
    ]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["stage"] == "distill" and "loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert all(r["pairing"] >= 0 for r in train) and any(r["paired_positions"] > 0 for r in train)
    assert np.mean([r["loss"] for r in train[-3:]]) < np.mean([r["loss"] for r in train[:3]])
    from transformers import AutoModelForSeq2SeqLM

    student = AutoModelForSeq2SeqLM.from_pretrained(run / "student-task")
    assert student.config.num_layers == max(1, AutoModelForSeq2SeqLM.from_pretrained(tiny_teacher_dir).config.num_layers // 2)


def test_cda_repeat_repeats_only_the_utterances_sigma_changes(tiny_teacher_dir, massive_dir):
    from core.config import ConfigError, load_config
    from data_prep.tokenizer import load_tokenizer
    from distill.config import DistillConfig
    from distill.data import MassiveDistillData

    tokenizer = load_tokenizer(tiny_teacher_dir)
    base = [f"massive_data={massive_dir}", "locales=[en-US,de-DE]", "num_train_examples=200"]
    once = MassiveDistillData(load_config(DistillConfig, section="taskdistill", preset="tiny",
                                          overrides=[*base, "cda_repeat=1"]), tokenizer)
    thrice = MassiveDistillData(
        load_config(DistillConfig, section="taskdistill", preset="tiny", overrides=[*base, "cda_repeat=3"]), tokenizer)
    gendered = [ex for ex in once.train if once.swapper.utterance(ex)[0] != list(ex.words)]
    assert 0 < len(gendered) < len(once.train) == 400
    assert thrice.train[:400] == once.train and thrice.train[400:] == gendered * 2
    assert f"{len(gendered)} changed by sigma, repeated x3" in thrice.description
    for bad, match in (("cda_repeat=0", ">= 1"), ("cda=none", "needs task=massive and cda")):
        with pytest.raises(ConfigError, match=match):
            load_config(DistillConfig, section="taskdistill", preset="tiny", overrides=[*base, "cda_repeat=2", bad])


def test_matched_plain_kd_sees_what_crr_sees_without_the_swap(tiny_teacher_dir, massive_dir):
    """cda=repeat (the pipeline's plain-KD arm) against CRR's two_sided: the same examples, sampler
    order, steps, batch sizes and lengths, and every gendered utterance as often per pass; CRR's x~
    is x there, nothing else differs."""
    import collections

    from core.config import load_config
    from core.data import ResumableSampler
    from data_prep.tokenizer import load_tokenizer
    from distill.config import DistillConfig
    from distill.data import MassiveDistillData

    tokenizer = load_tokenizer(tiny_teacher_dir)
    base = [f"massive_data={massive_dir}", "locales=[en-US,de-DE]", "num_train_examples=120", "cda_repeat=3",
            "train.micro_batch_size=8", "train.global_batch_size=16"]
    arms = {}
    for name, extra in (("crr", []), ("kd", ["cda=repeat", "perturb=none", "counterfactual_pairing_weight=0"])):
        cfg = load_config(DistillConfig, section="taskdistill", preset="tiny", overrides=[*base, *extra])
        data = MassiveDistillData(cfg, tokenizer)
        sampler = ResumableSampler(data.num_train, cfg.train.micro_batch_size, cfg.train.grad_accum_steps(1), 0, 1,
                                   cfg.train.seed, lengths=data.train_lengths)
        arms[name] = (cfg, data, sampler)
    (crr_cfg, crr, crr_sampler), (kd_cfg, kd, kd_sampler) = arms["crr"], arms["kd"]
    assert (crr_cfg.cda, kd_cfg.cda) == ("two_sided", "repeat") and crr_cfg.train == kd_cfg.train
    assert crr.train == kd.train and crr.num_train == kd.num_train > 240
    assert crr_sampler.steps_per_epoch == kd_sampler.steps_per_epoch > 10
    key = {id(ex): (ex.locale, ex.id) for ex in crr.train}
    gendered = {key[id(ex)] for ex in crr.train if crr.swapper.utterance(ex)[0] != list(ex.words)}
    assert gendered
    seen: dict[str, collections.Counter] = {"crr": collections.Counter(), "kd": collections.Counter()}
    swapped_seen: collections.Counter = collections.Counter()
    position = 0
    for _ in range(crr_sampler.steps_per_epoch):
        crr_batches = crr_sampler.micro_batches(0, position)
        assert crr_batches == kd_sampler.micro_batches(0, position)  # the same order
        position += crr_sampler.global_batch_size
        for indices in crr_batches:
            crr_pairs, kd_pairs = crr.pairs(indices, 0), kd.pairs(indices, 0)
            assert len(crr_pairs) == len(kd_pairs)  # the same rows per micro-batch
            sources = [k for k, i in enumerate(indices) for _ in range(2 if key[id(crr.train[i])] in gendered else 1)]
            for n, (c, k) in enumerate(zip(crr_pairs, kd_pairs)):
                ex = crr.train[indices[sources[n]]]
                seen["crr"][key[id(ex)]] += 1
                seen["kd"][key[id(ex)]] += 1
                assert not k.swapped and k.changed == c.changed == (key[id(ex)] in gendered)
                if c.swapped:  # CRR's x~: the matched arm has x again, with x~ as its (unused) partner
                    swapped_seen[key[id(ex)]] += 1
                    assert np.array_equal(k.train.source, crr_pairs[n - 1].train.source)
                    assert not np.array_equal(c.train.source, k.train.source)
                    assert np.array_equal(k.partner.source, c.train.source)
                else:
                    assert np.array_equal(c.train.source, k.train.source)
                    assert np.array_equal(c.train.target, k.train.target)
    assert seen["crr"] == seen["kd"]
    # Per pass each gendered utterance is seen 2 x cda_repeat times in both arms (CRR: half of them as x~),
    # less the few that fall into the dropped trailing partial batch.
    counts = collections.Counter(seen["kd"][i] for i in gendered)
    assert counts.most_common(1)[0][0] == 6 and sum(swapped_seen.values()) * 2 == sum(seen["kd"][i] for i in gendered)
    assert all(seen["kd"][key[id(ex)]] <= 1 for ex in crr.train if key[id(ex)] not in gendered)


def test_counterfactual_pairing_pairs_each_original_with_its_swap_where_the_targets_agree(tiny_teacher_dir, massive_dir):
    """Two-sided CDA puts x~ right after x; pairing holds at aligned positions with the same target token,
    is 0 for a student that answers alike on both and grows when it does not."""
    import torch

    from core.config import ConfigError, load_config
    from data_prep.tokenizer import load_tokenizer
    from distill.config import DistillConfig
    from distill.data import MassiveDistillData
    from distill.distill import paired_positions
    from distill.losses import counterfactual_pairing

    base = [f"massive_data={massive_dir}", "locales=[en-US,de-DE]", "num_train_examples=200", "cda=two_sided"]
    data = MassiveDistillData(load_config(DistillConfig, section="taskdistill", preset="tiny",
                                          overrides=[*base, "counterfactual_pairing_weight=1.0"]), load_tokenizer(tiny_teacher_dir))
    gendered = [i for i, ex in enumerate(data.train) if data.swapper.utterance(ex)[0] != list(ex.words)]
    plain = [i for i in range(len(data.train)) if i not in set(gendered)]
    pairs = data.pairs([plain[0], gendered[0], plain[1], gendered[1]], epoch=0)
    assert [(p.swapped, p.changed) for p in pairs] == [(False, False), (False, True), (True, True), (False, False),
                                                       (False, True), (True, True)]
    paired = paired_positions(pairs)
    assert {(i, j) for i, _, j, _ in paired} == {(1, 2), (4, 5)}
    for i, t, j, t2 in paired:
        assert pairs[i].train.target[t] == pairs[j].train.target[t2]
    for i in (1, 4):  # every position of x is paired unless the targets differ there
        assert sum(1 for a, *_ in paired if a == i) >= len(pairs[i].train.target) - 2
    index = torch.as_tensor(paired).unbind(1)
    length = max(len(p.train.target) for p in pairs)
    same = torch.randn(1, length, 50).repeat(len(pairs), 1, 1)
    assert float(counterfactual_pairing(same, *index)) == pytest.approx(0.0, abs=1e-6)
    differ = same.clone().requires_grad_(True)
    loss = counterfactual_pairing(differ + torch.randn(len(pairs), length, 50), *index)
    loss.backward()
    assert float(loss) > 0 and differ.grad[[1, 2, 4, 5]].abs().sum() > 0 and differ.grad[[0, 3]].abs().sum() == 0
    with pytest.raises(ConfigError, match="needs cda=two_sided"):
        load_config(DistillConfig, section="taskdistill", preset="tiny",
                    overrides=[*base, "cda=one_sided", "counterfactual_pairing_weight=1.0"])
