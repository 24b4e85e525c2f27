"""
train_sft.py: supervised fine-tuning (SFT) and multimodal continued pretraining (CPT) of Qwen-VL models.

    python train_sft.py                                   # demo: tiny-qwen2.5-vl learns to name colours on CPU
    python train_sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --dataset train.jsonl --train_type lora
    torchrun --nproc_per_node 8 train_sft.py --config sft.yaml --packing true --max_length 8192
    python train_sft.py --dataset pretrain.jsonl --train_on all      # CPT: loss on every text token

Loss: the mean negative log-likelihood over every labelled token of the global batch (all processes, all
accumulation steps), so the result does not depend on how a batch is split.
"""
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

import data
import lora


@dataclass
class Config:
    # model and data
    model: str = "tiny-qwen2.5-vl"  # local path, hub id, or tiny-qwen2.5-vl / tiny-qwen3-vl
    trust_remote_code: bool = False  # let transformers run Python code shipped with the model (only for repos you trust)
    dataset: list[str] = field(default_factory=lambda: ["demo"])  # files, each optionally `file%50` or `file#2000`
    val_dataset: list[str] = field(default_factory=lambda: ["demo"])  # "demo": the demo's held-out split (demo runs only)
    split_dataset_ratio: float = 0.0  # hold out this fraction of --dataset for validation instead
    media_root: str | None = None  # media paths are absolute, relative to this, or relative to the data file
    skip_bad_records: bool = False  # drop bad records (and report their count) instead of stopping at the first
    train_on: str = "assistant"  # assistant: every assistant reply; all: every text token (CPT on chat data)
    max_length: int = 2048  # tokens per example (and per packed row)
    truncation_strategy: str = "error"  # error | left | right | delete, for examples above max_length
    packing: bool = False  # pack examples into rows of max_length tokens (attention never crosses examples)
    num_workers: int = 2  # DataLoader workers that decode media and tokenise
    min_pixels: int | None = None  # image pixel bounds (default: the processor's, or MIN_PIXELS / MAX_PIXELS)
    max_pixels: int | None = None
    fps: float = 2.0  # video frames sampled per second, within [video_min_frames, video_max_frames]
    video_min_frames: int = 4
    video_max_frames: int = 64
    video_max_pixels: int = 128 * 28 * 28
    # what is trained
    train_type: str = "full"  # full | lora
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # names, or one regex
    use_rslora: bool = False
    freeze_vit: bool = False
    freeze_aligner: bool = False
    freeze_llm: bool = False
    # optimisation
    learning_rate: float | None = None  # default: the demo's, 1e-3 (full) / 3e-3 (LoRA); real models want ~1e-5 / ~1e-4
    lorap_lr_ratio: float | None = None  # LoRA+: B matrices learn at this multiple of the learning rate
    vit_lr: float | None = None
    aligner_lr: float | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_bad_steps: int = 5  # stop after this many steps in a row with a NaN/inf loss or gradient norm (each one is skipped)
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant
    warmup_ratio: float = 0.05
    warmup_steps: int = 0  # overrides warmup_ratio when > 0
    per_device_train_batch_size: int = 16  # examples per micro-batch (with --packing: packed rows)
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 2.0
    max_steps: int = -1  # overrides num_train_epochs when > 0
    gradient_checkpointing: bool = False
    gradient_checkpointing_layers: int = -1  # recompute only the first N decoder layers (-1: all): faster, more memory
    compile: bool = False  # torch.compile each decoder layer and vision block: fuses norms, rotary, activations (GPU)
    # the trainable weights AdamW updates, and its moments: float32 keeps updates below bf16's resolution (~0.4% of a
    # weight); bfloat16 is what a bf16-loaded model gets from HF Trainer: half the memory, room to recompute fewer layers
    master_dtype: str = "float32"  # float32 | bfloat16
    attn_implementation: str = "varlen"  # varlen: packed rows, images and windows through a variable-length kernel; sdpa | eager
    seed: int = 42
    # distributed
    fsdp_reshard_after_forward: bool = True  # false: keep gathered weights between forward and backward (ZeRO-2-like)
    offload_optimizer: bool = False  # FSDP2 CPU offload of parameters, gradients and optimizer state
    # evaluation, logging, checkpoints
    output_dir: str = "outputs/sft"
    logging_steps: int = 10
    eval_steps: int = 100
    eval_generate: int = 100  # exact-match accuracy of generated replies on up to this many val examples (0: off)
    max_new_tokens: int = 16  # for eval_generate
    save_steps: int = 500  # also saves at the end; 0 saves nothing (for benchmarks)
    save_total_limit: int = 2  # keep the best (by eval loss) and the latest
    resume_from_checkpoint: str | None = None  # a checkpoint folder, or "latest" in output_dir
    save_on_sigterm: bool = True  # on SIGTERM (preemption, scancel, torchrun stopping) finish the step, save, exit 0
    report_to: str = "none"  # none | wandb | tensorboard
    config: str | None = None  # a yaml/json file of defaults; the command line overrides it


