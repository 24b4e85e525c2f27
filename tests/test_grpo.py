"""GRPO: advantages and the loss against the written formulas, the REINFORCE gradient, and short runs of main()."""

import dataclasses
import json
import math
import os
import statistics
import time

import pytest
import torch

import data
import rewards
import train_chord
import train_grpo
from train_grpo import grpo_loss, group_advantages
from conftest import count_gathers, run_torchrun

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
                "completion_length_max", "truncated", "entropy", "rollout_s", "logprob_s", "update_s", "step_s",
                "tokens_per_s", "grad_norm"):
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


def test_partial_checkpointing_and_compile_change_speed_not_results(tmp_path):
    """--gradient_checkpointing_layers N recomputes exactly the first N decoder layers; with --compile as well, a rollout
    and its two updates (the second scored against the sampling policy's log-probs, taken in eval mode without
    gradients) give the plain run's completions and losses. Generation compiles nothing (rollout keeps the layers
    eager); the phase timings are positive and add up to step_s."""
    from torch._dynamo.utils import counters

    cfg = train_grpo.parse_config(SMALL + ["--gradient_checkpointing", "true", "--gradient_checkpointing_layers", "1"])
    cpu = torch.device("cpu")
    model = train_grpo.load_model(cfg, cpu)[0]
    assert [layer.gradient_checkpointing for layer in model.model.language_model.layers] == [True, False]
    for layer in [*model.model.language_model.layers, *model.model.visual.blocks]:  # as main() does
        layer.compile(dynamic=True)
    graphs = counters["stats"]["unique_graphs"]
    samples = data.load_dataset([data.demo_path("rl", "val") + "#1"], "rl", seed=0)
    train_grpo.rollout(model, data.Encoder(data.resolve_model(cfg.model)), samples, cfg, cpu, seeds=[1, 2, 3, 4])
    assert counters["stats"]["unique_graphs"] == graphs

    common = SMALL + ["--max_steps", "2", "--num_iterations", "2", "--save_steps", "0", "--eval_on_start", "false",
                      "--eval_steps", "0"]
    train_grpo.main(common + ["--output_dir", str(tmp_path / "plain")])
    train_grpo.main(common + ["--output_dir", str(tmp_path / "fast"), "--gradient_checkpointing", "true",
                              "--gradient_checkpointing_layers", "1", "--compile", "true"])
    plain, fast = [[m for m in read_jsonl(str(tmp_path / d / "metrics.jsonl")) if "loss" in m] for d in ("plain", "fast")]
    assert [m["step"] for m in plain] == [m["step"] for m in fast] == [1, 2] and plain[1]["grad_norm"] > 0
    for a, b in zip(plain, fast):
        assert (a["reward"], a["completion_length"]) == (b["reward"], b["completion_length"])  # the same completions
        for key in ("loss", "kl", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    for first, second in (plain, fast):
        assert min(first[k] for k in ("rollout_s", "logprob_s", "update_s", "tokens_per_s")) > 0
        assert first["step_s"] == pytest.approx(first["rollout_s"] + first["logprob_s"] + first["update_s"])
        assert second["rollout_s"] == second["logprob_s"] == 0 and second["step_s"] == second["update_s"] > 0
        # both updates went through the same prompt + completion tokens
        assert first["tokens_per_s"] * first["step_s"] == pytest.approx(second["tokens_per_s"] * second["step_s"])


# ----------------------------------------------------------------------------- the seeded sampler

CPU = torch.device("cpu")


def filtered_softmax(logits, temperature, top_k, top_p):
    """softmax(logits / T) over the top_k most likely tokens, then over the most likely of those until top_p of
    their probability is reached (transformers' top-k and top-p warpers, in that order), written out."""
    ranked = sorted(range(len(logits)), key=lambda v: -logits[v])[: top_k or len(logits)]
    weights = {v: math.exp(logits[v] / temperature) for v in ranked}
    p = {v: w / sum(weights.values()) for v, w in weights.items()}
    kept, mass = [], 0.0
    for v in ranked:
        if mass >= top_p:
            break
        kept.append(v)
        mass += p[v]
    return [p[v] / mass if v in kept else 0.0 for v in range(len(logits))]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 4, 0.8), (1.5, 0, 0.9)])
