"""train_sft.py end to end on the tiny model: a short run, exact resume after SIGKILL, 2 processes vs 1."""
import json
import math
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import data
import train_dpo
import train_grpo
import train_sft
from conftest import count_gathers, run_torchrun

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--dataset", "demo", "--val_dataset", "demo", "--num_workers", "0", "--eval_generate", "0",
        "--per_device_train_batch_size", "4", "--logging_steps", "1", "--learning_rate", "1e-3"]


def losses(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def small_demo_file(tmp_path, n=32, split="train"):
    """The first n demo records, with image paths made absolute."""
    src = data.demo_path("sft", split)
    out = tmp_path / f"{split}{n}.jsonl"
    with open(src) as f, open(out, "w") as g:
        for line in list(f)[:n]:
            record = json.loads(line)
            record["images"] = [os.path.join(os.path.dirname(src), p) for p in record["images"]]
            g.write(json.dumps(record) + "\n")
    return str(out)


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_short_run_writes_checkpoint_and_metrics(tmp_path, train_type):
    out = str(tmp_path / "run")
    train_sft.main(FAST + ["--dataset", small_demo_file(tmp_path), "--val_dataset", small_demo_file(tmp_path, 8, "val"), "--max_steps", "3", "--save_steps", "3",
                           "--eval_steps", "3", "--train_type", train_type, "--output_dir", out]
                   # LoRA: the decoder layers' inputs need no gradient, which reentrant checkpointing could not handle
                   + (["--gradient_checkpointing", "true"] if train_type == "lora" else []))
    ckpt = os.path.join(out, "checkpoint-3")
    assert os.path.exists(os.path.join(ckpt, "training_state.pt"))
    weights = "adapter_model.safetensors" if train_type == "lora" else "model.safetensors"
    assert os.path.exists(os.path.join(ckpt, weights))
    assert os.path.exists(os.path.join(ckpt, "tokenizer_config.json"))
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows if "loss" in r)
    assert any("eval_loss" in r for r in rows)


def test_packed_and_padded_training_give_the_same_first_loss(tmp_path):
    """The same micro-batch packed into one row or right-padded must give the same loss (attention never crosses)."""
    dataset = small_demo_file(tmp_path, 8)
    first = {}
    for packing in ("true", "false"):
        out = str(tmp_path / packing)
        train_sft.main(FAST + ["--dataset", dataset, "--val_dataset", dataset, "--max_steps", "1", "--save_steps", "100", "--packing", packing,
                               "--max_length", "4096", "--per_device_train_batch_size", "8", "--output_dir", out])
        first[packing] = losses(out)[1]
    assert abs(first["true"] - first["false"]) < 1e-5


def run_script(args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "train_sft.py")] + args, cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("train_type", ["full", "lora"])
def test_sigkill_then_resume_gives_the_same_loss_curve(tmp_path, train_type):
    dataset = small_demo_file(tmp_path)
    args = FAST + ["--dataset", dataset, "--val_dataset", small_demo_file(tmp_path, 8, "val"), "--max_steps", "8", "--save_steps", "3", "--train_type", train_type,
                   "--lora_dropout", "0.1", "--eval_steps", "100"]
    full_run = str(tmp_path / "uninterrupted")
    assert run_script(args + ["--output_dir", full_run]).wait() == 0
    killed = str(tmp_path / "killed")
    proc = run_script(args + ["--output_dir", killed])
    while not os.path.isdir(os.path.join(killed, "checkpoint-3")):  # kill as soon as the first checkpoint exists
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_script(args + ["--output_dir", killed, "--resume_from_checkpoint", "latest"])
    output = resumed.communicate()[0]
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    expected, got = losses(full_run), losses(killed)  # the killed run's log holds steps before and after the kill
    assert sorted(got) == sorted(expected) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(got[step] - expected[step]) < 1e-6, (step, got[step], expected[step])


