"""vLLM rollouts (train_grpo.py --use_vllm) against the built-in rollout, on CPU with real vLLM and the tiny models: the same greedy
completions token for token on image prompts, the same log-probabilities, and the same again after the trainer's weights
change and are synced (full fine-tuning, LoRA adapter, LoRA merged); server mode against vLLM's own OpenAI server on
127.0.0.1 (weights through /dev/shm, the same runs as colocate, a server stopped mid-run, --async_generate and resume).
Skipped where vLLM is not installed; the venv:
    bash tests/vllm_venv.sh && .venv-vllm/bin/python -m pytest -q tests/test_vllm.py"""

import collections
import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("vllm")

import bench  # noqa: E402
import data  # noqa: E402
from bench import stop_vllm_server as stop_server  # noqa: E402
from conftest import run_torchrun  # noqa: E402
import train_grpo  # noqa: E402

torch.set_num_threads(1)  # before vLLM's CPU worker binds its threads: with two each, in-process generation is ~50x slower
CPU = torch.device("cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ["tiny-qwen2.5-vl", "tiny-qwen3-vl"]



def config(model_name, *args, **vllm_fields):
    """train_grpo's Config from a command line, with --use_vllm true and the vLLM fields given."""
    cfg = train_grpo.parse_config(["--model", model_name, "--max_completion_length", "12", "--use_vllm", "true", *args])
    return dataclasses.replace(cfg, **vllm_fields)


@pytest.fixture(scope="module")
def engines():
    """One engine per (model, LoRA adapters on), started on first use and shared by the module's tests."""
    started = {}

    def get(model_name, lora=False):
        if (model_name, lora) not in started:
            cfg = config(model_name, *(["--train_type", "lora"] if lora else []))
            started[model_name, lora] = train_grpo.vllm_engine(cfg, CPU, max_media=(1, 1))
        return started[model_name, lora]

    yield get
    started.clear()


@pytest.fixture(scope="module")
def prompts(media):
    """Demo prompts; one with a long preamble (vLLM's CPU backend caches prefixes in blocks of 128 tokens); the demo
    question on pictures that smart_resize scales down (300x200) and up (12x20), and on a video: each vision token
    count comes from data.py's resizing."""
    samples = data.load_dataset(["demo#2"], "rl", seed=0)
    question = samples[0].messages
    long = "<image>" + "Look at the picture and think. " * 10 + question[0]["content"].replace("<image>", "")
    extra = [dataclasses.replace(samples[0], messages=[{"role": "user", "content": long}]),  # > 1 KV block: prefix-cached
             dataclasses.replace(samples[0], images=[media["big.png"]]),
             dataclasses.replace(samples[1], images=[media["small.png"]])]
    if importlib.util.find_spec("decord"):  # data.py reads videos with decord (tests/vllm_venv.sh installs it where it can)
        extra.append(dataclasses.replace(samples[0], images=[], videos=[media["video.avi"]],
                                         messages=[{"role": "user", "content": question[0]["content"].replace("<image>", "<video>")}]))
    return samples + extra


def sync_base(llm, model_name, lora=False):
    """The engine back to the checkpoint's weights (tests share engines and change their weights)."""
    cfg = config(model_name, *(["--train_type", "lora"] if lora else []))
    model = train_grpo.load_model(cfg, CPU)[0]
    return train_grpo.vllm_sync_weights(llm, model, cfg)


def completion_logits(model, encoder, prompt, completion):
    """A plain forward of prompt + completion -> the logits that predict each completion token [len(completion), V]."""
    device = next(model.parameters()).device
    example = {k: v.to(device) for k, v in train_grpo.completion_example(prompt, completion, encoder).items()}
    ids = example["input_ids"]
    vision = {k: example[k] for k in data.VISION_KEYS if k in example}
    with torch.no_grad():
        logits = model.eval()(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None],
                              position_ids=example["position_ids"][:, None], **vision).logits[0].float().cpu()
    n = len(prompt["input_ids"])
    return logits[n - 1 : n - 1 + len(completion)]


def masked_logps(model, encoder, prompt, completion, temperature=1.0):
    """The log-probability of each completion token under softmax(logits / T) over every token but the suppressed
    vision placeholders (what both rollouts sample from)."""
    logits = completion_logits(model, encoder, prompt, completion)
    logits[:, encoder.tokenizer.convert_tokens_to_ids(train_grpo.VLLM_SUPPRESSED)] = -math.inf
    return (logits / temperature).log_softmax(-1).gather(1, torch.tensor(completion)[:, None]).squeeze(1)


def perturb(model, seed, scale=0.05):
    """Noise on every weight (relative to each weight's spread)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p.device) * scale * p.float().std().clamp(min=1e-3))


def stop_on(model, encoder, token):
    """<|im_end|>'s output row becomes 1.1 x `token`'s: where the model would say `token` (with a positive logit) it
    now ends its reply, so completions of several lengths end with the stop token."""
    with torch.no_grad():
        model.lm_head.weight[encoder.im_end] = model.lm_head.weight[token] * 1.1


@pytest.mark.parametrize("model_name", MODELS)
def test_greedy_completions_equal_builtin_rollout(engines, prompts, model_name):
    """The same prompt samples through vllm_rollout and train_grpo.rollout (greedy): the same token ids, texts, and the
    same prompt tokens (vllm_rollout raises if vLLM's processor expanded an image to other vision tokens), with the
    processor's pixel bounds and with tighter ones."""
    llm = engines(model_name)
    sync_base(llm, model_name)
    cfg = config(model_name)
    model = train_grpo.load_model(cfg, CPU)[0]
    for vision in (data.VisionConfig(), data.VisionConfig(min_pixels=28 * 28 * 4, max_pixels=56 * 84)):
        encoder = data.Encoder(data.resolve_model(model_name), vision)
        encoded = [encoder(s, **train_grpo.PROMPT) for s in prompts]
        expected, expected_texts = train_grpo.rollout(model, encoder, prompts, cfg, CPU, greedy=True, prompts=encoded)
        got, texts, logprobs = train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, greedy=True)
        assert got == expected and texts == expected_texts
        assert [len(c) for c in got] == [len(lp) for lp in logprobs] and max(map(len, got)) == cfg.max_completion_length
    assert len({len(e["input_ids"]) for e in encoded}) > 2  # the pictures and the video gave different token counts


