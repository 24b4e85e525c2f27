"""
bench.py: speed and memory of the training scripts on real-shaped Qwen-VL models with random weights (nothing
downloaded), next to what users would otherwise run, printed as one markdown table.

    python bench.py build --shape qwen2.5-vl-3b --out /tmp/qwen2.5-vl-3b     # a random-weight checkpoint of a real shape
    python bench.py sft --shape qwen2.5-vl-3b --seq_len 8192 --against hf trl  # SFT tokens/s, MFU, peak memory
    python bench.py sft --shape qwen2.5-vl-7b --seq_len 16384 --train_type lora --against trl

Every workload runs the repo's own script end to end (`train_sft.py` as a subprocess, data loading included) on
synthetic records written here, and reads tokens/s and peak memory from its metrics.jsonl, skipping warm-up steps.
The same token rows go through a plain transformers loop (`hf`) and TRL's SFTTrainer (`trl`) in this process.

MFU = achieved FLOP/s / peak bf16 dense FLOP/s (989e12 for H100/H200 SXM). FLOPs per step = 6 x (language-model
parameters, the output head included, input embeddings not) x tokens + 6 x layers x hidden x sum(len^2) (causal
attention, forward and backward, per packed sequence) + 6 x vision parameters x patches (vision attention left out).
Activation recomputation is not counted as useful work.
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

import data

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
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out_dir)
    for name in os.listdir(tiny):  # tokenizer, processor and chat template of the tiny model
        if not name.endswith(".safetensors") and name not in ("config.json", "generation_config.json"):
            shutil.copy(os.path.join(tiny, name), out_dir)
    print(f"{shape}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters written to {out_dir}")


# ----------------------------------------------------------------------------------------------------------------
# Workloads: synthetic records whose token counts are known exactly

PEAK_FLOPS = 989e12  # bf16 dense, H100 / H200 SXM


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
            say = lambda n: "".join(" " + rng.choice(vocab) for _ in range(n)).strip()
            f.write(json.dumps({"messages": [{"role": "user", "content": "<image>" + say(16)},
                                             {"role": "assistant", "content": say(text_tokens)}], "images": [image]}) + "\n")


def flops_per_token(model_dir, lengths, patches):
    """Useful training FLOPs per token for sequences of these lengths holding this many vision patches (module doc)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    text = config.text_config
    # the language model's parameters: the input embeddings are a lookup, not a matmul, but the output head (tied or
    # not) is one of the same size, so it takes their place in the count
    lm = sum(p.numel() for p in model.model.language_model.parameters())
    vision = sum(p.numel() for p in model.model.visual.parameters())
    tokens = sum(lengths)
    attention = 6 * text.num_hidden_layers * text.hidden_size * sum(n * n for n in lengths)
    return (6 * lm * tokens + attention + 6 * vision * patches) / tokens


def encoded_rows(model_dir, dataset, max_pixels=None):
    """(input_ids of each record, vision patches of each record), as the training script encodes them."""
    encoder = data.Encoder(model_dir, data.VisionConfig(max_pixels, max_pixels), max_length=1 << 20)
    rows, patches = [], []
    for sample in data.load_file(dataset, "sft", None, False)[0]:
        example = encoder.encode(sample, train_on="all")
        rows.append(example["input_ids"].tolist())
        patches.append(len(example["pixel_values"]) if "pixel_values" in example else 0)
    return rows, patches


# ----------------------------------------------------------------------------------------------------------------
# Runners: each returns {"tokens_per_s", "peak_gib"} measured after `warmup` steps