def test_sampler_draws_from_the_filtered_softmax(temperature, top_k, top_p):
    logits = [2.0, 1.5, 1.0, 0.5, 0.0, -1.0]
    expected = filtered_softmax(logits, temperature, top_k, top_p)
    n = 4000
    # n rows with their own seeds, one draw each; and one row drawn n times
    across_rows = train_grpo.SeededSampler(range(n), temperature, top_k, top_p, CPU)(torch.tensor([logits] * n)).argmax(-1)
    one_row = train_grpo.SeededSampler([n], temperature, top_k, top_p, CPU)
    over_time = torch.cat([one_row(torch.tensor([logits])).argmax(-1) for _ in range(n)])
    for tokens in (across_rows, over_time):
        frequencies = (torch.bincount(tokens, minlength=len(logits)).double() / n).tolist()
        for v, (f, p) in enumerate(zip(frequencies, expected)):
            assert abs(f - p) <= 4 * math.sqrt(p * (1 - p) / n), (v, f, p)  # 4 sigma; a filtered token never


def test_sampler_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(0)
    together = train_grpo.SeededSampler([11, 22, 33], 1.0, 10, 0.9, CPU)
    alone = train_grpo.SeededSampler([22], 1.0, 10, 0.9, CPU)
    for _ in range(5):
        logits = torch.randn(3, 50, generator=g)
        assert together(logits).argmax(-1)[1] == alone(logits[1:2]).argmax(-1)[0]


def test_rollout_completion_depends_only_on_its_seed():
    """The same seeds give the same completions alone, next to a longer prompt (left padding), or one generate call
    per completion; other seeds give other completions."""
    import dataclasses

    cfg = train_grpo.parse_config(["--num_generations", "2", "--max_completion_length", "6", "--top_k", "50"])
    encoder = data.Encoder(data.resolve_model(cfg.model))
    model = train_grpo.load_model(cfg, CPU)[0]
    samples = data.load_dataset([data.demo_path("rl", "train") + "#2"], "rl", seed=0)
    longer = dataclasses.replace(samples[0], messages=[{"role": "user", "content": "<image>Look at the picture. Which "
                                                                                   "colour does the circle have?"}])
    alone, _ = train_grpo.rollout(model, encoder, [samples[1]], cfg, CPU, seeds=[5, 6])
    together, _ = train_grpo.rollout(model, encoder, [longer, samples[1]], cfg, CPU, seeds=[1, 2, 5, 6])
    cfg.generation_batch_size = 1
    one_by_one, _ = train_grpo.rollout(model, encoder, [longer, samples[1]], cfg, CPU, seeds=[1, 2, 5, 6])
    assert together[2:] == alone and one_by_one == together
    assert train_grpo.rollout(model, encoder, [samples[1]], cfg, CPU, seeds=[7, 8])[0] != alone


@pytest.mark.parametrize("script, model_name, attention", [(train_grpo, "tiny-qwen2.5-vl", "varlen"),
                                                         (train_grpo, "tiny-qwen3-vl", "varlen"),
                                                         (train_grpo, "tiny-qwen2.5-vl", "eager")])
