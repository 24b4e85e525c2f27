"""
bench.py: speed and memory of the training scripts on real-shaped Qwen-VL models with random weights (nothing
downloaded), next to what users would otherwise run, printed as one markdown table per command.

    python bench.py build --shape qwen2.5-vl-3b --out /tmp/qwen2.5-vl-3b     # a random-weight checkpoint of a real shape
    python bench.py sft --shape qwen2.5-vl-3b --seq_len 8192 --against hf trl  # SFT tokens/s, MFU, peak memory
    python bench.py sft --shape qwen2.5-vl-7b --seq_len 16384 --train_type lora --against trl
    python bench.py sft --shape qwen2.5-vl-3b --images 240 --text false --against trl   # packed rows of image examples
    python bench.py dpo --shape qwen2.5-vl-3b --train_type lora              # DPO pairs/s against TRL's DPOTrainer
    python bench.py grpo --shape qwen2.5-vl-3b                               # GRPO step time and its split, against TRL
    python bench.py grpo --shape qwen2.5-vl-3b --rollouts builtin vllm --against trl-vllm   # vLLM rollouts, both sides
    python bench.py grpo --shape qwen2.5-vl-3b --rollouts vllm-async --against trl-vllm      # a vLLM server, async
    python bench.py grpo --shape tiny-qwen2.5-vl --steps 3 --warmup 1 --max_completion_length 16   # CPU smoke test

Every workload runs the repo's own script end to end (train_sft.py, train_dpo.py, train_grpo.py as a subprocess,
data loading included) on synthetic records written here whose token counts are known exactly, and reads its speed
and peak memory from its metrics.jsonl, skipping warm-up steps. The same tokens go through the other frameworks in
this process: a plain transformers loop (`hf`, SFT on text rows only: DPO and GRPO have no plain loop worth the name)
and TRL's trainers (`trl`; on image examples TRL, which packs no vision data, trains batches of as many examples as one
packed row of ours holds), with the same model, batch, LoRA (rank 8, alpha 32, every linear layer of the language model),
bf16 compute with fp32 LoRA weights and learning rate. Two differences: TRL and the plain loop recompute every layer
(non-reentrant activation checkpointing; transformers has no per-layer switch), ours runs its defaults
(--gradient_checkpointing auto: only the layers that do not fit; --compile auto: on with CUDA) unless
--gradient_checkpointing true|false or --flags say otherwise; and in full fine-tuning our scripts keep fp32 master
weights by default, TRL trains the bf16-loaded weights as they are (--master_dtype bfloat16 in --flags or --fast gives
ours TRL's precision).

DPO: each pair is a prompt of --prompt_tokens tokens (chat template included) and two replies of --reply_tokens
tokens (their <|im_end|> and newline included), --pairs_per_step pairs a step. Both frameworks score the reference
every step, on the same sequences: with LoRA the same model with its adapters off, with full fine-tuning a frozen
copy (no precomputed reference log-probabilities in either). Plain sigmoid DPO: train_dpo.py's NLL term is off
(--rpo_alpha 0), as in TRL's default loss.
GRPO: --prompts_per_step prompts of --prompt_tokens tokens, --num_generations completions of each sampled by the
policy itself (train_grpo.py's own CUDA-graphed decode loop, or with `--rollouts vllm` a vLLM engine in the training
process, or with `vllm-async` a vLLM server this command starts, each step's rollout generated while the step before
trains; TRL's transformers generate, or with `--against trl-vllm` TRL's vLLM colocate mode, same memory share) up to
--max_completion_length tokens, scored by rewards.random (no cost, and every group gets a non-zero advantage); one
optimizer step per rollout, in micro-batches of --per_device_train_batch_size completions. Completions are not forced to full length: train_grpo.py has no
switch to ignore the end-of-turn token (TRL has, through generation_kwargs; left off, so both do the same work). But a
random-weight model's next token is close to uniform over a real vocabulary (152k tokens), so one of the two stop
tokens comes about once in 76,000 tokens and nearly every completion runs to the limit. The table shows the mean
completion length each run sampled: compare step times only where they agree. "vs this repo" is then this repo's
step time over the other's (above 1: faster than this repo).

MFU = achieved FLOP/s / peak bf16 dense FLOP/s (989e12 for H100/H200 SXM); GPU runs only.
SFT FLOPs per step = 6 x (language-model parameters, input embeddings and output head not) x tokens + 6 x (output
head parameters) x labelled tokens (the other tokens' logits serve no loss) + 6 x layers x hidden x sum(len^2) (causal
attention, forward and backward, per packed sequence) + 6 x vision parameters x patches (vision attention left out).
DPO FLOPs per step = 4/3 x the SFT count of the step's chosen and rejected sequences: the policy's forward and
backward over them (the SFT count) plus the reference's forward over them (a third of it).
Activation recomputation is not counted as useful work; LoRA runs are counted as full fine-tuning would be (the
frozen weights get no weight gradient, so the hardware does about 2/3 of the work counted).
"""
import argparse
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from transformers import TrainerCallback

import data
import rewards

CUDA = torch.cuda.is_available()  # CPU: the smoke test of tests/test_bench.py, on a tiny model
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
OPTIM = "adamw_torch_fused" if CUDA else "adamw_torch"  # (ours: fused AdamW on GPU)
# our scripts' default LoRA in PEFT's terms: rank 8, alpha 32, every linear layer of the language model
LORA = dict(r=8, lora_alpha=32,
            target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")

SHAPES = {
    "qwen2.5-vl-3b": dict(
        text=dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                  vocab_size=151936, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                    tokens_per_second=2)),
    "qwen2.5-vl-7b": dict(
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                  vocab_size=152064, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
                    tokens_per_second=2)),
}


