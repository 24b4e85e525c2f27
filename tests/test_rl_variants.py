"""GRPO's family (issue 20, items 1-3): SAPO's loss, the RLOO and REINFORCE++ advantages and the high-entropy token
mask against their formulas written out here, and short runs of main() with each flag."""

import json
import math
import os
import statistics
import sys

import pytest
import torch

import rewards
import train_chord
import train_grpo
from train_grpo import entropy_mask, entropy_threshold, grpo_loss, group_advantages
from conftest import run_torchrun

# ----------------------------------------------------------------------------- advantage estimators


def random_rewards(seed, groups, G):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.rand(groups * G, generator=g, dtype=torch.float64)
    rewards[:G] = 0.5  # a group that agrees: no signal, and no division by zero
    return rewards


def std(values):
    return statistics.stdev(values)  # unbiased, as torch.std


@pytest.mark.parametrize("G", [2, 4])
@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_rloo_is_reward_minus_the_mean_of_the_others(G, scale_rewards):
    rewards = random_rewards(G, 5, G)
    r = rewards.tolist()
    expected = []
    for i, reward in enumerate(r):
        group = r[i // G * G : i // G * G + G]
        others = group[: i % G] + group[i % G + 1 :]
        advantage = reward - sum(others) / (G - 1)
        divisor = {"group": std(group) + 1e-4, "batch": std(r) + 1e-4, "none": 1.0}[scale_rewards]
        expected.append(advantage / divisor)
    got = group_advantages(rewards, G, scale_rewards, estimator="rloo")
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-6)
    assert got[:G].abs().max() == 0  # the agreeing group


