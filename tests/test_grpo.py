"""GRPO: advantages and the loss against the written formulas, the REINFORCE gradient, and short runs of main()."""

import json
import math
import os
import statistics

import pytest
import torch

import rewards
import train_grpo
from train_grpo import grpo_loss, group_advantages

# ----------------------------------------------------------------------------- advantages


def test_group_advantages_each_scaling():
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0, 0.0, 0.5, 1.0, 3.0]
    G = 4
    groups = [rewards[i : i + G] for i in range(0, len(rewards), G)]
    means = [statistics.mean(g) for g in groups for _ in range(G)]
    group_std = [statistics.stdev(g) for g in groups for _ in range(G)]  # unbiased, as torch.std
    batch_std = statistics.stdev(rewards)
    got = {s: group_advantages(torch.tensor(rewards), G, s).tolist() for s in ("group", "batch", "none")}
    for i, r in enumerate(rewards):
        assert got["group"][i] == pytest.approx((r - means[i]) / (group_std[i] + 1e-4), rel=1e-5)
        assert got["batch"][i] == pytest.approx((r - means[i]) / (batch_std + 1e-4), rel=1e-5)
        assert got["none"][i] == pytest.approx(r - means[i], abs=1e-6)
    assert got["group"][4:8] == [0.0] * 4  # a group that agrees has no signal, and no division by zero
    with pytest.raises(ValueError):
        group_advantages(torch.tensor(rewards), G, "global")


# ----------------------------------------------------------------------------- the loss, written out token by token


def reference_loss(logps, old, ref, adv, mask, beta, eps, eps_high, loss_type, level, max_len, num_items):
    """The formulas of the grpo_loss docstring, in plain Python over one token at a time."""
    B, T = len(logps), len(logps[0])
    lengths = [sum(m) for m in mask]
    per_token, kls, low, high = [[0.0] * T for _ in range(B)], [], [], []
    for i in range(B):
        seq_log_ratio = sum(logps[i][t] - old[i][t] for t in range(T) if mask[i][t]) / max(lengths[i], 1)
        for t in range(T):
            if not mask[i][t]:
                continue
            r = math.exp(seq_log_ratio if level == "sequence" else logps[i][t] - old[i][t])
            if loss_type == "cispo":
                loss = -min(r, 1 + eps_high) * adv[i] * logps[i][t]
                low.append(False)
                high.append(r > 1 + eps_high)
            else:
                loss = -min(r * adv[i], min(max(r, 1 - eps), 1 + eps_high) * adv[i])
                low.append(r < 1 - eps and adv[i] < 0)
                high.append(r > 1 + eps_high and adv[i] > 0)
            kl = math.exp(ref[i][t] - logps[i][t]) - (ref[i][t] - logps[i][t]) - 1 if beta else 0.0
            kls.append(kl)
            per_token[i][t] = loss + beta * kl
    total = sum(map(sum, per_token))
    if loss_type == "grpo":
        value = sum(sum(per_token[i]) / max(lengths[i], 1) for i in range(B)) / B
    elif loss_type == "bnpo":
        value = total / sum(lengths)
    elif loss_type == "dr_grpo":
        value = total / (B * max_len)
    else:
        value = total / (num_items if num_items is not None else sum(lengths))
    n = len(kls)
    return value, {"kl": sum(kls) / n, "clip_low": sum(low) / n, "clip_high": sum(high) / n,
                   "clip_region": sum(a or b for a, b in zip(low, high)) / n}


def hand_built(seed=0, B=4, T=5):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5) * 1.2  # ratios 0.55 to 1.8: clips active
    ref = logps + (torch.rand(B, T, generator=g, dtype=torch.float64) - 0.5)
    advantages = torch.tensor([1.5, -0.7, 0.3, -1.2], dtype=torch.float64)[:B]
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)[:B, :T]
    return logps, old, ref, advantages, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_loss_matches_formulas(loss_type, level, beta):
    logps, old, ref, adv, mask = hand_built()
    num_items = 23.0 if loss_type in ("dapo", "cispo") else None  # tokens of a larger global batch
    eps, eps_high = 0.2, 0.28
    loss, metrics = grpo_loss(logps, old, ref if beta else None, adv, mask, beta, eps, eps_high, loss_type, level,
                              max_completion_length=8, num_items_in_batch=num_items)
    expected, expected_metrics = reference_loss(logps.tolist(), old.tolist(), ref.tolist(), adv.tolist(),
                                                mask.int().tolist(), beta, eps, eps_high, loss_type, level, 8, num_items)
    assert loss.item() == pytest.approx(expected, rel=1e-9, abs=1e-12)
    for name, value in expected_metrics.items():
        assert metrics[name].item() == pytest.approx(value, rel=1e-9, abs=1e-12), name
    if loss_type != "cispo":
        assert metrics["clip_region"] > 0  # the hand-built ratios do reach the clip


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_on_policy_gradient_is_reinforce_with_group_baseline(loss_type, level):
    """num_iterations 1: old = logps.detach(), ratio 1, no clip active: d loss / d logp_t = -A / normaliser."""
    logps, _, _, _, mask = hand_built(seed=1)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0], dtype=torch.float64)
    adv = group_advantages(rewards, 2)  # two groups of two
    logps = logps.clone().requires_grad_(True)
    B, T, max_len, num_items = *mask.shape, 7, 31.0
    loss, metrics = grpo_loss(logps, logps.detach(), None, adv, mask, 0.0, 0.2, 0.2, loss_type, level, max_len, num_items)
    loss.backward()
    lengths = mask.sum(1, keepdim=True).double()
    normaliser = {"grpo": B * lengths, "bnpo": mask.sum().double(), "dr_grpo": torch.tensor(B * max_len).double(),
                  "dapo": torch.tensor(num_items), "cispo": torch.tensor(num_items)}[loss_type]
    torch.testing.assert_close(logps.grad, -adv[:, None] * mask / normaliser)
    assert metrics["clip_region"].item() == 0.0 and metrics["kl"].item() == 0.0