def build(shape, out_dir, seed=0):
    from transformers import AutoModelForImageTextToText, AutoTokenizer, Qwen2_5_VLConfig

    tiny = data.resolve_model("tiny-qwen2.5-vl")
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>",
                                                           "<|vision_start|>", "<|vision_end|>")}
    spec = SHAPES[shape]
    text = dict(spec["text"], bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=spec["vision"], image_token_id=ids["<|image_pad|>"],
                              video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                              vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=text["tie_word_embeddings"])
    torch.manual_seed(seed)
    with torch.device(DEVICE):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    for name in os.listdir(tiny):  # tokenizer, processor and chat template of the tiny model
        if not name.endswith(".safetensors") and name not in ("config.json", "generation_config.json"):
            shutil.copy(os.path.join(tiny, name), out_dir)
    print(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters written to {out_dir}")


# ----------------------------------------------------------------------------------------------------------------
# Workloads: synthetic records whose token counts are known exactly

def one_token_words(tokenizer):
    """Words that are one token each after a space, so n of them make exactly n tokens."""
    return sorted(w[1:] for w in tokenizer.get_vocab()
                  if w.startswith("\u0120") and w[1:].isalpha() and len(tokenizer(" " + w[1:])["input_ids"]) == 1)


def write_text_records(path, tokenizer, rows, seq_len, seed=0):
    """Pretraining records of seq_len tokens each: seq_len - 1 words and the end-of-text token data.py appends."""
    rng, vocab = random.Random(seed), one_token_words(tokenizer)
    with open(path, "w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": "".join(" " + rng.choice(vocab) for _ in range(seq_len - 1))}) + "\n")


def write_image_records(path, tokenizer, examples, text_tokens, image_size, seed=0):
    """Chat records: one random image_size x image_size picture and a question, and a reply of text_tokens words."""
    from PIL import Image

    rng, vocab = random.Random(seed), one_token_words(tokenizer)
    folder = os.path.join(os.path.dirname(path), "images")
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        for i in range(examples):
            image = os.path.join(folder, f"{i}.png")
            Image.frombytes("RGB", (image_size, image_size), rng.randbytes(3 * image_size * image_size)).save(image)
            say = lambda n: "".join(" " + rng.choice(vocab) for _ in range(n))  # n tokens (each word after a space)
            f.write(json.dumps({"messages": [{"role": "user", "content": "<image>" + say(16)},
                                             {"role": "assistant", "content": say(text_tokens)}], "images": [image]}) + "\n")


def flops_per_token(model_dir, lengths, patches, labelled=None):
    """Useful training FLOPs per token for sequences of these lengths holding this many vision patches, of whose
    tokens `labelled` (default: all) have a label (module doc): data.training_flops, which the train scripts' MFU uses."""
    from transformers import AutoConfig

    return data.training_flops(AutoConfig.from_pretrained(model_dir), lengths, patches, labelled) / sum(lengths)


def encoded_rows(model_dir, dataset, max_pixels=None):
    """(input_ids, vision patches, labelled tokens) of each record, as train_sft.py encodes it (--train_on assistant)."""
    encoder = data.Encoder(model_dir, data.VisionConfig(max_pixels, max_pixels), max_length=1 << 20)
    rows, patches, labelled = [], [], []
    for sample in data.load_file(dataset, "sft", None, False)[0]:
        example = encoder.encode(sample)
        rows.append(example["input_ids"].tolist())
        patches.append(len(example["pixel_values"]) if "pixel_values" in example else 0)
        labelled.append(int((example["labels"] != data.IGNORE).sum()))
    return rows, patches, labelled


def prompt_overhead(tokenizer):
    """Tokens the chat template adds to one user turn of one-token words: its headers, the default system prompt and
    the generation prompt ("<|im_start|>assistant\\n")."""
    word = one_token_words(tokenizer)[0]
    turn = tokenizer.apply_chat_template([{"role": "user", "content": " " + word}], add_generation_prompt=True, tokenize=True)
    return len(turn["input_ids"]) - 1


def write_pair_records(path, tokenizer, pairs, prompt_tokens, reply_tokens, seed=0):
    """DPO pairs (ms-swift's format): a prompt of prompt_tokens tokens, chat template included, and chosen and rejected
    replies of reply_tokens tokens each, their <|im_end|> and the newline after it included."""
    rng, vocab = random.Random(seed), one_token_words(tokenizer)
    say = lambda n: "".join(" " + rng.choice(vocab) for _ in range(n))
    query_words = prompt_tokens - prompt_overhead(tokenizer)
    with open(path, "w") as f:
        for _ in range(pairs):
            f.write(json.dumps({"query": say(query_words), "response": say(reply_tokens - 2),
                                "rejected_response": say(reply_tokens - 2)}) + "\n")


