"""Held-out intents, in-context training prompts, and the held-out-intent ICL evaluation (tiny teacher,
real MASSIVE files, real scikit-learn TF-IDF)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import numpy as np
import pytest

from core.config import ConfigError
from data_prep.icl import (
    HELDOUT_SCENARIOS,
    IclPromptSampler,
    IclTrainConfig,
    exclude_heldout,
    heldout_intents,
    is_heldout,
    load_icl_pools,
)
from evaluation.icl_heldout import candidate_set, demo_plan, tfidf_nearest
from massive.format import label_text


@dataclass
class Ex:
    scenario: str
    intent: str
    utt: str = ""


@pytest.fixture(scope="module")
def train_pools(massive_dir):
    cfg = IclTrainConfig(massive=str(massive_dir), locales=["en-US", "de-DE", "ja-JP"])
    return cfg, load_icl_pools(cfg, "train")


def test_default_heldout_scenarios_hold_eleven_intents(train_pools):
    _, pools = train_pools
    intents = heldout_intents(pools["en-US"])
    assert HELDOUT_SCENARIOS == ("alarm", "audio", "cooking", "takeaway")
    assert intents == ["alarm_query", "alarm_remove", "alarm_set", "audio_volume_down", "audio_volume_mute",
                       "audio_volume_other", "audio_volume_up", "cooking_query", "cooking_recipe",
                       "takeaway_order", "takeaway_query"]


def test_exclude_heldout_filters_any_stream_lazily():
    stream = iter([Ex("alarm", "alarm_set"), Ex("weather", "weather_query"), Ex("takeaway", "takeaway_order"),
                   Ex("music", "music_query")])
    kept = exclude_heldout(stream)
    assert [e.intent for e in kept] == ["weather_query", "music_query"]
    assert is_heldout(Ex("audio", "audio_volume_up")) and not is_heldout(Ex("audio", "x"), scenarios=["alarm"])
    assert [e.intent for e in exclude_heldout([Ex("alarm", "alarm_set")], scenarios=["music"])] == ["alarm_set"]


def test_training_prompts_never_show_a_heldout_intent_and_vary(train_pools):
    cfg, pools = train_pools
    sampler = IclPromptSampler(pools, cfg)
    # Utterances only a held-out intent has (a few texts are annotated with several intents).
    seen_utts = {ex.utt for loc in pools for ex in pools[loc] if not is_heldout(ex)}
    held_utts = {ex.utt for loc in pools for ex in pools[loc] if is_heldout(ex)} - seen_utts
    held_labels = {label_text(i) for i in heldout_intents(pools["en-US"])}
    prompts = [sampler.prompt(i) for i in range(300)]
    shots, ways, label_sets, renamed, query_locs, demo_locs = set(), set(), set(), 0, set(), set()
    for p in prompts:
        assert not any(i in heldout_intents([Ex(i.split("_")[0], i)]) for i in p.intents)
        assert not set(p.labels) & held_labels and p.target not in held_labels
        for utt in p.text.split("Utterance: ")[1:]:
            assert utt.split(" Intent:")[0] not in held_utts
        assert p.target in p.labels
        assert p.text.count("Utterance:") == p.shots * len(p.intents) + 1
        if p.shots:
            # The target is the label shown with the query's intent's demonstrations.
            assert f"Intent: {p.target}\n" in p.text
        shots.add(p.shots)
        ways.add(len(p.intents))
        label_sets.add(frozenset(p.intents))
        renamed += p.labels != tuple(label_text(i) for i in p.intents)
        query_locs.add(p.query_locale)
        demo_locs.update(p.demo_locales)
    assert shots == set(cfg.shots) and ways == set(range(cfg.min_way, cfg.max_way + 1))
    assert len(label_sets) > 250 and 80 < renamed < 220
    assert query_locs == demo_locs == {"en-US", "de-DE", "ja-JP"}
    # Seeded: the same index gives the same prompt, another seed another one.
    assert IclPromptSampler(pools, cfg).prompt(7) == prompts[7]
    assert IclPromptSampler(pools, cfg, seed=1).prompt(7) != prompts[7]


def test_query_demo_curriculum_shows_the_query_once_with_its_label(train_pools):
    cfg, pools = train_pools
    plain = IclPromptSampler(pools, cfg)
    copying = IclPromptSampler(pools, dataclasses.replace(cfg, p_query_demo=1.0))
    for i in range(60):
        p = copying.prompt(i)
        query = p.text.rsplit("Utterance: ", 1)[1].split(" Intent:")[0]
        demos = [d.split(" Intent: ") for d in p.text.split("Utterance: ")[1:-1]]
        if p.shots == 0:
            assert p == plain.prompt(i)  # nothing to copy from: the prompt of a run without the option
            continue
        assert [label for utt, label in demos if utt == query] == [p.target + "\n"]
        # The other labels keep their demonstrations and the query its place at the end.
        assert p.text.count("Utterance:") == p.shots * len(p.intents) + 1 and p.labels == plain.prompt(i).labels
    with pytest.raises(ConfigError, match="p_query_demo"):
        dataclasses.replace(cfg, p_query_demo=1.5).validate()


def test_candidate_sets_and_demo_plans_are_seeded_and_nest():
    intents = [f"i{j}" for j in range(11)]
    cands = candidate_set(intents, "i3", 5, seed=0, query_id="42")
    assert len(cands) == 5 and "i3" in cands and cands == candidate_set(intents, "i3", 5, 0, "42")
    pool = {i: [f"{i}-{n}" for n in range(8)] for i in intents}
    plan = demo_plan(cands, pool, 5, seed=0, query_id="42")
    assert len(plan) == 25 and {i for _, i, _ in plan} == set(cands)
    one = [(i, d) for r, i, d in plan if r < 1]
    assert len(one) == 5 and {i for i, _ in one} == set(cands)


def test_tfidf_nearest_picks_the_surface_closest_demonstration():
    demos = [("wake me up at seven", "alarm set"), ("turn the volume down", "audio volume down")]
    assert tfidf_nearest(demos, "please turn volume down a bit") == "audio volume down"
    assert tfidf_nearest([], "anything") is None


@pytest.mark.slow
def test_evaluate_heldout_protocol_on_the_tiny_teacher(tiny_teacher_dir, massive_dir, tmp_path):
    from core.config import load_config
    from evaluation.config import EvalConfig
    from evaluation.icl_heldout import evaluate_icl_heldout

    cfg = load_config(EvalConfig, overrides=[
        f"icl.data={massive_dir}", "icl.locales=[en-US, ja-JP]", "icl.protocol=heldout", "icl.heldout_shots=[0, 1, 2]",
        "icl.max_examples=6", "icl.batch_size=4", "device=cpu", "bootstrap_samples=200"])
    result = evaluate_icl_heldout(cfg, tiny_teacher_dir, tmp_path, name="held")
    saved = json.loads((tmp_path / "held.json").read_text())
    assert saved["split"] == "dev" and saved["way"] == 5 and saved["chance"] == pytest.approx(0.2)
    assert set(saved["pairs"]) == {"en-US->en-US", "ja-JP->ja-JP", "en-US->ja-JP"}
    assert saved["pairs"]["en-US->ja-JP"]["kind"] == "cross" and saved["mean"]["cross"]["pairs"] == ["en-US->ja-JP"]
    for s in saved["pairs"].values():
        assert s["n"] == 6 and s["tfidf"]["0"] is None and s["vs_k0"]["0"] == 0.0
        for k in ("0", "1", "2"):
            assert s["accuracy"][k] in {j / 6 for j in range(7)}
            lo, hi = s["accuracy_ci"][k]
            assert lo <= s["accuracy"][k] <= hi
            assert s["vs_chance_ci"][k] == pytest.approx([lo - 0.2, hi - 0.2])
        for k in ("1", "2"):
            assert s["vs_tfidf"][k] == pytest.approx(s["accuracy"][k] - s["tfidf"][k])
    mean_same = np.mean([saved["pairs"][p]["accuracy"]["2"] for p in ("en-US->en-US", "ja-JP->ja-JP")])
    assert saved["mean"]["same"]["accuracy"]["2"] == pytest.approx(mean_same)
    # 2 demonstrations for each of the 5 candidates, then the query; none of another intent.
    prompt = saved["example_prompt"]
    assert prompt.count("Utterance:") == 11 and prompt.endswith("Intent:")
    shown = {line.split("Intent: ")[1] for line in prompt.splitlines()[:-1]}
    assert len(shown) == 5 and shown <= {label_text(i) for i in saved["heldout_intents"]}
    assert result["pairs"].keys() == saved["pairs"].keys()
    assert (tmp_path / "held.md").read_text().count("\n| ") >= 5
    assert (tmp_path / "held.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heldout_protocol_with_contextual_calibration_keeps_the_uncalibrated_ranking(tiny_teacher_dir, massive_dir, tmp_path):
    from core.config import load_config
    from evaluation.config import EvalConfig
    from evaluation.icl_heldout import evaluate_icl_heldout

    common = [f"icl.data={massive_dir}", "icl.locales=[en-US, de-DE]", "icl.protocol=heldout", "icl.heldout_shots=[0, 2]",
              "icl.max_examples=8", "icl.batch_size=3", "device=cpu", "bootstrap_samples=50"]
    plain = evaluate_icl_heldout(load_config(EvalConfig, overrides=common), tiny_teacher_dir, tmp_path, name="plain")
    calibrated = evaluate_icl_heldout(
        load_config(EvalConfig, overrides=[*common, "icl.calibration=contextual", "icl.content_free=[N/A, '']"]),
        tiny_teacher_dir, tmp_path, name="cal")
    assert plain["calibration"] == "none" and plain["content_free"] is None
    assert calibrated["calibration"] == "contextual" and calibrated["content_free"] == ["N/A", ""]
    assert "accuracy_uncalibrated" not in plain["pairs"]["en-US->en-US"]
    for key, s in calibrated["pairs"].items():
        # The same prompts and scores: the uncalibrated ranking is the plain run's.
        assert s["accuracy_uncalibrated"] == pytest.approx(plain["pairs"][key]["accuracy"])
        assert s["tfidf"] == plain["pairs"][key]["tfidf"]
    assert calibrated["mean"]["same"]["accuracy_uncalibrated"] == pytest.approx(plain["mean"]["same"]["accuracy"])
    table = (tmp_path / "cal.md").read_text()
    assert "uncal. k=2" in table and "contextual calibration" in table
    assert "uncal." not in (tmp_path / "plain.md").read_text()


@pytest.mark.slow
def test_evaluate_icl_command_runs_both_protocols(tiny_teacher_dir, massive_dir, tmp_path, capsys):
    from launch.cli import main

    common = ["evaluate", "icl", "--model", str(tiny_teacher_dir), "--out", str(tmp_path), "--locales", "en-US", "de-DE",
              "--max-examples", "3", f"icl.data={massive_dir}", "device=cpu", "bootstrap_samples=50"]
    assert main([*common, "--name", "held", "--protocol", "heldout", "--shots", "0", "1", "--way", "3"]) == 0
    held = json.loads((tmp_path / "held.json").read_text())
    assert held["kind"] == "icl_heldout" and held["shots"] == [0, 1] and held["way"] == 3 and held["split"] == "dev"
    assert "held-out-intent ICL (3-way" in capsys.readouterr().out
    # The original harness is still the default protocol, on test.
    assert main([*common, "--name", "all", "--shots", "0"]) == 0
    old = json.loads((tmp_path / "all.json").read_text())
    assert old["kind"] == "icl" and old["num_labels"] == 60 and old["split"] == "test"


@pytest.mark.slow
def test_pretrain_section_icl_trains_a_tiny_model_a_few_steps(tiny_teacher_dir, massive_dir, tmp_path):
    from data_prep.objectives import ICL, IclCollator, IclRows
    from launch.cli import main

    run = tmp_path / "run"
    rc = main(["pretrain", "--run-dir", str(run), "--preset", "tiny", "--section", "icl", "--init-from",
               str(tiny_teacher_dir), f"icl.massive={massive_dir}", "icl.locales=[en-US, de-DE]", "icl.max_prompt_tokens=128",
               "train.max_steps=3", "train.warmup_steps=1", "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_every=3",
               "train.num_eval_batches=1", "train.log_every=1", "train.save_every=3", "train.num_threads=1"])
    assert rc == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if "loss_icl" in r]
    assert len(train_records) == 3 and all("loss_denoise" not in r and "loss_clm" not in r for r in train_records)
    assert any("eval_loss_icl" in r for r in records)
    assert (run / "teacher-icl" / "config.json").is_file()
    # The batch: [CLM] + prompt + eos as the source, the query's label text + eos as the target.
    from data_prep.icl import IclPromptSampler, IclTrainConfig, load_icl_pools
    from data_prep.objectives import ObjectiveConfig
    from data_prep.tokenizer import load_tokenizer

    cfg = IclTrainConfig(massive=str(massive_dir), locales=["en-US"])
    sampler = IclPromptSampler(load_icl_pools(cfg, "train"), cfg)
    tokenizer = load_tokenizer(tiny_teacher_dir)
    collator = IclCollator(ObjectiveConfig(), tokenizer, clm_prompt=True, max_prompt_tokens=512)
    batch = collator.collate(IclRows(sampler, 4)[[0, 1]]["input_ids"], [0, 1])
    assert batch["objective"].tolist() == [ICL, ICL]
    target = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert tokenizer.decode(target, skip_special_tokens=True) == sampler.prompt(0).target
    assert tokenizer.decode(batch["input_ids"][0], skip_special_tokens=True).endswith(
        sampler.prompt(0).text.split("Utterance: ")[-1])


@pytest.mark.slow
def test_pipeline_heldout_commands_score_both_models_on_the_same_test_prompts(tiny_teacher_dir, massive_dir, tmp_path, capsys):
    """eval_icl's held-out commands as the pipeline builds them, run for real (two copies of the tiny
    teacher as teacher-icl and teacher-indomain, a few queries), then the report reads them."""
    import shutil

    from evaluation.report import write_report
    from launch.cli import main
    from launch.pipeline import STAGE_BY_NAME, PipelineConfig, stage_commands

    run_dir = tmp_path / "run"
    for model in ("teacher-icl", "teacher-indomain"):
        shutil.copytree(tiny_teacher_dir, run_dir / model)
    out = run_dir / "eval" / "icl"
    _all_intents, *heldout = stage_commands(STAGE_BY_NAME["eval_icl"], run_dir, "tiny", PipelineConfig(), out)
    for cmd in heldout:
        assert main([*cmd, f"icl.data={massive_dir}", "icl.max_examples=3", "device=cpu", "bootstrap_samples=50"]) == 0
    capsys.readouterr()
    results = [json.loads((out / f"{cmd[cmd.index('--name') + 1]}.json").read_text()) for cmd in heldout]
    assert [r["model"] for r in results] == [str(run_dir / "teacher-icl"), str(run_dir / "teacher-indomain")]
    for r in results:
        # The tiny preset's evaluate section: en-US and de-DE, k = 0 1 2 5, on test.
        assert r["split"] == "test" and r["shots"] == [0, 1, 2, 5] and r["num_queries"] == 3
        assert set(r["pairs"]) == {"en-US->en-US", "de-DE->de-DE", "en-US->de-DE"}
    # The same weights on the same prompts give the same figures.
    assert results[0]["example_prompt"] == results[1]["example_prompt"] and results[0]["pairs"] == results[1]["pairs"]
    summary = write_report(run_dir)
    assert summary["icl_heldout"]["same_prompts"] is True and summary["icl_heldout"]["split"] == "test"
    assert "### en-US->de-DE (across languages)" in (run_dir / "REPORT.md").read_text()


def test_icl_binding_benchmark_scores_real_and_renamed_labels(tiny_teacher_dir, massive_dir, tmp_path, capsys):
    from benchmarks.icl_binding import main

    out = tmp_path / "binding.json"
    assert main(["--models", f"t={tiny_teacher_dir}", "--data", str(massive_dir), "--locales", "en-US", "de-DE",
                 "--shots", "0", "1", "--way", "3", "--prompts", "6", "--samples", "50", "--out", str(out)]) == 0
    cells = json.loads(out.read_text())["models"]["t"]
    assert sorted(c for c in cells if c != "dir") == ["k0_real", "k1_real", "k1_renamed"]
    for name, cell in cells.items():
        if name == "dir":
            continue
        for measure in ("correct", "memory"):
            value, (low, high) = cell[measure]["value"], cell[measure]["ci"]
            assert 0.0 <= low <= value <= high <= 1.0 and value * 6 == round(value * 6)
    # Without renaming, the target is the query's real name: the two counts are one.
    assert cells["k0_real"]["correct"] == cells["k0_real"]["memory"]
    assert cells["k1_real"]["correct"] == cells["k1_real"]["memory"]
    assert "| t " in capsys.readouterr().out
    assert main(["--models", "nodir"]) == 2