def parse_config(argv=None):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(Config)
    argv = sys.argv[1:] if argv is None else argv
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        with open(path) as f:
            if path.endswith((".yaml", ".yml")):
                import yaml

                defaults = yaml.safe_load(f)
            else:
                defaults = json.load(f)
        unknown = set(defaults) - {f.name for f in Config.__dataclass_fields__.values()}
        if unknown:
            raise SystemExit(f"{path}: unknown option(s) {sorted(unknown)}")
        parser.set_defaults(**defaults)
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    if cfg.learning_rate is None:
        cfg.learning_rate = 3e-3 if cfg.train_type == "lora" else 1e-3
    if cfg.master_dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"--master_dtype {cfg.master_dtype}: use float32 or bfloat16")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# Distributed setup: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python` runs one process with no group.

def setup_distributed():
    """A GPU run without torchrun is a group of one, so one GPU and N GPUs take the same FSDP2 path and the same
    numerics (bf16 compute on fp32 master weights); a CPU run without torchrun has no group and no sharding."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    elif device.type == "cuda":
        dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    distributed = dist.is_initialized()
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    return distributed, rank, world_size, device


def all_reduce_sum(x, distributed):
    if distributed:
        dist.all_reduce(x)
    return x


def clip_grad_norm(model, max_norm, device, distributed):
    """torch's clip_grad_norm_ on each process's shards of the gradients: the same clipping, without a DTensor
    dispatch per gradient (~30 ms of host time a step on a 3B model while the GPU waits). -> the global norm."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads).to(device)
    if distributed:  # each process holds a shard of every gradient
        norm = all_reduce_sum(norm.float().square(), distributed).sqrt()
    torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].device))
    return norm


# ----------------------------------------------------------------------------------------------------------------
# The output folder, checked before any slow work: writable, with room for the checkpoints, no half-written one left