def write_prompt_records(path, tokenizer, prompts, prompt_tokens, seed=0):
    """RL prompts (messages format) of prompt_tokens tokens each, chat template and generation prompt included."""
    rng, vocab = random.Random(seed), one_token_words(tokenizer)
    say = lambda n: "".join(" " + rng.choice(vocab) for _ in range(n))
    words = prompt_tokens - prompt_overhead(tokenizer)
    with open(path, "w") as f:
        for _ in range(prompts):
            f.write(json.dumps({"messages": [{"role": "user", "content": say(words)}]}) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Runners: each returns a dict of measurements taken after `warmup` steps (the keys of its workload's table)

def run_script(script, model_dir, dataset, out_dir, steps, warmup, flags):
    """A train script end to end -> the metrics it logged after the first `warmup` steps (metrics.jsonl; evaluation
    lines left out). It logs every `warmup` steps, not every step: a log line waits for the GPU, which the steps
    between log lines never do, so logging each step would time a slower loop than users run."""
    shutil.rmtree(out_dir, ignore_errors=True)
    steps = warmup * -(-steps // warmup)  # whole logging windows
    cmd = [sys.executable, script, "--model", model_dir, "--dataset", dataset, "--output_dir", out_dir,
           "--max_steps", str(steps), "--logging_steps", str(warmup), "--save_steps", "0", "--warmup_steps", "1"] + flags
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=1800)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [m for m in map(json.loads, f) if "loss" in m][1:]


def mean(values):
    return sum(values) / len(values)


def logged_peak(steps):
    """Peak GPU memory a script logged (none on CPU)."""
    return max((m["peak_mem_gb"] for m in steps if "peak_mem_gb" in m), default=None)


def sync():
    if CUDA:  # GPU work is queued: a timer must wait for it
        torch.cuda.synchronize()


def reset_peak():
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


def peak_gib():
    return torch.cuda.max_memory_allocated() / 2**30 if CUDA else None


def release():
    """Give the GPU memory of a finished run back (its caller has dropped its references) for the next one."""
    gc.collect()  # (a trainer holds reference cycles)
    if CUDA:
        torch.cuda.empty_cache()


def timed_steps(step, steps, warmup):
    reset_peak()
    times = []
    for i in range(steps):
        sync()
        start = time.perf_counter()
        step(i)
        sync()
        times.append(time.perf_counter() - start)
    return mean(times[warmup:]), peak_gib()


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step of a transformers Trainer (all its micro-batches), and what it logged."""

    def __init__(self):
        self.times, self.logs = [], []

    def on_step_begin(self, *args, **kwargs):
        sync()
        self.start = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        sync()
        self.times.append(time.perf_counter() - self.start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def peft_config(lora, dropout):
    if not lora:
        return None
    from peft import LoraConfig

    return LoraConfig(lora_dropout=dropout, **LORA)


def run_hf_loop(model_dir, rows, steps, warmup, lora):
    """What a user writes first: the model's own loss (full logits), SDPA, activation checkpointing, fused AdamW, bf16."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=DTYPE, attn_implementation="sdpa").to(DEVICE)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()  # from_pretrained gives eval mode, where transformers skips activation checkpointing
    if lora:
        import lora as lora_module

        lora_module.add_lora(model, 8, 32, 0.05, None)
        lora_module.set_trainable(model, "lora", False, False, False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=CUDA)

    def step(i):
        ids = torch.tensor([rows[i % len(rows)]], device=DEVICE)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed_steps(step, steps, warmup)
    del model, optimizer
    release()
    return {"tokens_per_s": len(rows[0]) / seconds, "peak_gib": peak}


def run_trl_sft(model_dir, rows, steps, warmup, lora):
    """TRL's SFTTrainer on the same token rows (pre-tokenised, no packing needed: one sequence per row)."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=DTYPE, attn_implementation="sdpa")
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=1, learning_rate=1e-5,
                     lr_scheduler_type="constant", bf16=CUDA, gradient_checkpointing=True, logging_steps=1,
                     save_strategy="no", report_to="none", max_length=len(rows[0]), packing=False, optim=OPTIM,
                     dataloader_num_workers=2)
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft_config(lora, 0.05),
                         callbacks=[timer])
    reset_peak()
    trainer.train()
    seconds, peak = mean(timer.times[warmup:]), peak_gib()
    del trainer, model
    release()
    return {"tokens_per_s": len(rows[0]) / seconds, "peak_gib": peak}


def run_trl_sft_images(model_dir, image_file, batch_size, length, image_size, steps, warmup, lora):
    """TRL's SFTTrainer on the image examples: TRL packs no vision data, so a step is a batch of batch_size examples,
    as many as one packed row of ours holds (all of one length: no padding). Its collator runs the model's processor
    (resizing to image_size x image_size, as ours does) in the DataLoader workers; loss on every token, TRL's default."""
    from datasets import Dataset
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from trl import SFTConfig, SFTTrainer

    processor = AutoProcessor.from_pretrained(model_dir, min_pixels=image_size**2, max_pixels=image_size**2)
    with open(image_file) as f:
        records = [json.loads(line) for line in f]
    examples = [{"messages": [{"role": "user", "content": r["messages"][0]["content"].removeprefix("<image>")},
                              r["messages"][1]],
                 "images": [Image.open(r["images"][0]).convert("RGB")]} for r in records]
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=DTYPE, attn_implementation="sdpa")
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=batch_size,
                     learning_rate=1e-5, lr_scheduler_type="constant", bf16=CUDA, gradient_checkpointing=True,
                     logging_steps=1, save_strategy="no", report_to="none", max_length=None, packing=False,
                     optim=OPTIM, dataloader_num_workers=2)
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=processor,
                         peft_config=peft_config(lora, 0.05), callbacks=[timer])
    batch = next(iter(trainer.get_train_dataloader()))
    # the same tokens a step as ours: batch_size examples of our length, none of it padding
    assert batch["input_ids"].shape == (batch_size, length) and batch["attention_mask"].all(), batch["input_ids"].shape
    reset_peak()
    trainer.train()
    seconds, peak = mean(timer.times[warmup:]), peak_gib()
    del trainer, model
    release()
    return {"tokens_per_s": batch_size * length / seconds, "peak_gib": peak}