def test_generate_matches_transformers_generate(script, model_name, attention, media):
    """generate (prefill into a static KV cache, then each token through the language model alone) completes left-padded
    image, video and text prompts token for token as transformers' generate does: greedy, seeded sampling, repetition
    penalty."""
    import dataclasses

    from transformers import GenerationConfig

    encoder = data.Encoder(data.resolve_model(model_name))
    cfg = script.parse_config(["--model", model_name, "--attn_implementation", attention])
    model = script.load_model(cfg, CPU)[0].eval()
    samples = data.load_dataset([data.demo_path("rl", "train") + "#2"], "rl", seed=0)
    longer = dataclasses.replace(samples[0], messages=[{"role": "user", "content": "<image>Look at the picture. Which "
                                                                                   "colour does the circle have?"}])
    video = dataclasses.replace(samples[0], messages=[{"role": "user", "content": "<video>Which colour is this?"}],
                                images=[], videos=[media["video.avi"]])
    prompts = [encoder(s, **script.PROMPT) for s in (longer, video, samples[1])]
    stop, pad = script.stop_tokens(encoder), encoder.tokenizer.pad_token_id
    suppressed = [encoder.image_pad, encoder.video_pad]

    def transformers_generate(rows, new_tokens, sampler=None, penalty=1.0):
        width = max(len(e["input_ids"]) for e in rows)
        input_ids = torch.stack([torch.cat([torch.full((width - len(e["input_ids"]),), pad), e["input_ids"]]) for e in rows])
        mask = torch.stack([torch.arange(width) >= width - len(e["input_ids"]) for e in rows]).long()
        keys = data.VISION_KEYS + (("second_per_grid_ts",) if encoder.model_type != "qwen3_vl" else ())  # video rope spacing
        vision = {k: torch.cat([e[k] for e in rows if k in e]) for k in keys if any(k in e for e in rows)}
        mm_token_type_ids = (input_ids == encoder.image_pad).int() + 2 * (input_ids == encoder.video_pad).int()
        config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=stop, pad_token_id=pad,
                                  suppress_tokens=suppressed, repetition_penalty=penalty, use_cache=True)
        out = model.generate(input_ids=input_ids, attention_mask=mask, mm_token_type_ids=mm_token_type_ids,
                             **vision, generation_config=config,
                             logits_processor=[lambda ids, scores: sampler(scores)] if sampler else [])
        return [row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in out[:, width:].tolist()]

    def ours(rows, new_tokens, sampler=None, penalty=1.0):
        return script.generate(model, rows, new_tokens, stop, pad, suppressed, sampler, penalty)

    sampler = lambda: script.SeededSampler([3, 4, 5], 1.0, 0, 1.0, CPU)
    for rows, new_tokens, kwargs in [(prompts, 20, {}), (prompts, 8, {"sampler": sampler}), (prompts[:1], 20, {"penalty": 1.5})]:
        expected = transformers_generate(rows, new_tokens, **{k: v() if callable(v) else v for k, v in kwargs.items()})
        got = ours(rows, new_tokens, **{k: v() if callable(v) else v for k, v in kwargs.items()})
        assert got == expected and max(map(len, got)) > 4, kwargs
    # the penalty is applied (it changes the greedy completion of this prompt)
    assert ours(prompts[:1], 20, penalty=1.5) != ours(prompts[:1], 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_rollout_gives_the_eager_loops_completions():
    """On a GPU the decode step is recorded once as a CUDA graph and replayed; --cuda_graph false runs the same loop
    eagerly. Both give the same completions, greedy and seeded (an FSDP2 group of one, as a one-GPU run is)."""
    import torch.distributed as dist

    cuda = torch.device("cuda")
    cfg = train_grpo.parse_config(["--train_type", "lora", "--num_generations", "4", "--max_completion_length", "40"])
    encoder = data.Encoder(data.resolve_model(cfg.model))
    samples = data.load_dataset([data.demo_path("rl", "train") + "#2"], "rl", seed=0)
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = train_grpo.shard_model(train_grpo.load_model(cfg, cuda)[0], cfg, cuda)
        runs = {}
        for graph in (True, False):
            cfg.cuda_graph = graph
            runs[graph] = [train_grpo.rollout(model, encoder, samples, cfg, cuda, seeds=list(range(8)))[0],
                           train_grpo.rollout(model, encoder, samples, cfg, cuda, greedy=True)[0]]
    finally:
        dist.destroy_process_group()
    assert runs[True] == runs[False] and max(map(len, runs[True][0])) > 16


def test_sharded_rollout_gathers_each_unit_once(monkeypatch):
    """Under FSDP2 the rollout gathers every unit's weights once for the whole generation (not at every new token),
    gives the same completions as the unsharded policy, and leaves the units resharded as shard_model set them."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    script = train_grpo
    cfg = script.parse_config(["--num_generations", "2", "--max_completion_length", "6"])
    encoder = data.Encoder(data.resolve_model(cfg.model))
    samples = data.load_dataset([data.demo_path("rl", "train") + "#1"], "rl", seed=0)
    plain, _ = script.rollout(script.load_model(cfg, CPU)[0], encoder, samples, cfg, CPU, seeds=[1, 2])
    gathers = count_gathers(monkeypatch)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = script.shard_model(script.load_model(cfg, CPU)[0], cfg, CPU)
        gathers.clear()  # shard_model's own gather of every unit, once
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        sharded, _ = script.rollout(model, encoder, samples, cfg, CPU, seeds=[1, 2])
        assert 0 < len(gathers) <= len(units)  # once per unit; every token's forward would gather each unit again
        assert sharded == plain and max(map(len, plain)) > 1
        assert all(isinstance(p, DTensor) for p in model.parameters())  # resharded
        model(input_ids=torch.tensor([[1, 2, 3]]))
        assert all(isinstance(p, DTensor) for p in model.parameters())  # and resharding after forward again
    finally:
        dist.destroy_process_group()


def test_logprob_passes_give_the_vision_tower_its_window_order(monkeypatch):
    """The log-prob passes build Qwen2.5-VL's window order on the CPU (data.vision_windows) and hand it to the vision
    tower, which would otherwise build it from GPU tensors in every forward; the log-probabilities do not change."""
    script = train_grpo
    cfg = script.parse_config([])
    encoder = data.Encoder(data.resolve_model(cfg.model))
    assert encoder.model_type == "qwen2_5_vl"
    model = script.load_model(cfg, CPU)[0]
    samples = data.load_dataset([data.demo_path("rl", "train") + "#2"], "rl", seed=0)
    examples = [script.completion_example(encoder(s, **script.PROMPT), [11, 12, 13], encoder) for s in samples]
    seen = []
    tower = model.model.visual.forward
    monkeypatch.setattr(model.model.visual, "forward", lambda *a, **k: seen.append(set(k)) or tower(*a, **k))
    with torch.no_grad():
        given = script.completion_logps(model, examples, [3, 3], CPU, 1.0)[0]
        assert seen and set(data.WINDOW_KEYS) <= seen[-1]
        monkeypatch.setattr(data, "vision_windows", lambda batch, config: {})
        own = script.completion_logps(model, examples, [3, 3], CPU, 1.0)[0]
    assert not set(data.WINDOW_KEYS) & seen[-1]
    assert torch.equal(given, own)


# ----------------------------------------------------------------------------- DAPO's overlong filter


@pytest.mark.parametrize("model_name", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_completions_sharing_their_prompt_give_each_its_own_logps(model_name):
    """A group's completions in a micro-batch hold their image prompt once (micro_batches' heads, data.collate_shared:
    each completion attends to the first's prompt): the log-probabilities and entropies of each completion packed
    on its own; fewer tokens, one image through the vision tower; a micro-batch's heads point at its group's first."""
    cfg = train_grpo.parse_config(["--model", model_name, "--num_generations", "3", "--per_device_train_batch_size", "4",
                                   "--gradient_accumulation_steps", "3"])
    encoder = data.Encoder(data.resolve_model(model_name))
    model = train_grpo.load_model(cfg, CPU)[0].eval()
    samples = data.load_dataset([data.demo_path("rl", "train") + "#2"], "rl", seed=0)
    prompts = [encoder(s, **train_grpo.PROMPT) for s in samples]
    completions = [[11, 12, 13], [14, 15], [16, 17, 18, 19], [20, 21], [22], [23, 24, 25]]
    examples = [train_grpo.completion_example(prompts[i // 3], c, encoder) for i, c in enumerate(completions)]
    lengths, heads = [len(c) for c in completions], [0, 0, 0, 3, 3, 3]
    with torch.no_grad():
        whole = train_grpo.completion_logps(model, examples, lengths, CPU, 0.7, True)
        shared = train_grpo.completion_logps(model, examples, lengths, CPU, 0.7, True, heads)
    torch.testing.assert_close(shared[0], whole[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(shared[1], whole[1], atol=1e-5, rtol=0)
    row = data.collate_shared(examples, heads)
    assert len(row["image_grid_thw"]) == 2 and row["input_ids"].shape[1] == sum(lengths) + 2 * len(prompts[0]["input_ids"]) + 4
    batch = {"completion_ids": completions, "groups": [{"prompt": p, "sampled_logps": None} for p in prompts],
             "advantages": torch.zeros(6), "keep": torch.ones(6, dtype=torch.bool)}
    assert [mb["heads"] for mb in train_grpo.micro_batches(batch, encoder, cfg, CPU)] == [[0, 0, 0, 3], [0, 0]]
    assert train_grpo.micro_batches(batch, encoder, dataclasses.replace(cfg, attn_implementation="sdpa"), CPU)[0]["heads"] is None


def test_overlong_filter_masks_truncated_completions(monkeypatch):
    """A completion cut at max_completion_length gets no loss; one that ends with <|im_end|> at exactly that
    length is finished and keeps it."""
    encoder = data.Encoder(data.resolve_model("tiny-qwen2.5-vl"))
    red, end = encoder.tokenizer.encode("red", add_special_tokens=False)[0], encoder.im_end
    completions = [[red, red, end], [red, red, red], [end], [red, red, red]]
    texts = [encoder.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    samples = data.load_dataset([data.demo_path("rl", "train") + "#2"], "rl", seed=0)
    prompts = [encoder(s, **train_grpo.PROMPT) for s in samples]
    for overlong_filter, keep in (("true", [True, False, True, False]), ("false", [True] * 4)):
        cfg = train_grpo.parse_config(["--num_generations", "2", "--per_device_train_batch_size", "4",
                                       "--max_completion_length", "3", "--overlong_filter", overlong_filter])
        groups = train_grpo.make_groups(samples, prompts, completions, texts, torch.tensor([0.0, 1.0, 0.0, 1.0]), {}, 2)
        generated = {}
        train_grpo.note_completions(generated, groups, encoder)
        assert generated["truncated"] == [0.0, 1.0, 0.0, 1.0]
        batch = {"groups": groups, "completion_ids": completions, "advantages": torch.zeros(4),
                 "keep": train_grpo.loss_mask(groups, cfg, encoder)}
        assert batch["keep"].tolist() == keep
        assert train_grpo.micro_batches(batch, encoder, cfg, CPU)[0]["keep"].tolist() == keep  # what masks the loss


def test_vllm_comparison_from_the_update_equals_a_pass_of_its_own():
    """With one update a rollout and no entropy pass, the trainer's side of the comparison with vLLM (the truncated
    importance weights, vllm_logprob_diff) comes from the update's own forward instead of a no-grad pass of its own:
    the same numbers, the same loss, one forward fewer."""
    encoder = data.Encoder(data.resolve_model("tiny-qwen2.5-vl"))
    red, end = encoder.tokenizer.encode("red", add_special_tokens=False)[0], encoder.im_end
    completions = [[red, red, end], [red, end], [end], [red, red, red]]
    texts = [encoder.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    samples = data.load_dataset([data.demo_path("rl", "train") + "#2"], "rl", seed=0)
    prompts = [encoder(s, **train_grpo.PROMPT) for s in samples]
    g = torch.Generator().manual_seed(0)
    sampled = [(-4 - torch.rand(len(c), generator=g) * 6).tolist() for c in completions]  # "vLLM's", around the trainer's
    cfg = train_grpo.parse_config(["--num_generations", "2", "--per_device_train_batch_size", "4", "--use_vllm", "true",
                                   "--vllm_importance_sampling_correction", "true", "--vllm_importance_sampling_cap", "2"])
    model = train_grpo.load_model(cfg, CPU)[0]
    results = []
    for num_iterations in (1, 2):  # 2: fixed_logps computes the sampling policy's logps, and the comparison with them
        groups = train_grpo.make_groups(samples, prompts, completions, texts, torch.tensor([0.0, 1.0, 0.0, 1.0]), {}, 2,
                                        sampled_logps=sampled)
        batch = {"groups": groups, "completion_ids": completions, "advantages": torch.tensor([-1.0, 1.0, -1.0, 1.0]),
                 "keep": torch.ones(4, dtype=torch.bool)}
        run_cfg = dataclasses.replace(cfg, num_iterations=num_iterations)
        (mb,) = train_grpo.micro_batches(batch, encoder, run_cfg, CPU)
        train_grpo.fixed_logps(model, None, [mb], run_cfg, CPU)
        assert ("vllm_diff" in mb) == (num_iterations == 2)
        loss = train_grpo.micro_batch_loss(model, mb, 9, 1, run_cfg, CPU, 1)[0]
        results.append((loss.item(), mb["is_weights"], mb["vllm_diff"]))
    (loss_1, weights_1, diff_1), (loss_2, weights_2, diff_2) = results
    assert loss_1 == pytest.approx(loss_2, abs=1e-6) and diff_1[1] == diff_2[1] == 9
    torch.testing.assert_close(weights_1, weights_2)
    torch.testing.assert_close(diff_1, diff_2)
    assert (weights_1 == 2).any() and ((weights_1 > 0) & (weights_1 < 2)).any()  # the cap binds on some tokens only


# ----------------------------------------------------------------------------- 2 processes against 1

DISTINCT_CHARACTERS = "def distinct(completions, **kwargs):\n    return [len(set(c)) / 10 for c in completions]\n"


def test_two_processes_match_one(tmp_path, monkeypatch):
    """FSDP2 over 2 processes (gloo, CPU) with 8 completions each samples the same completions as 1 process with 16
    (each has its own seed) and gives the same rewards, losses and gradient norms, before and after an update."""
    import subprocess
    import sys

    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))  # the plugin must not outlive this test
    plugin = tmp_path / "distinct.py"
    plugin.write_text(DISTINCT_CHARACTERS)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    common = SMALL + ["--max_steps", "2", "--save_steps", "0", "--eval_limit", "0", "--eval_on_start", "false",
                      "--reward_plugin", str(plugin), "--reward_funcs", "accuracy", "distinct", "--temperature", "1.5"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29537"]
    p = run_torchrun(torchrun + ["train_grpo.py"] + common + ["--per_device_train_batch_size", "8", "--output_dir", two],
                     two, cwd=root, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    train_grpo.main(common + ["--per_device_train_batch_size", "16", "--output_dir", one])  # here: no start-up to wait for
    a, b = [[m for m in read_jsonl(os.path.join(d, "metrics.jsonl")) if "loss" in m] for d in (one, two)]
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2]
    assert a[0]["reward_std"] > 0 and a[0]["grad_norm"] > 0  # something to compare
    for x, y in zip(a, b):
        for key in ("reward", "reward/distinct", "reward_std", "completion_length", "loss", "entropy", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), key


# ----------------------------------------------------------------------------- faults: SIGTERM, NaN, rewards, output_dir

# SMALL without evaluation: the fault tests time steps, not held-out prompts
FAST = SMALL + ["--eval_on_start", "false", "--eval_limit", "0", "--eval_steps", "0"]


def test_sigterm_saves_exits_and_resume_continues_exactly(three_steps, tmp_path, monkeypatch, capsys):
    """SIGTERM during step 2's rollout: step 2 finishes, checkpoint-2 is written, main returns (exit 0); resuming
    from it gives the step 3 of the uninterrupted run exactly."""
    import signal

    calls, random_reward = [], rewards.REWARDS["random"]

    def random_then_sigterm(completions, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return random_reward(completions, **kwargs)

    monkeypatch.setitem(rewards.REWARDS, "random", random_then_sigterm)
    out = str(tmp_path / "stopped")
    args = FAST + ["--max_steps", "3", "--save_steps", "100", "--output_dir", out]
    handler = signal.getsignal(signal.SIGTERM)
    assert train_grpo.main(args)["step"] == 2
    assert f"SIGTERM: saved {os.path.join(out, 'checkpoint-2')} at step 2 of 3" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is handler  # put back
    train_grpo.main(args + ["--resume_from_checkpoint", "latest"])
    first = [m for m in read_jsonl(os.path.join(three_steps, "metrics.jsonl")) if "loss" in m]
    again = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in m]
    assert [m["step"] for m in again] == [1, 2, 3]
    for x, y in zip(first, again):
        for key in ("reward", "reward/random", "completion_length", "loss", "entropy", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-6, abs=1e-9), key


def nan_loss_on(steps, monkeypatch, module=train_grpo):
    """Patch the module's grpo_loss so that its loss is NaN on the given steps (1-based; one micro-batch a step)."""
    calls, real = [], module.grpo_loss

    def grpo_loss(*args, **kwargs):
        calls.append(1)
        loss, metrics = real(*args, **kwargs)
        return (loss * math.nan if len(calls) in steps else loss), metrics

    monkeypatch.setattr(module, "grpo_loss", grpo_loss)


