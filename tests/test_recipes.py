"""Smoke run of recipes/finetune_long_context.py through `accelerate launch` with the CPU config.

The recipe trains the tiny random Llama (2 layers, hidden 64, 2 query heads / 1 key-value head of 32) on
packed passkey documents of 32-64 tokens with attn_implementation="flashattn_custom" (Triton interpreter),
LoRA and activation checkpointing. Run A trains 3 steps, checkpointing at steps 2 and 3; run B resumes
from A's step-2 checkpoint and must reproduce A's step-3 loss: model, optimizer, scheduler, RNG and data
position all came back. About 35 s on two idle cores (the Triton interpreter is most of it).
Needs accelerate and peft (the [train] extra): without them the test fails, it does not skip.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "finetune_long_context.py")
CPU_CONFIG = os.path.join(ROOT, "recipes", "accelerate", "cpu.yaml")
TINY = ["--model-preset", "tiny", "--num-attention-heads", "2", "--num-key-value-heads", "1", "--head-dim", "32",
        "--seq-len", "64", "--min-len", "32", "--batch-size", "2", "--warmup-steps", "1", "--lr", "3e-3",
        "--timing-warmup", "1", "--log-every", "1", "--eval-samples", "2", "--seed", "0"]


def launch(tmp_path, name, *args):
    out = tmp_path / name
    metrics = out / "metrics.json"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_CONFIG,
           "--num_cpu_threads_per_process", "1", RECIPE, *TINY, "--output-dir", str(out),
           "--metrics-out", str(metrics), *args]
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    print(proc.stdout[-3000:], proc.stderr[-3000:])
    assert proc.returncode == 0, f"the recipe failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{"recipe"')]
    assert len(lines) == 1, "expected one final JSON summary line on stdout"
    summary = json.loads(lines[0])
    assert json.loads(metrics.read_text())["final_step"] == summary["final_step"]
    return summary, json.loads(metrics.read_text())["log"], out


def test_finetune_smoke_checkpoint_and_resume(tmp_path):
    a, log_a, out_a = launch(tmp_path, "a", "--max-steps", "3", "--save-every", "2")
    assert a["attn_implementation"] == "flashattn_custom" and a["mode"] == "lora" and a["device"] == "cpu"
    assert [r["step"] for r in log_a] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and r["tokens"] > 0 for r in log_a), log_a
    assert 3 * 2 * 32 <= a["tokens_seen"] <= 3 * 2 * 64 and a["tokens_per_s"] > 0 and a["peak_memory_gib"] > 0
    assert 0.0 <= a["retrieval_exact_match"] <= 1.0 and a["eval_documents"] == 2
    for step in (2, 3):
        names = set(os.listdir(out_a / f"checkpoint-{step}"))
        assert {"model.safetensors", "optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl"} <= names, names

    b, log_b, out_b = launch(tmp_path, "b", "--max-steps", "3", "--resume-from", str(out_a / "checkpoint-2"))
    assert b["start_step"] == 2 and b["final_step"] == 3 and [r["step"] for r in log_b] == [3]
    assert b["resumed_from"] == str(out_a / "checkpoint-2")
    assert math.isfinite(log_b[0]["loss"])
    assert log_b[0]["tokens"] == log_a[2]["tokens"], "the resumed run did not continue with the same batch"
    assert log_b[0]["loss"] == pytest.approx(log_a[2]["loss"], rel=1e-5, abs=1e-6), (log_a, log_b)
    assert b["tokens_seen"] == a["tokens_seen"]
    assert (out_b / "checkpoint-3" / "custom_checkpoint_0.pkl").exists()
