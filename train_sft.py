"""
train_sft.py: supervised fine-tuning (SFT) and multimodal continued pretraining (CPT) of Qwen-VL models.

    python train_sft.py                                   # demo: tiny-qwen2.5-vl learns to name colours on CPU
    python train_sft.py --model Qwen/Qwen2.5-VL-7B-Instruct --dataset train.jsonl --train_type lora
    torchrun --nproc_per_node 8 train_sft.py --config sft.yaml --packing true --max_length 8192
    python train_sft.py --dataset pretrain.jsonl --train_on all      # CPT: loss on every text token

Loss: the mean negative log-likelihood over every labelled token of the global batch (all processes, all
accumulation steps), so the result does not depend on how a batch is split.
"""
import fnmatch
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace

import torch
import torch.distributed as dist
import yaml
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
    # recompute activations in backward: auto (GPU: only as many decoder layers and vision blocks as the GPU's memory
    # needs, decided before the first step and logged; CPU: none) | true (every layer and block) | false
    gradient_checkpointing: str = "auto"
    gradient_checkpointing_layers: int = -1  # N >= 0 (unless false): exactly the first N decoder layers, every vision block
    compile: str = "auto"  # auto (on GPU) | true | false: torch.compile each decoder layer and vision block (fused norms, rotary)
    # the trainable weights AdamW updates, and its moments: float32 keeps updates below bf16's resolution (~0.4% of a
    # weight); bfloat16 is what a bf16-loaded model gets from HF Trainer: half the memory, room to recompute fewer layers
    master_dtype: str = "float32"  # float32 | bfloat16
    # the language model's Linears multiply in float8 with one scale per tensor (lora.fp8_linears; GPUs: H100 and newer)
    fp8: bool = False
    attn_implementation: str = "varlen"  # varlen: packed rows, images and windows through a variable-length kernel; sdpa | eager
    seed: int = 42
    # distributed
    fsdp_reshard_after_forward: bool = True  # false: keep gathered weights between forward and backward (ZeRO-2-like)
    fsdp_offload: bool = False  # FSDP2 CPU offload of parameters, gradients and optimizer state
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