def test_logprobs_match_the_trainer_greedy_and_sampled(engines, prompts):
    """vLLM's log-probability of each token it chose equals the trainer's (a plain forward, softmax(logits / T) without
    the suppressed tokens): greedy (T = 1), and sampled at T = 0.7, where the same seeds give the same completions and
    other seeds others."""
    model_name = "tiny-qwen2.5-vl"
    llm = engines(model_name)
    sync_base(llm, model_name)
    cfg = config(model_name, "--num_generations", "3", "--per_device_train_batch_size", "3", "--temperature", "0.7")
    model = train_grpo.load_model(cfg, CPU)[0]
    encoder = data.Encoder(data.resolve_model(model_name))
    encoded = [encoder(s, **train_grpo.PROMPT) for s in prompts[:3]]
    got, _, logprobs = train_grpo.vllm_rollout(llm, encoder, prompts[:3], encoded, cfg, greedy=True)
    for prompt, completion, lp in zip(encoded, got, logprobs):
        torch.testing.assert_close(torch.tensor(lp), masked_logps(model, encoder, prompt, completion), atol=1e-4, rtol=0)
    seeds = list(range(100, 109))
    sampled, _, logprobs = train_grpo.vllm_rollout(llm, encoder, prompts[:3], encoded, cfg, seeds=seeds)
    for i, (completion, lp) in enumerate(zip(sampled, logprobs)):
        torch.testing.assert_close(torch.tensor(lp), masked_logps(model, encoder, encoded[i // 3], completion, 0.7),
                                   atol=1e-4, rtol=0)
    again = train_grpo.vllm_rollout(llm, encoder, prompts[:3], encoded, cfg, seeds=seeds)[0]
    other = train_grpo.vllm_rollout(llm, encoder, prompts[:3], encoded, cfg, seeds=[s + 1 for s in seeds])[0]
    assert again == sampled and other != sampled and len(set(map(tuple, sampled))) > 3


@pytest.mark.parametrize("model_name", MODELS)
def test_full_weight_sync_gives_the_changed_models_completions(engines, prompts, model_name):
    """Full fine-tuning: every weight changed in the trainer, then vllm_sync_weights; vLLM's greedy completions are the
    changed model's built-in ones (and not the old ones), twice in a row (the caches were reset)."""
    llm = engines(model_name)
    sync_base(llm, model_name)
    cfg = config(model_name)
    model = train_grpo.load_model(cfg, CPU)[0]
    encoder = data.Encoder(data.resolve_model(model_name))
    encoded = [encoder(s, **train_grpo.PROMPT) for s in prompts]
    before = train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, greedy=True)[0]
    for seed in (1, 2):
        perturb(model, seed)
        expected = train_grpo.rollout(model, encoder, prompts, cfg, CPU, greedy=True, prompts=encoded)[0]
        if seed == 2:  # the second time, replies that stop: the stop token is kept, as the built-in rollout keeps it
            stop_on(model, encoder, collections.Counter(t for c in expected for t in c[2:]).most_common(1)[0][0])
            expected = train_grpo.rollout(model, encoder, prompts, cfg, CPU, greedy=True, prompts=encoded)[0]
            assert [c[-1] for c in expected].count(encoder.im_end) >= 2 and len({len(c) for c in expected}) >= 2
        assert expected != before
        assert train_grpo.vllm_sync_weights(llm, model, cfg) is None
        assert train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, greedy=True)[0] == expected
        before = expected


def test_full_sync_from_an_fsdp2_sharded_policy(engines, prompts, monkeypatch):
    """The policy sharded by train_grpo.shard_model (FSDP2 over the group of one that vLLM's in-process engine set up):
    vllm_sync_weights gathers one DTensor at a time, when vLLM asks for it (a few alive at once: vLLM buffers a fused
    layer's parts until the layer is whole), and vLLM then completes as the sharded policy does."""
    import weakref

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    model_name = "tiny-qwen2.5-vl"
    llm = engines(model_name)
    sync_base(llm, model_name)
    assert dist.is_initialized() and dist.get_world_size() == 1
    cfg = config(model_name)
    model = train_grpo.load_model(cfg, CPU)[0]
    perturb(model, 5)
    model = train_grpo.shard_model(model, cfg, CPU)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    encoder = data.Encoder(data.resolve_model(model_name))
    encoded = [encoder(s, **train_grpo.PROMPT) for s in prompts]
    expected = train_grpo.rollout(model, encoder, prompts, cfg, CPU, greedy=True, prompts=encoded)[0]
    gathered, most_alive, full_tensor = [], [0], DTensor.full_tensor

    def counted(self, *args, **kwargs):
        out = full_tensor(self, *args, **kwargs)
        gathered.append(weakref.ref(out))
        most_alive[0] = max(most_alive[0], sum(r() is not None for r in gathered))
        return out

    monkeypatch.setattr(DTensor, "full_tensor", counted)
    train_grpo.vllm_sync_weights(llm, model, cfg)
    monkeypatch.undo()
    # at most one fused layer's tensors alive at once (q, k, v weights and biases: 6), never the whole model (57)
    assert len(gathered) == len(list(model.parameters())) and most_alive[0] <= 6
    assert train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, greedy=True)[0] == expected


def test_vision_placeholders_are_never_sampled(engines, prompts):
    """A model whose top choice is often <|vision_start|> or <|image_pad|> (their output rows made 1.2 x and 1.1 x a
    common token's): neither rollout picks them, greedy (the same completions) or sampled."""
    model_name = "tiny-qwen2.5-vl"
    llm = engines(model_name)
    sync_base(llm, model_name)
    cfg = config(model_name, "--num_generations", "2")
    model = train_grpo.load_model(cfg, CPU)[0]
    encoder = data.Encoder(data.resolve_model(model_name))
    encoded = [encoder(s, **train_grpo.PROMPT) for s in prompts]
    plain = train_grpo.rollout(model, encoder, prompts, cfg, CPU, greedy=True, prompts=encoded)[0]
    common = collections.Counter(t for c in plain for t in c).most_common(1)[0][0]
    suppressed = encoder.tokenizer.convert_tokens_to_ids(train_grpo.VLLM_SUPPRESSED)
    with torch.no_grad():
        for token, factor in ((suppressed[2], 1.2), (suppressed[0], 1.1)):
            model.lm_head.weight[token] = model.lm_head.weight[common] * factor
    train_grpo.vllm_sync_weights(llm, model, cfg)
    expected = train_grpo.rollout(model, encoder, prompts, cfg, CPU, greedy=True, prompts=encoded)[0]
    assert train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, greedy=True)[0] == expected
    sampled = train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, seeds=list(range(2 * len(prompts))))[0]
    assert not {t for c in expected + sampled for t in c} & set(suppressed)
    top = [completion_logits(model, encoder, p, c).argmax(-1).tolist() for p, c in zip(encoded, expected)]
    assert sum(t in suppressed for row in top for t in row) >= 5  # unsuppressed, the model would have said them


