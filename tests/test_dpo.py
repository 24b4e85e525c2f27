"""train_dpo.py: the loss against its written formulas, the reference, packed pair log-probabilities, a run end to end."""
import json
import copy
import math
import os

import pytest
import torch

import data
import lora
import train_dpo
from conftest import run_torchrun


def test_dpo_loss_matches_the_written_formulas():
    # pair 1: chosen log-ratio +1, rejected -1 -> h = 2; pair 2: chosen 0, rejected +1 -> h = -1; beta = 0.5
    chosen, rejected = torch.tensor([-1.0, -2.0], dtype=torch.float64), torch.tensor([-3.0, -1.0], dtype=torch.float64)
    ref_chosen, ref_rejected = torch.tensor([-2.0, -2.0], dtype=torch.float64), torch.tensor([-2.0, -2.0], dtype=torch.float64)
    expected = {
        # -log sigmoid(beta h) = log(1 + exp(-beta h)): log(1 + e^-1), log(1 + e^0.5)
        ("sigmoid", 0.0): [0.31326168751822286, 0.9740769841801067],
        # 0.9 * log(1 + e^-1) + 0.1 * log(1 + e^1);  0.9 * log(1 + e^0.5) + 0.1 * log(1 + e^-0.5)
        ("sigmoid", 0.1): [0.9 * 0.31326168751822286 + 0.1 * 1.3132616875182228, 0.9 * 0.9740769841801067 + 0.1 * 0.47407698418010663],
        ("ipo", 0.0): [(2 - 1) ** 2, (-1 - 1) ** 2],  # (h - 1/(2 beta))^2
        ("hinge", 0.0): [0.0, 1.5],  # max(0, 1 - beta h)
    }
    for (loss_type, smoothing), values in expected.items():
        losses, chosen_rewards, rejected_rewards = train_dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, 0.5,
                                                                      loss_type, smoothing)
        torch.testing.assert_close(losses, torch.tensor(values, dtype=torch.float64), rtol=0, atol=1e-12)
        torch.testing.assert_close(chosen_rewards, torch.tensor([0.5, 0.0], dtype=torch.float64))  # beta * log-ratio
        torch.testing.assert_close(rejected_rewards, torch.tensor([-0.5, 0.5], dtype=torch.float64))


def test_rewards_are_detached_and_the_loss_has_a_gradient():
    chosen = torch.tensor([-1.0, -2.0], requires_grad=True)
    losses, chosen_rewards, _ = train_dpo.dpo_loss(chosen, torch.tensor([-3.0, -1.0]), torch.zeros(2), torch.zeros(2), 0.1)
    assert not chosen_rewards.requires_grad
    losses.sum().backward()
    assert (chosen.grad < 0).all()  # raising the chosen reply's log-probability lowers the loss


def test_sigmoid_loss_is_ln2_when_policy_equals_reference():
    logps = torch.randn(2, 7) * 30
    for dtype in (torch.float32, torch.float64):
        chosen, rejected = logps.to(dtype)
        losses, chosen_rewards, rejected_rewards = train_dpo.dpo_loss(chosen, rejected, chosen.clone(), rejected.clone(), 0.1)
        assert torch.equal(losses, torch.full_like(losses, math.log(2)))
        assert not chosen_rewards.any() and not rejected_rewards.any()


# ----------------------------------------------------------------------------------------------------------------
# On the tiny model

@pytest.fixture(scope="module")
def tiny(tiny_model_path):
    """Each tiny model (Qwen2.5-VL, Qwen3-VL), its encoder and three demo pairs."""
    from transformers import AutoModelForImageTextToText

    path = tiny_model_path
    encoder = data.Encoder(path)
    pairs = data.load_dataset([data.demo_path("dpo", "val") + "#3"], "dpo", seed=0)
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    return path, encoder, pairs, model


def packed_pairs(encoder, pairs, share_prompts=False):
    return train_dpo.PairDataset(pairs, encoder, [list(range(len(pairs)))], share_prompts)[0]