def run_script(script, model_dir, dataset, out_dir, steps, warmup, flags):
    """A train script end to end; tokens/s and peak memory from its metrics.jsonl (one line per step)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    cmd = [sys.executable, script, "--model", model_dir, "--dataset", dataset, "--output_dir", out_dir,
           "--max_steps", str(steps), "--logging_steps", "1", "--save_steps", "0", "--eval_generate", "0",
           "--eval_steps", str(10**9), "--warmup_steps", "1"] + flags
    print(" ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=os.path.dirname(os.path.abspath(__file__)), timeout=1800)
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        steps_logged = [m for m in map(json.loads, f) if "tokens_per_s" in m][warmup:]
    seconds = sum(1 / m["tokens_per_s"] for m in steps_logged)  # equal tokens per step: the harmonic mean
    return {"tokens_per_s": len(steps_logged) / seconds, "peak_gib": max(m.get("peak_mem_gb", 0) for m in steps_logged)}


def timed_steps(step, steps, warmup):
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step(i)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sum(times[warmup:]) / len(times[warmup:]), torch.cuda.max_memory_allocated() / 2**30


def release(*objects):
    del objects
    gc.collect()
    torch.cuda.empty_cache()


def run_hf_loop(model_dir, rows, steps, warmup, lora):
    """What a user writes first: the model's own loss (full logits), SDPA, activation checkpointing, fused AdamW, bf16."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()  # from_pretrained gives eval mode, where transformers skips activation checkpointing
    if lora:
        import lora as lora_module

        lora_module.add_lora(model, 8, 32, 0.05, None)
        lora_module.set_trainable(model, "lora", False, False, False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=True)

    def step(i):
        ids = torch.tensor([rows[i % len(rows)]], device="cuda")
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds, peak = timed_steps(step, steps, warmup)
    release(model, optimizer)
    return {"tokens_per_s": len(rows[0]) / seconds, "peak_gib": peak}


def run_trl_sft(model_dir, rows, steps, warmup, lora):
    """TRL's SFTTrainer on the same token rows (pre-tokenised, no packing needed: one sequence per row)."""
    from datasets import Dataset
    from transformers import AutoModelForImageTextToText, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class StepTimer(TrainerCallback):
        times = []

        def on_step_begin(self, *args, **kwargs):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.start)

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa")
    peft_config = None
    if lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.05,
                                 target_modules=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)")
    args = SFTConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=1, learning_rate=1e-5,
                     lr_scheduler_type="constant", bf16=True, gradient_checkpointing=True, logging_steps=1,
                     save_strategy="no", report_to="none", max_length=len(rows[0]), packing=False,
                     optim="adamw_torch_fused", dataloader_num_workers=2)
    timer = StepTimer()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": rows}),
                         processing_class=AutoTokenizer.from_pretrained(model_dir), peft_config=peft_config, callbacks=[timer])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    seconds = sum(timer.times[warmup:]) / len(timer.times[warmup:])
    peak = torch.cuda.max_memory_allocated() / 2**30
    release(trainer, model)
    return {"tokens_per_s": len(rows[0]) / seconds, "peak_gib": peak}


# ----------------------------------------------------------------------------------------------------------------