@pytest.mark.parametrize("sync", ["adapter", "merged"])
def test_lora_sync_gives_the_adapted_models_completions(engines, prompts, sync):
    """LoRA with random non-zero A and B: the adapter as a vLLM LoRA (adapter), or merged into the base weights on the
    fly (merged); vLLM's greedy completions are the adapted model's built-in ones, not the base's, after two syncs."""
    model_name = "tiny-qwen2.5-vl"
    llm = engines(model_name, lora=sync == "adapter")
    sync_base(llm, model_name, lora=sync == "adapter")
    cfg = config(model_name, "--train_type", "lora", "--lora_rank", "8", "--lora_alpha", "16", vllm_lora_sync=sync)
    model = train_grpo.load_model(cfg, CPU)[0]
    encoder = data.Encoder(data.resolve_model(model_name))
    encoded = [encoder(s, **train_grpo.PROMPT) for s in prompts]
    base = train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, greedy=True)[0]
    assert base == train_grpo.rollout(model, encoder, prompts, cfg, CPU, greedy=True, prompts=encoded)[0]  # B = 0
    for seed in (3, 4):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in train_grpo.lora.lora_layers(model):
                layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.3)
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.3)
        expected = train_grpo.rollout(model, encoder, prompts, cfg, CPU, greedy=True, prompts=encoded)[0]
        assert expected != base
        lora_request = train_grpo.vllm_sync_weights(llm, model, cfg)
        assert (lora_request is None) == (sync == "merged")
        got = train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, greedy=True, lora_request=lora_request)[0]
        assert got == expected
        if sync == "adapter":
            assert llm.llm_engine.list_loras() == {lora_request.lora_int_id}  # the previous adapter was removed
    sync_base(llm, model_name, lora=sync == "adapter")


def test_sleep_and_wake_are_no_ops_on_cpu(engines, prompts):
    """vLLM's CPU backend has no sleep mode: vllm_sleep / vllm_wake leave the engine as it was."""
    model_name = "tiny-qwen2.5-vl"
    llm = engines(model_name)
    sync_base(llm, model_name)
    cfg = config(model_name, sleep_level=1)
    encoder = data.Encoder(data.resolve_model(model_name))
    encoded = [encoder(s, **train_grpo.PROMPT) for s in prompts[:2]]
    before = train_grpo.vllm_rollout(llm, encoder, prompts[:2], encoded, cfg, greedy=True)[0]
    train_grpo.vllm_sleep(llm, cfg)
    train_grpo.vllm_wake(llm, cfg)
    assert train_grpo.vllm_rollout(llm, encoder, prompts[:2], encoded, cfg, greedy=True)[0] == before


def test_importance_weights_and_logprob_diff():
    """w_t = min(exp(old_t - vllm_t), cap) on completion tokens, 0 elsewhere; the diff is the mean |old - vllm|."""
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, 0.0]])
    sampled = torch.tensor([[-1.5, -1.0, -0.5], [-2.0, -3.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, False]])
    weights, diff = train_grpo.vllm_importance_weights(old, sampled, mask, cap=3.0)
    torch.testing.assert_close(weights, torch.tensor([[math.exp(0.5), math.exp(-1.0), 0.0], [3.0, 1.0, 0.0]]))
    assert diff.item() == pytest.approx((0.5 + 1.0 + 1.9 + 0.0) / 4)
    assert train_grpo.vllm_logps([[-1.5, -1.0], [-2.0, -3.0]], mask).tolist() == [[-1.5, -1.0, 0.0], [-2.0, -3.0, 0.0]]



# ----------------------------------------------------------------------------- on a GPU (vLLM 0.26 on the H200s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 engine, sleep mode and CUDA-side reload need a GPU")
def test_gpu_colocate_sync_sleep_and_lora(prompts):
    """In a process group of one, as train_grpo.setup_distributed makes it on one GPU: vLLM's log-probabilities are the
    trainer's (bf16 on both sides: mean difference < 0.02); a changed policy synced in changes the completions and the
    checkpoint's weights synced back restore them exactly; so does a sync after sleeping at level 1 (which frees
    memory) and level 2; a LoRA adapter (a second engine) gives the adapted policy's log-probabilities, twice."""
    import torch.distributed as dist

    cuda = torch.device("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    model_name = "tiny-qwen2.5-vl"
    cfg = config(model_name, sleep_level=1, vllm_gpu_memory_utilization=0.2)
    llm = train_grpo.vllm_engine(cfg, cuda, max_media=(1, 1))
    encoder = data.Encoder(data.resolve_model(model_name))
    encoded = [encoder(s, **train_grpo.PROMPT) for s in prompts]
    base = train_grpo.load_model(cfg, cuda)[0]

    def diff_to_trainer(model, completions, logprobs):  # -> (mean, max) |vLLM - trainer| over the completion tokens
        with torch.autocast("cuda", dtype=torch.bfloat16):
            diffs = torch.cat([(torch.tensor(lp) - masked_logps(model, encoder, prompt, completion)).abs()
                               for prompt, completion, lp in zip(encoded, completions, logprobs)])
        return diffs.mean().item(), diffs.max().item()

    def close_to_trainer(model, completions, logprobs):  # bf16 on both sides (LoRA: vLLM's kernels, the trainer's fp32 A, B)
        mean, most = diff_to_trainer(model, completions, logprobs)
        assert mean < 0.02 and most < 0.15, (mean, most)

    first, _, logprobs = train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, greedy=True)
    close_to_trainer(base, first, logprobs)
    changed = train_grpo.load_model(cfg, cuda)[0]
    perturb(changed, 6, scale=0.3)
    train_grpo.vllm_sync_weights(llm, changed, cfg)
    second, _, logprobs = train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, greedy=True)
    assert second != first
    close_to_trainer(changed, second, logprobs)
    for level in (1, 2):
        cfg.sleep_level = level
        before = torch.cuda.mem_get_info()[0]
        train_grpo.vllm_sleep(llm, cfg)
        assert torch.cuda.mem_get_info()[0] > before + (1 << 28)  # the KV cache (and at level 2 the weights) freed
        train_grpo.vllm_wake(llm, cfg, ["weights"])
        train_grpo.vllm_sync_weights(llm, base, cfg)
        train_grpo.vllm_wake(llm, cfg, ["kv_cache"])
        assert train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, greedy=True)[0] == first, level

    cfg = config(model_name, "--train_type", "lora", vllm_gpu_memory_utilization=0.2)
    llm = train_grpo.vllm_engine(cfg, cuda, max_media=(1, 1))
    model = train_grpo.load_model(cfg, cuda)[0]
    for seed in (7, 8):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, layer in train_grpo.lora.lora_layers(model):
                for w in (layer.lora_A.weight, layer.lora_B.weight):
                    w.copy_(torch.randn(w.shape, generator=g) * 0.3)
        lora_request = train_grpo.vllm_sync_weights(llm, model, cfg)
        adapted, _, logprobs = train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, greedy=True, lora_request=lora_request)
        assert adapted != first and llm.llm_engine.list_loras() == {lora_request.lora_int_id}
        close_to_trainer(model, adapted, logprobs)
        with train_grpo.lora.disable_adapters(model):  # (the base model is far from them: the adapter was applied)
            assert diff_to_trainer(model, adapted, logprobs)[0] > 0.2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="moves the training state between the GPU and the CPU")