@pytest.mark.parametrize("script", [train_sft, train_dpo, train_grpo], ids=lambda m: m.__name__)
@pytest.mark.parametrize("max_norm", [0.5, 100.0], ids=["clipped", "unclipped"])
def test_clip_grad_norm_equals_torchs(script, max_norm):
    """Each script's clip_grad_norm (one process; the shards' sum over processes is test_two_processes_match_one's):
    the norm and the clipped gradients of torch.nn.utils.clip_grad_norm_, fp32 and bf16 gradients mixed, frozen
    parameters (no gradient) left out."""
    def model_with_grads():
        g = torch.Generator().manual_seed(0)
        model = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Linear(8, 4).bfloat16(), torch.nn.Linear(4, 4)])
        model[2].requires_grad_(False)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype) if p.requires_grad else None
        return model

    ours, theirs = model_with_grads(), model_with_grads()
    norm = script.clip_grad_norm(ours, max_norm, torch.device("cpu"), distributed=False)
    expected = torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), max_norm)
    assert 1.0 < float(norm) < 100.0 and torch.equal(norm, expected)
    for a, b in zip(ours.parameters(), theirs.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("script", [train_sft, train_dpo, train_grpo], ids=lambda m: m.__name__)
@pytest.mark.parametrize("bad", ["loss", "grad_norm"])
def test_optimizer_step_skips_a_nonfinite_step(script, bad):
    """A NaN loss or gradient norm: no update (the weights and AdamW's moments and step count as they were), the
    schedule still advanced, the gradients cleared; the next finite step updates as if the bad one never came."""
    def setup():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 2)
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
        return model, optimizer, scheduler

    def backward(model, poisoned):
        loss = model(torch.ones(3, 4)).square().sum()
        (loss * math.nan if poisoned and bad == "grad_norm" else loss).backward()
        return loss.detach() * math.nan if poisoned and bad == "loss" else loss.detach()

    cfg, cpu = script.parse_config(["--max_grad_norm", "1.0"]), torch.device("cpu")
    model, optimizer, scheduler = setup()
    optimizer_step = lambda loss, sigterm=False: script.optimizer_step(model, optimizer, scheduler, loss, cfg, cpu, False, sigterm)
    grad_norm, skipped, stop = optimizer_step(backward(model, poisoned=False))
    assert math.isfinite(grad_norm) and not skipped and not stop
    weights = [p.detach().clone() for p in model.parameters()]
    moments = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}
    grad_norm, skipped, stop = optimizer_step(backward(model, poisoned=True), sigterm=True)
    assert skipped and stop and (math.isnan(grad_norm) if bad == "grad_norm" else math.isfinite(grad_norm))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), weights))
    assert all(torch.equal(optimizer.state_dict()["state"][0][k], v) for k, v in moments.items())
    assert scheduler.last_epoch == 2 and all(p.grad is None for p in model.parameters())

    # the same run without the bad step: one scheduler step fewer before the second update, so set it to match
    expected, expected_optimizer, expected_scheduler = setup()
    script.optimizer_step(expected, expected_optimizer, expected_scheduler, backward(expected, False), cfg, cpu, False, False)
    expected_scheduler.step()
    optimizer_step(backward(model, poisoned=False))
    script.optimizer_step(expected, expected_optimizer, expected_scheduler, backward(expected, False), cfg, cpu, False, False)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), expected.parameters()))


def test_two_processes_match_one(tmp_path):
    """FSDP2 over 2 processes (gloo, CPU) computes the same losses as 1 process with the same global batch."""
    dataset = small_demo_file(tmp_path)
    common = ["--dataset", dataset, "--val_dataset", small_demo_file(tmp_path, 8, "val"), "--num_workers", "0", "--eval_generate", "0",
              "--logging_steps", "1", "--max_steps", "4", "--save_steps", "100", "--eval_steps", "100", "--learning_rate", "1e-3",
              "--gradient_checkpointing", "true"]  # recomputation under FSDP2 marks no gradient ready twice
    one = str(tmp_path / "one")
    p = run_script(common + ["--per_device_train_batch_size", "8", "--output_dir", one])
    assert p.wait() == 0, p.stdout.read()
    two = str(tmp_path / "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    p = run_torchrun(torchrun + [os.path.join(ROOT, "train_sft.py")] + common + ["--per_device_train_batch_size", "4",
                     "--output_dir", two], two, cwd=ROOT)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


