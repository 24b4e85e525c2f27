"""CHORD: the mu schedule and the SFT loss against their formulas, and one step of main() against one GRPO step
(mu = 0) and one SFT step computed by hand (mu = 1); expert data from a file or from the RL records' solutions."""

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file

import data
import rewards
import train_chord
import train_grpo
import train_sft
from train_chord import chord_mu, chord_sft_loss
from conftest import run_torchrun

torch.set_num_threads(1)  # the machine's cores are shared

# ----------------------------------------------------------------------------- the mu schedule


def test_chord_mu_boundaries_and_midpoints():
    peak, valley = 0.9, 0.1
    mu = lambda step: chord_mu(step, 10, 20, peak, valley)
    assert mu(0) == 0.0  # warmup starts at 0
    assert mu(5) == pytest.approx(peak / 2)  # halfway up
    assert mu(9) == pytest.approx(peak * 9 / 10)
    assert mu(10) == pytest.approx(peak)  # the peak, where the decay starts
    assert mu(15) == pytest.approx(valley + (peak - valley) * (1 + math.cos(math.pi / 4)) / 2)  # a quarter of the cosine
    assert mu(20) == pytest.approx((peak + valley) / 2)  # halfway down
    assert mu(25) == pytest.approx(valley + (peak - valley) * (1 + math.cos(3 * math.pi / 4)) / 2)
    assert valley < mu(29) < valley + 0.01
    assert mu(30) == valley and mu(1000) == valley  # then it holds
    assert all(mu(s) >= mu(s + 1) for s in range(10, 40))  # never rises after the peak


def test_chord_mu_without_warmup_or_decay_and_constant():
    assert chord_mu(0, 0, 100, 0.9, 0.05) == pytest.approx(0.9)  # no warmup: the first step has the peak
    assert chord_mu(3, 4, 0, 0.5, 0.2) == pytest.approx(0.375)
    assert chord_mu(4, 4, 0, 0.5, 0.2) == 0.2  # no decay: straight to the valley after the warmup
    assert [chord_mu(s, 0, 10, 0.3, 0.3) for s in (0, 5, 10, 50)] == pytest.approx([0.3] * 4)  # peak = valley: constant


# ----------------------------------------------------------------------------- the SFT loss, written out token by token


def expert_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = torch.rand(3, 5, generator=g, dtype=torch.float64).clamp(min=1e-3).log()  # p from 0.001 to 1
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return logps, mask


@pytest.mark.parametrize("phi", [False, True])
@pytest.mark.parametrize("num_items", [None, 17.0])
def test_chord_sft_loss_matches_formula(phi, num_items):
    logps, mask = expert_batch()
    total, n = 0.0, 0
    for row, keep in zip(logps.tolist(), mask.tolist()):
        for logp, k in zip(row, keep):
            if k:
                p = math.exp(logp)
                total += -logp * (p * (1 - p) if phi else 1.0)
                n += 1
    expected = total / (num_items if num_items is not None else n)  # divided by the tokens, not the weights
    assert chord_sft_loss(logps, mask, phi, num_items).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("phi", [False, True])
def test_chord_sft_loss_gradient_is_minus_phi_over_tokens(phi):
    """phi is detached: d loss / d logp_t = -phi_t / n (phi_t = 1 without phi), 0 off the mask."""
    logps, mask = expert_batch(seed=1)
    logps.requires_grad_(True)
    chord_sft_loss(logps, mask, phi).backward()
    p = logps.detach().exp()
    weight = p * (1 - p) if phi else torch.ones_like(p)
    torch.testing.assert_close(logps.grad, -weight * mask / mask.sum())


# ----------------------------------------------------------------------------- one step of main() against GRPO and SFT

SMALL = ["--dataset", "demo#32", "--val_dataset", "demo#4", "--eval_limit", "4", "--num_generations", "4",
         "--per_device_train_batch_size", "8", "--max_completion_length", "4", "--num_workers", "0",
         "--learning_rate", "1e-3", "--logging_steps", "1", "--reward_funcs", "accuracy", "random",
         "--eval_on_start", "false", "--eval_steps", "100"]
