from __future__ import annotations

import json

import pytest

from core.models import build_model, count_parameters, model_flops_per_example
from launch.cli import main
from teacher.plan import GIB, flops_per_text_token, make_plan


@pytest.fixture(scope="module")
def alexatm_plan():
    return make_plan("alexatm-20b", nodes=16, gpus_per_node=8, days=30)


def _row(plan, stage, offload):
    (row,) = [r for r in plan["memory"] if r["zero_stage"] == stage and r["offload"] == offload]
    return row


def test_alexatm_parameter_count(alexatm_plan):
    p = alexatm_plan["parameters"]
    assert alexatm_plan["model"]["vocab_size"] == 150016  # 150k padded to a multiple of 128
    assert p["total"] == count_parameters("alexatm-20b").total == 19_080_669_184
    assert p["total"] == p["embeddings"] + p["encoder"] + p["decoder"]
    assert p["embeddings"] == 2 * 150016 * 4096  # untied input embedding and output layer


def test_memory_uses_deepspeed_estimators(alexatm_plan):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    total, largest = alexatm_plan["parameters"]["total"], alexatm_plan["parameters"]["largest_layer"]
    cpu, gpu = estimate_zero2_model_states_mem_needs(total, 8, 16, cpu_offload=False)
    assert _row(alexatm_plan, 2, "none")["gpu_bytes"] == gpu
    cpu, gpu = estimate_zero2_model_states_mem_needs(total, 8, 16, cpu_offload=True)
    assert (_row(alexatm_plan, 2, "optimizer->cpu")["gpu_bytes"], _row(alexatm_plan, 2, "optimizer->cpu")["cpu_bytes_per_node"]) == (gpu, cpu)
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, 8, 16, cpu_offload=True, cpu_offload_params=True)
    assert _row(alexatm_plan, 3, "optimizer+params->cpu")["gpu_bytes"] == gpu == 4 * largest
    # ZeRO-1 as documented by DeepSpeed: 2P + 2P + 12P/N.
    assert _row(alexatm_plan, 1, "none")["gpu_bytes"] == int(4 * total + 12 * total / 128)
    assert _row(alexatm_plan, 3, "optimizer+params->nvme")["nvme_bytes_per_node"] == int(18 * total / 16)


def test_memory_ordering_and_fit(alexatm_plan):
    per_gpu = {(r["zero_stage"], r["offload"]): r["gpu_bytes"] for r in alexatm_plan["memory"]}
    assert per_gpu[(1, "none")] > per_gpu[(2, "none")] > per_gpu[(3, "none")] > per_gpu[(3, "optimizer->cpu")]
    assert per_gpu[(2, "none")] > per_gpu[(2, "optimizer->cpu")]
    # 19 B parameters: ZeRO-3 on 128 GPUs needs a few GiB of model states per GPU; one GPU could not
    # hold even the 16-bit weights (38 GiB) plus their gradients and Adam states.
    assert 3 * GIB < per_gpu[(3, "none")] < 6 * GIB
    single = make_plan("alexatm-20b", nodes=1, gpus_per_node=1)
    assert not _row(single, 1, "none")["fits_gpu"] and not _row(single, 3, "none")["fits_gpu"]
    assert _row(single, 3, "optimizer+params->cpu")["fits_gpu"]


def test_throughput_is_consistent(alexatm_plan):
    t = alexatm_plan["throughput"]
    gpu_flops = 989e12 * 0.4
    assert t["total_train_flops"] == pytest.approx(t["train_flops_per_token"] * 300e9)
    assert t["cluster_days_for_budget"] == pytest.approx(t["total_train_flops"] / (128 * gpu_flops) / 86400)
    assert t["needed_tokens_per_s"] == pytest.approx(300e9 / (30 * 86400))
    assert t["needed_gpus"] == pytest.approx(t["total_train_flops"] / (30 * 86400) / gpu_flops)
    # Per text token the mixture costs between a CLM example (each token through one stack) and
    # a denoising one (~0.85 of the tokens through the encoder, all through the decoder).
    clm = model_flops_per_example("alexatm-20b", None, 512, 512) / 1024
    denoise = model_flops_per_example("alexatm-20b", None, 871, 1025) / 1024
    assert clm < t["train_flops_per_token"] < denoise


def test_tiny_plan_matches_built_model():
    plan = make_plan("tiny", nodes=1, gpus_per_node=2, vocab_size=2000, seq_len=64)
    model = build_model("tiny", 2000)
    assert plan["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert plan["model"]["vocab_size"] == 2048
    assert flops_per_text_token("tiny", 2000, 64) == plan["throughput"]["train_flops_per_token"]
    assert all(r["fits_gpu"] for r in plan["memory"])


def test_cli_table_and_json(capsys):
    assert main(["plan", "--preset", "alexatm-20b", "--nodes", "16", "--gpus-per-node", "8"]) == 0
    text = capsys.readouterr().out
    assert "19,080,669,184" in text and "16 node(s) x 8 GPUs = 128 GPUs" in text
    assert text.count("deepspeed estimator") == 5 and "GPUs needed" not in text
    assert main(["plan", "--preset", "tiny", "--gpus-per-node", "2", "--vocab-size", "2000", "--days", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)  # stdout holds only the JSON
    assert plan["parameters"]["total"] == count_parameters("tiny", 2000).total
    assert plan["throughput"]["needed_gpus"] > 0 and len(plan["memory"]) == 8


def test_cli_errors_and_help(capsys):
    assert main(["plan", "--preset", "tiny", "--mfu", "0"]) == 2
    assert "--mfu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--preset", "huge"])
    assert "alexatm-20b" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    help_text = capsys.readouterr().out
    for option in ("--nodes", "--gpus-per-node", "--vocab-size", "--seq-len", "--token-budget", "--days",
                   "--peak-tflops", "--mfu", "--json"):
        assert option in help_text


def test_teacher_inference_memory_for_distillation(alexatm_plan, capsys):
    rows = {r["placement"]: r for r in alexatm_plan["teacher_inference"]}
    total, largest = alexatm_plan["parameters"]["total"], alexatm_plan["parameters"]["largest_layer"]
    assert rows["replica per rank"]["gpu_bytes"] == 2 * total  # bf16 weights, no grads or optimizer states
    assert rows["ZeRO-3 over 128 GPUs"]["gpu_bytes"] == 2 * total // 128 + 2 * 2 * largest
    assert rows["device_map=auto over 8 GPUs"]["gpu_bytes"] == -(-2 * total // 8) + 2 * largest
    assert rows["device_map=auto, CPU offload"]["cpu_bytes_per_node"] == 2 * total
    assert all(r["fits_gpu"] == (r["gpu_bytes"] <= 80 * 1024**3) for r in rows.values())
    assert main(["plan", "--preset", "alexatm-20b", "--nodes", "16", "--gpus-per-node", "8"]) == 0
    text = capsys.readouterr().out
    assert "teacher inference memory per GPU for distillation" in text and "teacher_shard=zero3" in text