def check_output_dir(cfg):
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
        probe = os.path.join(cfg.output_dir, f".write_test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise SystemExit(f"--output_dir {cfg.output_dir} is not writable: {e}")
    for name in sorted(os.listdir(cfg.output_dir)):
        if name.startswith("checkpoint-") and name.endswith(".tmp"):  # a save killed half-way (resume never reads it)
            shutil.rmtree(os.path.join(cfg.output_dir, name), ignore_errors=True)
            print(f"removed {os.path.join(cfg.output_dir, name)}: a checkpoint whose save was interrupted")
    # checkpoints on disk at once: the ones kept, plus the new one written before the oldest goes (0 keeps all: we
    # count the first only); with --save_steps 0, only the one SIGTERM would write. Those already there (a resumed
    # run) take no new space.
    at_once = (cfg.save_total_limit + 1 if cfg.save_total_limit > 0 else 1) if cfg.save_steps > 0 else int(cfg.save_on_sigterm)
    at_once -= min(len(checkpoint_dirs(cfg.output_dir)), max(at_once - 1, 0))
    size = checkpoint_size(cfg)
    free = shutil.disk_usage(cfg.output_dir).free
    if at_once * size > free:
        raise SystemExit(f"--output_dir {cfg.output_dir}: {free / 2**30:.1f} GiB free, about {at_once * size / 2**30:.1f} GiB "
                         f"needed for {at_once} checkpoint(s) of ~{size / 2**30:.2f} GiB ({cfg.train_type}); free some space, "
                         f"choose another --output_dir or lower --save_total_limit")


def checkpoint_size(cfg):
    """Rough bytes of one checkpoint, from the parameter count in the model's safetensors headers (no weights read);
    0 (no check) for a hub id: only a local folder is measured. Full: fp32 weights (trainable weights are kept in
    fp32) and AdamW's two fp32 moments, 12 bytes a parameter. LoRA: the same for the adapters, which give a d x d
    weight 2 x rank x d weights: at most 2 rank / d of the model."""
    from safetensors import safe_open

    path = data.resolve_model(cfg.model)
    files = [os.path.join(path, n) for n in os.listdir(path) if n.endswith(".safetensors")] if os.path.isdir(path) else []
    params = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    if cfg.train_type == "lora" and params:
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        hidden_size = config.get("text_config", config).get("hidden_size", 1024)  # (a guess where the config has none)
        params *= min(1.0, 2 * cfg.lora_rank / hidden_size)
    return 12 * params


# ----------------------------------------------------------------------------------------------------------------
# Data

def load_data(cfg, encoder, rank, world_size, distributed):
    def specs(names, split):
        return [data.demo_path("sft", split) if n == "demo" else n for n in names]

    train = data.load_dataset(specs(cfg.dataset, "train"), "sft", cfg.seed, cfg.media_root, cfg.skip_bad_records)
    if cfg.split_dataset_ratio > 0:
        train, val = data.split_dataset(train, cfg.split_dataset_ratio, cfg.seed)
    elif cfg.val_dataset and not (cfg.val_dataset == ["demo"] and cfg.dataset != ["demo"]):  # demo val only for demo
        val = data.load_dataset(specs(cfg.val_dataset, "val"), "sft", cfg.seed, cfg.media_root, cfg.skip_bad_records)
    else:
        val = []
    # every record is encoded once up front, each process taking a share: lengths for packing, bad records found now
    encode_kwargs = {"train_on": cfg.train_on}
    shard = list(range(rank, len(train), world_size))
    kept, lengths, _ = data.measure_lengths([train[i] for i in shard], encoder, cfg.skip_bad_records, cfg.num_workers, encode_kwargs)
    measured = [([shard[i] for i in kept], lengths)]
    if distributed:
        measured = [None] * world_size
        dist.all_gather_object(measured, ([shard[i] for i in kept], lengths))
    pairs = sorted((i, n) for ids, ns in measured for i, n in zip(ids, ns))
    return train, val, [i for i, _ in pairs], [n for _, n in pairs], encode_kwargs


def make_loader(cfg, train, encoder, plan, encode_kwargs):
    dataset = data.EncodedDataset(train, encoder, plan, cfg.packing, encode_kwargs)
    # its own generator: creating a loader must not draw from the global RNG, or a resumed run's dropout would differ
    return torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=cfg.num_workers,
                                       pin_memory=torch.cuda.is_available(), generator=torch.Generator(),
                                       worker_init_fn=lambda _: init_worker(cfg.save_on_sigterm))


def init_worker(save_on_sigterm):
    torch.set_num_threads(1)  # workers must not oversubscribe cores
    if save_on_sigterm:  # torchrun and SLURM signal the whole process group: a worker that died would break the save
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (workers still end with their loader, or with the main process)


# ----------------------------------------------------------------------------------------------------------------
# Model

def load_model(cfg, device, distributed, weights=None):
    """The model from cfg.model, or from `weights` (a full checkpoint being resumed), with LoRA and freezing applied."""
    from transformers import AutoModelForImageTextToText

    # GPU: frozen weights in bf16, trainable ones in master_dtype (below: the copy that FSDP2 casts to bf16 for
    # compute, see shard_model); CPU: fp32 throughout, unless the master weights are bf16
    dtype = torch.bfloat16 if device.type == "cuda" or cfg.master_dtype == "bfloat16" else torch.float32
    attn_implementation = "sdpa" if cfg.attn_implementation == "varlen" else cfg.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(weights or data.resolve_model(cfg.model), dtype=dtype,
                                                        attn_implementation=attn_implementation,
                                                        trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation == "varlen":
        data.use_varlen_attention(model)
    if cfg.train_type == "lora":
        targets = cfg.target_modules
        targets = None if targets == ["all-linear"] else targets[0] if len(targets) == 1 and not targets[0].isidentifier() else targets
        lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, targets, use_rslora=cfg.use_rslora)
    trainable, total = lora.set_trainable(model, cfg.train_type, cfg.freeze_vit, cfg.freeze_llm, cfg.freeze_aligner)
    for p in model.parameters():
        if p.requires_grad and cfg.master_dtype == "float32":  # AdamW on bf16 weights loses small updates
            p.data = p.data.float()
    if cfg.gradient_checkpointing:
        # non-reentrant: works with frozen inputs (LoRA) and never marks a gradient ready twice
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for i, layer in enumerate(model.model.language_model.layers):
            layer.gradient_checkpointing = cfg.gradient_checkpointing_layers < 0 or i < cfg.gradient_checkpointing_layers
    model.config.use_cache = False
    return model.to(device), trainable, total


