"""The model kinds, one entry each: what every other module asks instead of switching on a kind.

| entry          | a directory with                          | home                                   |
|----------------|-------------------------------------------|----------------------------------------|
| `seq2seq`      | config.json (Hugging Face seq2seq)        | student/text_to_text.py, onnx_graphs   |
| `encoder_nlu`  | nlu_labels.json                           | student/nlu.py (EncoderNLUModel)       |
| `nlu_ensemble` | nlu_labels.json listing member folders    | student/nlu.py (NLUEnsemble)           |
| `onnx`         | manifest.json (`polyteacher export`)      | student/runtime.py (OnnxPredictor)     |

`kind_of(model_dir)` detects the entry from those marker files (core.modeldir.model_kind, the one
rule); `KINDS[name]` names it; `kind_for_head(head)` is the trainable entry of `finetune --head`.
Each entry holds its kind's functions: check, load, predictor, save, export (the tracing itself
lives in student/onnx_graphs.py), size in bytes and, for the trainable kinds, the pieces
student/finetune.py runs (`Training`). The ONNX runtime keeps its own per-kind table of graphs
(student.runtime.GRAPH_KINDS), because it must not import torch.

Importing this module stays cheap and torch-free: the PyTorch sides are imported when called.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.modeldir import ModelDirError, check_model_dir, is_nlu_ensemble, model_kind, weight_files
from student import text_to_text
from student.runtime import OnnxPredictor, read_manifest


@dataclass(frozen=True)
class PredictOptions:
    """How a predictor is built; each kind reads the options that apply to it."""

    device: str = "auto"
    """PyTorch kinds: auto, cpu or cuda."""
    dtype: str = "float32"
    """PyTorch text-to-text: the weights' dtype ("auto": bf16/fp16 on GPU)."""
    load: Any = None
    """PyTorch text-to-text: big-model placement (a core.bigmodel.ModelLoadConfig), None for one device."""
    num_threads: int = 1
    """ONNX: onnxruntime intra-op threads."""
    torch_threads: int | None = None
    """PyTorch kinds: torch.set_num_threads before loading (None: leave torch's setting)."""
    batch_size: int = 32
    """ONNX: utterances per graph call in predict_words."""
    max_new_tokens: int | None = None
    """Text-to-text: a fixed generation budget (None: the export's max_target_length, or for PyTorch
    `fixed_budget`, else each batch's longest well-formed target)."""
    fixed_budget: int | None = None
    """PyTorch text-to-text without max_new_tokens: generate at most this many tokens."""
    slot_labels: Sequence[str] = ()
    """PyTorch text-to-text: the slot labels whose token length bounds generation."""
    intents: Sequence[str] = ()
    """PyTorch text-to-text: the intents whose token length bounds generation."""
    max_new_tokens_margin: int = 4
    """PyTorch text-to-text: tokens added to the bound of a well-formed target."""


@dataclass(frozen=True)
class TracedExport:
    """What tracing a model directory wrote into an export directory, for its manifest."""

    graphs: dict[str, dict[str, Any]]
    parity: dict[str, float] | None
    manifest: dict[str, Any]
    """The kind's own manifest entries (model_config, special_ids, labels, max_target_length, ...)."""
    cfg: Any
    """The export config the manifest records (the NLU kind keeps its model's max input length)."""


