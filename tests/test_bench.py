"""bench.py end to end on the tiny model, on CPU: each command runs this repo's script and the other frameworks, and
prints one table whose rows have positive numbers; a framework that is not installed (TRL, in CI) is a row that says so."""
import importlib.util
import os

import pytest

import bench

SMALL = ["--shape", "tiny-qwen2.5-vl", "--steps", "3", "--warmup", "1"]
HAS_TRL = importlib.util.find_spec("trl") is not None


def table(capsys, argv, work):
    """Run `bench.py argv` -> {framework: {column: cell}} of its markdown table (one workload)."""
    bench.main(argv + ["--work", str(work), "--flags", "--num_workers", "0"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))) for line in lines[2:]]
    assert len({row["workload"] for row in rows}) == 1
    return {row["framework"]: row for row in rows}


def number(cell):
    return float(cell.replace(",", "").rstrip("x%"))


def check(rows, measured, ours, others):
    """This repo's row first at 1.00x, then one row per other framework: positive numbers in the measured columns,
    or (TRL not installed) a row saying the import failed."""
    assert list(rows) == [ours] + others
    assert rows[ours]["vs this repo"] == "1.00x"
    for framework, row in rows.items():
        if framework.startswith("TRL") and not HAS_TRL:
            assert row[measured[0]].startswith("failed: ModuleNotFoundError"), row
            continue
        assert all(number(row[column]) > 0 for column in measured + ["vs this repo"]), row


def test_sft(capsys, tmp_path):
    rows = table(capsys, ["sft"] + SMALL + ["--seq_len", "64", "--fast=--master_dtype bfloat16", "--against", "hf", "trl"],
                 tmp_path)
    check(rows, ["tokens/s per GPU"], "this repo (train_sft.py)",
          ["this repo, --master_dtype bfloat16", "plain transformers loop", "TRL SFTTrainer"])


def test_dpo(capsys, tmp_path):
    prompt_tokens, reply_tokens = 48, 16
    rows = table(capsys, ["dpo"] + SMALL + ["--prompt_tokens", str(prompt_tokens), "--reply_tokens", str(reply_tokens),
                                            "--pairs_per_step", "2"], tmp_path)
    check(rows, ["pairs/s per GPU", "tokens/s per GPU"], "this repo (train_dpo.py)", ["TRL DPOTrainer"])
    # train_dpo.py counts the tokens it trained on: the planned 2 x (prompt + reply) per pair
    ours = rows["this repo (train_dpo.py)"]
    assert number(ours["tokens/s per GPU"]) / number(ours["pairs/s per GPU"]) == pytest.approx(
        2 * (prompt_tokens + reply_tokens), rel=0.01)


def test_grpo(capsys, tmp_path):
    rows = table(capsys, ["grpo"] + SMALL + ["--prompt_tokens", "48", "--prompts_per_step", "2", "--num_generations", "4",
                                             "--max_completion_length", "16", "--per_device_train_batch_size", "4"], tmp_path)
    phases = ["rollout s", "log-prob s", "update s"]
    check(rows, ["step s"] + phases + ["mean completion tokens"], "this repo (train_grpo.py)", ["TRL GRPOTrainer (no vLLM)"])
    ours = rows["this repo (train_grpo.py)"]
    assert sum(number(ours[p]) for p in phases) == pytest.approx(number(ours["step s"]), abs=0.02)  # the split is the step
    assert number(ours["mean completion tokens"]) <= 16