def shard_model(model, cfg, device):
    """FSDP2: one unit per decoder layer and per vision block, then the root (embeddings, merger, head).
    bf16 compute, fp32 gradient reduction; the optimizer sees sharded fp32 master parameters (trainable ones are fp32
    since load_model; frozen ones stay bf16, which halves the memory of a LoRA base)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    param_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
              "reshard_after_forward": cfg.fsdp_reshard_after_forward}
    if cfg.offload_optimizer:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in model.model.language_model.layers:
        fully_shard(layer, **kwargs)
    # the vision blocks get their rotary cos/sin in fp32 and keep them (transformers computes the rotation in fp32):
    # torch before 2.13 does not cast a unit's inputs when activation checkpointing recomputes it, so a cast in the
    # forward alone made the recompute differ from the forward (and compiled blocks fail checkpointing's check)
    vision = {**kwargs, "mp_policy": replace(kwargs["mp_policy"], cast_forward_inputs=False)}
    for block in model.model.visual.blocks:
        fully_shard(block, **vision)
    fully_shard(model, **kwargs)
    # each unit gathers once now: with bf16 compute FSDP2 (torch 2.11 to 2.13) accumulates micro-batch gradients in
    # fp32 through every unit's gathered parameters, which a unit that has never run forward (the vision blocks on
    # text-only data) does not have yet: AttributeError '_unsharded_param' at the first accumulating backward
    for unit in [model, *model.model.language_model.layers, *model.model.visual.blocks]:
        unit.unshard()
        unit.reshard()
    return model


# ----------------------------------------------------------------------------------------------------------------
# Loss: log-probabilities of the labelled tokens, the vocabulary projected for those tokens only and the fp32
# log-softmax taken in chunks (recomputed in backward), so no [T, vocab] fp32 tensor is ever held.

def model_inputs(batch, device):
    keys = ("input_ids", "attention_mask", "position_ids") + data.VISION_KEYS + data.PACKED_KEYS + data.WINDOW_KEYS
    return {k: batch[k].to(device, non_blocking=True) if torch.is_tensor(batch[k]) else batch[k]
            for k in keys if batch.get(k) is not None}


def chunk_logps(logits, targets):
    return torch.gather(logits.float().log_softmax(-1), 1, targets[:, None]).squeeze(1)


def token_logps(model, batch, device, chunk_size=1024):
    """-> (log-probabilities of the labelled tokens [N], N). Positions are shared across the batch rows. Which tokens
    are labelled is read from the labels while they are still on the CPU, so the GPU is never waited for here."""
    labelled = batch["labels"] != data.IGNORE
    keep = labelled.any(0).nonzero().squeeze(1)  # columns with a label in some row
    # index_select/masked_select, not [:, keep][mask]: CPU advanced indexing of an 8k-token row takes ~8 ms a call
    labelled = labelled.index_select(1, keep)
    targets = batch["labels"].index_select(1, keep).masked_select(labelled).to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(**model_inputs(batch, device), logits_to_keep=keep.to(device), use_cache=False).logits
    # one row (packed) has a label in every kept column; padded rows need the mask (a boolean index: one sync)
    logits = logits[0] if len(logits) == 1 else logits[labelled.to(device)]
    logps = [checkpoint(chunk_logps, logits[i : i + chunk_size], targets[i : i + chunk_size], use_reentrant=False)
             for i in range(0, len(targets), chunk_size)]
    return torch.cat(logps) if logps else logits.new_zeros(0), len(targets)


# ----------------------------------------------------------------------------------------------------------------
# Schedule, evaluation, checkpoints

def lr_lambda(cfg, total_steps):
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)

    def schedule(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total_steps - warmup)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.lr_scheduler_type == "linear":
            return 1 - progress
        return 1.0

    return schedule


@torch.no_grad()
def evaluate_loss(model, val, encoder, cfg, device, rank, world_size, distributed):
    model.eval()
    total = torch.zeros(2, device=device)  # summed NLL, token count
    size = cfg.per_device_train_batch_size
    mine = val[rank::world_size]
    for i in range(0, math.ceil(len(val) / world_size), size):  # every rank runs as many forwards (FSDP gathers in step)
        chunk = mine[i : i + size]
        examples = [e for e in (encoder(s, train_on=cfg.train_on) for s in chunk or val[:1]) if e is not None]
        batch = data.collate(examples, packing=cfg.packing, pad_token_id=encoder.tokenizer.pad_token_id)
        logps, n = token_logps(model, batch, device)
        if chunk:  # a rank with nothing left ran a stand-in batch only to keep in step
            total += torch.stack([-logps.sum(), torch.tensor(float(n), device=device)])
    total = all_reduce_sum(total, distributed)
    model.train()
    return (total[0] / total[1].clamp(min=1)).item()


@torch.no_grad()
def generate(model, encoder, samples, device, max_new_tokens, synced):
    """Greedy replies for prompt samples (conversations ending with a user turn), batched with left padding."""
    examples = [encoder.encode(s, train_on="none", add_generation_prompt=True) for s in samples]
    pad = encoder.tokenizer.pad_token_id
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        input_ids[row, width - len(e["input_ids"]):] = e["input_ids"]
        attention_mask[row, width - len(e["input_ids"]):] = 1
    vision = {k: torch.cat([e[k] for e in examples if k in e]).to(device) for k in data.VISION_KEYS
              if any(k in e for e in examples)}
    mm_token_type_ids = (input_ids == encoder.image_pad).int() + 2 * (input_ids == encoder.video_pad).int()
    # --compile: generation runs the layers eager; under a KV cache each compiled layer's graph specialises on its
    # layer index and the cache's state, which would spend torch's recompile limit and leave training uncompiled
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"), \
            torch.compiler.set_stance("force_eager"):
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                             mm_token_type_ids=mm_token_type_ids.to(device), **vision, max_new_tokens=max_new_tokens,
                             do_sample=False, synced_gpus=synced, use_cache=True)
    return [encoder.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]


def evaluate_accuracy(model, val, encoder, cfg, device, rank, world_size, distributed):
    """Exact match of greedy replies against the reference replies of the first eval_generate val examples."""
    from torch.distributed.fsdp import FSDPModule

    samples = val[: cfg.eval_generate]
    mine = samples[rank::world_size]
    model.eval()
    # FSDP2: each unit gathers its weights once for all the replies, not again at every new token
    gather_once = isinstance(model, FSDPModule)
    if gather_once:
        model.set_reshard_after_forward(False)
    correct = 0
    for i in range(0, max(len(mine), math.ceil(len(samples) / world_size)), cfg.per_device_train_batch_size):
        chunk = mine[i : i + cfg.per_device_train_batch_size] or samples[:1]  # every rank runs the same number of batches
        prompts = [data.Sample(s.messages[:-1], s.images, s.videos) for s in chunk]
        replies = generate(model, encoder, prompts, device, cfg.max_new_tokens, synced=distributed)
        if mine[i : i + cfg.per_device_train_batch_size]:
            correct += sum(r.strip() == s.messages[-1]["content"].strip() for r, s in zip(replies, chunk))
    if gather_once:
        for unit in model.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()
        model.set_reshard_after_forward(cfg.fsdp_reshard_after_forward)  # shard_model's setting, on every unit
    model.train()
    model.config.use_cache = False
    return all_reduce_sum(torch.tensor(float(correct), device=device), distributed).item() / len(samples)


def checkpoint_dirs(output_dir):
    """Complete checkpoints only (a half-written one is still named *.tmp), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n[len("checkpoint-"):].isdigit()]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n.split("-")[1]))]