@dataclass(frozen=True)
class Training:
    """What `finetune --head HEAD` runs for a trainable kind (cfg: a FinetuneConfig; data: a
    student.finetune.FinetuneData). Items are what the sampler indexes: (source, target) id pairs
    for text-to-text, the examples themselves for the encoder."""

    head: str
    """The `finetune --head` value."""
    output_suffix: str
    """The default output directory is "<init name>-<suffix>"."""
    build: Callable[[Any, Any, Any, Any], Any]
    """(seq2seq backbone, cfg, tokenizer, data) -> the model the engine trains."""
    encode: Callable[[Any, list[Any], Any], tuple[list[Any], dict[str, int]]]
    """(tokenizer, examples, cfg) -> (items, how many sources/targets were cut)."""
    length: Callable[[Any], int]
    """An item's length, for group_by_length."""
    collate: Callable[[list[Any], Any, Any, Any], dict[str, Any]]
    """(items, tokenizer, model, cfg) -> one micro-batch of tensors."""
    loss: Callable[[Any, dict[str, Any], Any, Any], tuple[Any, dict[str, Any]]]
    """(engine, batch on the device, cfg, frozen teacher or None) -> (loss, loss parts)."""
    evaluate: Callable[..., tuple[float, float, list[Any]]]
    """(engine, model, tokenizer, items, examples, cfg, device, synced, intents) -> (summed loss,
    its count, predictions) of one dev batch."""
    teacher_term: bool
    """Whether a frozen teacher of the same kind may add its term (finetune.teacher), and
    teacher-labelled target utterances with it."""


@dataclass(frozen=True)
class ModelKind:
    """One model kind and its functions."""

    name: str
    """Its key in KINDS."""
    recorded_as: str
    """What manifests and reports call it (core.modeldir.model_kind's name; an ensemble is "encoder_nlu")."""
    backend: str
    """"pytorch" or "onnxruntime": the libraries a process needs to serve it."""
    check: Callable[[Path, str], Any]
    """(directory, what the user called it) -> refuses a broken directory with a one-line error."""
    load: Callable[[Path], Any]
    """A directory -> its model (fp32, eval mode, on the CPU)."""
    predictor: Callable[[Path, PredictOptions], Any]
    """A directory -> an object with predict_words(list of word lists) -> NLUPredictions."""
    save: Callable[[Any, Path], Any] | None
    """(model, directory) -> writes what `load` reads; None for an export."""
    export: Callable[[Path, Path, Any], TracedExport] | None
    """(directory, empty export directory, ExportConfig) -> traces its ONNX graphs there; None for an
    export itself (which --int8 quantizes instead)."""
    size_bytes: Callable[[Path], int]
    """Bytes of the model's weights on disk."""
    scores_text: bool
    """A PyTorch text-to-text model: it scores and generates free text (fairness disparity)."""
    served_as: Callable[[Any], dict[str, str]]
    """A predictor of this kind -> {"kind": the kind its model was (an export: the one exported from),
    "precision": "fp32" or "int8"}, as latency reports record them."""
    training: Training | None = None
    """The fine-tuning pieces, for the kinds `finetune --head` trains."""

    @property
    def is_export(self) -> bool:
        """An ONNX export directory: served as it is, quantized by `export --int8`, never traced again."""
        return self.export is None


# ----------------------------------------------------------------------------- the kinds' functions