@pytest.mark.parametrize("model_name", ["tiny-qwen2.5-vl", "tiny-qwen3-vl"])
def test_partial_checkpointing_and_compile_change_speed_not_results(tmp_path, model_name):
    """--gradient_checkpointing_layers N recomputes exactly the first N decoder layers; with --compile as well (decoder
    layers and vision blocks), the losses are those of a plain run (packed rows of several image examples, so the
    compiled layers and blocks see the boundaries)."""
    from torch._dynamo.utils import counters

    cfg = train_sft.parse_config(FAST + ["--model", model_name, "--gradient_checkpointing", "true",
                                         "--gradient_checkpointing_layers", "1"])
    model, _, _ = train_sft.load_model(cfg, torch.device("cpu"))
    assert [layer.gradient_checkpointing for layer in model.model.language_model.layers] == [True, False]
    for layer in [*model.model.language_model.layers, *model.model.visual.blocks]:  # as main() does
        layer.compile(dynamic=True)
    graphs = counters["stats"]["unique_graphs"]
    prompt = data.load_dataset([data.demo_path("sft", "val") + "#1"], "sft", seed=0)[0]
    prompt = data.Sample(prompt.messages[:-1], prompt.images, prompt.videos)
    train_sft.generate(model, data.Encoder(data.resolve_model(cfg.model)), [prompt], torch.device("cpu"), 4, False)
    assert counters["stats"]["unique_graphs"] == graphs  # generation keeps the compiled layers eager
    train, val = small_demo_file(tmp_path, 16), small_demo_file(tmp_path, 4, "val")
    common = FAST + ["--model", model_name, "--dataset", train, "--val_dataset", val, "--max_steps", "2", "--save_steps", "0",
                     "--packing", "true"]
    train_sft.main(common + ["--output_dir", str(tmp_path / "plain")])
    train_sft.main(common + ["--output_dir", str(tmp_path / "fast"), "--gradient_checkpointing", "true",
                             "--gradient_checkpointing_layers", "1", "--compile", "true"])
    plain, fast = losses(str(tmp_path / "plain")), losses(str(tmp_path / "fast"))
    assert list(plain) == [1, 2] and all(abs(plain[s] - fast[s]) < 1e-4 * abs(plain[s]) for s in plain)


@pytest.mark.parametrize("report_to", ["wandb", "tensorboard"])
def test_report_to_sends_every_logged_metric(tmp_path, monkeypatch, report_to):
    """--report_to wandb|tensorboard: every metrics.jsonl line goes to the tracker with its step (stand-in modules
    record the calls, so the test needs neither package installed)."""
    import types

    sent = []
    if report_to == "wandb":
        run = types.SimpleNamespace(log=lambda metrics, step: sent.extend((step, k, v) for k, v in metrics.items()),
                                    finish=lambda: sent.append("closed"))
        monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run))
    else:
        class SummaryWriter:
            def __init__(self, log_dir):
                assert log_dir == out

            def add_scalar(self, key, value, step):
                sent.append((step, key, value))

            def close(self):
                sent.append("closed")

        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    out = str(tmp_path / "run")
    train_sft.main(FAST + ["--dataset", small_demo_file(tmp_path, 16), "--val_dataset", small_demo_file(tmp_path, 4, "val"),
                           "--max_steps", "2", "--save_steps", "0", "--eval_steps", "2", "--report_to", report_to,
                           "--output_dir", out])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logged = [(m["step"], k, v) for m in map(json.loads, f) for k, v in m.items()]
    assert sent[-1] == "closed"  # closed at the end, or the last metrics may never reach the tracker's files
    assert sorted(sent[:-1], key=str) == sorted(logged, key=str) and any(k == "eval_loss" for _, k, _ in logged)


def test_bf16_master_weights_learn_like_fp32_and_are_saved_in_bf16(tmp_path):
    """--master_dtype bfloat16: AdamW updates bf16 weights and keeps bf16 moments (half the memory of fp32)."""
    from safetensors.torch import load_file

    common = FAST + ["--dataset", small_demo_file(tmp_path, 16), "--val_dataset", small_demo_file(tmp_path, 4, "val"),
              "--max_steps", "3", "--save_steps", "3"]
    train_sft.main(common + ["--output_dir", str(tmp_path / "fp32")])
    train_sft.main(common + ["--output_dir", str(tmp_path / "bf16"), "--master_dtype", "bfloat16"])
    fp32, bf16 = losses(str(tmp_path / "fp32")), losses(str(tmp_path / "bf16"))
    assert list(bf16) == [1, 2, 3] and all(abs(fp32[s] - bf16[s]) < 0.03 * fp32[s] for s in fp32), (fp32, bf16)
    assert bf16[3] < bf16[1]
    saved = load_file(str(tmp_path / "bf16" / "checkpoint-3" / "model.safetensors"))
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.bfloat16}
    with pytest.raises(SystemExit, match="float32 or bfloat16"):
        train_sft.parse_config(["--master_dtype", "fp16"])