def all_finite(checkpoint):
    from safetensors.torch import load_file

    return all(torch.isfinite(v).all() for v in load_file(os.path.join(checkpoint, "model.safetensors")).values())


def test_nan_step_is_skipped_and_counted(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    nan_loss_on({2}, monkeypatch)
    out = str(tmp_path / "nan")
    state = train_grpo.main(FAST + ["--max_steps", "3", "--save_steps", "1", "--save_total_limit", "5", "--output_dir", out])
    assert state["step"] == 3 and state["skipped_steps"] == 1
    steps = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in m]
    assert [m["skipped_steps"] for m in steps] == [0, 1, 1] and math.isnan(steps[1]["loss"])
    weights = [load_file(os.path.join(out, f"checkpoint-{s}", "model.safetensors")) for s in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 changed nothing
    assert any(not torch.equal(weights[1][k], weights[2][k]) for k in weights[0])  # step 3 trained again
    assert all(all_finite(os.path.join(out, f"checkpoint-{s}")) for s in (1, 2, 3))


def test_nan_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    nan_loss_on({1, 2, 3}, monkeypatch)
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit, match="stopped at step 2: the loss or gradient norm was NaN/inf in 2 steps in a row"):
        train_grpo.main(FAST + ["--max_steps", "5", "--save_steps", "1", "--max_bad_steps", "2", "--output_dir", out])
    assert [m["skipped_steps"] for m in read_jsonl(os.path.join(out, "metrics.jsonl"))] == [1, 2]
    assert all_finite(os.path.join(out, "checkpoint-1"))


