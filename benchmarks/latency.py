"""Latency benchmark: PyTorch generate vs ONNX fp32 vs ONNX int8, teacher vs student, and sizes.

Batch 1, one thread, MASSIVE test utterances (evaluation.latency.measure: tokenize, model, parse).

    .venv/bin/python -m benchmarks.latency                      # models built from presets (random weights)
    .venv/bin/python -m benchmarks.latency --run-dir runs/demo  # the trained models of a pipeline run

Without --run-dir the teacher (preset --teacher-preset, default small) and the student (tiny) are
randomly initialised on a small tokenizer trained here, and the encoder NLU student is the tiny
student's encoder with MASSIVE's intent and slot heads. Random seq2seq models rarely emit eos, so
every model decodes exactly --new-tokens tokens (default 24, about a MASSIVE target's length): the
comparison is per utterance at equal work. With --run-dir, models stop at eos and --new-tokens is a cap.

Prints a table and the design goals, writes benchmarks/results/latency.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS  # noqa: I001 (first: sets the thread and DeepSpeed defaults)

RUN_DIR_MODELS = {
    "teacher_pytorch": "teacher-ft",
    "teacher_int8": "onnx/teacher-int8",
    "student_pytorch": "student-ft",
    "student_fp32": "onnx/fp32",
    "student_int8": "onnx/int8",
    "student_nlu_pytorch": "student-nlu",
    "student_nlu_int8": "onnx/nlu-int8",
}


def build_models(work: Path, teacher_preset: str) -> dict[str, Path]:
    """Random-weight teacher/student/NLU directories and their exports under `work` (reused when present)."""
    import torch

    from core.config import data_root
    from core.fsutil import atomic_dir
    from core.models import ModelConfig, build_model
    from data_prep.config import TokenizerConfig
    from data_prep.tokenizer import load_tokenizer, train_tokenizer
    from massive.loader import load_massive
    from student.export import export
    from student.export_config import ExportConfig
    from student.nlu import EncoderNLUModel, NLULabels

    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    data = load_massive(data_root() / "massive" / "data", locales=["en-US", "de-DE", "ja-JP"], partitions=("train",),
                        progress=False)
    if not tok_dir.exists():
        texts = [e.utt for e in data.examples(partition="train")]
        train_tokenizer(texts, tok_dir, TokenizerConfig(vocab_size=2000, character_coverage=0.9995, num_sentinels=100), seed=0)
    tokenizer = load_tokenizer(tok_dir)
    dirs: dict[str, Path] = {}
    for role, preset in (("teacher", teacher_preset), ("student", "tiny")):
        model_dir = work / f"{role}-{preset}"
        if not model_dir.exists():
            model = build_model(ModelConfig(preset=preset), tokenizer, seed=0)
            with atomic_dir(model_dir) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
        dirs[f"{role}_pytorch"] = model_dir
    nlu_dir = work / "student-nlu"
    if not nlu_dir.exists():
        from transformers import AutoModelForSeq2SeqLM

        examples = data.examples(locale="en-US", partition="train")
        slot_labels = ["Other", *sorted({s for e in examples for s in e.slots} - {"Other"})]
        labels = NLULabels(intents=sorted({e.intent for e in examples}), slot_labels=slot_labels, max_length=64)
        torch.manual_seed(0)
        seq2seq = AutoModelForSeq2SeqLM.from_pretrained(dirs["student_pytorch"])
        EncoderNLUModel.from_seq2seq(seq2seq, labels, tokenizer=tokenizer).eval().save_pretrained(nlu_dir)
    dirs["student_nlu_pytorch"] = nlu_dir
    exports = {
        "teacher_fp32": (dirs["teacher_pytorch"], False), "teacher_int8": (dirs["teacher_pytorch"], True),
        "student_fp32": (dirs["student_pytorch"], False), "student_int8": (dirs["student_pytorch"], True),
        "student_nlu_fp32": (nlu_dir, False), "student_nlu_int8": (nlu_dir, True),
    }
    for name, (src, int8) in exports.items():
        out = work / f"onnx-{name}"
        if out.exists() and not _current_export(out):  # an export of an earlier format: redo it
            shutil.rmtree(out)
        if not out.exists():
            fp32_out = work / f"onnx-{name.replace('int8', 'fp32')}"
            export(fp32_out if int8 and fp32_out.exists() else src, out, ExportConfig(int8=int8))
        dirs[name] = out
    order = ["teacher_pytorch", "teacher_fp32", "teacher_int8", "student_pytorch", "student_fp32", "student_int8",
             "student_nlu_pytorch", "student_nlu_fp32", "student_nlu_int8"]
    return {name: dirs[name] for name in order}


def _current_export(export_dir: Path) -> bool:
    """Whether `export_dir` holds an export the runtime reads (student.runtime.FORMAT_VERSION)."""
    import json

    from student.runtime import FORMAT_VERSION

    try:
        return json.loads((export_dir / "manifest.json").read_text())["format_version"] == FORMAT_VERSION
    except (OSError, ValueError, KeyError):
        return False


def goals(results: dict[str, dict]) -> list[dict]:
    """The design goals, each with the measured value and whether it is met (None: not measured)."""

    def p50(name: str) -> float | None:
        return results[name]["p50"] if name in results else None

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    rows = [
        ("int8 student vs PyTorch generate of the same student (p50 speed-up)", ratio(p50("student_pytorch"), p50("student_int8")), ">=", 6.0),
        ("int8 / fp32 size of the student (fraction)", ratio(results.get("student_int8", {}).get("size_mb"),
                                                            results.get("student_fp32", {}).get("size_mb")), "<=", 1 / 3.5),
        ("encoder-only int8 student p50 (ms)", p50("student_nlu_int8"), "<=", 2.0),
        ("int8 student vs PyTorch teacher (p50 speed-up)", ratio(p50("teacher_pytorch"), p50("student_int8")), ">=", 20.0),
        ("int8 student vs int8 teacher (p50 speed-up)", ratio(p50("teacher_int8"), p50("student_int8")), ">=", 20.0),
    ]
    out = []
    for text, value, op, target in rows:
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        out.append({"goal": f"{text} {op} {target:.3g}", "value": value, "met": met})
    return out


def main(argv: list[str] | None = None) -> int:
    from core.fsutil import atomic_write_json
    from evaluation.latency import latency_table, massive_utterances, measure

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", default=None, help="time a pipeline run's models instead of preset-built ones")
    p.add_argument("--work", default=str(RESULTS / "latency-models"), help="where preset-built models are cached")
    p.add_argument("--teacher-preset", default="small", help="teacher size preset when building models (default small)")
    p.add_argument("--locales", nargs="+", default=["en-US"], help="MASSIVE locales whose test utterances are timed")
    p.add_argument("--max-examples", type=int, default=50, help="utterances per locale (default 50)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    p.add_argument("--new-tokens", type=int, default=24, help="decoding budget per utterance (default 24)")
    p.add_argument("--out", default=str(RESULTS / "latency.json"), help="JSON output path")
    args = p.parse_args(argv)

    if args.run_dir:
        run = Path(args.run_dir)
        models = {name: run / rel for name, rel in RUN_DIR_MODELS.items() if (run / rel).is_dir()}
    else:
        models = build_models(Path(args.work), args.teacher_preset)
    utterances = massive_utterances("@data/massive/data", args.locales, "test", args.max_examples)
    started = time.time()
    results = {name: measure(d, utterances, num_threads=args.threads, max_new_tokens=args.new_tokens, name=name)
               for name, d in models.items()}
    table = latency_table(results)
    checks = goals(results)
    print(f"\nbatch 1, {args.threads} thread(s), {len(utterances)} MASSIVE test utterances ({', '.join(args.locales)}), "
          f"{'stop at eos, cap' if args.run_dir else 'exactly'} {args.new_tokens} new tokens\n")
    print(table)
    for row in checks:
        value = "n/a" if row["value"] is None else f"{row['value']:.3g}"
        print(f"- {row['goal']}: {value} -> {({True: 'met', False: 'NOT met', None: 'not measured'})[row['met']]}")
    atomic_write_json(args.out, {
        "settings": {"threads": args.threads, "num_utterances": len(utterances), "locales": args.locales,
                     "new_tokens": args.new_tokens, "run_dir": args.run_dir,
                     "models": "run directory" if args.run_dir else f"random weights: teacher {args.teacher_preset}, student tiny",
                     "seconds": time.time() - started},
        "results": results,
        "goals": checks,
    })
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