def run_trl_dpo(model_dir, pairs, steps, warmup, lora, pairs_per_step, tokens_per_pair, beta, learning_rate):
    """TRL's DPOTrainer on the same pairs, given as conversations that TRL tokenises with the same chat template (the
    same tokens; bench_dpo checks). Its batch: the pairs' chosen and rejected sequences as 2 x pairs_per_step rows of
    one length (no padding). Its reference: with LoRA the model with the adapter disabled, with full fine-tuning a
    second copy of the model, run every step in both cases (precompute_ref_log_probs off), as in train_dpo.py."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=DTYPE, attn_implementation="sdpa")
    args = DPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=pairs_per_step,
                     learning_rate=learning_rate, lr_scheduler_type="constant", bf16=CUDA, gradient_checkpointing=True,
                     gradient_checkpointing_kwargs={"use_reentrant": False}, beta=beta, loss_type=["sigmoid"],
                     max_length=None, precompute_ref_log_probs=False, logging_steps=1, save_strategy="no",
                     report_to="none", optim=OPTIM, dataloader_num_workers=2)
    timer = StepTimer()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(pairs),
                         processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft_config(lora, 0.0),
                         callbacks=[timer])
    reset_peak()
    trainer.train()
    seconds, peak = mean(timer.times[warmup:]), peak_gib()
    del trainer, model
    release()
    return {"pairs_per_s": pairs_per_step / seconds, "tokens_per_s": pairs_per_step * tokens_per_pair / seconds,
            "peak_gib": peak}


VLLM_ON_CPU = (["--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20)],
               {"OMP_NUM_THREADS": "1"})  # a server of a tiny model on CPU (tests/test_vllm.py): what vLLM needs there


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_placement(memory_share):
    """Where bench_grpo's vLLM server runs -> (its name in the table, arguments for it, its environment): on the last
    GPU where there are two or more (train_grpo.py trains on the first), else beside the trainer on its GPU with
    `memory_share` of it, else on CPU."""
    if torch.cuda.device_count() > 1:
        return "its own GPU", [], {"CUDA_VISIBLE_DEVICES": str(torch.cuda.device_count() - 1)}
    if CUDA:
        return "the same GPU", ["--gpu-memory-utilization", str(memory_share)], {}
    return "CPU", *VLLM_ON_CPU


def start_vllm_server(cfg, log_path, arguments=(), environment=None, max_media=(1, 0)):
    """vLLM's OpenAI server for cfg (train_grpo's Config, --vllm_mode server) at its --vllm_server_port, started as
    train_grpo prints its command (vllm_server_command with room for max_media, vllm_server_env) plus `arguments` and
    `environment`, in a process group of its own (its engine runs in a child process; stop_vllm_server ends both), its output to log_path.
    -> (the process, once the server answers; the name it serves the model under)"""
    import train_grpo

    command = [sys.executable, *train_grpo.vllm_server_command(cfg, max_media)[1:], *arguments]
    env = {**os.environ, **train_grpo.vllm_server_env(cfg), **(environment or {})}
    print(" ".join(command), flush=True)
    with open(log_path, "w") as log:  # (the child keeps its own copy of the file)
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return process, train_grpo.vllm_server_wait(cfg, max_media)
    except BaseException:
        stop_vllm_server(process)
        raise


def stop_vllm_server(process):
    """SIGTERM to the server's process group (its engine too); SIGKILL if it has not gone in 60 s (a loaded 2-core
    machine)."""
    import signal

    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def run_trl_grpo(model_dir, prompts, steps, warmup, lora, learning_rate, args, use_vllm=False):
    """TRL's GRPOTrainer on the same prompts, generating with transformers, or with use_vllm with a vLLM engine in
    this process (TRL's colocate mode, its defaults: no sleep, truncated importance sampling on), one optimizer step
    per rollout: the whole rollout generated at once, then gradient_accumulation_steps micro-batches. The step is timed
    by a callback; inside it, TRL's generation, rewards and log-prob passes by wrapping the trainer's methods
    (_generate: tokenise + weight sync + generate; _calculate_rewards; _generate_and_score_completions: both, then the
    old-policy and reference log-probs and the advantages; vLLM: its sync_weights alone too)."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    completions = args.num_generations * args.prompts_per_step
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=DTYPE, attn_implementation="sdpa")
    config = GRPOConfig(output_dir=tempfile.mkdtemp(), max_steps=steps,
                        per_device_train_batch_size=args.per_device_train_batch_size,
                        gradient_accumulation_steps=completions // args.per_device_train_batch_size,
                        num_generations=args.num_generations, max_completion_length=args.max_completion_length,
                        temperature=args.temperature, top_p=1.0, top_k=0, beta=args.beta, num_iterations=1,
                        epsilon=0.2, loss_type=args.loss_type, scale_rewards="group", learning_rate=learning_rate,
                        lr_scheduler_type="constant", adam_beta2=0.99, bf16=CUDA, gradient_checkpointing=True,
                        gradient_checkpointing_kwargs={"use_reentrant": False}, use_vllm=use_vllm, logging_steps=1,
                        save_strategy="no", report_to="none", optim=OPTIM,
                        **(dict(vllm_mode="colocate", vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                                vllm_max_model_length=args.prompt_tokens + args.max_completion_length) if use_vllm else {}))
    timer = StepTimer()
    trainer = GRPOTrainer(model=model, reward_funcs=rewards.random, args=config, train_dataset=Dataset.from_list(prompts),
                          processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft_config(lora, 0.0),
                          callbacks=[timer])
    phases = {"_generate": [], "_calculate_rewards": [], "_generate_and_score_completions": []}

    def timed(method, seconds):
        def run(*positional, **keyword):
            sync()
            start = time.perf_counter()
            out = method(*positional, **keyword)
            sync()
            seconds.append(time.perf_counter() - start)
            return out
        return run

    for name, seconds in phases.items():  # an attribute of the instance: TRL's own calls (self._generate...) find it
        setattr(trainer, name, timed(getattr(trainer, name), seconds))
    sync_times = []
    if use_vllm:
        trainer.vllm_generation.sync_weights = timed(trainer.vllm_generation.sync_weights, sync_times)
    reset_peak()
    trainer.train()
    peak = peak_gib()
    step, generate, score, prepare = (mean(t[warmup:]) for t in [timer.times] + list(phases.values()))
    lengths = [m["completions/mean_length"] for m in timer.logs if "completions/mean_length" in m][warmup:]
    del trainer, model
    release()
    return {"step_s": step, "rollout_s": generate + score, "logprob_s": prepare - generate - score,
            "update_s": step - prepare, "completion_length": mean(lengths), "peak_gib": peak,
            "weight_sync_s": mean(sync_times[warmup:]) if use_vllm else None}