def save_checkpoint(model, optimizer, scheduler, cfg, state, rank, distributed):
    """checkpoint-STEP/: the model (full, Hugging Face format) or the adapter (PEFT format), plus what an exact resume
    needs. Written to a .tmp folder, then renamed, so a crash never leaves a checkpoint that looks complete."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    final = os.path.join(cfg.output_dir, f"checkpoint-{state['step']}")
    if rank == 0:
        nonfinite = [k for k, v in model_state.items() if v.is_floating_point() and not v.isfinite().all()]
        if nonfinite:  # NaN steps are skipped, so only an overflowing update gets here: never write it as a checkpoint
            raise SystemExit(f"not saving step {state['step']}: NaN/inf weights in {nonfinite[:3]}; lower --learning_rate")
        tmp = final + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        if cfg.train_type == "lora":
            lora.save_adapter(model, tmp, state_dict=model_state, base_model_name_or_path=cfg.model)
        else:
            model.save_pretrained(tmp, state_dict=model_state)
        base = data.resolve_model(cfg.model)
        for name in os.listdir(base) if os.path.isdir(base) else []:  # tokenizer, processor, chat template
            if not name.endswith((".safetensors", ".safetensors.index.json", ".bin")) and name not in ("config.json", "generation_config.json", "training_state.pt", "trainer_state.json") \
                    and os.path.isfile(os.path.join(base, name)) and not os.path.exists(os.path.join(tmp, name)):
                shutil.copy(os.path.join(base, name), tmp)
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng}, os.path.join(tmp, "training_state.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, final)
        # keep the latest and the best by eval loss, up to save_total_limit
        dirs = checkpoint_dirs(cfg.output_dir)
        scores = {}
        for d in dirs:
            with open(os.path.join(d, "trainer_state.json")) as f:
                scores[d] = json.load(f).get("eval_loss") or float("inf")
        keep = {dirs[-1]} | set(sorted(dirs, key=lambda d: scores[d])[: max(cfg.save_total_limit - 1, 0)])
        for d in dirs:
            if d not in keep and cfg.save_total_limit > 0:
                shutil.rmtree(d, ignore_errors=True)
    if distributed:
        dist.barrier()
    return final


def load_checkpoint(path, model, optimizer, scheduler, cfg):
    """Restore what the model load did not: the adapter (LoRA), optimizer, scheduler and RNG. -> trainer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    if cfg.train_type == "lora":  # full fine-tuning loaded its weights from the checkpoint in load_model
        set_model_state_dict(model, lora.read_adapter_weights(path), options=StateDictOptions(full_state_dict=True, strict=False))
    saved = torch.load(os.path.join(path, "training_state.pt"), weights_only=True)
    set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    if torch.cuda.is_available() and saved["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    with open(os.path.join(path, "trainer_state.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_config(argv)
    distributed, rank, world_size, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(cfg.seed)
    if master:
        check_output_dir(cfg)  # seconds, before the slow model load and data encoding
        with open(os.path.join(cfg.output_dir, "args.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)

    vision = data.VisionConfig(cfg.min_pixels, cfg.max_pixels, cfg.fps, cfg.video_min_frames, cfg.video_max_frames, cfg.video_max_pixels)
    encoder = data.Encoder(data.resolve_model(cfg.model), vision, cfg.max_length, cfg.truncation_strategy,
                           cfg.trust_remote_code)
    train, val, kept, lengths, encode_kwargs = load_data(cfg, encoder, rank, world_size, distributed)
    plan_of = lambda epoch: data.make_plan(kept, lengths, cfg.per_device_train_batch_size, cfg.packing, cfg.max_length,
                                           cfg.seed, epoch, rank, world_size)
    steps_per_epoch = len(plan_of(0)) // cfg.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise SystemExit("fewer micro-batches than --gradient_accumulation_steps: use more data or a smaller batch")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    resume = cfg.resume_from_checkpoint
    if resume == "latest":
        found = checkpoint_dirs(cfg.output_dir)
        resume = found[-1] if found else None
    model, trainable, total = load_model(cfg, device, distributed, resume if cfg.train_type == "full" else None)
    if distributed:
        model = shard_model(model, cfg, device)
    if cfg.compile:  # after sharding: FSDP2's hooks stay outside the compiled layer
        for layer in [*model.model.language_model.layers, *model.model.visual.blocks]:
            layer.compile(dynamic=True)  # rows and images of any size without a recompile
    groups = lora.param_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.lorap_lr_ratio, cfg.vit_lr, cfg.aligner_lr)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                  fused=True)  # fused: also the only AdamW that can skip a step on the GPU (found_inf)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    state = {"step": 0, "epoch": 0, "batch": 0, "eval_loss": None, "skipped_steps": 0}
    if resume:
        state = {"skipped_steps": 0, **load_checkpoint(resume, model, optimizer, scheduler, cfg)}
        if master:
            print(f"resumed from {resume} at step {state['step']}")
    if master:
        print(f"{len(kept)} training examples, {len(val)} validation; {steps_per_epoch} steps per epoch, {total_steps} steps; "
              f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable ({cfg.train_type}); {world_size} process(es) on {device.type}")
    tracker = None
    if master and cfg.report_to == "wandb":
        import wandb

        tracker = wandb.init(config=asdict(cfg), dir=cfg.output_dir)
    elif master and cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        tracker = SummaryWriter(cfg.output_dir)
    metrics_file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") if master else None

    def log(metrics):
        if not master:
            return
        metrics_file.write(json.dumps(metrics) + "\n")
        metrics_file.flush()
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()), flush=True)
        if cfg.report_to == "wandb":
            tracker.log(metrics, step=metrics["step"])
        elif cfg.report_to == "tensorboard":
            for k, v in metrics.items():
                tracker.add_scalar(k, v, metrics["step"])

    def evaluate():
        result = {"step": state["step"], "eval_loss": evaluate_loss(model, val, encoder, cfg, device, rank, world_size, distributed)}
        if cfg.eval_generate > 0:
            result["eval_accuracy"] = evaluate_accuracy(model, val, encoder, cfg, device, rank, world_size, distributed)
        state["eval_loss"] = result["eval_loss"]
        log(result)
        return result

    model.train()
    window = {"loss": torch.zeros(2, device=device), "tokens": 0, "time": time.time()}  # summed NLL, labelled tokens
    progress = None
    if master and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=state["step"], desc="sft", dynamic_ncols=True)
    # SIGTERM only raises a flag: the step in progress finishes, then every process saves and the run exits 0
    sigterm = {"received": False}
    if cfg.save_on_sigterm:
        default_sigterm = signal.signal(signal.SIGTERM, lambda *_: sigterm.update(received=True))
    stop, bad_in_a_row, checkpoint_path = False, 0, None
    outcomes = []  # (flags [nonfinite, SIGTERM] on their way to the host, the event that marks their arrival) per step

    def due(every):  # a step on which something happens every `every` steps (and the last step)
        return every > 0 and (state["step"] % every == 0 or state["step"] == total_steps)

    while state["step"] < total_steps and not stop:
        plan = plan_of(state["epoch"])
        loader = iter(make_loader(cfg, train, encoder, plan[state["batch"]:], encode_kwargs))
        while state["step"] < total_steps and not stop and state["batch"] + cfg.gradient_accumulation_steps <= len(plan):
            micro_batches = [next(loader) for _ in range(cfg.gradient_accumulation_steps)]
            state["batch"] += cfg.gradient_accumulation_steps
            # normalise by the labelled tokens of the whole global batch, counted before any backward
            n_tokens = sum(int((b["labels"] != data.IGNORE).sum()) for b in micro_batches)
            n_global = all_reduce_sum(torch.full((), float(n_tokens), device=device), distributed)  # (a fill: no sync)
            step_sums = torch.zeros(2, device=device)  # this step's summed NLL and labelled tokens
            for i, batch in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                if distributed:
                    model.set_requires_gradient_sync(last)  # reduce gradients once per step, not per micro-batch
                logps, n = token_logps(model, batch, device)
                loss = -logps.sum() / n_global * world_size  # FSDP averages gradients over processes
                loss.backward()
                step_sums[0] -= logps.detach().sum()
                step_sums[1] += n
                window["tokens"] += batch["input_ids"].numel()
            grad_norm = clip_grad_norm(model, cfg.max_grad_norm, device, distributed)
            # no host sync in the step: a step whose loss or gradient norm is NaN/inf on any process is skipped on the GPU
            # (fused AdamW leaves weights and moments untouched when found_inf is 1), and the host reads what happened
            # (skipped? SIGTERM?) a step later, once the GPU is past it, or at once before logging, evaluating or saving
            finite = torch.isfinite(step_sums[0]) & torch.isfinite(grad_norm)
            flags = all_reduce_sum(torch.stack([~finite, finite.new_full((), sigterm["received"])]).float(), distributed) > 0
            # (offloaded, AdamW runs on the host, which must not read found_inf before its copy has landed)
            optimizer.found_inf = flags[0].float().cpu() if cfg.offload_optimizer else flags[0].float()
            optimizer.step()
            window["loss"] += torch.where(flags[0], 0.0, step_sums)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            if progress:
                progress.update(1)
            copied = torch.cuda.Event() if device.type == "cuda" else None  # recorded after the copy is queued
            outcomes.append((flags.to("cpu", non_blocking=True), copied))
            if copied:
                copied.record()
            boundary = due(cfg.logging_steps) or val and due(cfg.eval_steps) or due(cfg.save_steps)
            while outcomes and (len(outcomes) > 1 or boundary or stop or bad_in_a_row >= cfg.max_bad_steps):
                outcome, copied = outcomes.pop(0)
                if copied:
                    copied.synchronize()
                nonfinite, received = outcome.tolist()
                state["skipped_steps"] += nonfinite
                bad_in_a_row = bad_in_a_row + 1 if nonfinite else 0
                stop = stop or received
            if due(cfg.logging_steps) or bad_in_a_row >= cfg.max_bad_steps:
                summed = all_reduce_sum(window["loss"].clone(), distributed)
                tokens = all_reduce_sum(torch.tensor(float(window["tokens"]), device=device), distributed).item()
                elapsed = time.time() - window["time"]
                metrics = {"step": state["step"], "loss": (summed[0] / summed[1]).item(),  # nan when every step was skipped
                           "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr()[0],
                           "epoch": state["epoch"] + state["batch"] / len(plan), "tokens_per_s": tokens / elapsed / world_size,
                           "skipped_steps": state["skipped_steps"]}
                if device.type == "cuda":
                    metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                log(metrics)
                window = {"loss": torch.zeros(2, device=device), "tokens": 0, "time": time.time()}
            if bad_in_a_row >= cfg.max_bad_steps:
                if cfg.save_on_sigterm:
                    signal.signal(signal.SIGTERM, default_sigterm)
                raise SystemExit(f"stopped at step {state['step']}: the loss or gradient norm was NaN/inf in {bad_in_a_row} steps "
                                 f"in a row ({state['skipped_steps']} skipped in all; none changed the weights, so every checkpoint "
                                 f"is finite). Try a lower --learning_rate or --max_grad_norm, check the data (python data.py "
                                 f"check FILE), keep bf16 rather than fp16 on GPU, or raise --max_bad_steps to skip more")
            if val and not stop and due(cfg.eval_steps):
                evaluate()
            if stop or due(cfg.save_steps):
                checkpoint_path = save_checkpoint(model, optimizer, scheduler, cfg, state, rank, distributed)
        if state["batch"] + cfg.gradient_accumulation_steps > len(plan):
            state["epoch"], state["batch"] = state["epoch"] + 1, 0
    if cfg.save_on_sigterm:
        signal.signal(signal.SIGTERM, default_sigterm)
    if progress:
        progress.close()
    if master and stop:
        print(f"SIGTERM: saved {checkpoint_path} at step {state['step']} of {total_steps}; to go on, run the same command "
              f"with --resume_from_checkpoint latest", flush=True)
    elif master:
        print(f"done: {state['step']} steps; checkpoints in {cfg.output_dir}")
    if tracker is not None:  # the last metrics are still buffered until the tracker is closed
        tracker.finish() if cfg.report_to == "wandb" else tracker.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    finally:  # also after an error (out of memory, say): a GPU run is a process group even alone, and must let go
        if dist.is_initialized():
            dist.destroy_process_group()