EXPERT = ["--chord_sft_dataset", "demo#32", "--chord_sft_per_device_train_batch_size", "4"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def weights(output_dir, step=1):
    return load_file(os.path.join(output_dir, f"checkpoint-{step}", "model.safetensors"))


def assert_same_weights(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def test_mu_0_step_equals_grpo_step(tmp_path):
    grpo, chord = str(tmp_path / "grpo"), str(tmp_path / "chord")
    train_grpo.main(SMALL + ["--max_steps", "1", "--save_steps", "1", "--output_dir", grpo])
    train_chord.main(SMALL + EXPERT + ["--max_steps", "1", "--save_steps", "1", "--output_dir", chord,
                                       "--chord_mu_peak", "0", "--chord_mu_valley", "0"])
    step = [m for m in read_jsonl(os.path.join(chord, "metrics.jsonl")) if "loss" in m][0]
    assert step["mu"] == 0.0 and step["grad_norm"] > 0 and step["sft_loss"] > 0  # measured, not trained on
    assert step["loss"] == pytest.approx(step["grpo_loss"])
    assert_same_weights(weights(grpo), weights(chord))


def test_mu_1_step_equals_sft_step_by_hand(tmp_path):
    """mu = 1: the GRPO part has weight 0, so the step is AdamW on the token-mean NLL of the first expert batch,
    taken here in train_sft.py's order (seed, epoch 0) and with its log-probabilities (train_sft.token_logps)."""
    chord = str(tmp_path / "chord")
    train_chord.main(SMALL + EXPERT + ["--max_steps", "1", "--save_steps", "1", "--output_dir", chord,
                                       "--chord_mu_peak", "1", "--chord_mu_valley", "1"])
    from transformers import AutoModelForImageTextToText

    path = data.resolve_model("tiny-qwen2.5-vl")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    data.use_varlen_attention(model)  # the scripts' default attention (the same sums in another order would differ)
    model.train()
    encoder = data.Encoder(path)
    samples = data.load_dataset([data.demo_path("sft", "train") + "#32"], "sft", seed=42)
    first = data.make_plan(list(range(len(samples))), [0] * len(samples), 4, False, 2048, seed=42, epoch=0)[0]
    batch = data.collate([encoder(samples[j], train_on="assistant") for j in first], packing=True)
    logps, _ = train_sft.token_logps(model, batch, torch.device("cpu"))
    (-logps.sum() / len(logps)).backward()
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0).step()
    model.save_pretrained(str(tmp_path / "by_hand" / "checkpoint-1"))  # the file's key names, as the run's checkpoint
    expected, got = weights(str(tmp_path / "by_hand")), weights(chord)
    step = [m for m in read_jsonl(os.path.join(chord, "metrics.jsonl")) if "loss" in m][0]
    assert step["mu"] == 1.0 and step["sft_loss"] == pytest.approx(-logps.mean().item(), rel=1e-5)
    assert any(not torch.equal(got[k], v) for k, v in load_file(os.path.join(path, "model.safetensors")).items())
    assert_same_weights(expected, got)


# ----------------------------------------------------------------------------- a short run: schedule, phi, LoRA, resume


# LoRA, two micro-batches a step (each with its expert micro-batch), mu rising over one step then decaying, phi on
LORA_PHI = ["--train_type", "lora", "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
            "--chord_mu_warmup_steps", "1", "--chord_mu_decay_steps", "4", "--chord_enable_phi_function", "true"]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("chord") / "run")
    train_chord.main(SMALL + EXPERT + LORA_PHI + ["--max_steps", "3", "--save_steps", "1", "--save_total_limit", "5",
                                                  "--output_dir", out, "--log_completions", "true"])
    return out


def test_main_logs_mu_both_parts_and_checkpoints(three_steps):
    steps = [m for m in read_jsonl(os.path.join(three_steps, "metrics.jsonl")) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert [m["mu"] for m in steps] == pytest.approx([chord_mu(s, 1, 4, 0.9, 0.05) for s in (0, 1, 2)])
    for m in steps:
        assert m["loss"] == pytest.approx((1 - m["mu"]) * m["grpo_loss"] + m["mu"] * m["sft_loss"], rel=1e-6, abs=1e-9)
        assert 0 < m["sft_loss"] < m["sft_nll"] / 4  # phi = p (1 - p) <= 1/4 weighs every token down
        for key in ("reward", "reward/random", "advantage_std", "kl", "entropy", "grad_norm", "rollout_s", "logprob_s",
                    "update_s", "step_s", "tokens_per_s"):
            assert math.isfinite(m[key]), key
    assert len(read_jsonl(os.path.join(three_steps, "completions.jsonl"))) == 3 * 8
    state = json.load(open(os.path.join(three_steps, "checkpoint-3", "trainer_state.json")))
    assert (state["sft_epoch"], state["sft_cursor"]) == (0, 6)  # 2 micro-batches of 4 expert examples a step
    assert {"adapter_model.safetensors", "adapter_config.json", "training_state.pt"} <= set(
        os.listdir(os.path.join(three_steps, "checkpoint-3")))


def test_resume_continues_exactly(three_steps, tmp_path):
    """Resuming at step 2 takes the same prompts and expert examples and reaches the same adapter at step 3."""
    out = str(tmp_path / "resumed")
    train_chord.main(SMALL + EXPERT + LORA_PHI + ["--max_steps", "3", "--save_steps", "1", "--output_dir", out,
                                                  "--resume_from_checkpoint", os.path.join(three_steps, "checkpoint-2")])
    first = [m for m in read_jsonl(os.path.join(three_steps, "metrics.jsonl")) if m["step"] == 3 and "loss" in m][0]
    again = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in m]
    assert [m["step"] for m in again] == [3]
    for key in ("mu", "reward", "loss", "grpo_loss", "sft_loss", "sft_nll", "grad_norm"):
        assert again[0][key] == pytest.approx(first[key], rel=1e-5, abs=1e-7), key
    a = load_file(os.path.join(three_steps, "checkpoint-3", "adapter_model.safetensors"))
    b = load_file(os.path.join(out, "checkpoint-3", "adapter_model.safetensors"))
    assert_same_weights(a, b)