def read_config(config_class, argv):
    """The command line (argv; None: sys.argv) parsed into config_class, over the defaults of `--config file`."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_class)
    argv = sys.argv[1:] if argv is None else argv
    if "--config" in argv:
        path = argv[argv.index("--config") + 1]
        with open(path) as f:
            defaults = yaml.safe_load(f) if path.endswith((".yaml", ".yml")) else json.load(f)
        unknown = set(defaults) - {f.name for f in fields(config_class)}
        if unknown:
            raise SystemExit(f"{path}: unknown option(s) {sorted(unknown)}")
        parser.set_defaults(**defaults)
    (cfg,) = parser.parse_args_into_dataclasses(args=argv)
    return cfg


def parse_config(argv=None):
    cfg = read_config(Config, argv)
    if cfg.learning_rate is None:
        cfg.learning_rate = 3e-3 if cfg.train_type == "lora" else 1e-3
    if cfg.master_dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"--master_dtype {cfg.master_dtype}: use float32 or bfloat16")
    for name in ("gradient_checkpointing", "compile"):
        setattr(cfg, name, str(getattr(cfg, name)).lower())  # (a --config file may give a boolean)
        if getattr(cfg, name) not in ("auto", "true", "false"):
            raise SystemExit(f"--{name} {getattr(cfg, name)}: use auto, true or false")
    cfg.val_dataset = [name for name in cfg.val_dataset if name]  # `--val_dataset ""`: no validation set
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


def all_reduce(x, distributed, op="sum"):
    """x summed (op "sum") or maximised (op "max") over the processes, in place; x itself without a group."""
    if distributed:
        dist.all_reduce(x, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return x


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

def load_data(cfg, encoder, rank, world_size):
    """-> (training samples, validation samples, kept training indices, their token counts, encode options).
    Every record is encoded once up front, the processes sharing the work: lengths for packing, bad records found now."""
    train, val = data.load_train_val(cfg.dataset, cfg.val_dataset, cfg.split_dataset_ratio, "sft", cfg.seed,
                                     cfg.media_root, cfg.skip_bad_records)
    encode_kwargs = {"train_on": cfg.train_on}
    kept, lengths, _, patches = data.measure_lengths(train, encoder, cfg.skip_bad_records, cfg.num_workers,
                                                     encode_kwargs, rank, world_size)
    return train, val, kept, lengths, patches, encode_kwargs


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

def pretrained(cfg, path, dtype):
    """The Hugging Face model at `path`, in `dtype`, with --attn_implementation and no KV cache (training)."""
    from transformers import AutoModelForImageTextToText

    attn_implementation = "sdpa" if cfg.attn_implementation == "varlen" else cfg.attn_implementation
    model = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation,
                                                        trust_remote_code=cfg.trust_remote_code)
    if cfg.attn_implementation == "varlen":
        data.use_varlen_attention(model)
    model.config.use_cache = False
    return model


def load_model(cfg, device, weights=None):
    """The policy from cfg.model, or from `weights` (a full checkpoint being resumed), with LoRA, freezing, the
    trainable weights in --master_dtype and gradient checkpointing (auto's is decided later: auto_checkpointing).
    -> (model, trainable parameters, all parameters)"""
    # GPU: frozen weights in bf16, trainable ones in master_dtype (the copy that FSDP2 casts to bf16 for compute, see
    # shard_model); CPU: fp32 throughout, unless the master weights are bf16
    dtype = torch.bfloat16 if device.type == "cuda" or cfg.master_dtype == "bfloat16" else torch.float32
    model = pretrained(cfg, weights or data.resolve_model(cfg.model), dtype)
    if cfg.train_type == "lora":
        lora.add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules, use_rslora=cfg.use_rslora)
    if cfg.fp8:  # (after LoRA: a LoRA layer's frozen base multiplies in float8 too)
        lora.fp8_linears(model)
    trainable, total = lora.set_trainable(model, cfg.train_type, cfg.freeze_vit, cfg.freeze_llm, cfg.freeze_aligner,
                                          master_dtype=getattr(torch, cfg.master_dtype))
    if cfg.gradient_checkpointing == "true" or cfg.gradient_checkpointing == "auto" and cfg.gradient_checkpointing_layers >= 0:
        # non-reentrant: works with frozen inputs (LoRA) and never marks a gradient ready twice. Vision blocks: all
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for i, layer in enumerate(model.model.language_model.layers):
            layer.gradient_checkpointing = cfg.gradient_checkpointing_layers < 0 or i < cfg.gradient_checkpointing_layers
    return model.to(device), trainable, total


def shard_model(model, cfg, device):
    """FSDP2: one unit per decoder layer and per vision block, then the root (embeddings, merger, head).
    bf16 compute, fp32 gradient reduction; the optimizer sees sharded master parameters (trainable ones are in
    --master_dtype since load_model; frozen ones stay bf16, which halves the memory of a LoRA base)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    param_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    kwargs = {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
              "reshard_after_forward": cfg.fsdp_reshard_after_forward}
    if cfg.fsdp_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for layer in model.model.language_model.layers:
        fully_shard(layer, **kwargs)
    # the vision blocks get their rotary cos/sin in fp32 and keep them, as transformers computes them. Needed while
    # requirements.txt allows torch < 2.13, which does not cast a unit's inputs when activation checkpointing
    # recomputes it: a forward-only cast made the recompute differ (and compiled blocks fail checkpointing's check)
    vision = {**kwargs, "mp_policy": replace(kwargs["mp_policy"], cast_forward_inputs=False)}
    for block in model.model.visual.blocks:
        fully_shard(block, **vision)
    fully_shard(model, **kwargs)
    # each unit gathers once now: with bf16 compute FSDP2 accumulates micro-batch gradients in fp32 through every
    # unit's gathered parameters, which a unit that has never run forward (the vision blocks on text-only data) does
    # not have yet (AttributeError '_unsharded_param'). Still so in torch 2.13: drop the loop once the oldest torch
    # requirements.txt allows passes test_sharded_model_accumulates_gradients_of_units_a_batch_never_ran without it
    for unit in [model, *model.model.language_model.layers, *model.model.visual.blocks]:
        unit.unshard()
        unit.reshard()
    return model


def auto_checkpointing(model, cfg, device, trainable, tokens, elsewhere=0, patches=None):
    """--gradient_checkpointing auto on a GPU: the fewest decoder layers and vision blocks (the first of each) that
    recompute their activations in backward for training to fit in 90% of the memory other processes leave
    (data.recompute_plan): what this process holds now (the model as sharded, a reference), what training adds
    (gradients, AdamW's moments, FSDP's gathered copies, the head's logits, the activations of `tokens` tokens a
    micro-batch, their vision blocks' over `patches` patches if known) and `elsewhere` bytes taken later (a colocated
    vLLM). Call it before the optimizer exists. CPU: none."""
    if cfg.gradient_checkpointing != "auto" or cfg.gradient_checkpointing_layers >= 0 or device.type != "cuda":
        return
    layers, blocks = model.model.language_model.layers, model.model.visual.blocks
    numel = lambda module: sum(p.numel() for p in module.parameters())  # (whole tensors, sharded or not)
    largest, root = max(map(numel, layers)), numel(model) - sum(map(numel, [*layers, *blocks]))  # root: embeddings, head
    # FSDP's bf16 copies gathered at once (every unit's when kept from forward to backward, else the root's and two
    # layers', one prefetched) and one unit's unsharded gradients (bf16, and fp32 to reduce)
    gathered = numel(model) if not cfg.fsdp_reshard_after_forward else root + 2 * largest
    unsharded = 2 * gathered + 6 * min(trainable, max(root, largest))
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    fixed = data.fixed_bytes(torch.cuda.memory_allocated(device) + elsewhere, trainable,
                             4 if cfg.master_dtype == "float32" else 2, world_size, unsharded, tokens,
                             model.config.text_config.vocab_size, cfg.fsdp_offload)
    free, capacity = torch.cuda.mem_get_info(device)
    budget = 0.9 * (free + torch.cuda.memory_reserved(device))  # 10%: the allocator's fragmentation, what is not counted
    activations = data.activation_bytes(model.config, tokens, cfg.compile != "false", patches)  # (GPU: auto compiles)
    n_layers, n_blocks, need = data.recompute_plan(budget, fixed, len(layers), len(blocks), activations)
    if dist.is_initialized():  # every process recomputes the same units: the one that needs most decides
        plan = torch.tensor([n_layers, n_blocks], device=device)
        dist.all_reduce(plan, op=dist.ReduceOp.MAX)
        n_layers, n_blocks = plan.tolist()
    if n_layers or n_blocks:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # (see load_model)
        for i, layer in enumerate(layers):
            layer.gradient_checkpointing = i < n_layers
        for i, block in enumerate(blocks):
            block.gradient_checkpointing = i < n_blocks
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"gradient checkpointing auto: recomputing {n_layers} of {len(layers)} decoder layers, {n_blocks} of "
              f"{len(blocks)} vision blocks (est. {need / 2**30:.0f} GiB of {capacity / 2**30:.0f})", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Loss: log-probabilities of the labelled tokens, the vocabulary projected for those tokens only and the fp32
# log-softmax taken in chunks (recomputed in backward), so no [T, vocab] fp32 tensor is ever held.

def model_inputs(batch, device):
    keys = ("input_ids", "attention_mask", "position_ids") + data.VISION_KEYS + data.PACKED_KEYS + data.WINDOW_KEYS
    return {k: batch[k].to(device, non_blocking=True) if torch.is_tensor(batch[k]) else batch[k]
            for k in keys if batch.get(k) is not None}


def chunk_logps(logits, targets, temperature=1.0, with_entropy=False):
    """-> (log-probabilities of targets [n] at `temperature`, each position's entropy [n] if asked, else None)"""
    logps = (logits.float() if temperature == 1 else logits.float() / temperature).log_softmax(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():  # logged, not trained on
            entropy = -(logps.exp() * logps).sum(-1)
    return torch.gather(logps, 1, targets[:, None]).squeeze(1), entropy


def token_logps(model, batch, device, temperature=1.0, with_entropy=False, chunk_size=1024):
    """-> (log-probabilities of the labelled tokens [N], row by row, their entropies [N] if asked, else None).
    Positions are shared across the batch rows. Which tokens are labelled is read from the labels while they are
    still on the CPU, so the host never waits for the GPU here."""
    labelled = batch["labels"] != data.IGNORE
    keep = labelled.any(0).nonzero().squeeze(1)  # columns with a label in some row
    # index_select/masked_select, not [:, keep][mask]: CPU advanced indexing of an 8k-token row takes ~8 ms a call
    labelled = labelled.index_select(1, keep)
    targets = batch["labels"].index_select(1, keep).masked_select(labelled).to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(**model_inputs(batch, device), logits_to_keep=keep.to(device), use_cache=False).logits
    if len(logits) == 1:  # one row (packed): a label in every kept column
        logits = logits[0]
    else:  # padded rows: the labelled positions, indexed from the CPU's mask (a boolean index on the GPU would sync)
        logits = logits.flatten(0, 1).index_select(0, labelled.flatten().nonzero().squeeze(1).to(device))
    out = [checkpoint(chunk_logps, logits[i : i + chunk_size], targets[i : i + chunk_size], temperature, with_entropy,
                      use_reentrant=False) for i in range(0, len(targets), chunk_size)]
    if not out:  # nothing labelled
        return logits.new_zeros(0), logits.new_zeros(0) if with_entropy else None
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]) if with_entropy else None


