"""The model-kind registry (student/kinds.py): the only place that switches on a model kind, and
`kind_of` on real small directories of every kind."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core.modeldir import ModelDirError
from student import KINDS, PredictOptions, kind_for_head, kind_of
from tests.fixtures_models import build_nlu_dir, session_export

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("core", "massive", "data_prep", "teacher", "distill", "student", "evaluation", "launch")
REGISTRY = REPO / "student" / "kinds.py"
# The names of model kinds and of finetune heads: comparing a value to one of them is a switch on kind.
KIND_NAMES = {"seq2seq", "encoder_nlu", "nlu_ensemble", "encoder", "onnx"}
# Where a directory's kind is detected from its marker files (the foundation the registry reads).
DETECTION = REPO / "core" / "modeldir.py"


def _constants(node: ast.AST) -> set[str]:
    """The string constants a comparison operand names: "x", or each of ("x", "y") / ["x"] / {"x"}."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def kind_switches(path: Path) -> list[str]:
    """`line: source` of every comparison of a value to a model-kind name, and of every use of
    is_nlu_ensemble (the ensemble's detection), in one module."""
    text = path.read_text(encoding="utf-8")
    found = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Compare):
            named = set().union(*(_constants(n) for n in [node.left, *node.comparators]))
            if named & KIND_NAMES:
                found.append(f"{node.lineno}: {ast.get_source_segment(text, node)}")
        elif isinstance(node, ast.Name) and node.id == "is_nlu_ensemble" and path != DETECTION:
            found.append(f"{node.lineno}: is_nlu_ensemble")
    return found


def test_no_module_outside_the_registry_switches_on_a_model_kind():
    bad = [f"{path.relative_to(REPO)}:{hit}" for package in PRODUCT for path in sorted((REPO / package).rglob("*.py"))
           if path != REGISTRY for hit in kind_switches(path)]
    assert not bad, "ask student.kinds (kind_of, KINDS, kind_for_head) instead:\n" + "\n".join(bad)


def test_the_check_finds_each_form_of_a_kind_switch(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "def f(kind, cfg, d):\n"
        "    if kind == 'onnx':\n"
        "        return 1\n"
        "    x = 'pytorch' if cfg.head != \"encoder\" else 'other'\n"
        "    if kind in ('seq2seq', 'encoder_nlu'):\n"
        "        return is_nlu_ensemble(d)\n"
        "    return kind == 'same' or stage.kind == 'cli'\n"
    )
    hits = kind_switches(module)
    assert sorted(int(h.split(":")[0]) for h in hits) == [2, 4, 5, 6], hits


def test_every_kind_is_named_by_its_key_and_the_heads_map_to_the_trainable_kinds():
    assert sorted(KINDS) == ["encoder_nlu", "nlu_ensemble", "onnx", "seq2seq"]
    assert all(name == kind.name for name, kind in KINDS.items())
    assert kind_for_head("seq2seq") is KINDS["seq2seq"] and kind_for_head("encoder") is KINDS["encoder_nlu"]
    assert [k.name for k in KINDS.values() if k.training is not None] == ["seq2seq", "encoder_nlu"]
    with pytest.raises(ValueError, match="'decoder' is not one of"):
        kind_for_head("decoder")
    # Only the export is served by onnxruntime and never traced again; only text-to-text scores text.
    assert [k.name for k in KINDS.values() if k.is_export] == ["onnx"]
    assert [k.name for k in KINDS.values() if k.backend == "onnxruntime"] == ["onnx"]
    assert [k.name for k in KINDS.values() if k.scores_text] == ["seq2seq"]


def test_kind_of_real_directories_of_every_kind(tiny_teacher_dir, tmp_path, tmp_path_factory, request):
    from student.kinds import build_ensemble, load_nlu_model
    from student.nlu import EncoderNLUModel, NLUEnsemble

    assert kind_of(tiny_teacher_dir) is KINDS["seq2seq"]
    assert KINDS["seq2seq"].size_bytes(tiny_teacher_dir) == (tiny_teacher_dir / "model.safetensors").stat().st_size

    member = build_nlu_dir(tmp_path / "nlu", tiny_teacher_dir)
    assert kind_of(member) is KINDS["encoder_nlu"]
    assert isinstance(load_nlu_model(member), EncoderNLUModel)
    ensemble = build_ensemble([member, build_nlu_dir(tmp_path / "nlu2", tiny_teacher_dir)], tmp_path / "ensemble")
    assert kind_of(ensemble) is KINDS["nlu_ensemble"]
    assert isinstance(KINDS["nlu_ensemble"].load(ensemble), NLUEnsemble)
    # An ensemble's weights are its members': twice a member's.
    assert KINDS["nlu_ensemble"].size_bytes(ensemble) == 2 * KINDS["encoder_nlu"].size_bytes(member)

    export = session_export(tmp_path_factory, request, "nlu-fp32")
    assert kind_of(export) is KINDS["onnx"]
    predictor = kind_of(export).predictor(export, PredictOptions(batch_size=4))
    assert predictor.batch_size == 4 and kind_of(export).served_as(predictor) == {"kind": "encoder_nlu",
                                                                                 "precision": "fp32"}
    assert KINDS["onnx"].size_bytes(export) == predictor.manifest["size_bytes"] > 0


def test_kind_of_refuses_a_directory_of_no_kind_with_the_loading_rule(tmp_path):
    with pytest.raises(ModelDirError, match="--model .*missing: no such directory"):
        kind_of(tmp_path / "missing", "--model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelDirError, match="not a model directory \\(no config.json\\)"):
        kind_of(tmp_path / "empty")