def test_bf16_master_weights_learn_like_fp32_and_are_saved_in_bf16(tmp_path):
    """--master_dtype bfloat16: AdamW updates the policy's bf16 weights. On-policy GRPO's loss is ~0, so the runs
    compare by their gradient norms and entropies; the reference copy (full, beta > 0) keeps its dtype."""
    from safetensors.torch import load_file

    runs = {}
    for dtype in ("float32", "bfloat16"):
        out = str(tmp_path / dtype)
        train_grpo.main(FAST + ["--max_steps", "2", "--save_steps", "2", "--beta", "0.04", "--output_dir", out,
                                "--master_dtype", dtype])
        runs[dtype] = [m for m in read_jsonl(os.path.join(out, "metrics.jsonl")) if "loss" in m]
    assert [m["step"] for m in runs["bfloat16"]] == [1, 2]
    for a, b in zip(runs["float32"], runs["bfloat16"]):
        for key in ("grad_norm", "entropy"):
            assert b[key] == pytest.approx(a[key], rel=0.03), key
    saved = load_file(os.path.join(tmp_path, "bfloat16", "checkpoint-2", "model.safetensors"))
    base = load_file(os.path.join(data.resolve_model("tiny-qwen2.5-vl"), "model.safetensors"))
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.bfloat16}
    assert any(not torch.equal(saved[k], base[k].to(torch.bfloat16)) for k in saved)  # it trained
    with pytest.raises(SystemExit, match="float32, bfloat16"):
        train_grpo.parse_config(["--master_dtype", "fp16"])