def test_gpu_offload_moves_the_training_state_and_back(tmp_path):
    """move_training_state under FSDP2 (a group of one, as on one GPU): to CPU, the GPU memory of the weights and
    AdamW's moments is freed; back, the policy computes what it computed before, and a step still trains; and
    train_grpo.py with --offload_model --offload_optimizer --sleep_level 1 gives the losses of the same run without."""
    import torch.distributed as dist

    cuda = torch.device("cuda")
    if not dist.is_initialized():
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    cfg = config("tiny-qwen2.5-vl", "--sleep_level", "1", "--offload_model", "true", "--offload_optimizer", "true")
    model = train_grpo.shard_model(train_grpo.load_model(cfg, cuda)[0], cfg, cuda)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    ids = torch.randint(0, 100, (1, 16), device=cuda)
    model(input_ids=ids).logits.float().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        before = model(input_ids=ids).logits.float()
    used = torch.cuda.memory_allocated()
    weight_bytes = sum(p.to_local().nbytes for p in model.parameters())  # fp32 shards
    # (AdamW's moments exist only for the weights a text-only step gave a gradient: the vision tower has none)
    moment_bytes = sum(v.nbytes for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    assert moment_bytes > weight_bytes
    train_grpo.move_training_state(model, optimizer, cfg, torch.device("cpu"))
    freed = used - torch.cuda.memory_allocated()
    assert freed >= weight_bytes + moment_bytes, (freed, weight_bytes, moment_bytes)  # (+ the allocator's rounding)
    assert all(p.to_local().device.type == "cpu" for p in model.parameters())
    assert all(v.device.type == "cpu" for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    train_grpo.move_training_state(model, optimizer, cfg, cuda)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits.float(), before)
    model(input_ids=ids).logits.float().mean().backward()
    optimizer.step()  # (fused AdamW needs its state on the parameters' device: it is)

    args = ["--dataset", "demo#8", "--val_dataset", "demo#2", "--num_workers", "0", "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--max_completion_length", "6", "--max_steps", "3", "--eval_steps", "0",
            "--save_steps", "0", "--use_vllm", "true", "--vllm_gpu_memory_utilization", "0.2", "--sleep_level", "1",
            "--reward_funcs", "random", "--learning_rate", "1e-2"]
    runs = []
    for name, extra in (("plain", []), ("offload", ["--offload_model", "true", "--offload_optimizer", "true"])):
        subprocess.run([sys.executable, "train_grpo.py", *args, *extra, "--output_dir", str(tmp_path / name)], cwd=ROOT,
                       check=True)
        runs.append([json.loads(line) for line in open(tmp_path / name / "metrics.jsonl") if '"loss"' in line])
    for a, b in zip(*runs):
        assert a["reward"] == b["reward"] and a["loss"] == pytest.approx(b["loss"], abs=1e-5)


# ----------------------------------------------------------------------------- server mode: vLLM's own OpenAI server


def start_server(cfg, log_name, max_media=(1, 0)):
    """vLLM's OpenAI server for cfg on 127.0.0.1 at a free port, as bench.py starts one on CPU (train_grpo's printed
    command plus vLLM's CPU settings). -> (the config that reaches it, with served_model; the process)"""
    cfg = dataclasses.replace(cfg, vllm_mode="server", vllm_server_port=bench.free_port(), vllm_server_timeout=120)
    log_path = os.path.join(os.path.dirname(data.resolve_model(cfg.model)), f"vllm-server-{log_name}-{cfg.vllm_server_port}.log")
    process, cfg.served_model = bench.start_vllm_server(cfg, log_path, *bench.VLLM_ON_CPU, max_media=max_media)
    return cfg, process


@pytest.fixture(scope="module")
def server():
    """The module's server of the tiny Qwen2.5-VL, started as a LoRA run's command says (vLLM's LoRA on, adapters
    loaded at run time), so that it serves full and LoRA runs, with room for an image and a video a prompt.
    -> (the config that reaches it, the process)"""
    cfg, process = start_server(config("tiny-qwen2.5-vl", "--train_type", "lora"), "module", max_media=(1, 1))
    cfg.train_type = "full"
    try:
        yield cfg, process
    finally:
        if process.poll() is None:
            stop_server(process)


def server_sync_base(cfg):
    """The server back to the checkpoint's weights (the tests share it; a full run leaves its policy there)."""
    model = train_grpo.load_model(config(cfg.model), CPU)[0]
    vllm = types.SimpleNamespace(lora_name=None, run_id="test", weights_root=None)
    train_grpo.vllm_server_sync_local(vllm, model, dataclasses.replace(cfg, train_type="full"), 0, 0, torch.float32)


def test_server_rollouts_equal_colocate(engines, prompts, server):
    """The same prompts (images; a video, sent as its sampled frames) through the server and through the in-process
    engine: the same prompt tokens (checked inside), the same greedy completions (the built-in rollout's), the same
    log-probabilities; sampled with the same seeds, the same completions (one vLLM sampler, one seed per request)."""
    cfg, _ = server
    llm = engines("tiny-qwen2.5-vl")
    sync_base(llm, "tiny-qwen2.5-vl")
    cfg.num_generations, cfg.temperature = 2, 0.8
    encoder = data.Encoder(data.resolve_model(cfg.model))
    encoded = [encoder(s, **train_grpo.PROMPT) for s in prompts]
    model = train_grpo.load_model(config(cfg.model), CPU, False)[0]
    expected = train_grpo.rollout(model, encoder, prompts, cfg, CPU, greedy=True, prompts=encoded)[0]
    got, texts, logprobs = train_grpo.vllm_server_rollout(cfg.served_model, encoder, prompts, encoded, cfg, greedy=True)
    local, _, local_logprobs = train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, greedy=True)
    assert got == expected == local
    for a, b in zip(logprobs, local_logprobs):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=1e-5, rtol=0)
    seeds = list(range(7, 7 + 2 * len(prompts)))
    paths = []
    with pytest.MonkeyPatch.context() as mp:  # one request a prompt, for both its completions
        send = train_grpo.vllm_server_request
        mp.setattr(train_grpo, "vllm_server_request", lambda cfg, path, body=None: paths.append(path) or send(cfg, path, body))
        sampled = train_grpo.vllm_server_rollout(cfg.served_model, encoder, prompts, encoded, cfg, seeds=seeds)[0]
    assert paths == ["/v1/chat/completions"] * len(prompts) and len(sampled) == 2 * len(prompts)
    assert sampled == train_grpo.vllm_rollout(llm, encoder, prompts, encoded, cfg, seeds=seeds)[0] and sampled != got[:1] * len(got)