@pytest.mark.parametrize("share_prompts", [False, True], ids=["prompt-twice", "prompt-once"])
def test_packed_pair_logps_equal_unpacked(tiny, share_prompts):
    """A micro-batch of pairs packed into one row gives each reply the log-probability it has alone; with varlen
    attention each prompt and its image are in the row once (the rejected reply attends to the chosen example's
    prompt), fewer tokens for the same numbers."""
    _, encoder, pairs, model = tiny
    if share_prompts:
        model = copy.deepcopy(model)
        data.use_varlen_attention(model)
    batch = packed_pairs(encoder, pairs, share_prompts)
    assert batch["input_ids"].shape[0] == 1 and len(batch["cu_seqlens"]) == 2 * len(pairs) + 1
    twice = packed_pairs(encoder, pairs)
    if share_prompts:  # a prompt's image tokens and text once, and its last token again before the rejected reply
        sequences = twice["labels"][0].split(twice["cu_seqlens"].diff().tolist())[: len(pairs)]
        prompts = [int((labels != data.IGNORE).nonzero()[0]) for labels in sequences]
        assert batch["input_ids"].shape[1] == twice["input_ids"].shape[1] - sum(prompts)
        assert len(batch["pixel_values"]) == len(twice["pixel_values"]) // 2
    with torch.no_grad():
        packed, counts = train_dpo.sequence_logps(model, batch, torch.device("cpu"))
        alone = []
        for sample, reply in [(s, None) for s in pairs] + [(s, s.rejected) for s in pairs]:
            one = data.collate([train_dpo.encode_reply(encoder, sample, reply)], packing=True)
            alone.append(train_dpo.sequence_logps(model, one, torch.device("cpu"))[0])
    assert (packed - torch.cat(alone)).abs().max() < 1e-4
    # each sequence's labels are its reply's tokens and <|im_end|>
    replies = [s.messages[-1]["content"] for s in pairs] + [s.rejected for s in pairs]
    assert counts.tolist() == [len(encoder.tokenizer.encode(r)) + 1 for r in replies]


def test_final_reply_only_is_labelled():
    encoder = data.Encoder(data.resolve_model("tiny-qwen2.5-vl"))
    record = {"query": "how many", "response": "3", "rejected_response": "2", "history": [["hi", "hello there"]]}
    sample = data.record_to_sample(record, "dpo")
    for reply, text in ((None, "3<|im_end|>"), ("2", "2<|im_end|>")):
        example = train_dpo.encode_reply(encoder, sample, reply)
        labelled = example["labels"][example["labels"] != data.IGNORE]
        assert encoder.tokenizer.decode(labelled) == text


def test_lora_reference_is_the_base_model(tiny):
    from transformers import AutoModelForImageTextToText

    path, encoder, pairs, base = tiny
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    lora.add_lora(model, rank=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)
    for _, layer in lora.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.1)  # a trained adapter: the policy differs from the base
    batch = packed_pairs(encoder, pairs)
    cpu = torch.device("cpu")
    with torch.no_grad():
        expected, _ = train_dpo.sequence_logps(base, batch, cpu)
        policy, _ = train_dpo.sequence_logps(model, batch, cpu)
    ref_chosen, ref_rejected = train_dpo.reference_logps(model, None, None, batch, cpu)
    assert torch.equal(torch.cat([ref_chosen, ref_rejected]), expected)
    assert (policy - expected).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------------------------
# main() end to end