# ----------------------------------------------------------------------------------------------------------------
# Workloads -> rows of (workload, framework, measurements)

def model_for(args, work):
    """The checkpoint to benchmark: a tiny model by name, or a real shape built once into the work folder."""
    model_dir = data.resolve_model(args.shape) if args.shape in data.TINY_MODELS else os.path.join(work, args.shape)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build(args.shape, model_dir)
    return model_dir


def run_rows(results, name, frameworks, runners, labels):
    """Run the runners of frameworks (or of this repo's other flags); one that cannot run here (not installed, out of
    memory, a failing flag) is a row saying so, and the rows after it still run."""
    for other in frameworks:
        try:
            results.append((name, labels[other], runners[other]()))
        except Exception as e:
            error = f"{type(e).__name__}: {e}".replace("|", "/").replace("\n", " ")[:200]  # one table cell
            results.append((name, labels[other], {"error": error}))
            release()  # what the failed run left on the GPU


def bench_sft(args, work):
    from transformers import AutoTokenizer

    model_dir = model_for(args, work)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lora_flags = ["--train_type", "lora", "--learning_rate", "1e-4"] if args.train_type == "lora" else ["--learning_rate", "1e-5"]
    flags = lora_flags + ["--packing", "true", "--max_length", str(args.seq_len), "--per_device_train_batch_size", "1",
                          "--gradient_checkpointing", args.gradient_checkpointing, "--num_workers", "2",
                          "--eval_steps", str(10**9), "--eval_generate", "0"] + args.flags

    def ours(dataset, out_dir, extra_flags, flops):
        steps = run_script("train_sft.py", model_dir, dataset, out_dir, args.steps, args.warmup, flags + extra_flags)
        tokens_per_s = len(steps) / sum(1 / m["tokens_per_s"] for m in steps)  # equal tokens per step: the harmonic mean
        return {"tokens_per_s": tokens_per_s, "peak_gib": logged_peak(steps), "flops_per_token": flops}

    results = []  # (workload, framework, measurements)
    lora = args.train_type == "lora"
    if args.text:
        text_file = os.path.join(work, f"text-{args.seq_len}.jsonl")
        write_text_records(text_file, tokenizer, args.steps + 2, args.seq_len)
        rows, _, _ = encoded_rows(model_dir, text_file)
        assert all(len(r) == args.seq_len for r in rows), "synthetic rows must have exactly seq_len tokens"
        text_flops = flops_per_token(model_dir, [args.seq_len], 0)
        name = f"SFT {args.train_type}, {args.shape}, 1 x {args.seq_len} text tokens"
        results.append((name, "this repo (train_sft.py)", ours(text_file, os.path.join(work, "out"), [], text_flops)))
        fast_rows = {fast: lambda i=i, fast=fast: ours(text_file, os.path.join(work, f"out-fast{i}"), fast.split(), text_flops)
                     for i, fast in enumerate(args.fast)}
        run_rows(results, name, args.fast, fast_rows, {fast: f"this repo, {fast}" for fast in args.fast})
        run_rows(results, name, args.against,
                {"hf": lambda: {**run_hf_loop(model_dir, rows, args.steps, args.warmup, lora), "flops_per_token": text_flops},
                 "trl": lambda: {**run_trl_sft(model_dir, rows, args.steps, args.warmup, lora), "flops_per_token": text_flops}},
                {"hf": "plain transformers loop", "trl": "TRL SFTTrainer"})
    if args.images:
        image_file = os.path.join(work, "images.jsonl")
        write_image_records(image_file, tokenizer, args.images, args.reply_tokens, args.image_size)
        image_rows, patches, labelled = encoded_rows(model_dir, image_file, args.image_size**2)
        length = len(image_rows[0])
        assert all(len(r) == length for r in image_rows), "synthetic image examples must all have the same length"
        flops = flops_per_token(model_dir, [length] * len(image_rows), sum(patches), sum(labelled))
        image_flags = ["--max_pixels", str(args.image_size**2), "--min_pixels", str(args.image_size**2)]
        image_name = f"SFT {args.train_type}, {args.shape}, packed {args.seq_len}-token rows of {length}-token image examples"
        results.append((image_name, "this repo (train_sft.py)", ours(image_file, os.path.join(work, "out-images"), image_flags, flops)))
        fast_rows = {fast: lambda i=i, fast=fast: ours(image_file, os.path.join(work, f"out-images-fast{i}"),
                                                       image_flags + fast.split(), flops) for i, fast in enumerate(args.fast)}
        run_rows(results, image_name, args.fast, fast_rows, {fast: f"this repo, {fast}" for fast in args.fast})
        per_row = args.seq_len // length  # the examples one packed row of ours holds
        run_rows(results, image_name, [f for f in args.against if f == "trl"],  # (the plain loop: text rows only)
                {"trl": lambda: {**run_trl_sft_images(model_dir, image_file, per_row, length, args.image_size, args.steps,
                                                      args.warmup, lora), "flops_per_token": flops}},
                {"trl": f"TRL SFTTrainer (batches of {per_row} examples: it packs no images)"})
    return results