def _nlu(name: str) -> Callable[..., Any]:
    """student.nlu's `name`, imported when called (student.nlu imports torch)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        from student import nlu

        return getattr(nlu, name)(*args, **kwargs)

    call.__name__ = name
    return call


def _load_seq2seq(model_dir: Path) -> Any:
    from student.onnx_graphs import load_seq2seq

    return load_seq2seq(model_dir)


def _load_encoder_nlu(model_dir: Path) -> Any:
    from student.nlu import EncoderNLUModel

    return EncoderNLUModel.from_pretrained(model_dir)


def _load_nlu_ensemble(model_dir: Path) -> Any:
    from student.nlu import NLUEnsemble

    return NLUEnsemble.from_pretrained(model_dir)


def _save_pretrained(model: Any, out: Path) -> Any:
    return model.save_pretrained(out)


def _set_torch_threads(options: PredictOptions) -> None:
    if options.torch_threads is not None:
        import torch

        torch.set_num_threads(options.torch_threads)


def _text_to_text_predictor(model_dir: Path, options: PredictOptions) -> Any:
    _set_torch_threads(options)
    return text_to_text.Seq2SeqPredictor(
        model_dir, device=options.device, dtype=options.dtype, slot_labels=options.slot_labels,
        intents=options.intents, max_new_tokens_margin=options.max_new_tokens_margin,
        max_new_tokens=options.max_new_tokens or options.fixed_budget, load=options.load)


def _nlu_predictor(load: Callable[[Path], Any]) -> Callable[[Path, PredictOptions], Any]:
    def predictor(model_dir: Path, options: PredictOptions) -> Any:
        _set_torch_threads(options)
        model = load(model_dir)
        return model.to(text_to_text.torch_device(options.device)).eval()

    return predictor


def _onnx_predictor(model_dir: Path, options: PredictOptions) -> OnnxPredictor:
    return OnnxPredictor(model_dir, num_threads=options.num_threads, batch_size=options.batch_size,
                         max_new_tokens=options.max_new_tokens)


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in weight_files(model_dir))


def _trace_seq2seq(model_dir: Path, out: Path, cfg: Any) -> TracedExport:
    from student.onnx_graphs import (
        _model_config_summary,
        _seq2seq_special_ids,
        check_seq2seq_parity,
        export_seq2seq_graphs,
        load_seq2seq,
    )

    model = load_seq2seq(model_dir)
    graphs = export_seq2seq_graphs(model, out, cfg)
    parity = check_seq2seq_parity(model, out, cfg) if cfg.check_parity else None
    config = _model_config_summary(model.config)
    return TracedExport(graphs, parity, {"model_config": config, "special_ids": _seq2seq_special_ids(model),
                                         "max_target_length": cfg.max_target_length,
                                         "num_decoder_layers": config["num_decoder_layers"]}, cfg)


def _trace_nlu(load: Callable[[Path], Any]) -> Callable[[Path, Path, Any], TracedExport]:
    def trace(model_dir: Path, out: Path, cfg: Any) -> TracedExport:
        from student.onnx_graphs import (
            _model_config_summary,
            _nlu_special_ids,
            check_nlu_parity,
            export_nlu_graph,
        )

        model = load(model_dir).float().eval()
        labels = model.labels
        graphs = export_nlu_graph(model, out, cfg)
        parity = check_nlu_parity(model, out, cfg) if cfg.check_parity else None
        # The NLU model was trained with its own maximum input length; keep it.
        cfg = dataclasses.replace(cfg, max_source_length=labels.max_length)
        return TracedExport(graphs, parity, {
            "model_config": _model_config_summary(model.config),
            "special_ids": _nlu_special_ids(model.config),
            "labels": {"intents": labels.intents, "slot_labels": labels.slot_labels},
        }, cfg)

    return trace


def _build_text_to_text(backbone: Any, cfg: Any, tokenizer: Any, data: Any) -> Any:
    return text_to_text.prepare_text_to_text(backbone, cfg, tokenizer, [*data.intents, *data.slot_labels])


# ----------------------------------------------------------------------------- the registry


TEXT_TO_TEXT = Training(
    head="seq2seq", output_suffix="ft", build=_build_text_to_text, encode=text_to_text.encode_seq2seq,
    length=text_to_text.pair_length, collate=text_to_text.collate_pairs, loss=text_to_text.text_to_text_loss,
    evaluate=text_to_text.evaluate_pairs, teacher_term=False,
)
ENCODER_NLU = Training(
    head="encoder", output_suffix="nlu", build=_nlu("attach_nlu_heads"), encode=_nlu("examples_as_items"),
    length=_nlu("example_length"), collate=_nlu("collate_examples"), loss=_nlu("encoder_nlu_loss"),
    evaluate=_nlu("evaluate_examples"), teacher_term=True,
)


def _pytorch_fp32(name: str) -> Callable[[Any], dict[str, str]]:
    return lambda predictor: {"kind": name, "precision": "fp32"}


def _export_facts(predictor: OnnxPredictor) -> dict[str, str]:
    return {"kind": predictor.manifest["kind"], "precision": predictor.manifest["precision"]}


KINDS: dict[str, ModelKind] = {kind.name: kind for kind in (
    ModelKind("seq2seq", "seq2seq", "pytorch", check=check_model_dir, load=_load_seq2seq,
              predictor=_text_to_text_predictor, save=_save_pretrained, export=_trace_seq2seq,
              size_bytes=_weights_bytes, scores_text=True, served_as=_pytorch_fp32("seq2seq"), training=TEXT_TO_TEXT),
    ModelKind("encoder_nlu", "encoder_nlu", "pytorch", check=check_model_dir, load=_load_encoder_nlu,
              predictor=_nlu_predictor(_load_encoder_nlu), save=_save_pretrained,
              export=_trace_nlu(_load_encoder_nlu), size_bytes=_weights_bytes, scores_text=False,
              served_as=_pytorch_fp32("encoder_nlu"), training=ENCODER_NLU),
    ModelKind("nlu_ensemble", "encoder_nlu", "pytorch", check=check_model_dir, load=_load_nlu_ensemble,
              predictor=_nlu_predictor(_load_nlu_ensemble), save=_save_pretrained,
              export=_trace_nlu(_load_nlu_ensemble), size_bytes=_weights_bytes, scores_text=False,
              served_as=_pytorch_fp32("encoder_nlu")),
    ModelKind("onnx", "onnx", "onnxruntime", check=lambda path, what: read_manifest(path), load=OnnxPredictor,
              predictor=_onnx_predictor, save=None, export=None,
              size_bytes=lambda path: int(read_manifest(path)["size_bytes"]), scores_text=False,
              served_as=_export_facts),
)}
"""Every model kind by name."""


def kind_of(model_dir: str | os.PathLike, what: str = "model directory") -> ModelKind:
    """The kind of a model directory, from its marker files; a directory of no kind is refused with
    check_model_dir's one-line ModelDirError (no such directory, no config.json), naming it `what`."""
    name = model_kind(model_dir)
    if name is None:
        check_model_dir(model_dir, what)
        raise ModelDirError(f"{what} {model_dir}: not a model directory")  # check_model_dir refused it first
    if name == "encoder_nlu" and is_nlu_ensemble(model_dir):
        return KINDS["nlu_ensemble"]
    return KINDS[name]