def run_args(out, *extra):
    return ["--model", "tiny-qwen2.5-vl", "--dataset", data.demo_path("dpo", "train") + "#16",
            "--val_dataset", data.demo_path("dpo", "val") + "#4", "--per_device_train_batch_size", "2",
            "--num_workers", "0", "--logging_steps", "1", "--eval_steps", "100", "--eval_generate", "2",
            "--output_dir", str(out), *extra]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_lora_run_writes_adapter_and_metrics(tmp_path):
    train_dpo.main(run_args(tmp_path, "--max_steps", "2", "--train_type", "lora", "--learning_rate", "1e-2", "--rpo_alpha", "0"))
    metrics = read_metrics(tmp_path)
    train = [m for m in metrics if "loss" in m]
    evals = [m for m in metrics if "eval_loss" in m]
    assert [m["step"] for m in train] == [1, 2] and [m["step"] for m in evals] == [0, 2]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "tokens_per_s", "pairs_per_s", "grad_norm", "lr"):
        assert key in train[0], key
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "eval_accuracy"):
        assert key in evals[0], key
    # before any update the policy is the reference (LoRA B starts at zero): the sigmoid loss is ln 2
    assert abs(train[0]["loss"] - math.log(2)) < 1e-6 and abs(evals[0]["eval_loss"] - math.log(2)) < 1e-6
    assert train[1]["loss"] != train[0]["loss"]
    checkpoint = tmp_path / "checkpoint-2"
    for name in ("adapter_model.safetensors", "adapter_config.json", "training_state.pt", "trainer_state.json"):
        assert (checkpoint / name).exists(), name
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def test_full_run_with_precomputed_reference(tmp_path):
    train_dpo.main(run_args(tmp_path, "--max_steps", "2", "--train_type", "full", "--precompute_ref_logps", "true",
                            "--learning_rate", "1e-3", "--rpo_alpha", "1.0", "--eval_generate", "0"))
    tables = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("ref_logps-"))
    assert len(tables) == 2  # train and val
    train = [m for m in read_metrics(tmp_path) if "loss" in m]
    # step 1: policy = reference, so the DPO part is ln 2 and the loss adds alpha x the chosen replies' NLL
    assert abs(train[0]["loss"] - (math.log(2) + train[0]["nll_loss"])) < 1e-6
    assert (tmp_path / "checkpoint-2" / "model.safetensors").exists()


def test_full_run_with_frozen_copy_matches_precomputed(tmp_path):
    common = ("--max_steps", "2", "--train_type", "full", "--learning_rate", "1e-3", "--eval_generate", "0")
    train_dpo.main(run_args(tmp_path / "copy", *common))
    train_dpo.main(run_args(tmp_path / "table", *common, "--precompute_ref_logps", "true"))
    copy, table = read_metrics(tmp_path / "copy"), read_metrics(tmp_path / "table")
    for a, b in zip(copy, table):
        for key in ("loss", "eval_loss", "rewards/margins", "eval_rewards/margins"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-4, (key, a[key], b[key])


def test_partial_checkpointing_and_compile_change_speed_not_results(tmp_path):
    """--gradient_checkpointing_layers N recomputes exactly the first N decoder layers; with --compile as well, the
    losses, and the evaluations before and after (pairs and greedy replies), are those of a plain run. Generation
    compiles nothing (generate keeps the layers eager)."""
    from torch._dynamo.utils import counters

    cfg = train_dpo.parse_config(run_args(tmp_path, "--gradient_checkpointing", "true", "--gradient_checkpointing_layers", "1"))
    model, _, _ = train_dpo.load_model(cfg, torch.device("cpu"))
    assert [layer.gradient_checkpointing for layer in model.model.language_model.layers] == [True, False]
    for layer in [*model.model.language_model.layers, *model.model.visual.blocks]:  # as main() does
        layer.compile(dynamic=True)
    graphs = counters["stats"]["unique_graphs"]
    pair = data.load_dataset([data.demo_path("dpo", "val") + "#1"], "dpo", seed=0)[0]
    prompt = data.Sample(pair.messages[:-1], pair.images, pair.videos)
    train_dpo.generate(model, data.Encoder(data.resolve_model(cfg.model)), [prompt], torch.device("cpu"), 4, False)
    assert counters["stats"]["unique_graphs"] == graphs

    common = ("--max_steps", "2", "--train_type", "full", "--learning_rate", "1e-3", "--save_steps", "0")
    train_dpo.main(run_args(tmp_path / "plain", *common))
    train_dpo.main(run_args(tmp_path / "fast", *common, "--gradient_checkpointing", "true",
                            "--gradient_checkpointing_layers", "1", "--compile", "true"))
    plain, fast = read_metrics(tmp_path / "plain"), read_metrics(tmp_path / "fast")
    assert [m["step"] for m in plain] == [m["step"] for m in fast] == [0, 1, 2, 2]  # eval, steps, eval
    for a, b in zip(plain, fast):
        for key in ("loss", "rewards/margins", "grad_norm", "eval_loss", "eval_rewards/margins", "eval_accuracy"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
        assert "loss" not in a or 0 < a["pairs_per_s"] < a["tokens_per_s"]


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_resume_continues_exactly(tmp_path, train_type):
    # LoRA with dropout: the resumed RNG matters; full: the weights come from the checkpoint, the reference from --model
    common = ("--max_steps", "4", "--save_steps", "2", "--save_total_limit", "0", "--eval_generate", "0",
              "--train_type", train_type, "--learning_rate", "1e-2" if train_type == "lora" else "1e-3", "--lora_dropout", "0.1")
    train_dpo.main(run_args(tmp_path / "straight", *common))
    train_dpo.main(run_args(tmp_path / "resumed", *common, "--resume_from_checkpoint",
                            str(tmp_path / "straight" / "checkpoint-2")))
    straight = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "straight") if "loss" in m}
    resumed = {m["step"]: m["loss"] for m in read_metrics(tmp_path / "resumed") if "loss" in m}
    assert sorted(resumed) == [3, 4]
    for step in (3, 4):
        assert abs(straight[step] - resumed[step]) < 1e-6, (step, straight[step], resumed[step])