@pytest.mark.parametrize("G", [2, 4])
def test_reinforce_plus_plus_normalises_group_centred_rewards_over_the_batch(G):
    rewards = random_rewards(10 + G, 6, G)
    r = rewards.tolist()
    centred = [reward - statistics.mean(r[i // G * G : i // G * G + G]) for i, reward in enumerate(r)]
    mean_c, std_c = statistics.mean(centred), std(centred)
    expected = torch.tensor([(c - mean_c) / (std_c + 1e-4) for c in centred], dtype=torch.float64)
    for scale_rewards in ("group", "batch", "none"):  # scale_rewards does not apply
        got = group_advantages(rewards, G, scale_rewards, estimator="reinforce_plus_plus")
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert got.std().item() == pytest.approx(1.0, abs=1e-3)


def test_grpo_estimator_is_the_default_and_unknown_ones_are_refused():
    rewards = random_rewards(3, 4, 4)
    for scale_rewards in ("group", "batch", "none"):
        assert torch.equal(group_advantages(rewards, 4, scale_rewards, "grpo"), group_advantages(rewards, 4, scale_rewards))
    with pytest.raises(ValueError):
        group_advantages(rewards, 4, "group", "ppo")
    with pytest.raises(SystemExit):
        train_grpo.parse_config(["--advantage_estimator", "ppo"])


# ----------------------------------------------------------------------------- SAPO


def random_batch(seed, B=5, T=7, spread=0.3):
    """float64 logps, old logps (ratios around 1, some far from it), ref logps, advantages of both signs, a mask
    with one completion of a single token."""
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    ref = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    adv[0] = 0.0
    lengths = torch.tensor([T, 3, 1, T - 2, 5])[:B]
    mask = torch.arange(T)[None] < lengths[:, None]
    return logps, old, ref, adv, mask


def sapo_reference(logps, old, ref, adv, mask, beta, level, tau_pos, tau_neg, num_items, policy_mask=None):
    """SAPO as the issue writes it, one token at a time in plain Python: -f(r) A + beta KL, f(r) = (4 / tau)
    sigmoid(tau (r - 1)), summed and divided by num_items (or the tokens of the batch)."""
    logps, old, ref, mask = logps.tolist(), old.tolist(), ref.tolist(), mask.tolist()
    policy_mask = mask if policy_mask is None else policy_mask.tolist()
    total, tokens = 0.0, 0
    for i in range(len(logps)):
        kept = [t for t in range(len(logps[i])) if mask[i][t]]
        seq_log_ratio = sum(logps[i][t] - old[i][t] for t in kept) / max(len(kept), 1)
        tau = tau_pos if adv[i] > 0 else tau_neg
        for t in kept:
            r = math.exp(seq_log_ratio if level == "sequence" else logps[i][t] - old[i][t])
            f = 4 / tau / (1 + math.exp(-tau * (r - 1)))
            kl = math.exp(ref[i][t] - logps[i][t]) - (ref[i][t] - logps[i][t]) - 1
            total += -f * adv[i].item() * policy_mask[i][t] + beta * kl
            tokens += 1
    return total / (num_items if num_items is not None else max(tokens, 1))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("num_items", [None, 41.0])
def test_sapo_matches_formula(level, beta, num_items):
    logps, old, ref, adv, mask = random_batch(seed=1)
    tau_pos, tau_neg = 1.3, 2.1  # not the defaults: each must reach its own sign of A
    loss, metrics = grpo_loss(logps, old, ref if beta else None, adv, mask, beta, 0.2, 0.28, "sapo", level,
                              num_items_in_batch=num_items, tau_pos=tau_pos, tau_neg=tau_neg)
    expected = sapo_reference(logps, old, ref, adv, mask, beta, level, tau_pos, tau_neg, num_items)
    assert loss.item() == pytest.approx(expected, rel=0, abs=1e-6)
    assert metrics["clip_low"].item() == metrics["clip_high"].item() == metrics["clip_region"].item() == 0.0  # no clip
    assert (metrics["kl"].item() > 0) == (beta != 0)


def test_sapo_gradient_is_the_soft_gate_derivative():
    """Off policy, token level: d loss / d logp_t = -A 4 s (1 - s) r / n, s = sigmoid(tau (r - 1)), r = exp(logp - old):
    largest at r = 1, fading (never cut to 0) as r leaves it."""
    logps, old, _, adv, mask = random_batch(seed=2, spread=1.0)
    logps.requires_grad_(True)
    grpo_loss(logps, old, None, adv, mask, 0.0, 0.2, 0.2, "sapo", tau_pos=1.0, tau_neg=1.05)[0].backward()
    r = (logps - old).detach().exp()
    tau = torch.where(adv[:, None] > 0, 1.0, 1.05).double()
    s = torch.sigmoid(tau * (r - 1))
    torch.testing.assert_close(logps.grad, -adv[:, None] * 4 * s * (1 - s) * r * mask / mask.sum(), rtol=0, atol=1e-9)
    assert (logps.grad[mask & (adv[:, None] != 0)] != 0).all()


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_sapo_on_policy_gradient_is_the_plain_policy_gradient(level):
    """r = 1: f'(1) = 1, so d loss / d logp_t = -A / n whatever tau is. Sequence level too: each of the |o_i| tokens
    carries f(s_i) of the sequence's ratio s_i = exp(mean_t(logp_t - old_t)), whose derivative is s_i / |o_i|."""
    logps, _, _, adv, mask = random_batch(seed=3)
    logps.requires_grad_(True)
    num_items = 29.0
    grpo_loss(logps, logps.detach(), None, adv, mask, 0.0, 0.2, 0.2, "sapo", level, num_items_in_batch=num_items,
              tau_pos=0.7, tau_neg=3.0)[0].backward()
    torch.testing.assert_close(logps.grad, -adv[:, None] * mask / num_items, rtol=0, atol=1e-9)


def test_sapo_micro_batches_add_up_like_dapo():
    logps, old, ref, adv, mask = random_batch(seed=4)
    whole = grpo_loss(logps, old, ref, adv, mask, 0.04, 0.2, 0.2, "sapo")[0]
    n = mask.sum()
    parts = [grpo_loss(logps[s], old[s], ref[s], adv[s], mask[s], 0.04, 0.2, 0.2, "sapo", num_items_in_batch=n)[0]
             for s in (slice(0, 2), slice(2, 5))]
    assert sum(parts).item() == pytest.approx(whole.item(), rel=1e-12)


# ----------------------------------------------------------------------------- high-entropy tokens


def test_entropy_mask_by_hand():
    entropies = torch.tensor([[0.9, 0.1, 2.0, 7.0], [0.5, 3.0, 1.5, 0.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)  # 7.0 is padding: never chosen, never counted
    # the 7 masked entropies sorted: 0.0 0.1 0.5 0.9 1.5 2.0 3.0; quantile 0.5 of them (rho 0.5): rank 0.5 * 6 = 3 -> 0.9;
    # rho 0.2: the 0.8 quantile, rank 4.8 -> 1.5 + 0.8 * (2.0 - 1.5) = 1.9
    assert entropy_mask(entropies, mask, 0.5).tolist() == [[True, False, True, False], [False, True, True, False]]
    assert entropy_mask(entropies, mask, 0.2).tolist() == [[False, False, True, False], [False, True, False, False]]
    assert entropy_threshold(entropies[mask], 0.2).item() == pytest.approx(1.9, abs=1e-12)
    assert torch.equal(entropy_mask(entropies, mask, 1.0), mask)  # rho 1: every token
    # a threshold taken over more tokens (every process's) is used as given
    assert entropy_mask(entropies, mask, 0.2, torch.tensor(0.5)).tolist() == [[True, False, True, False],
                                                                               [True, True, True, False]]


@pytest.mark.parametrize("n", [1, 2, 17, 1000])
@pytest.mark.parametrize("rho", [0.2, 0.5, 0.999])
def test_entropy_threshold_is_torch_quantile(n, rho):
    values = torch.rand(n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    assert entropy_threshold(values, rho).item() == pytest.approx(torch.quantile(values, 1 - rho).item(), abs=1e-12)
    chosen = entropy_mask(values[None], torch.ones(1, n, dtype=torch.bool), rho)
    assert chosen.sum().item() == pytest.approx(rho * n, abs=1 + 1e-9)  # about rho of the tokens (no ties here)


def test_step_threshold_ranks_only_tokens_with_a_policy_gradient():
    """A group whose rewards all agree (advantage 0) gets no policy gradient whatever the mask says: its tokens must
    not take the quantile's places. On the demo they did: a group of long, high-entropy wrong answers held the top 20%
    and the groups with a signal lost their answer tokens (seed 2: 36 of 40 steps without a gradient)."""
    g = torch.Generator().manual_seed(0)
    signal = {"entropy": torch.rand(4, 3, generator=g, dtype=torch.float64),
              "token_mask": torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool),
              "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)}
    agreed = {"entropy": torch.full((2, 3), 9.0, dtype=torch.float64), "token_mask": torch.ones(2, 3, dtype=torch.bool),
              "advantages": torch.zeros(2, dtype=torch.float64)}
    mixed = {k: torch.cat([signal[k], agreed[k]]) for k in signal}  # the agreed group inside the same micro-batch
    expected = entropy_threshold(signal["entropy"][signal["token_mask"]], 0.2)
    for micro in ([signal, agreed], [mixed]):
        assert train_grpo.step_entropy_threshold(micro, 0.2, False).item() == pytest.approx(expected.item(), abs=1e-12)
    kept = entropy_mask(signal["entropy"], signal["token_mask"], 0.2, expected)
    assert 1 <= kept.sum().item() <= 3  # 20% of the 9 tokens with a signal, not none of them


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo"])
def test_policy_mask_removes_the_policy_term_only(loss_type):
    """Unchosen tokens lose the policy term; the KL term and the normaliser still cover every token."""
    logps, old, ref, adv, mask = random_batch(seed=5)
    chosen = entropy_mask(torch.rand(mask.shape, generator=torch.Generator().manual_seed(0)), mask, 0.4)
    logps.requires_grad_(True)
    loss, _ = grpo_loss(logps, old, None, adv, mask, 0.0, 0.2, 0.2, loss_type, policy_mask=chosen)
    loss.backward()
    assert (logps.grad[mask & ~chosen] == 0).all() and (logps.grad[chosen & (adv[:, None] != 0)] != 0).any()
    full, _ = grpo_loss(logps.detach(), old, None, adv, mask, 0.0, 0.2, 0.2, loss_type)
    alone, _ = grpo_loss(logps.detach(), old, None, adv, chosen, 0.0, 0.2, 0.2, loss_type)
    assert loss.item() != pytest.approx(full.item()) and loss.item() != pytest.approx(alone.item())
    if loss_type == "sapo":
        expected = sapo_reference(logps.detach(), old, ref, adv, mask, 0.0, "token", 1.0, 1.05, None, chosen)
        assert loss.item() == pytest.approx(expected, abs=1e-6)
    kl_chosen = grpo_loss(logps.detach(), old, ref, adv, mask, 0.1, 0.2, 0.2, loss_type, policy_mask=chosen)[0] - loss.detach()
    kl_all = grpo_loss(logps.detach(), old, ref, adv, mask, 0.1, 0.2, 0.2, loss_type)[0] - full
    assert kl_chosen.item() == pytest.approx(kl_all.item(), rel=1e-12)  # the KL term is the same with or without


# ----------------------------------------------------------------------------- short runs of main() with each flag

# tests/test_grpo.py's small fast run: 8 completions of 2 prompts a step, 4 new tokens each, no evaluation
SMALL = ["--dataset", "demo#32", "--val_dataset", "demo#4", "--eval_limit", "4", "--num_generations", "4",
         "--per_device_train_batch_size", "8", "--max_completion_length", "4", "--num_workers", "0",
         "--learning_rate", "1e-3", "--logging_steps", "1", "--reward_funcs", "accuracy", "random"]
FAST = SMALL + ["--eval_on_start", "false", "--eval_limit", "0", "--eval_steps", "0"]


def steps_of(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if "loss" in m]


@pytest.mark.parametrize("flags", [["--loss_type", "sapo"], ["--advantage_estimator", "rloo"],
                                   ["--advantage_estimator", "reinforce_plus_plus"], ["--top_entropy_quantile", "0.2"],
                                   ["--top_entropy_quantile", "0.2", "--num_iterations", "2", "--beta", "0.04",
                                    "--loss_type", "sapo", "--advantage_estimator", "rloo"]],
                         ids=["sapo", "rloo", "reinforce_plus_plus", "top_entropy", "together"])
def test_main_runs_with_each_variant(flags, tmp_path):
    """Each flag alone, and all together with the passes they share (num_iterations 2: the entropies come with the
    sampling policy's logps; beta: the reference's)."""
    out = str(tmp_path / "run")
    train_grpo.main(FAST + ["--max_steps", "2", "--save_steps", "0", "--output_dir", out] + flags)
    steps = steps_of(out)
    assert [m["step"] for m in steps] == [1, 2]
    for m in steps:
        for key in ("loss", "grad_norm", "entropy", "kl", "advantage_std"):
            assert math.isfinite(m[key]), key
        assert m["grad_norm"] > 0
        assert ("entropy_threshold" in m) == ("--top_entropy_quantile" in flags)
        if "--top_entropy_quantile" in flags:
            assert math.isfinite(m["entropy_threshold"]) and m["entropy_threshold"] > 0
        if "sapo" in flags:
            assert m["clip_region"] == 0.0


def test_chord_takes_the_flags():
    cfg = train_chord.parse_config(["--loss_type", "sapo", "--tau_neg", "2", "--advantage_estimator", "rloo",
                                    "--top_entropy_quantile", "0.2"])
    assert (cfg.loss_type, cfg.tau_neg, cfg.advantage_estimator, cfg.top_entropy_quantile) == ("sapo", 2.0, "rloo", 0.2)


DISTINCT_CHARACTERS = "def distinct(completions, **kwargs):\n    return [len(set(c)) / 10 for c in completions]\n"


def test_entropy_threshold_is_over_every_process(tmp_path, monkeypatch):
    """2 processes (gloo, CPU) x 8 completions take the same threshold, and reach the same losses and gradient norms,
    as 1 process x 16: the threshold is the quantile of every process's tokens, not each process's own."""
    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))  # the plugin must not outlive this test
    plugin = tmp_path / "distinct.py"
    plugin.write_text(DISTINCT_CHARACTERS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = FAST + ["--max_steps", "2", "--save_steps", "0", "--reward_plugin", str(plugin), "--reward_funcs",
                     "accuracy", "distinct", "--temperature", "1.5", "--top_entropy_quantile", "0.3"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541"]
    p = run_torchrun(torchrun + ["train_grpo.py"] + common + ["--per_device_train_batch_size", "8", "--output_dir", two],
                     two, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    train_grpo.main(common + ["--per_device_train_batch_size", "16", "--output_dir", one])  # here: no start-up to wait for
    a, b = steps_of(one), steps_of(two)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    assert a[0]["grad_norm"] > 0
    for x, y in zip(a, b):
        for key in ("reward", "entropy_threshold", "loss", "entropy", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), key