def bench_sft(args):
    from transformers import AutoTokenizer

    work = args.work or tempfile.mkdtemp(prefix="bench-")
    os.makedirs(work, exist_ok=True)
    model_dir = data.resolve_model(args.shape) if args.shape in data.TINY_MODELS else os.path.join(work, args.shape)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build(args.shape, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows_needed = args.steps + 2
    text_file = os.path.join(work, f"text-{args.seq_len}.jsonl")
    write_text_records(text_file, tokenizer, rows_needed, args.seq_len)
    rows, _ = encoded_rows(model_dir, text_file)
    assert all(len(r) == args.seq_len for r in rows), "synthetic rows must have exactly seq_len tokens"
    lora_flags = ["--train_type", "lora", "--learning_rate", "1e-4"] if args.train_type == "lora" else ["--learning_rate", "1e-5"]
    flags = lora_flags + ["--packing", "true", "--max_length", str(args.seq_len), "--per_device_train_batch_size", "1",
                          "--gradient_checkpointing", str(args.gradient_checkpointing).lower(), "--num_workers", "2"] + args.flags
    results = []  # (workload, framework, measurement, flops per token)
    text_flops = flops_per_token(model_dir, [args.seq_len], 0)
    name = f"SFT {args.train_type}, {args.shape}, 1 x {args.seq_len} text tokens"
    results.append((name, "this repo (train_sft.py)",
                    run_script("train_sft.py", model_dir, text_file, os.path.join(work, "out"), args.steps, args.warmup, flags), text_flops))
    if args.images:
        image_file = os.path.join(work, "images.jsonl")
        write_image_records(image_file, tokenizer, args.images, args.reply_tokens, args.image_size)
        image_rows, patches = encoded_rows(model_dir, image_file, args.image_size**2)
        flops = flops_per_token(model_dir, [len(r) for r in image_rows], sum(patches))
        image_flags = flags + ["--max_pixels", str(args.image_size**2), "--min_pixels", str(args.image_size**2)]
        results.append((f"SFT {args.train_type}, {args.shape}, packed {args.seq_len}-token rows of "
                        f"{len(image_rows[0])}-token image examples", "this repo (train_sft.py)",
                        run_script("train_sft.py", model_dir, image_file, os.path.join(work, "out-images"), args.steps,
                                   args.warmup, image_flags), flops))
    for other in args.against:
        runner = {"hf": run_hf_loop, "trl": run_trl_sft}[other]
        label = {"hf": "plain transformers loop", "trl": "TRL SFTTrainer"}[other]
        try:
            results.append((name, label, runner(model_dir, rows, args.steps, args.warmup, args.train_type == "lora"), text_flops))
        except Exception as e:  # a framework that cannot run here is reported, not hidden
            results.append((name, label, {"error": f"{type(e).__name__}: {e}"[:200]}, text_flops))
    return results


def print_table(results):
    ours = {}
    print("| workload | framework | tokens/s per GPU | vs this repo | MFU | peak GiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    first_seen = [workload for workload, *_ in results]
    for workload, framework, m, flops in sorted(results, key=lambda r: first_seen.index(r[0])):
        if "error" in m:
            print(f"| {workload} | {framework} | failed: {m['error']} | | | |")
            continue
        ours.setdefault(workload, m["tokens_per_s"])
        mfu = m["tokens_per_s"] * flops / PEAK_FLOPS
        print(f"| {workload} | {framework} | {m['tokens_per_s']:,.0f} | {m['tokens_per_s'] / ours[workload]:.2f}x | "
              f"{100 * mfu:.1f}% | {m['peak_gib']:.1f} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="write a random-weight checkpoint of a real model's shape")
    b.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-vl-3b")
    b.add_argument("--out", required=True)
    s = sub.add_parser("sft", help="SFT tokens/s, MFU and peak memory, against other frameworks")
    s.add_argument("--shape", choices=sorted(SHAPES) + list(data.TINY_MODELS), default="qwen2.5-vl-3b")
    s.add_argument("--train_type", choices=["full", "lora"], default="full")
    s.add_argument("--seq_len", type=int, default=8192)
    s.add_argument("--steps", type=int, default=8)
    s.add_argument("--warmup", type=int, default=3, help="steps left out of the timing")
    s.add_argument("--gradient_checkpointing", type=lambda v: v.lower() == "true", default=True)
    s.add_argument("--against", nargs="*", default=["hf", "trl"], choices=["hf", "trl"])
    s.add_argument("--images", type=int, default=0, help="also time packed rows of this many image examples")
    s.add_argument("--image_size", type=int, default=448)
    s.add_argument("--reply_tokens", type=int, default=200)
    s.add_argument("--work", help="folder for the model and data (default: a new temporary one)")
    s.add_argument("--flags", nargs=argparse.REMAINDER, default=[], help="passed on to train_sft.py")
    args = parser.parse_args()
    if args.command == "build":
        build(args.shape, args.out)
    elif args.command == "sft":
        print_table(bench_sft(args))


if __name__ == "__main__":
    main()