def bench_dpo(args, work):
    from transformers import AutoTokenizer

    model_dir = model_for(args, work)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    length = args.prompt_tokens + args.reply_tokens  # of each sequence: the prompt and one reply
    pair_file = os.path.join(work, f"pairs-{args.prompt_tokens}-{args.reply_tokens}.jsonl")
    write_pair_records(pair_file, tokenizer, (args.steps + 1) * args.pairs_per_step, args.prompt_tokens, args.reply_tokens)
    samples = data.load_file(pair_file, "dpo")[0]
    # the same tokens in both frameworks: ours (data.Encoder) has every sequence at the planned length, and TRL's
    # tokenisation of the same conversation (the chat template on prompt + reply) gives the same ids
    encoder = data.Encoder(model_dir, max_length=1 << 20)
    ours_ids = [encoder.encode(s)["input_ids"].tolist() for s in samples] + \
               [encoder.encode(s, reply=s.rejected)["input_ids"].tolist() for s in samples]
    assert {len(ids) for ids in ours_ids} == {length}, "synthetic pairs must have exactly prompt + reply tokens per side"
    pairs = [{"prompt": s.messages[:-1], "chosen": s.messages[-1:], "rejected": [{"role": "assistant", "content": s.rejected}]}
             for s in samples]
    trl_ids = tokenizer.apply_chat_template(pairs[0]["prompt"] + pairs[0]["chosen"], tokenize=True)["input_ids"]
    assert trl_ids == ours_ids[0], "TRL would tokenise the pairs differently"

    lora = args.train_type == "lora"
    learning_rate = 5e-5 if lora else 5e-7  # (the speed does not depend on it; a real model's values)
    flags = ["--train_type", args.train_type, "--learning_rate", str(learning_rate), "--lora_dropout", "0",
             "--per_device_train_batch_size", str(args.pairs_per_step), "--max_length", str(length),
             "--gradient_checkpointing", args.gradient_checkpointing, "--beta", str(args.beta),
             "--loss_type", "sigmoid", "--rpo_alpha", "0", "--lr_scheduler_type", "constant", "--val_dataset", "",
             "--eval_generate", "0", "--num_workers", "2"] + args.flags
    tokens_per_pair = 2 * length
    # the policy's forward and backward (the SFT count) plus the reference's forward (a third of it): module doc
    flops = 4 / 3 * flops_per_token(model_dir, [length] * 2 * args.pairs_per_step, 0,
                                    2 * args.pairs_per_step * args.reply_tokens)  # the replies are labelled
    name = (f"DPO {args.train_type}, {args.shape}, {args.pairs_per_step} pairs x 2 x ({args.prompt_tokens} prompt + "
            f"{args.reply_tokens} reply) tokens")

    def ours(out_dir, extra_flags):
        steps = run_script("train_dpo.py", model_dir, pair_file, out_dir, args.steps, args.warmup, flags + extra_flags)
        harmonic = lambda key: len(steps) / sum(1 / m[key] for m in steps)  # the same work every step: the harmonic mean
        # tokens/s and MFU of the pairs' tokens, as TRL's row counts them (each prompt twice): train_dpo.py packs a
        # pair's prompt once (data.collate_shared), so it runs fewer tokens and FLOPs than that for the same pairs
        return {"pairs_per_s": harmonic("pairs_per_s"), "peak_gib": logged_peak(steps),
                "tokens_per_s": harmonic("pairs_per_s") * tokens_per_pair, "flops_per_token": flops}

    results = [(name, "this repo (train_dpo.py)", ours(os.path.join(work, "out-dpo"), []))]
    run_rows(results, name, args.fast,
             {fast: lambda i=i, fast=fast: ours(os.path.join(work, f"out-dpo-fast{i}"), fast.split()) for i, fast in enumerate(args.fast)},
             {fast: f"this repo, {fast}" for fast in args.fast})
    run_rows(results, name, args.against,
            {"trl": lambda: {**run_trl_dpo(model_dir, pairs, args.steps, args.warmup, lora, args.pairs_per_step,
                                           tokens_per_pair, args.beta, learning_rate), "flops_per_token": flops}},
            {"trl": "TRL DPOTrainer"})
    return results