def kind_for_head(head: str) -> ModelKind:
    """The trainable kind of `finetune --head HEAD` (student.config.FinetuneConfig.head)."""
    for kind in KINDS.values():
        if kind.training is not None and kind.training.head == head:
            return kind
    heads = [k.training.head for k in KINDS.values() if k.training is not None]
    raise ValueError(f"finetune.head: {head!r} is not one of {heads}")


def load_nlu_model(model_dir: str | os.PathLike) -> Any:
    """An encoder NLU directory: a single model, or an ensemble when nlu_labels.json lists members.
    Any other directory is refused by the single model's loader (no nlu_labels.json)."""
    return KINDS["nlu_ensemble" if is_nlu_ensemble(model_dir) else "encoder_nlu"].load(Path(model_dir))


def build_ensemble(member_dirs: list[str | os.PathLike], out: str | os.PathLike) -> Path:
    """Combine trained NLU model directories into one ensemble directory `out` (members copied in)."""
    from student.nlu import NLUEnsemble, NLULabels

    if len(member_dirs) < 2:
        raise ValueError(f"an NLU ensemble needs at least 2 member directories, got {len(member_dirs)}")
    members = []
    for d in member_dirs:
        if is_nlu_ensemble(d):
            raise ValueError(f"{d}: is itself an ensemble; list its members instead")
        members.append(load_nlu_model(d))
    first = members[0]
    labels = NLULabels(intents=first.labels.intents, slot_labels=first.labels.slot_labels,
                       max_length=first.labels.max_length, source_model=first.labels.source_model,
                       extra={"members_from": [str(d) for d in member_dirs]})
    return KINDS["nlu_ensemble"].save(NLUEnsemble(members, labels, first.tokenizer), Path(out))