def train_step(model, micro_batches, device, world_size, distributed):
    """Forward and backward every micro-batch of one step. -> [summed NLL, labelled tokens] of this process."""
    # normalise by the labelled tokens of the whole global batch, counted before any backward
    n_tokens = sum(int((b["labels"] != data.IGNORE).sum()) for b in micro_batches)
    n_global = all_reduce(torch.full((), float(n_tokens), device=device), distributed)  # (a fill: no sync)
    sums = torch.zeros(2, device=device)
    for i, batch in enumerate(micro_batches):
        if distributed:
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)  # reduce gradients once per step
        logps, _ = token_logps(model, batch, device)
        (-logps.sum() / n_global * world_size).backward()  # FSDP averages gradients over processes
        sums[0] -= logps.detach().sum()
        sums[1] += len(logps)
    return sums


# ----------------------------------------------------------------------------------------------------------------
# Step and schedule

def clip_grad_norm(model, max_norm, device, distributed):
    """torch's clip_grad_norm_ on each process's shards of the gradients: the same clipping, without a DTensor
    dispatch per gradient (~30 ms of host time a step on a 3B model while the GPU waits). -> the global norm."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads).to(device)
    if distributed:  # each process holds a shard of every gradient
        norm = all_reduce(norm.float().square(), distributed).sqrt()
    torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].device))
    return norm


def optimizer_step(model, optimizer, scheduler, loss, cfg, device, distributed, sigterm):
    """Clip, then update unless the loss (this process's, a tensor) or the gradient norm is NaN/inf on any process:
    a skipped step leaves the weights and AdamW's moments as they were; the schedule moves on either way. The step's
    one host sync reads the norm and those flags and SIGTERM (`sigterm`: this process got one) from every process.
    -> (gradient norm, skipped, stop: some process got SIGTERM)"""
    grad_norm = clip_grad_norm(model, cfg.max_grad_norm, device, distributed)
    finite = torch.isfinite(loss.to(device)) & torch.isfinite(grad_norm)
    flags = all_reduce(torch.stack([~finite, finite.new_tensor(sigterm)]).float(), distributed, op="max")
    nonfinite, stop, grad_norm = torch.cat([flags, grad_norm.float().reshape(1)]).tolist()
    if not nonfinite:
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, bool(nonfinite), bool(stop)


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


def due(every, step, total_steps, steps_done=1):
    """Whether a thing done every `every` steps (and at the end) is due now, at `step`, the last `steps_done` steps
    having just run: a multiple of `every` was crossed, or the run is over. every <= 0: never."""
    return every > 0 and (step // every > (step - steps_done) // every or step >= total_steps)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation

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
        logps, _ = token_logps(model, batch, device)
        if chunk:  # a rank with nothing left ran a stand-in batch only to keep in step
            total += torch.stack([-logps.sum(), torch.tensor(float(len(logps)), device=device)])
    total = all_reduce(total, distributed)
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


def evaluate_accuracy(model, val, encoder, cfg, device, rank, world_size, distributed, batch_size):
    """Exact match of greedy replies, `batch_size` prompts per generate call, with the last reply of each of the
    first eval_generate val samples (the reference reply; for DPO, the chosen one)."""
    from torch.distributed.fsdp import FSDPModule

    samples = val[: cfg.eval_generate]
    mine = samples[rank::world_size]
    model.eval()
    # FSDP2: each unit gathers its weights once for all the replies, not again at every new token
    gather_once = isinstance(model, FSDPModule)
    if gather_once:
        model.set_reshard_after_forward(False)
    correct = 0
    for i in range(0, max(len(mine), math.ceil(len(samples) / world_size)), batch_size):
        chunk = mine[i : i + batch_size] or samples[:1]  # every rank runs the same number of batches
        prompts = [data.Sample(s.messages[:-1], s.images, s.videos) for s in chunk]
        replies = generate(model, encoder, prompts, device, cfg.max_new_tokens, synced=distributed)
        if mine[i : i + batch_size]:
            correct += sum(r.strip() == s.messages[-1]["content"].strip() for r, s in zip(replies, chunk))
    if gather_once:
        for unit in model.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()
        model.set_reshard_after_forward(cfg.fsdp_reshard_after_forward)  # shard_model's setting, on every unit
    model.train()
    model.config.use_cache = False
    return all_reduce(torch.tensor(float(correct), device=device), distributed).item() / len(samples)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

# the base model's files a checkpoint does not copy: its weights, and the files save_checkpoint writes itself
NOT_COPIED = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json", "config.json", "generation_config.json",
              "trainer_state.json")


def checkpoint_dirs(output_dir):
    """Complete checkpoints only (a half-written one is still named *.tmp), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n[len("checkpoint-"):].isdigit()]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n.split("-")[1]))]