@pytest.mark.skipif(not importlib.util.find_spec("decord"), reason="data.py reads videos with decord")
def test_server_sends_qwen3_vl_videos_as_colocate_does(engines, prompts):
    """Qwen3-VL writes a timestamp and a vision pair per frame pair into the prompt, from the frames' indices and fps:
    a server of the tiny Qwen3-VL, started with room for a video (so trusting a request's media_io_kwargs and chat
    template), gets the video prompt's tokens (checked inside: without the template sent, vLLM's has two vision
    tokens more, 63 against 61) and gives the greedy completions of the in-process engine and the built-in rollout."""
    cfg, process = start_server(config("tiny-qwen3-vl"), "qwen3-video", max_media=(1, 1))
    try:
        videos = [s for s in prompts if s.videos]
        encoder = data.Encoder(data.resolve_model(cfg.model))
        encoded = [encoder(s, **train_grpo.PROMPT) for s in videos]
        model = train_grpo.load_model(config(cfg.model), CPU, False)[0]
        expected = train_grpo.rollout(model, encoder, videos, cfg, CPU, greedy=True, prompts=encoded)[0]
        llm = engines("tiny-qwen3-vl")
        sync_base(llm, "tiny-qwen3-vl")
        assert train_grpo.vllm_server_rollout(cfg.served_model, encoder, videos, encoded, cfg, greedy=True)[0] == expected
        assert train_grpo.vllm_rollout(llm, encoder, videos, encoded, cfg, greedy=True)[0] == expected
    finally:
        stop_server(process)


def test_server_refuses_two_videos_in_a_prompt(prompts, media):
    """Before any request: the frames' indices and fps go per request, so one video a prompt."""
    cfg = config("tiny-qwen2.5-vl", vllm_mode="server")
    two = dataclasses.replace(prompts[0], images=[], videos=[media["video.avi"]] * 2,
                              messages=[{"role": "user", "content": "<video><video>What is it?"}])
    with pytest.raises(NotImplementedError, match="more than one video"):
        train_grpo.vllm_server_rollout("absent", data.Encoder(data.resolve_model(cfg.model)), [two], None, cfg, greedy=True)