def test_sigterm_saves_and_resume_continues_exactly(three_steps, tmp_path, monkeypatch, capsys):
    """SIGTERM during step 2's rollout: step 2 finishes, checkpoint-2 is written and main returns (exit 0); resuming
    takes the prompts and expert examples the uninterrupted run took at step 3, and its metrics."""
    import signal

    calls, random_reward = [], rewards.REWARDS["random"]

    def random_then_sigterm(completions, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return random_reward(completions, **kwargs)

    monkeypatch.setitem(rewards.REWARDS, "random", random_then_sigterm)
    out = str(tmp_path / "stopped")
    args = SMALL + EXPERT + LORA_PHI + ["--max_steps", "3", "--save_steps", "100", "--output_dir", out]
    assert train_chord.main(args)["step"] == 2
    assert "SIGTERM: saved" in capsys.readouterr().out
    train_chord.main(args + ["--resume_from_checkpoint", "latest"])
    first, again = [[m for m in read_jsonl(os.path.join(d, "metrics.jsonl")) if "loss" in m] for d in (three_steps, out)]
    assert [m["step"] for m in again] == [1, 2, 3]
    for x, y in zip(first, again):
        for key in ("reward", "loss", "grpo_loss", "sft_loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), key


def test_partial_checkpointing_and_compile_change_speed_not_results(tmp_path):
    """--gradient_checkpointing_layers N recomputes exactly the first N decoder layers; with --compile as well, two
    steps with both parts trained (mu = 0.5) give the plain run's completions and losses; the phase timings are
    positive and add up to step_s."""
    cfg = train_chord.parse_config(SMALL + EXPERT + ["--gradient_checkpointing", "true", "--gradient_checkpointing_layers", "1"])
    model = train_grpo.load_model(cfg, torch.device("cpu"))[0]
    assert [layer.gradient_checkpointing for layer in model.model.language_model.layers] == [True, False]
    common = SMALL + EXPERT + ["--max_steps", "2", "--save_steps", "0", "--chord_mu_peak", "0.5", "--chord_mu_valley", "0.5"]
    train_chord.main(common + ["--output_dir", str(tmp_path / "plain")])
    train_chord.main(common + ["--output_dir", str(tmp_path / "fast"), "--gradient_checkpointing", "true",
                               "--gradient_checkpointing_layers", "1", "--compile", "true"])
    plain, fast = [[m for m in read_jsonl(str(tmp_path / d / "metrics.jsonl")) if "loss" in m] for d in ("plain", "fast")]
    assert [m["step"] for m in plain] == [m["step"] for m in fast] == [1, 2] and plain[1]["grad_norm"] > 0
    for a, b in zip(plain, fast):
        assert (a["reward"], a["completion_length"]) == (b["reward"], b["completion_length"])  # the same completions
        for key in ("loss", "grpo_loss", "sft_loss", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for m in plain + fast:
        assert min(m[k] for k in ("rollout_s", "logprob_s", "update_s", "tokens_per_s")) > 0
        assert m["step_s"] == pytest.approx(m["rollout_s"] + m["logprob_s"] + m["update_s"])


def test_nan_in_the_sft_part_skips_steps_and_stops(tmp_path, monkeypatch):
    real = train_chord.chord_sft_loss
    monkeypatch.setattr(train_chord, "chord_sft_loss", lambda *args, **kwargs: real(*args, **kwargs) * math.nan)
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit, match="stopped at step 2: .* NaN/inf in 2 steps in a row"):
        train_chord.main(SMALL + EXPERT + ["--max_steps", "3", "--max_bad_steps", "2", "--save_steps", "1",
                                           "--output_dir", out])
    assert [m["skipped_steps"] for m in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [1, 2]
    base = load_file(os.path.join(data.resolve_model("tiny-qwen2.5-vl"), "model.safetensors"))
    assert_same_weights(weights(out, step=1), base, atol=0)  # the skipped step changed nothing


def test_bf16_master_weights_learn_like_fp32_and_are_saved_in_bf16(tmp_path):
    """--master_dtype bfloat16: AdamW updates the policy's bf16 weights; the SFT part's loss and the gradient norm
    are those of the fp32 run within bf16's precision."""
    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = str(tmp_path / dtype)
        train_chord.main(SMALL + EXPERT + ["--max_steps", "2", "--save_steps", "2", "--eval_limit", "0",
                                           "--output_dir", out, "--master_dtype", dtype])
        runs[dtype] = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in m]
    assert [m["step"] for m in runs["bfloat16"]] == [1, 2]
    for a, b in zip(runs["float32"], runs["bfloat16"]):
        for key in ("sft_loss", "grad_norm", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=0.03), key
    saved = weights(str(tmp_path / "bfloat16"), step=2)
    base = load_file(os.path.join(data.resolve_model("tiny-qwen2.5-vl"), "model.safetensors"))
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.bfloat16}
    assert any(not torch.equal(saved[k], base[k].to(torch.bfloat16)) for k in saved)  # it trained
    with pytest.raises(SystemExit, match="float32, bfloat16"):
        train_chord.parse_config(["--master_dtype", "fp16"])


# ----------------------------------------------------------------------------- where the expert data comes from


def rl_file(tmp_path, n=6, drop_solution_at=None):
    """The first n demo RL records, image paths made absolute; one without its solution if asked."""
    src = data.demo_path("rl", "train")
    out = tmp_path / "rl.jsonl"
    with open(src) as f, open(out, "w") as g:
        for i, line in enumerate(list(f)[:n]):
            record = json.loads(line)
            record["images"] = [os.path.join(os.path.dirname(src), p) for p in record["images"]]
            if i == drop_solution_at:
                del record["solution"]
            g.write(json.dumps(record) + "\n")
    return str(out)


def load_expert(args):
    cfg = train_chord.parse_config(args + ["--num_workers", "0"])
    encoder = data.Encoder(data.resolve_model(cfg.model))
    train, _, kept, _ = train_grpo.load_data(cfg, encoder, 0, 1)
    return train, kept, train_chord.load_expert_data(cfg, encoder, train, kept, 0, 1)


def test_expert_data_defaults(tmp_path):
    # demo prompts: the demo's SFT split
    _, _, (expert, kept, lengths) = load_expert(["--dataset", "demo#8", "--val_dataset", "demo#2"])
    assert len(expert) == len(kept) == len(lengths) == 2000 and all(n > 0 for n in lengths)
    # the user's prompts and no --chord_sft_dataset: each record with its solution as the reply
    train, rl_kept, (expert, kept, _) = load_expert(["--dataset", rl_file(tmp_path), "--val_dataset", "demo#2"])
    assert kept == list(range(6))
    for i in kept:
        record = train[rl_kept[i]]
        assert expert[i].messages == record.messages + [{"role": "assistant", "content": record.extra["solution"]}]
        assert expert[i].images == record.images
    # ... which must then have one
    with pytest.raises(SystemExit, match="rl.jsonl:4: no `solution`"):
        load_expert(["--dataset", rl_file(tmp_path, drop_solution_at=3), "--val_dataset", "demo#2"])


# ----------------------------------------------------------------------------- 2 processes against 1


def test_two_processes_match_one(tmp_path, monkeypatch):
    """FSDP2 over 2 processes (gloo, CPU), 4 completions and 2 expert examples each, samples the same completions and
    takes the same expert examples as 1 process with 8 and 4, and normalises both parts over the global batch: with
    mu = 0.5 the same rewards, GRPO and SFT losses, before and after an update."""
    import subprocess
    import sys

    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))  # the plugin must not outlive this test
    plugin = tmp_path / "distinct.py"
    plugin.write_text("def distinct(completions, **kwargs):\n    return [len(set(c)) / 10 for c in completions]\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = SMALL + ["--chord_sft_dataset", "demo#32", "--chord_mu_peak", "0.5", "--chord_mu_valley", "0.5", "--max_steps",
                      "2", "--save_steps", "0", "--eval_limit", "0", "--reward_plugin", str(plugin), "--reward_funcs",
                      "accuracy", "distinct", "--temperature", "1.5"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533"]
    p = run_torchrun(torchrun + ["train_chord.py"] + common + ["--per_device_train_batch_size", "4",
                     "--chord_sft_per_device_train_batch_size", "2", "--output_dir", two], two, cwd=root,
                     env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    train_chord.main(common + ["--per_device_train_batch_size", "8", "--chord_sft_per_device_train_batch_size", "4",
                               "--output_dir", one])  # here: no start-up to wait for
    a, b = [[m for m in read_jsonl(os.path.join(d, "metrics.jsonl")) if "loss" in m] for d in (one, two)]
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    assert a[0]["advantage_std"] > 0 and a[0]["mu"] == 0.5  # both parts have a gradient
    for x, y in zip(a, b):
        for key in ("reward", "reward/distinct", "loss", "grpo_loss", "sft_loss", "entropy", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), key