def test_profile_script_profiles_whole_steps_of_the_real_loop(tmp_path, capsys):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import profile_sft

    trace = tmp_path / "trace.json"
    profile_sft.main(["--wait", "1", "--steps", "1", "--trace", str(trace), "--"] + FAST +
                     ["--dataset", small_demo_file(tmp_path, 16), "--val_dataset", small_demo_file(tmp_path, 4, "val"),
                      "--max_steps", "3", "--save_steps", "0", "--output_dir", str(tmp_path / "run")])
    printed = capsys.readouterr().out
    assert "ProfilerStep*" in printed and "aten::mm" in printed  # whole steps, with their matrix multiplies
    families = dict(re.findall(r"^\| ([a-z][^|]*?) \| ([0-9.]+) \| [0-9]+% \|$", printed, re.MULTILINE))
    assert set(families) == {f for f, _ in profile_sft.FAMILIES} | {"other"} and float(families["matrix multiplies"]) > 0
    names = [("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n", 5.0), ("void flash::flash_fwd_kernel<Flash_fwd_kernel_traits>", 3.0),
             ("triton_poi_fused_add_mul_0", 2.0), ("ncclDevKernel_AllGather_RING_LL", 1.0), ("aten::copy_", 1.5),
             ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", 4.0), ("mystery", 0.5)]
    assert profile_sft.kernel_families(names) == {
        "attention": 3.0, "matrix multiplies": 5.0, "communication": 1.0, "optimizer (multi-tensor)": 4.0,
        "compiled elementwise (Triton)": 2.0, "copies and casts": 1.5, "reductions, norms, softmax, loss": 0.0,
        "indexing and gathers": 0.0, "data loading (host)": 0.0, "other elementwise": 0.0, "other": 0.5}
    assert json.loads(trace.read_text())["traceEvents"]
    assert torch.optim.lr_scheduler.LambdaLR.step.__name__ == "step"  # the scheduler is given back unpatched


@pytest.fixture
def bf16_group_of_one(monkeypatch):
    """A gloo process group of one in which shard_model's FSDP2 units compute in bf16, as they do on a GPU."""
    import torch.distributed as dist
    from torch.distributed import fsdp

    policy = fsdp.MixedPrecisionPolicy
    monkeypatch.setattr(fsdp, "MixedPrecisionPolicy", lambda param_dtype, **kwargs: policy(torch.bfloat16, **kwargs))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("script", [train_sft, train_dpo, train_grpo])
def test_sharded_model_accumulates_gradients_of_units_a_batch_never_ran(script, bf16_group_of_one):
    """bf16 compute as on a GPU: a text-only batch never runs the vision blocks, and FSDP2 still accumulates (fp32)
    gradients over micro-batches through every unit (it raised AttributeError on the GPU before shard_model gathered
    each unit once). Two accumulating backwards and a reducing one leave the trained weights with gradients."""
    cpu = torch.device("cpu")
    cfg = script.parse_config(["--model", "tiny-qwen2.5-vl", "--train_type", "lora"])
    model = script.shard_model(script.load_model(cfg, cpu)[0], cfg, cpu)
    for last in (False, False, True):
        model.set_requires_gradient_sync(last)
        model(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.float().square().mean().backward()
    grads = [p.grad for p in model.model.language_model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


@pytest.mark.parametrize("script", [train_sft, train_dpo, train_grpo])
def test_sharded_vision_blocks_keep_their_rotary_in_float32(script, bf16_group_of_one):
    """bf16 compute as on a GPU: the vision blocks get their rotary cos/sin in fp32, as transformers computes them, and
    not cast to bf16 by FSDP2 (torch < 2.13 leaves a recomputed unit's inputs uncast, so a forward-only cast made the
    recompute differ from the forward); the hidden states reach them in bf16."""
    cpu = torch.device("cpu")
    cfg = script.parse_config(["--model", "tiny-qwen2.5-vl"])
    encoder = data.Encoder(data.resolve_model(cfg.model))
    example = encoder(data.load_dataset([data.demo_path("sft", "train") + "#1"], "sft", seed=0)[0])
    seen = []
    model = script.shard_model(script.load_model(cfg, cpu)[0], cfg, cpu)
    for block in model.model.visual.blocks:
        block.register_forward_pre_hook(lambda m, args, kwargs: seen.append(
            (args[0].dtype, kwargs["position_embeddings"][0].dtype)), with_kwargs=True)
    with torch.no_grad():
        model(input_ids=example["input_ids"][None], position_ids=example["position_ids"][:, None],
              pixel_values=example["pixel_values"], image_grid_thw=example["image_grid_thw"])
    assert seen == [(torch.bfloat16, torch.float32)] * len(model.model.visual.blocks)


@pytest.mark.parametrize("script, kind", [(train_sft, "sft"), (train_dpo, "dpo")])
def test_sharded_eval_generation_gathers_each_unit_once(script, kind, monkeypatch):
    """Under FSDP2, eval generation gathers every unit's weights once for all replies (not at every new token), scores
    as the unsharded model does, and leaves the units resharded as shard_model set them."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    cpu = torch.device("cpu")
    cfg = script.parse_config(["--model", "tiny-qwen2.5-vl", "--eval_generate", "2", "--max_new_tokens", "4",
                               "--per_device_train_batch_size", "2"])
    val = data.load_dataset([data.demo_path(kind, "val") + "#2"], kind, seed=0)
    encoder = data.Encoder(data.resolve_model(cfg.model))
    size = cfg.per_device_train_batch_size
    plain = script.evaluate_accuracy(script.load_model(cfg, cpu)[0], val, encoder, cfg, cpu, 0, 1, False, size)
    gathers = count_gathers(monkeypatch)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        model = script.shard_model(script.load_model(cfg, cpu)[0], cfg, cpu)
        gathers.clear()  # shard_model's own gather of every unit, once
        units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        assert script.evaluate_accuracy(model, val, encoder, cfg, cpu, 0, 1, True, size) == plain
        assert 0 < len(gathers) <= len(units)  # once per unit; every token's forward would gather each unit again
        assert all(isinstance(p, DTensor) for p in model.parameters())  # resharded
        model(input_ids=torch.tensor([[1, 2, 3]]))
        assert all(isinstance(p, DTensor) for p in model.parameters())  # and resharding after forward again
    finally:
        dist.destroy_process_group()


def test_fp8_matmuls_learn_like_the_plain_ones(tmp_path):
    """--fp8 true (the language model's Linears in float8, lora.fp8_linears): the same first loss within the format's
    rounding, and the run learns; the checkpoint holds the same weights a plain run's has (names and dtypes)."""
    from safetensors.torch import load_file

    common = FAST + ["--dataset", small_demo_file(tmp_path, 16), "--val_dataset", small_demo_file(tmp_path, 4, "val"),
              "--max_steps", "4", "--save_steps", "4"]
    train_sft.main(common + ["--output_dir", str(tmp_path / "plain")])
    train_sft.main(common + ["--output_dir", str(tmp_path / "fp8"), "--fp8", "true"])
    plain, fp8 = losses(str(tmp_path / "plain")), losses(str(tmp_path / "fp8"))
    assert list(fp8) == [1, 2, 3, 4] and fp8[1] != plain[1] and abs(fp8[1] - plain[1]) < 0.02 * plain[1], (plain, fp8)
    assert fp8[4] < fp8[1] and abs(fp8[4] - plain[4]) < 0.05 * plain[4], (plain, fp8)
    weights = [load_file(str(tmp_path / run / "checkpoint-4" / "model.safetensors")) for run in ("plain", "fp8")]
    assert {k: v.dtype for k, v in weights[0].items()} == {k: v.dtype for k, v in weights[1].items()}


@pytest.mark.parametrize("script", [train_dpo, train_grpo], ids=lambda m: m.__name__)
def test_fp8_reaches_the_policy_of_dpo_and_grpo(script):
    """--fp8 true in DPO and GRPO: their policy (load_model, the copy test_copies holds identical to SFT's) multiplies
    in float8, as train_sft.py's does."""
    import lora

    for flag, expected in (("false", 0), ("true", 7)):
        model = script.load_model(script.parse_config(["--model", "tiny-qwen2.5-vl", "--fp8", flag]), torch.device("cpu"))[0]
        layers = model.config.get_text_config().num_hidden_layers
        assert sum(isinstance(m, lora.FP8Linear) for m in model.modules()) == expected * layers