def bench_grpo(args, work):
    from transformers import AutoTokenizer

    model_dir = model_for(args, work)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    completions = args.num_generations * args.prompts_per_step
    if completions % args.per_device_train_batch_size:
        raise SystemExit("--per_device_train_batch_size must divide --num_generations x --prompts_per_step")
    prompt_file = os.path.join(work, f"prompts-{args.prompt_tokens}.jsonl")
    write_prompt_records(prompt_file, tokenizer, (args.steps + 1) * args.prompts_per_step, args.prompt_tokens)
    samples = data.load_file(prompt_file, "rl")[0]
    encoder = data.Encoder(model_dir, max_length=1 << 20)
    ours_ids = [encoder.encode(s, train_on="none", add_generation_prompt=True)["input_ids"].tolist() for s in samples]
    assert {len(ids) for ids in ours_ids} == {args.prompt_tokens}, "synthetic prompts must have exactly prompt_tokens tokens"
    prompts = [{"prompt": s.messages} for s in samples]
    trl_ids = tokenizer.apply_chat_template(prompts[0]["prompt"], add_generation_prompt=True, tokenize=True)["input_ids"]
    assert trl_ids == ours_ids[0], "TRL would tokenise the prompts differently"

    lora = args.train_type == "lora"
    learning_rate = 1e-5 if lora else 1e-6  # (the speed does not depend on it; a real model's values)
    flags = ["--train_type", args.train_type, "--learning_rate", str(learning_rate), "--lora_dropout", "0",
             "--num_generations", str(args.num_generations), "--max_completion_length", str(args.max_completion_length),
             "--per_device_train_batch_size", str(args.per_device_train_batch_size),
             "--gradient_accumulation_steps", str(completions // args.per_device_train_batch_size),
             "--temperature", str(args.temperature), "--reward_funcs", "random", "--beta", str(args.beta),
             "--loss_type", args.loss_type, "--num_iterations", "1", "--max_length", str(args.prompt_tokens),
             "--gradient_checkpointing", args.gradient_checkpointing, "--lr_scheduler_type", "constant",
             "--val_dataset", prompt_file + "#1", "--eval_on_start", "false", "--eval_steps", "0"] + args.flags
    name = (f"GRPO {args.train_type}, {args.shape}, {args.prompts_per_step} prompts x {args.num_generations} completions, "
            f"{args.prompt_tokens} + up to {args.max_completion_length} tokens, beta {args.beta}")
    vllm_flags = ["--use_vllm", "true", "--vllm_mode", "colocate", "--vllm_importance_sampling_correction", "true",
                  "--vllm_gpu_memory_utilization", str(args.vllm_gpu_memory_utilization)]  # TRL's colocate defaults
    async_flags = ["--use_vllm", "true", "--vllm_mode", "server", "--async_generate", "true",
                   "--vllm_importance_sampling_correction", "true", "--vllm_server_timeout", "900"]
    where, server_arguments, server_environment = server_placement(args.vllm_gpu_memory_utilization)
    if "vllm-merged" in args.rollouts and not lora:
        raise SystemExit("--rollouts vllm-merged: a LoRA row (--train_type lora)")
    ours = {"builtin": ("this repo (train_grpo.py)", []),
            "vllm": ("this repo (train_grpo.py), vLLM colocate", vllm_flags),
            "vllm-merged": ("this repo (train_grpo.py), vLLM colocate, --vllm_lora_sync merged",
                            vllm_flags + ["--vllm_lora_sync", "merged"]),
            "vllm-async": (f"this repo (train_grpo.py), vLLM server on {where}, --async_generate", async_flags)}

    def ours_row(rollout):
        extra, server = ours[rollout][1], None
        if rollout == "vllm-async":
            import train_grpo

            extra = extra + ["--vllm_server_port", str(free_port())]
            server, _ = start_vllm_server(train_grpo.parse_config(["--model", model_dir, *flags, *extra]),
                                          os.path.join(work, "vllm-server.log"), server_arguments, server_environment)
        try:
            steps = run_script("train_grpo.py", model_dir, prompt_file, os.path.join(work, f"out-grpo-{rollout}"),
                               args.steps, args.warmup, flags + extra)
        finally:
            if server is not None:
                stop_vllm_server(server)
        row = {k: mean([m[k] for m in steps]) for k in ("step_s", "rollout_s", "logprob_s", "update_s", "completion_length")}
        if rollout != "builtin":
            row.update(weight_sync_s=mean([m["weight_sync_s"] for m in steps]),
                       vllm_logprob_diff=mean([m["vllm_logprob_diff"] for m in steps]))
        return {**row, "peak_gib": logged_peak(steps)}

    results = []
    run_rows(results, name, args.rollouts, {r: lambda r=r: ours_row(r) for r in ours}, {r: ours[r][0] for r in ours})
    run_rows(results, name, args.against,
            {"trl": lambda: run_trl_grpo(model_dir, prompts, args.steps, args.warmup, lora, learning_rate, args),
             "trl-vllm": lambda: run_trl_grpo(model_dir, prompts, args.steps, args.warmup, lora, learning_rate, args,
                                              use_vllm=True)},
            {"trl": "TRL GRPOTrainer (no vLLM)", "trl-vllm": "TRL GRPOTrainer, vLLM colocate"})
    return results


# ----------------------------------------------------------------------------------------------------------------
# One markdown table per command: a row per (workload, framework), this repo's row first in each workload

# per workload kind: the speed that "vs this repo" compares (above 1: faster than this repo), and the columns after
# workload and framework as (header, measurement, format); a measurement a run lacks (MFU and memory on CPU) is left empty
TABLES = {
    "sft": (lambda m: m["tokens_per_s"],
            [("tokens/s per GPU", "tokens_per_s", "{:,.0f}"), ("vs this repo", "vs", "{:.2f}x"), ("MFU", "mfu", "{:.1%}"),
             ("peak GiB", "peak_gib", "{:.1f}")]),
    "dpo": (lambda m: m["pairs_per_s"],
            [("pairs/s per GPU", "pairs_per_s", "{:,.2f}"), ("vs this repo", "vs", "{:.2f}x"),
             ("tokens/s per GPU", "tokens_per_s", "{:,.0f}"), ("MFU", "mfu", "{:.1%}"), ("peak GiB", "peak_gib", "{:.1f}")]),
    "grpo": (lambda m: 1 / m["step_s"],
             [("step s", "step_s", "{:.2f}"), ("vs this repo", "vs", "{:.2f}x"), ("rollout s", "rollout_s", "{:.2f}"),
              ("weight sync s", "weight_sync_s", "{:.2f}"), ("log-prob s", "logprob_s", "{:.2f}"),
              ("update s", "update_s", "{:.2f}"), ("vLLM logprob diff", "vllm_logprob_diff", "{:.4f}"),
              ("mean completion tokens", "completion_length", "{:.0f}"), ("peak GiB", "peak_gib", "{:.1f}")]),
}


def print_table(results, kind):
    speed, columns = TABLES[kind]
    print("| workload | framework | " + " | ".join(header for header, _, _ in columns) + " |")
    print("| --- | --- |" + " --- |" * len(columns))
    first_seen = [workload for workload, *_ in results]
    ours = {}
    for workload, framework, m in sorted(results, key=lambda r: first_seen.index(r[0])):
        if "error" in m:
            print(f"| {workload} | {framework} | failed: {m['error']} |" + " |" * (len(columns) - 1))
            continue
        ours.setdefault(workload, speed(m))
        m = {**m, "vs": speed(m) / ours[workload]}
        if CUDA and "flops_per_token" in m:
            m["mfu"] = m["tokens_per_s"] * m["flops_per_token"] / data.PEAK_FLOPS
        cells = ["" if m.get(key) is None else spec.format(m[key]) for _, key, spec in columns]
        print(f"| {workload} | {framework} | " + " | ".join(cells) + " |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write a random-weight checkpoint of a real model's shape")
    b.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-vl-3b")
    b.add_argument("--out", required=True)

    def workload(name, help, train_type, steps, warmup, frameworks):
        p = sub.add_parser(name, help=help)
        p.add_argument("--shape", choices=sorted(SHAPES) + list(data.TINY_MODELS), default="qwen2.5-vl-3b")
        p.add_argument("--train_type", choices=["full", "lora"], default=train_type)
        p.add_argument("--steps", type=int, default=steps)
        p.add_argument("--warmup", type=int, default=warmup, help="steps left out of the timing")
        p.add_argument("--gradient_checkpointing", choices=["auto", "true", "false"], default="auto",
                       help="this repo's (its default: auto); TRL and the plain loop recompute every layer")
        p.add_argument("--against", nargs="*", default=frameworks, choices=frameworks)
        p.add_argument("--work", help="folder for the model and data (default: a new temporary one)")
        p.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help=f"passed on to train_{name}.py")
        return p

    s = workload("sft", "SFT tokens/s, MFU and peak memory, against other frameworks", "full", 8, 3, ["hf", "trl"])
    s.add_argument("--seq_len", type=int, default=8192)
    s.add_argument("--text", type=lambda v: v.lower() == "true", default=True, help="time rows of text tokens")
    s.add_argument("--images", type=int, default=0, help="also time packed rows of this many image examples")
    s.add_argument("--image_size", type=int, default=448)
    s.add_argument("--reply_tokens", type=int, default=200)
    s.add_argument("--fast", action="append", default=[], help="also time train_sft.py with these flags (one string, "
                   "after an =; give it again for another row), e.g. --fast='--compile true --master_dtype bfloat16 --gradient_checkpointing_layers 6 --fsdp_reshard_after_forward false'")
    d = workload("dpo", "DPO pairs/s, MFU and peak memory, against TRL's DPOTrainer", "lora", 8, 3, ["trl"])
    d.add_argument("--prompt_tokens", type=int, default=512, help="per prompt, chat template included")
    d.add_argument("--reply_tokens", type=int, default=512, help="per reply, its <|im_end|> and newline included")
    d.add_argument("--pairs_per_step", type=int, default=8)
    d.add_argument("--beta", type=float, default=0.1)
    d.add_argument("--fast", action="append", default=[], help="also time train_dpo.py with these flags (one string, "
                   "after an =; give it again for another row), e.g. --fast='--fp8 true'")
    g = workload("grpo", "GRPO step time and its split, against TRL's GRPOTrainer", "lora", 5, 2, ["trl", "trl-vllm"])
    g.set_defaults(against=["trl"])  # (trl-vllm: on a machine with vLLM)
    g.add_argument("--rollouts", nargs="*", default=["builtin"], choices=["builtin", "vllm", "vllm-merged", "vllm-async"],
                   help="this repo's rows: the built-in rollout, vLLM colocate (--use_vllm true), colocate with the "
                        "adapter merged into the weights it sends (TRL's way: vLLM generates without LoRA kernels), a "
                        "vLLM server started here with --async_generate (on the last GPU where there are two or more, "
                        "else on the same one)")
    g.add_argument("--vllm_gpu_memory_utilization", type=float, default=0.3,
                   help="colocate engines' share (ours and TRL's); a server's on the trainer's GPU")
    g.add_argument("--prompt_tokens", type=int, default=256, help="per prompt, chat template included")
    g.add_argument("--prompts_per_step", type=int, default=8)
    g.add_argument("--num_generations", type=int, default=8)
    g.add_argument("--max_completion_length", type=int, default=512)
    g.add_argument("--per_device_train_batch_size", type=int, default=8, help="completions per micro-batch")
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--beta", type=float, default=0.04, help="KL weight; > 0 scores the reference (LoRA: adapters off)")
    g.add_argument("--loss_type", choices=["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"], default="grpo")
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.shape, args.out)
        return
    work = args.work or tempfile.mkdtemp(prefix="bench-")
    os.makedirs(work, exist_ok=True)
    bench = {"sft": bench_sft, "dpo": bench_dpo, "grpo": bench_grpo}[args.command]
    print_table(bench(args, work), args.command)


if __name__ == "__main__":
    main()