def test_server_errors_name_the_server(server, prompts):
    """No server at the address: the run stops at once with the command (and environment) that starts one. (A server
    that stops answering mid-run: test_server_stopped_mid_run_says_where_to_resume.)"""
    cfg, _ = server
    absent = types.SimpleNamespace(**{**vars(cfg), "vllm_server_port": cfg.vllm_server_port + 1, "vllm_server_timeout": 1})
    with pytest.raises(SystemExit, match=rf"(?s)no vLLM server at 127.0.0.1:{absent.vllm_server_port} .*VLLM_SERVER_DEV_MODE=1 python -m vllm.entrypoints.openai.api_server"):
        train_grpo.vllm_server_wait(absent)
    lora = dataclasses.replace(cfg, train_type="lora", lora_rank=12)  # a LoRA run on this machine: vLLM's LoRA, rank 16
    assert "--enable-lora" in train_grpo.vllm_server_command(lora) and "16" in train_grpo.vllm_server_command(lora)
    assert train_grpo.vllm_server_env(lora)["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    remote = dataclasses.replace(cfg, vllm_server_host="192.0.2.1")  # elsewhere: NCCL (TEST-NET-1: no such host here)
    assert not train_grpo.vllm_server_local(remote) and "--weight-transfer-config" in train_grpo.vllm_server_command(remote)
    assert "--weight-transfer-config" not in train_grpo.vllm_server_command(cfg) and train_grpo.vllm_server_local(cfg)
    # NCCL to a server on this machine (another GPU), when asked: the command's transfer engine, LoRA sent merged; on
    # CPU the run stops before it waits for a server
    nccl = dataclasses.replace(lora, vllm_server_weight_transfer="nccl")
    assert "--weight-transfer-config" in train_grpo.vllm_server_command(nccl) and not train_grpo.vllm_server_shm(nccl)
    assert "--enable-lora" not in train_grpo.vllm_server_command(nccl) and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in train_grpo.vllm_server_env(nccl)
    with pytest.raises(SystemExit, match="would go over NCCL, which needs GPUs"):
        train_grpo.start_vllm(nccl, CPU, 0, prompts, False, None, None)
    # a request's media_io_kwargs (a video's frames) and chat template (Qwen3-VL's) need a server that trusts them
    for flag in ("--trust-request-mm-kwargs", "--trust-request-chat-template"):
        assert flag in train_grpo.vllm_server_command(cfg, (1, 1)) and flag not in train_grpo.vllm_server_command(cfg, (1, 0))


# a short server-mode run: 2 prompts x 4 completions a step, a high learning rate (the policy moves fast: a step whose
# weights did not reach the server shows as a vllm_logprob_diff 10x larger)
SERVER_RUN = ["--dataset", "demo#8", "--val_dataset", "demo#2", "--num_workers", "0", "--num_generations", "4",
              "--per_device_train_batch_size", "8", "--max_completion_length", "6", "--eval_steps", "0",
              "--eval_on_start", "false", "--learning_rate", "1e-2", "--use_vllm", "true"]


def run_grpo(out, *args, env=None):
    """train_grpo.py in a process of its own, as a user runs it (this one holds the module's engines and their process
    group), with 2 tries per server request (a server that is gone fails in 1 s). -> (the process, its metric rows
    with a loss)"""
    code = "import sys, train_grpo; train_grpo.VLLM_SERVER_RETRIES = 2; train_grpo.main(sys.argv[1:])"
    p = subprocess.run([sys.executable, "-c", code, *SERVER_RUN, "--output_dir", str(out), *args], cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True)
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")] if (out / "metrics.jsonl").exists() else []
    return p, [r for r in rows if "loss" in r]


def server_args(cfg):
    return ["--vllm_mode", "server", "--vllm_server_port", str(cfg.vllm_server_port)]


@pytest.mark.parametrize("train_type", ["lora", "full"])  # (LoRA first: it needs the server's base weights)
def test_server_run_syncs_the_policy(tmp_path, server, train_type):
    """train_grpo.py against a server on this machine, weights through /dev/shm: every step's weights reach the server
    (vllm_logprob_diff stays as small as at the first step while the policy moves), and after the run the server's
    greedy completions are those of the policy it was last sent (checkpoint-2: the run's last rollout was step 3's),
    not the base model's. LoRA: the adapter is the newest on the server, the earlier ones unloaded."""
    cfg, _ = server
    server_sync_base(cfg)
    p, steps = run_grpo(tmp_path, *server_args(cfg), "--train_type", train_type, "--max_steps", "3", "--save_steps", "2",
                        "--reward_funcs", "random")
    assert p.returncode == 0, p.stderr[-3000:]
    diffs = [r["vllm_logprob_diff"] for r in steps]
    assert len(steps) == 3 and diffs[0] < 0.02 and all(d < 2 * diffs[0] for d in diffs), diffs
    assert all(r["weight_sync_s"] > 0 and r["rollout_wait_s"] > 0 for r in steps)  # (the first step syncs too)
    policy_cfg = config(cfg.model, "--train_type", train_type)
    checkpoint = str(tmp_path / "checkpoint-2")
    policy = train_grpo.load_model(policy_cfg, CPU, checkpoint if train_type == "full" else None)[0]
    if train_type == "lora":
        assert not policy.load_state_dict(train_grpo.lora.read_adapter_weights(checkpoint), strict=False).unexpected_keys
    served = [m["id"] for m in train_grpo.vllm_server_request(cfg, "/v1/models")["data"]]
    name = served[-1] if train_type == "lora" else cfg.served_model
    if train_type == "lora":  # the adapter of step 2's sync, and none of the run's earlier ones
        assert name.startswith("policy-") and name.endswith("-2"), served
        assert [n for n in served if n.startswith(name[: -len("2")])] == [name], served
    samples = data.load_dataset(["demo#6"], "rl", seed=0)
    encoder = data.Encoder(data.resolve_model(cfg.model))
    encoded = [encoder(s, **train_grpo.PROMPT) for s in samples]
    expected = train_grpo.rollout(policy, encoder, samples, policy_cfg, CPU, greedy=True, prompts=encoded)[0]
    base = train_grpo.rollout(train_grpo.load_model(policy_cfg, CPU)[0], encoder, samples, policy_cfg, CPU, greedy=True,
                              prompts=encoded)[0]
    assert train_grpo.vllm_server_rollout(name, encoder, samples, encoded, cfg, greedy=True)[0] == expected != base


def distinct_plugin(tmp_path):
    plugin = tmp_path / "distinct.py"
    plugin.write_text("def distinct(completions, **kwargs):\n    return [len(set(c)) / 10 for c in completions]\n")
    return ["--reward_plugin", str(plugin), "--reward_funcs", "distinct"]


def test_server_run_equals_colocate(tmp_path, server):
    """The same run (a reward of the completions' text, sampled at temperature 1) with the server and with colocated
    vLLM: the same rewards, losses, gradient norms and vLLM log-probability diffs, step by step; the two sample with one
    vLLM sampler and one seed per completion, and get the same weights after every step."""
    cfg, _ = server
    args = [*distinct_plugin(tmp_path), "--max_steps", "3", "--save_steps", "0"]
    runs = [run_grpo(tmp_path / mode, *args, *(server_args(cfg) if mode == "server" else [])) for mode in ("server", "colocate")]
    assert all(p.returncode == 0 for p, _ in runs), [p.stderr[-3000:] for p, _ in runs]
    (_, served), (_, colocated) = runs
    assert len(served) == len(colocated) == 3 and len({r["reward"] for r in served}) > 1
    for a, b in zip(served, colocated):
        for key in ("reward", "loss", "grad_norm", "vllm_logprob_diff"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_server_stopped_mid_run_says_where_to_resume(tmp_path, server):
    """A server that goes away mid-run (stopped by the reward function of the third rollout, whose step still trains
    and saves checkpoint-3): the next request is retried, then the run stops with an error that names the server, the
    step and the checkpoint to resume from; the same command with --resume_from_checkpoint, against a server again (the
    module's), continues from there to the end. This server is started as a full run's command says. (SIGTERM, and the
    reward waits until the port refuses: a SIGKILLed vLLM leaves its shared memory in /dev/shm.)"""
    own, process = start_server(config("tiny-qwen2.5-vl"), "stopped")
    plugin = tmp_path / "stop.py"
    plugin.write_text(
        "import os, signal, socket, time\ncalls = 0\n\n"
        "def stop_server(completions, **kwargs):\n    global calls\n    calls += 1\n    if calls == 3:\n"
        "        os.killpg(int(os.environ['SERVER_PGID']), signal.SIGTERM)\n        while True:\n            try:\n"
        "                socket.create_connection(('127.0.0.1', int(os.environ['SERVER_PORT'])), timeout=1).close()\n"
        "                time.sleep(0.2)\n            except OSError:\n                break\n"
        "    return [float(len(c) % 3) for c in completions]\n")
    args = ["--max_steps", "4", "--save_steps", "1", "--reward_plugin", str(plugin), "--reward_funcs", "stop_server"]
    try:
        p, steps = run_grpo(tmp_path, *args, *server_args(own),
                            env={"SERVER_PGID": str(process.pid), "SERVER_PORT": str(own.vllm_server_port)})
    finally:
        try:
            process.wait(timeout=60)  # (stopped by the reward function)
        except subprocess.TimeoutExpired:
            stop_server(process)
    message = p.stderr.strip().splitlines()[-1]
    assert p.returncode != 0 and len(steps) == 3, p.stderr[-3000:]
    assert f"vLLM server http://127.0.0.1:{own.vllm_server_port}/" in message and "after 2 tries" in message, message
    assert f"at step 3 of 4" in message and f"--resume_from_checkpoint {tmp_path / 'checkpoint-3'}" in message, message
    cfg, _ = server
    p, steps = run_grpo(tmp_path, *args, *server_args(cfg), "--resume_from_checkpoint", str(tmp_path / "checkpoint-3"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and [r["step"] for r in steps] == [1, 2, 3, 4] and (tmp_path / "checkpoint-4").is_dir()


def test_async_generate_is_one_step_off_and_resumes(tmp_path, server):
    """--async_generate: each step's rollout is generated while the step before trains, with that step's weights.
    vllm_logprob_diff shows it: as small as synchronous at the first step (on-policy), 10x larger after (the policy one
    step on; a high learning rate); the trainer hardly waits for the rollout. A run resumed from checkpoint-2 draws
    the same prompts and seeds as the uninterrupted run at every step; its first rollout (step 3's) is generated with
    the checkpoint's weights rather than the step before's, so it may differ, and the one after is the same again
    (both were generated with the weights of checkpoint-2)."""
    cfg, _ = server
    args = [*distinct_plugin(tmp_path), *server_args(cfg), "--async_generate", "true", "--max_steps", "4",
            "--save_steps", "2", "--log_completions", "true"]
    p, steps = run_grpo(tmp_path / "run", *args)
    assert p.returncode == 0, p.stderr[-3000:]
    diffs = [r["vllm_logprob_diff"] for r in steps]
    assert len(steps) == 4 and diffs[0] < 0.02 and all(d > 5 * diffs[0] for d in diffs[1:]), diffs
    assert all("rollout_wait_s" in r for r in steps)
    p, resumed = run_grpo(tmp_path / "resumed", *args, "--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-2"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in resumed] == [3, 4] and resumed[0]["vllm_logprob_diff"] < 0.02  # (on-policy again)
    rows = {name: collections.defaultdict(list) for name in ("run", "resumed")}
    for name in rows:
        for line in open(tmp_path / name / "completions.jsonl"):
            row = json.loads(line)
            rows[name][row["step"]].append(row)
    for step in (2, 3):
        assert [r["prompt"] for r in rows["run"][step]] == [r["prompt"] for r in rows["resumed"][step]]
    assert [r["completion"] for r in rows["run"][3]] == [r["completion"] for r in rows["resumed"][3]]
    assert [r["reward"] for r in rows["run"][3]] == [r["reward"] for r in rows["resumed"][3]]


def test_async_generate_needs_the_server():
    """--async_generate without a server to generate beside the training, or with DAPO's dynamic sampling: refused."""
    with pytest.raises(SystemExit, match="needs --use_vllm true --vllm_mode server"):
        train_grpo.parse_config(["--async_generate", "true", "--use_vllm", "true"])
    with pytest.raises(SystemExit, match="--async_generate with --dynamic_sample"):
        train_grpo.parse_config(["--async_generate", "true", "--use_vllm", "true", "--vllm_mode", "server",
                                 "--dynamic_sample", "true"])


# ----------------------------------------------------------------------------------------------------------------
# the whole loop: train_grpo.main with --use_vllm true


@pytest.mark.parametrize("train_type", ["full", "lora", "full-offload"])
def test_main_with_vllm_keeps_vllm_on_the_policy(tmp_path, train_type):
    """A CPU run of train_grpo.py with colocated vLLM: after every optimizer step the weights reach the engine, so
    vLLM's log-probabilities of its own samples stay as close to the trainer's as before the first step while the
    policy moves fast (random rewards, a high learning rate: a missed sync shows as a diff 10x larger), with truncated
    importance sampling on; the run writes its metrics and checkpoint as a built-in run does. (The diff is not 0:
    vLLM samples with the vision placeholders suppressed, the trainer scores over the whole vocabulary, and the tiny
    random model puts ~1% of its mass on those 4 tokens.)"""
    args = ["--dataset", "demo#8", "--val_dataset", "demo#2", "--num_workers", "0", "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--max_completion_length", "6", "--max_steps", "3", "--eval_steps", "0",
            "--save_steps", "3", "--learning_rate", "1e-2", "--use_vllm", "true", "--train_type", train_type,
            "--vllm_importance_sampling_correction", "true", "--reward_funcs", "random", "--output_dir", str(tmp_path)]
    if train_type == "full-offload":  # (CPU: the state stays where it is and vLLM has no sleep mode: the wiring only)
        args[args.index("full-offload")] = "full"
        args += ["--sleep_level", "1", "--offload_model", "true", "--offload_optimizer", "true"]
    # a process of its own, as a user runs it (this one holds the module's engines and their process group)
    subprocess.run([sys.executable, "train_grpo.py", *args], cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in steps)
    diffs = [r["vllm_logprob_diff"] for r in steps]
    assert diffs[0] < 0.02 and all(d < 2 * diffs[0] for d in diffs), diffs
    assert steps[0]["weight_sync_s"] < 1e-3 < steps[1]["weight_sync_s"]  # a fresh engine has the checkpoint's weights
    assert (tmp_path / "checkpoint-3").is_dir()


def test_eval_generator_syncs_the_policy_then_generates_with_the_engine(engines, prompts):
    """eval_generator: the policy's weights of now into the engine (it had an older step's), then greedy completions
    from the engine, the policy's own; with --async_generate (the server is busy with the next rollout) None: the
    built-in rollout."""
    llm = engines("tiny-qwen2.5-vl")
    cfg = config("tiny-qwen2.5-vl")
    model = train_grpo.load_model(cfg, CPU)[0]
    perturb(model, 3)
    encoder = data.Encoder(data.resolve_model("tiny-qwen2.5-vl"))
    encoded = [encoder(s, **train_grpo.PROMPT) for s in prompts]
    vllm = types.SimpleNamespace(llm=llm, synced_step=4, sleeping=set(), lora_request=None, tp_group=None, lora_name=None, model_name=None)
    run = types.SimpleNamespace(cfg=cfg, model=model, optimizer=None, encoder=encoder, state={"step": 5}, device=CPU, vllm=vllm)
    generate = train_grpo.eval_generator(run)
    assert vllm.synced_step == 5
    assert generate(prompts, encoded)[0] == train_grpo.rollout(model, encoder, prompts, cfg, CPU, greedy=True, prompts=encoded)[0]
    run.cfg = dataclasses.replace(cfg, async_generate=True)
    assert train_grpo.eval_generator(run) is None
    sync_base(llm, "tiny-qwen2.5-vl")


def test_held_out_evaluation_with_vllm_equals_the_built_in_one(tmp_path):
    """With --use_vllm the held-out evaluation generates with the engine too, after the policy's weights reach it:
    the eval rewards a run logs at steps 0, 2 and 4 are those of the built-in evaluation of the same weights (the
    checkpoints), greedy replies token for token on CPU; the training around it goes on (the engine awake for it,
    then asleep again)."""
    plugin = tmp_path / "distinct.py"
    plugin.write_text("def distinct(completions, **kwargs):\n    return [len(set(c)) / 10 for c in completions]\n")
    args = ["--dataset", "demo#8", "--val_dataset", "demo#6", "--num_workers", "0", "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--max_completion_length", "6", "--max_steps", "4", "--eval_steps", "2",
            "--save_steps", "2", "--save_total_limit", "3", "--learning_rate", "1e-2", "--reward_plugin", str(plugin),
            "--reward_funcs", "distinct"]
    run = tmp_path / "run"
    subprocess.run([sys.executable, "train_grpo.py", *args, "--use_vllm", "true", "--output_dir", str(run)], cwd=ROOT,
                   check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    logged = {r["step"]: r["eval_reward"] for r in map(json.loads, open(run / "metrics.jsonl")) if "eval_reward" in r}
    assert sorted(logged) == [0, 2, 4]
    train_grpo.rewards.load_reward_plugin(str(plugin))
    encoder = data.Encoder(data.resolve_model("tiny-qwen2.5-vl"))
    for step, model_path in ((0, data.resolve_model("tiny-qwen2.5-vl")), (2, run / "checkpoint-2"), (4, run / "checkpoint-4")):
        cfg = train_grpo.parse_config([*args, "--model", str(model_path)])
        model = train_grpo.load_model(cfg, CPU)[0]
        val = data.load_train_val(cfg.dataset, cfg.val_dataset, cfg.split_dataset_ratio, "rl", cfg.seed)[1]
        built_in = train_grpo.evaluate(model, val, encoder, cfg, CPU, 0, 1, False)
        assert built_in["eval_reward"] == pytest.approx(logged[step], abs=1e-9), step
    assert len(set(logged.values())) > 1  # the policy moved between evaluations


def test_chord_with_vllm_runs(tmp_path):
    """train_chord.py gets --use_vllm through train_grpo.py: a short CPU run generates with vLLM, keeps it on the
    policy and trains on both parts (mu 0.5)."""
    args = ["--dataset", "demo#8", "--val_dataset", "demo#2", "--num_workers", "0", "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--max_completion_length", "6", "--max_steps", "2", "--eval_steps", "0",
            "--save_steps", "0", "--use_vllm", "true", "--reward_funcs", "random", "--chord_mu_peak", "0.5",
            "--chord_mu_valley", "0.5", "--chord_sft_per_device_train_batch_size", "2", "--output_dir", str(tmp_path)]
    subprocess.run([sys.executable, "train_chord.py", *args], cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    steps = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"loss"' in line]
    assert len(steps) == 2 and all(r["mu"] == 0.5 and math.isfinite(r["sft_loss"]) for r in steps)
    assert all(r["vllm_logprob_diff"] < 0.02 for r in steps) and steps[1]["weight_sync_s"] > 1e-3


def test_two_processes_with_vllm_match_one(tmp_path):
    """Colocate under torchrun (vLLM's external_launcher): 2 CPU processes, each with its own engine or sharing one
    (--vllm_tensor_parallel_size 2: each sends both processes' prompts and keeps its own completions), give the
    rewards, losses and gradient norms of 1 process with the same global batch, since each completion's vLLM request
    has its own seed whichever process sends it; the weights reach the engines (vllm_logprob_diff equal too)."""
    plugin = tmp_path / "distinct.py"
    plugin.write_text("def distinct(completions, **kwargs):\n    return [len(set(c)) / 10 for c in completions]\n")
    args = ["--dataset", "demo#8", "--val_dataset", "demo#2", "--num_workers", "0", "--num_generations", "4",
            "--max_completion_length", "6", "--max_steps", "3", "--eval_steps", "0", "--save_steps", "0", "--use_vllm",
            "true", "--reward_plugin", str(plugin), "--reward_funcs", "distinct", "--learning_rate", "1e-2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train_grpo.py", *args, "--per_device_train_batch_size", "8", "--output_dir",
                    str(tmp_path / "one")], cwd=ROOT, check=True, env=env)
    one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl") if '"loss"' in line]
    assert len(one) == 3
    for tensor_parallel in ("1", "2"):
        two = tmp_path / f"two-tp{tensor_parallel}"
        p = run_torchrun([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_grpo.py", *args,
                          "--per_device_train_batch_size", "4", "--vllm_tensor_parallel_size", tensor_parallel,
                          "--output_dir", str(two)], two, cwd=ROOT, env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        steps = [json.loads(line) for line in open(two / "metrics.jsonl") if '"loss"' in line]
        assert len(steps) == 3
        for a, b in zip(steps, one):
            assert a["reward"] == pytest.approx(b["reward"], abs=1e-6)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
            assert a["vllm_logprob_diff"] == pytest.approx(b["vllm_logprob_diff"], rel=1e-3)


def test_bench_grpo_times_vllm_rollouts(capsys, tmp_path):
    """bench.py grpo --rollouts builtin vllm vllm-merged vllm-async: a row for each of this repo's rollouts (the last
    against a vLLM server bench.py starts and stops), the vLLM rows with their weight sync and log-probability diff;
    the phases add up to the step."""
    bench.main(["grpo", "--shape", "tiny-qwen2.5-vl", "--steps", "3", "--warmup", "1", "--prompt_tokens", "48",
                "--prompts_per_step", "2", "--num_generations", "4", "--max_completion_length", "8",
                "--per_device_train_batch_size", "4", "--rollouts", "builtin", "vllm", "vllm-merged", "vllm-async", "--against",
                "--work", str(tmp_path),
                "--flags", "--num_workers", "0"])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("| GRPO")]
    header = ["workload", "framework", "step s", "vs this repo", "rollout s", "weight sync s", "log-prob s", "update s",
              "vLLM logprob diff", "mean completion tokens", "peak GiB"]
    rows = {row["framework"]: row for row in (dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines)}
    assert list(rows) == ["this repo (train_grpo.py)", "this repo (train_grpo.py), vLLM colocate",
                          "this repo (train_grpo.py), vLLM colocate, --vllm_lora_sync merged",
                          "this repo (train_grpo.py), vLLM server on CPU, --async_generate"]
    builtin, *vllm = rows.values()
    assert builtin["weight sync s"] == "" and all(0 < float(row["vLLM logprob diff"]) < 0.05 for row in vllm)
    metrics = [json.loads(line) for line in open(tmp_path / "out-grpo-vllm-async" / "metrics.jsonl") if '"loss"' in line]
    assert len(metrics) == 3 and all("rollout_wait_s" in m for m in metrics)  # (server mode's own metric)
    (command,) = [line.split() for line in out.splitlines() if "vllm.entrypoints.openai.api_server" in line]
    port = command[command.index("--port") + 1]
    with pytest.raises(ConnectionError):  # the server is gone: bench.py stopped it
        train_grpo.vllm_server_request(train_grpo.parse_config(["--vllm_server_port", port]), "/health", retries=1, timeout=5)
    for row in rows.values():
        phases = sum(float(row[p]) for p in ("rollout s", "log-prob s", "update s"))
        assert phases == pytest.approx(float(row["step s"]), abs=0.02) and float(row["mean completion tokens"]) <= 8