def test_dapo_normaliser_makes_micro_batches_add_up():
    """Split a batch into micro-batches: with num_items_in_batch = all its tokens the losses sum to the whole batch's."""
    logps, old, ref, adv, mask = hand_built(seed=2)
    whole, _ = grpo_loss(logps, old, ref, adv, mask, 0.04, 0.2, 0.28, "dapo")
    n = mask.sum()
    parts = [grpo_loss(logps[s], old[s], ref[s], adv[s], mask[s], 0.04, 0.2, 0.28, "dapo", num_items_in_batch=n)[0]
             for s in (slice(0, 1), slice(1, 4))]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-12)


def test_grpo_loss_rejects_unknown_options():
    logps, old, ref, adv, mask = hand_built()
    with pytest.raises(ValueError):
        grpo_loss(logps, old, None, adv, mask, 0.0, 0.2, 0.2, "ppo")
    with pytest.raises(ValueError):
        grpo_loss(logps, old, None, adv, mask, 0.0, 0.2, 0.2, "grpo", "group")
    with pytest.raises(ValueError):
        grpo_loss(logps, old, None, adv, mask, 0.0, 0.2, 0.2, "dr_grpo")  # needs max_completion_length


# ----------------------------------------------------------------------------- short runs of main() on the tiny model

SMALL = ["--dataset", "demo#32", "--val_dataset", "demo#4", "--eval_limit", "4", "--num_generations", "4",
         "--per_device_train_batch_size", "8", "--max_completion_length", "4", "--num_workers", "0",
         "--learning_rate", "1e-3", "--logging_steps", "1", "--reward_funcs", "accuracy", "random"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def three_steps(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("grpo") / "run")
    train_grpo.main(SMALL + ["--max_steps", "3", "--save_steps", "1", "--save_total_limit", "5", "--output_dir", out,
                             "--log_completions", "true", "--eval_steps", "2"])
    return out


def test_main_writes_metrics_completions_and_checkpoints(three_steps):
    metrics = read_jsonl(os.path.join(three_steps, "metrics.jsonl"))
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    for key in ("reward", "reward/accuracy", "advantage_std", "kl", "clip_region", "completion_length",
                "completion_length_max", "truncated", "entropy", "rollout_s", "train_s", "grad_norm"):
        assert all(math.isfinite(m[key]) for m in steps), key
    assert [m["step"] for m in metrics if "eval_reward" in m] == [0, 2, 3]  # at the start, every eval_steps, the end
    completions = read_jsonl(os.path.join(three_steps, "completions.jsonl"))
    assert len(completions) == 3 * 8
    assert {"prompt", "completion", "reward", "reward/accuracy", "advantage", "images"} <= completions[0].keys()
    last = os.path.join(three_steps, "checkpoint-3")
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "chat_template.jinja", "training_state.pt", "trainer_state.json"} <= set(os.listdir(last))


def test_resume_continues_exactly(three_steps, tmp_path):
    """Resuming at step 2 samples the same completions and reaches the same weights at step 3."""
    from safetensors.torch import load_file

    out = str(tmp_path / "resumed")
    train_grpo.main(SMALL + ["--max_steps", "3", "--save_steps", "1", "--output_dir", out, "--eval_steps", "100",
                             "--resume_from_checkpoint", os.path.join(three_steps, "checkpoint-2")])
    first = [m for m in read_jsonl(os.path.join(three_steps, "metrics.jsonl")) if m["step"] == 3 and "loss" in m][0]
    again = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in m]
    assert [m["step"] for m in again] == [3]
    for key in ("reward", "completion_length", "loss", "entropy", "grad_norm"):
        assert again[0][key] == pytest.approx(first[key], rel=1e-5, abs=1e-7), key
    a = load_file(os.path.join(three_steps, "checkpoint-3", "model.safetensors"))
    b = load_file(os.path.join(out, "checkpoint-3", "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_lora_reference_iterations_and_dapo_options(tmp_path, monkeypatch):
    """The other code paths: LoRA with the adapters-off reference (beta > 0), old logps for num_iterations 2,
    GSPO with the dapo normaliser, dynamic sampling with a reward that always has spread."""
    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))  # the plugin must not outlive this test
    plugin = tmp_path / "spread.py"
    plugin.write_text("def spread(completions, **kwargs):\n    return [float(i % 2) for i in range(len(completions))]\n")
    out = str(tmp_path / "lora")
    state = train_grpo.main(SMALL + ["--max_steps", "2", "--output_dir", out, "--train_type", "lora", "--beta", "0.1",
                                     "--num_iterations", "2", "--loss_type", "dapo", "--importance_sampling_level", "sequence",
                                     "--dynamic_sample", "true", "--reward_plugin", str(plugin),
                                     "--reward_funcs", "spread", "--eval_on_start", "false"])
    assert state["step"] == 2
    steps = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2]
    assert steps[0]["reward/spread"] == 0.5 and steps[0]["rollout_rounds"] == 1
    assert steps[1]["kl"] > 0  # the second update of a rollout has moved away from the reference
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(os.path.join(out, "checkpoint-2")))
