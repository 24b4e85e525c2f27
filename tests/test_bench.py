"""bench.py end to end on the tiny model, on CPU: each command runs this repo's script and the other frameworks, and
prints one table whose rows have positive numbers; a framework that is not installed (TRL, in CI) is a row that says so."""
import importlib.util
import os

import pytest

import bench

SMALL = ["--shape", "tiny-qwen2.5-vl", "--steps", "3", "--warmup", "1"]
HAS_TRL = importlib.util.find_spec("trl") is not None


def tables(capsys, argv, work):
    """Run `bench.py argv` -> {workload: {framework: {column: cell}}} of its markdown table."""
    bench.main(argv + ["--work", str(work), "--flags", "--num_workers", "0"])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    out = {}
    for line in lines[2:]:
        row = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        out.setdefault(row["workload"], {})[row["framework"]] = row
    return out


def table(capsys, argv, work):
    """Run `bench.py argv` -> {framework: {column: cell}} of its one workload."""
    (rows,) = tables(capsys, argv, work).values()
    return rows


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
    rows = table(capsys, ["sft"] + SMALL + ["--seq_len", "64", "--fast=--master_dtype bfloat16",
                                 "--fast=--master_dtype bfloat16 --fp8 true", "--against", "hf", "trl"], tmp_path)
    check(rows, ["tokens/s per GPU"], "this repo (train_sft.py)",
          ["this repo, --master_dtype bfloat16", "this repo, --master_dtype bfloat16 --fp8 true", "plain transformers loop",
           "TRL SFTTrainer"])


def test_sft_image_rows(capsys, tmp_path):
    """--images: a workload of its own, packed rows of image examples of one length (the chat template, 16 + 20
    words, 4 image tokens: 76) for ours, batches of as many examples as one of our rows holds (3 in 256) for TRL;
    --text false leaves the text rows out."""
    out = tables(capsys, ["sft"] + SMALL + ["--seq_len", "256", "--images", "8", "--image_size", "56", "--reply_tokens", "20",
                                            "--against", "trl"], tmp_path)
    text, images = out
    assert text == "SFT full, tiny-qwen2.5-vl, 1 x 256 text tokens"
    assert images == "SFT full, tiny-qwen2.5-vl, packed 256-token rows of 76-token image examples"
    check(out[images], ["tokens/s per GPU"], "this repo (train_sft.py)",
          ["TRL SFTTrainer (batches of 3 examples: it packs no images)"])
    assert list(tables(capsys, ["sft"] + SMALL + ["--seq_len", "256", "--images", "8", "--image_size", "56", "--reply_tokens",
                                                  "20", "--against", "--text", "false"], tmp_path)) == [images]


def test_flops_count_vision_patches_and_labelled_tokens_of_the_head():
    """flops_per_token against its written formula on the tiny model's own parameter counts."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    model_dir = bench.data.resolve_model("tiny-qwen2.5-vl")
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_config(config)
    head = model.model.language_model.embed_tokens.weight.numel()
    body = sum(p.numel() for p in model.model.language_model.parameters()) - head
    vision = sum(p.numel() for p in model.model.visual.parameters())
    text = config.text_config
    lengths, patches, labelled = [100, 50], 64, 30
    expected = (6 * body * 150 + 6 * head * labelled + 6 * text.num_hidden_layers * text.hidden_size * (100**2 + 50**2)
                + 6 * vision * patches) / 150
    assert bench.flops_per_token(model_dir, lengths, patches, labelled) == pytest.approx(expected)
    assert bench.flops_per_token(model_dir, lengths, 0) == pytest.approx(expected + (6 * head * 120 - 6 * vision * patches) / 150)


def test_dpo(capsys, tmp_path):
    prompt_tokens, reply_tokens = 48, 16
    rows = table(capsys, ["dpo"] + SMALL + ["--prompt_tokens", str(prompt_tokens), "--reply_tokens", str(reply_tokens),
                                            "--pairs_per_step", "2", "--fast=--fp8 true"], tmp_path)
    check(rows, ["pairs/s per GPU", "tokens/s per GPU"], "this repo (train_dpo.py)", ["this repo, --fp8 true", "TRL DPOTrainer"])
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