@pytest.mark.parametrize("train_type", ["lora", "full"])
def test_two_processes_match_one(tmp_path, train_type):
    """FSDP2 over 2 processes (gloo, CPU), the reference sharded too (full) or adapters off (LoRA): the same losses and
    rewards as 1 process with the same global batch."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = ("--max_steps", "3", "--train_type", train_type, "--eval_generate", "0", "--learning_rate", "1e-2")
    train_dpo.main(run_args(tmp_path / "one", *common, "--per_device_train_batch_size", "4"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    p = run_torchrun(torchrun + [os.path.join(root, "train_dpo.py")] + run_args(tmp_path / "two", *common) +
                     ["--per_device_train_batch_size", "2"], str(tmp_path / "two"), cwd=root)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [m["step"] for m in one] == [m["step"] for m in two]
    for a, b in zip(one, two):
        for key in ("loss", "rewards/margins", "logps/chosen", "eval_loss", "eval_rewards/margins"):
            if key in a:
                assert abs(a[key] - b[key]) < 1e-5, (a["step"], key, a[key], b[key])


def test_bf16_master_weights_learn_like_fp32_and_are_saved_in_bf16(tmp_path):
    """--master_dtype bfloat16: AdamW updates the policy's bf16 weights (the frozen reference copy keeps its dtype)."""
    from safetensors.torch import load_file

    common = ("--max_steps", "3", "--save_steps", "3", "--train_type", "full", "--learning_rate", "1e-3",
              "--eval_generate", "0")
    train_dpo.main(run_args(tmp_path / "fp32", *common))
    train_dpo.main(run_args(tmp_path / "bf16", *common, "--master_dtype", "bfloat16"))
    fp32, bf16 = ({m["step"]: m["loss"] for m in read_metrics(tmp_path / run) if "loss" in m} for run in ("fp32", "bf16"))
    assert list(bf16) == [1, 2, 3] and all(abs(fp32[s] - bf16[s]) < 0.03 * fp32[s] for s in fp32), (fp32, bf16)
    assert bf16[3] < bf16[1]
    saved = load_file(str(tmp_path / "bf16" / "checkpoint-3" / "model.safetensors"))
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.bfloat16}
    with pytest.raises(SystemExit, match="float32 or bfloat16"):
        train_dpo.parse_config(["--master_dtype", "fp16"])