def checkpoint_score(trainer_state):
    """What picks the best checkpoint, kept besides the latest (lower is better; None: not evaluated)."""
    return trainer_state.get("eval_loss")


def save_checkpoint(model, optimizer, scheduler, cfg, state, rank, distributed):
    """checkpoint-STEP/: the model (full, Hugging Face format) or the adapter (PEFT format), the base model's tokenizer
    and processor files, and what an exact resume needs (optimizer, scheduler, RNG, trainer state). Written to a .tmp
    folder, then renamed, so a crash never leaves a checkpoint that looks complete. Keeps the latest and the best by
    checkpoint_score, up to --save_total_limit. -> the checkpoint's folder"""
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
        for name in sorted(os.listdir(base)) if os.path.isdir(base) else []:
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in NOT_COPIED) \
                    and os.path.isfile(os.path.join(base, name)) and not os.path.exists(os.path.join(tmp, name)):
                shutil.copy(os.path.join(base, name), tmp)
        rng = {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
        torch.save({"optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rng}, os.path.join(tmp, "training_state.pt"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump(state, f, indent=2)
        os.replace(tmp, final)
        dirs, scores = checkpoint_dirs(cfg.output_dir), {}
        for d in dirs:
            with open(os.path.join(d, "trainer_state.json")) as f:
                score = checkpoint_score(json.load(f))
            scores[d] = float("inf") if score is None else score
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
# Logging

def progress_note(step, total_steps, seconds_per_step):
    """The progress a log line ends with where no tqdm bar shows it: 'step 40/250 (16%) 1.20 s/step, ETA 4m12s'."""
    left = round((total_steps - step) * seconds_per_step)
    eta = f"{left // 3600}h{left // 60 % 60:02d}m" if left >= 3600 else f"{left // 60}m{left % 60:02d}s"
    return f"step {step}/{total_steps} ({step / total_steps:.0%}) {seconds_per_step:.2f} s/step, ETA {eta}"


def open_log(cfg, master):
    """-> log(metrics, note=""): a line of metrics.jsonl, printed (with the note after it), and sent to --report_to's
    tracker (on the master process only); log.close() closes the tracker (which may hold the last metrics until then)
    and the file."""
    file = open(os.path.join(cfg.output_dir, "metrics.jsonl"), "a") if master else None
    tracker = None
    if master and cfg.report_to == "wandb":
        import wandb

        tracker = wandb.init(config=asdict(cfg), dir=cfg.output_dir)
    elif master and cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        tracker = SummaryWriter(cfg.output_dir)

    def log(metrics, note=""):
        if not master:
            return
        file.write(json.dumps(metrics) + "\n")
        file.flush()
        line = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        print(line + (f" | {note}" if note else ""), flush=True)
        if cfg.report_to == "wandb":
            tracker.log(metrics, step=metrics["step"])
        elif cfg.report_to == "tensorboard":
            for k, v in metrics.items():
                tracker.add_scalar(k, v, metrics["step"])

    def close():
        if tracker is not None:
            tracker.finish() if cfg.report_to == "wandb" else tracker.close()
        if file is not None:
            file.close()

    log.close = close
    return log


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_config(argv)
    distributed, rank, world_size, device = setup_distributed()
    master = rank == 0
    start_time = time.time()
    torch.manual_seed(cfg.seed)
    if master:
        check_output_dir(cfg)  # seconds, before the slow model load and data encoding
        with open(os.path.join(cfg.output_dir, "args.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)

    vision = data.VisionConfig(cfg.min_pixels, cfg.max_pixels, cfg.fps, cfg.video_min_frames, cfg.video_max_frames, cfg.video_max_pixels)
    encoder = data.Encoder(data.resolve_model(cfg.model), vision, cfg.max_length, cfg.truncation_strategy,
                           cfg.trust_remote_code)
    train, val, kept, lengths, patches, encode_kwargs = load_data(cfg, encoder, rank, world_size)
    plan_of = lambda epoch: data.make_plan(kept, lengths, cfg.per_device_train_batch_size, cfg.packing, cfg.max_length,
                                           cfg.seed, epoch, rank, world_size)
    steps_per_epoch = len(plan_of(0)) // cfg.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise SystemExit("fewer micro-batches than --gradient_accumulation_steps: use more data or a smaller batch")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    resume = cfg.resume_from_checkpoint
    if resume == "latest":
        resume = (checkpoint_dirs(cfg.output_dir) or [None])[-1]
    model, trainable, total = load_model(cfg, device, resume if cfg.train_type == "full" else None)
    if distributed:
        model = shard_model(model, cfg, device)
    if cfg.compile == "true" or cfg.compile == "auto" and device.type == "cuda":  # after sharding: FSDP2's hooks stay
        for layer in [*model.model.language_model.layers, *model.model.visual.blocks]:  # outside the compiled layer
            layer.compile(dynamic=True)  # rows and images of any size without a recompile
    # --gradient_checkpointing auto: a packed row holds max_length tokens, a padded one at most the longest example's;
    # no more vision patches a token than the example with the most
    tokens = cfg.per_device_train_batch_size * (cfg.max_length if cfg.packing else min(cfg.max_length, max(lengths)))
    auto_checkpointing(model, cfg, device, trainable, tokens,
                       patches=math.ceil(tokens * max((p / n for p, n in zip(patches, lengths)), default=0)))
    counts = data.parameter_counts(model.config) if device.type == "cuda" else None  # for MFU
    groups = lora.param_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.lorap_lr_ratio, cfg.vit_lr, cfg.aligner_lr)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    state = {"step": 0, "epoch": 0, "batch": 0, "eval_loss": None, "skipped_steps": 0}
    if resume:
        state = {"skipped_steps": 0, **load_checkpoint(resume, model, optimizer, scheduler, cfg)}
        if master:
            print(f"resumed from {resume} at step {state['step']}")
    if master:
        print(f"{len(kept)} training examples, {len(val)} validation; {steps_per_epoch} steps per epoch, {total_steps} steps; "
              f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable ({cfg.train_type}); {world_size} process(es) on {device.type}")
    log = open_log(cfg, master)

    def evaluate():
        result = {"step": state["step"], "eval_loss": evaluate_loss(model, val, encoder, cfg, device, rank, world_size, distributed)}
        if cfg.eval_generate > 0:
            result["eval_accuracy"] = evaluate_accuracy(model, val, encoder, cfg, device, rank, world_size, distributed,
                                                        cfg.per_device_train_batch_size)
        state["eval_loss"] = result["eval_loss"]
        log(result)

    model.train()
    new_window = lambda: {"loss": torch.zeros(2, device=device), "tokens": 0, "flops": 0, "steps": 0, "time": time.time()}
    window = new_window()  # loss: summed NLL, labelled tokens
    progress = None
    if master and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=state["step"], desc="sft", dynamic_ncols=True)
    # SIGTERM only raises a flag: the step in progress finishes, then every process saves and the run exits 0
    sigterm = {"received": False}
    if cfg.save_on_sigterm:
        default_sigterm = signal.signal(signal.SIGTERM, lambda *_: sigterm.update(received=True))
    stop, bad_in_a_row, checkpoint_path = False, 0, None
    while state["step"] < total_steps and not stop:
        plan = plan_of(state["epoch"])
        loader = iter(make_loader(cfg, train, encoder, plan[state["batch"]:], encode_kwargs))
        while state["step"] < total_steps and not stop and state["batch"] + cfg.gradient_accumulation_steps <= len(plan):
            micro_batches = [next(loader) for _ in range(cfg.gradient_accumulation_steps)]
            state["batch"] += cfg.gradient_accumulation_steps
            step_sums = train_step(model, micro_batches, device, world_size, distributed)
            grad_norm, skipped, stop = optimizer_step(model, optimizer, scheduler, step_sums[0], cfg, device, distributed,
                                                      sigterm["received"])
            state["step"] += 1
            state["skipped_steps"] += skipped  # no update from it; the step count and the data still advance
            bad_in_a_row = bad_in_a_row + 1 if skipped else 0
            if not skipped:
                window["loss"] += step_sums
            window["tokens"] += sum(b["input_ids"].numel() for b in micro_batches)
            window["steps"] += 1
            if counts:  # (from the host's tensors: no wait for the GPU)
                window["flops"] += sum(data.training_flops(model.config, *data.flop_inputs(b), counts=counts) for b in micro_batches)
            if progress:
                progress.update(1)
            if due(cfg.logging_steps, state["step"], total_steps) or bad_in_a_row >= cfg.max_bad_steps:
                summed = all_reduce(window["loss"].clone(), distributed)
                counted = torch.tensor([window["tokens"], window["flops"]], dtype=torch.float64, device=device)
                tokens, flops = all_reduce(counted, distributed).tolist()
                elapsed = time.time() - window["time"]
                metrics = {"step": state["step"], "loss": (summed[0] / summed[1]).item(),  # nan when every step was skipped
                           "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                           "epoch": state["epoch"] + state["batch"] / len(plan), "tokens_per_s": tokens / elapsed / world_size,
                           "skipped_steps": state["skipped_steps"]}
                if device.type == "cuda":
                    metrics["mfu"] = flops / elapsed / world_size / data.PEAK_FLOPS
                    metrics["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                log(metrics, "" if progress else progress_note(state["step"], total_steps, elapsed / window["steps"]))
                window = new_window()
            if bad_in_a_row >= cfg.max_bad_steps:
                if cfg.save_on_sigterm:
                    signal.signal(signal.SIGTERM, default_sigterm)
                raise SystemExit(f"stopped at step {state['step']}: the loss or gradient norm was NaN/inf in {bad_in_a_row} steps "
                                 f"in a row ({state['skipped_steps']} skipped in all; none changed the weights, so every checkpoint "
                                 f"is finite). Try a lower --learning_rate or --max_grad_norm, check the data (python data.py "
                                 f"check FILE), keep bf16 rather than fp16 on GPU, or raise --max_bad_steps to skip more")
            if val and not stop and due(cfg.eval_steps, state["step"], total_steps):
                evaluate()
            if stop or due(cfg.save_steps, state["step"], total_steps):
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
        print(f"done: {state['step']} steps in {time.time() - start_time:.0f} s; checkpoints in {cfg.output_dir}")
    log.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    finally:  # also after an error (out of memory, say): a GPU run is a process group even alone, and must let go
        if dist.is_initialized():
            dist.destroy_process_group()