def test_vllm_tensor_parallel_needs_a_multiple_of_its_processes(monkeypatch):
    """colocate with --vllm_tensor_parallel_size N: an engine spans N training processes, so a run of a number of
    processes that N does not divide is refused before anything loads; server mode leaves it to the server."""
    flags = ["--use_vllm", "true", "--vllm_tensor_parallel_size", "2"]
    for world_size in ("1", "3"):
        monkeypatch.setenv("WORLD_SIZE", world_size)
        with pytest.raises(SystemExit, match=f"must be a multiple of it \\(this run has {world_size}"):
            train_grpo.parse_config(flags)
    assert train_grpo.parse_config(flags + ["--vllm_mode", "server"]).vllm_tensor_parallel_size == 2
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert train_grpo.parse_config(flags).vllm_tensor_parallel_size == 2


@pytest.mark.parametrize("flags", [[], ["--use_vllm", "true"], ["--use_vllm", "true", "--vllm_mode", "server", "--sleep_level", "1"]])
def test_offload_needs_a_sleeping_colocated_engine(flags):
    """--offload_model / --offload_optimizer hand the training state's GPU memory to a colocated vLLM engine while it
    generates: without one that sleeps while training they would only slow the run, so they are refused."""
    for offload in ("--offload_model", "--offload_optimizer"):
        with pytest.raises(SystemExit, match="need --use_vllm true --vllm_mode colocate --sleep_level 1"):
            train_grpo.parse_config(flags + [offload, "true"])
    assert train_grpo.parse_config(["--use_vllm", "true", "--sleep_level", "1", "--offload_model", "true"]).offload_model


FLAKY = '''
import math, time

def raises(completions, solution, **kwargs):
    return [1 / 0 for s in solution]

def sleeps(completions, **kwargs):
    time.sleep(30)
    return [0.0 for _ in completions]

def nan_on_even(completions, **kwargs):
    return [math.nan if i % 2 == 0 else 1.0 for i in range(len(completions))]
'''


def test_failing_rewards_raise_or_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))  # the plugin must not outlive this test
    monkeypatch.setattr(rewards, "_WARNED", set())
    plugin = tmp_path / "flaky.py"
    plugin.write_text(FLAKY)
    args = FAST + ["--max_steps", "1", "--reward_plugin", str(plugin), "--output_dir", str(tmp_path / "run")]
    # raise (the default): the run stops, naming the reward, the record and the cause
    with pytest.raises(RuntimeError, match=r"reward 'raises' failed on record 0: completion=.*solution='\w+', "
                                           r"prompts=.*What color.*: ZeroDivisionError"):
        train_grpo.main(args + ["--reward_funcs", "accuracy", "raises"])
    # skip: a None for the completions affected, counted per reward
    start = time.time()
    train_grpo.main(args + ["--reward_funcs", "accuracy", "raises", "sleeps", "nan_on_even", "--reward_error", "skip",
                            "--reward_timeout", "0.5"])
    assert time.time() - start < 20  # the 30 s sleep was cut short
    step = [m for m in read_jsonl(os.path.join(tmp_path / "run", "metrics.jsonl")) if "loss" in m][-1]
    assert step["reward_errors/accuracy"] == 0 and step["reward_errors/nan_on_even"] == 4  # 8 completions a step
    assert step["reward_errors/sleeps"] == step["reward_errors/raises"] == 8
    assert step["reward/nan_on_even"] == 1.0 and "reward/sleeps" not in step


def test_unwritable_output_dir_stops_before_loading_anything(tmp_path, monkeypatch):
    def load_model(*args, **kwargs):
        raise AssertionError("loaded a model before checking the output folder")

    monkeypatch.setattr(train_grpo, "load_model", load_model)
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is not writable"):
        train_grpo.main(FAST + ["--output_dir", str(tmp_path / "file" / "run")])
    # a writable one: a checkpoint whose save was killed is removed before the run starts
    stale = tmp_path / "run" / "checkpoint-7.tmp"
    stale.mkdir(parents=True)
    with pytest.raises(AssertionError, match="loaded a model"):
        train_grpo.main(FAST + ["--output_dir", str(tmp_path / "run")])
    assert not stale.exists()


def test_trust_remote_code_reaches_from_pretrained(monkeypatch):
    import importlib

    from transformers import AutoModelForImageTextToText

    script, seen = importlib.import_module("train_grpo"), []

    def from_pretrained(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise StopIteration  # enough: the call was made

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    for trust in ("true", "false"):
        cfg = script.parse_config(["--trust_remote_code", trust])
        for load in (lambda: script.load_model(cfg, CPU), lambda: script.load_reference(cfg, CPU, False)):
            with pytest.raises(StopIteration):  # the policy and the frozen reference
                load()
    assert seen == [True, True, False, False]


@pytest.mark.parametrize("module", ["train_grpo", "train_chord"])
def test_full_disk_stops_before_loading_anything(module, tmp_path, monkeypatch):
    """Too little free space for the checkpoints to come: a clear stop at once, not a failed save hours later."""
    import collections
    import importlib

    script, grpo = importlib.import_module(module), importlib.import_module("train_grpo")  # CHORD runs GRPO's setup

    def load_model(*args, **kwargs):
        raise AssertionError("loaded a model before checking the disk")

    monkeypatch.setattr(grpo, "load_model", load_model)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(grpo.shutil, "disk_usage", lambda path: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(SystemExit, match=r"GiB free, about .* GiB needed for 3 checkpoint"):
        script.main(FAST + ["--output_dir", str(tmp_path / "run")])
    monkeypatch.setattr(grpo.shutil, "disk_usage", lambda path: usage(10**12, 0, 10**12))
    with pytest.raises(AssertionError, match="loaded a model"):  # enough room: the run goes on to load the model
        script.main(FAST + ["--output_dir", str(tmp_path / "run")])
