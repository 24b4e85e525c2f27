"""
train_dpo.py: Direct Preference Optimization (DPO) of Qwen-VL models, LoRA or full, on (prompt, chosen, rejected) pairs.

    python train_sft.py --max_steps 60 --output_dir outputs/sft_short     # demo, step 1: a short SFT checkpoint
    python train_dpo.py --model outputs/sft_short/checkpoint-60           # demo, step 2: DPO on CPU, under 3 minutes
    python train_dpo.py --model Qwen/Qwen2.5-VL-7B-Instruct --dataset pairs.jsonl --train_type lora --lora_rank 32 \
        --freeze_vit true --learning_rate 5e-5                            # LoRA: the reference is the adapters-off model
    torchrun --nproc_per_node 8 train_dpo.py --config dpo.yaml            # FSDP2 over 8 GPUs
    python train_dpo.py --model ... --dataset ... --precompute_ref_logps true  # full fine-tuning, no reference in memory

Pairs come in any format of data.py (ms-swift `rejected_response`, `chosen`/`rejected`); both replies share the
prompt and its images. The chosen and rejected sequences of a micro-batch's pairs go through one packed forward pass
(attention never crosses sequences), and each sequence's log-probability is the sum over its reply tokens.

The reference policy: with LoRA, the same model with its adapters switched off (no second copy in memory); with full
fine-tuning, a frozen copy of the starting model (sharded like the policy); with --precompute_ref_logps, one pass
before training stores every pair's reference log-probabilities, and no reference model is kept at all.
"""
import fnmatch
import hashlib
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
import torch.nn.functional as F
import yaml
from torch.utils.checkpoint import checkpoint

import data
import lora


@dataclass
class Config:
    # model and data
    model: str = "outputs/sft_short/checkpoint-60"  # a checkpoint folder (the demo's SFT run), hub id or tiny model name
    trust_remote_code: bool = False  # let transformers run Python code shipped with the model (only for repos you trust)
    dataset: list[str] = field(default_factory=lambda: ["demo#960"])  # pair files, each optionally `file%50` or
    # `file#2000`; "demo#960": 960 demo pairs, one epoch of which is the CPU demo (120 steps, under 3 minutes)
    val_dataset: list[str] = field(default_factory=lambda: ["demo"])  # "demo": the demo's held-out pairs (demo runs)
    split_dataset_ratio: float = 0.0  # hold out this fraction of --dataset for validation instead
    media_root: str | None = None  # media paths are absolute, relative to this, or relative to the data file
    skip_bad_records: bool = False  # drop bad records (and report their count) instead of stopping at the first
    max_length: int = 2048  # tokens per sequence (prompt + one reply)
    truncation_strategy: str = "error"  # error | left | right | delete, for sequences above max_length
    num_workers: int = 1  # DataLoader workers that decode media and tokenise
    min_pixels: int | None = None  # image pixel bounds (default: the processor's, or MIN_PIXELS / MAX_PIXELS)
    max_pixels: int | None = None
    fps: float = 2.0  # video frames sampled per second, within [video_min_frames, video_max_frames]
    video_min_frames: int = 4
    video_max_frames: int = 64
    video_max_pixels: int = 128 * 28 * 28
    # DPO
    beta: float = 0.1  # strength of the KL tie to the reference: small beta lets the policy move further
    loss_type: str = "sigmoid"  # sigmoid (DPO) | ipo | hinge (SLiC)
    label_smoothing: float = 0.0  # conservative DPO: the assumed probability that a preference label is flipped
    rpo_alpha: float = 1.0  # add alpha x the chosen reply's NLL (RPO, Pang et al. 2024), 0: plain DPO. It keeps the
    # chosen replies likely: plain DPO lowers both sides' log-probabilities, and on the demo that breaks the replies
    precompute_ref_logps: bool = False  # one reference pass before training, then no reference model in memory
    # what is trained
    train_type: str = "full"  # full | lora
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # 0: the policy at step 0 equals the reference exactly
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # names, or one regex
    use_rslora: bool = False
    freeze_vit: bool = False
    freeze_aligner: bool = False
    freeze_llm: bool = False
    # optimisation
    learning_rate: float | None = None  # default: the demo's, 5e-4 (full) / 3e-3 (LoRA); real models want ~5e-7 / ~5e-5
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
    warmup_ratio: float = 0.1
    warmup_steps: int = 0  # overrides warmup_ratio when > 0
    per_device_train_batch_size: int = 8  # pairs per micro-batch, packed into one row (2x that many sequences)
    gradient_accumulation_steps: int = 1
    num_train_epochs: float = 1.0
    max_steps: int = -1  # overrides num_train_epochs when > 0
    # recompute activations in backward: auto (GPU: only as many decoder layers and vision blocks as the GPU's memory
    # needs, decided before the first step and logged; CPU: none) | true (every layer and block) | false
    gradient_checkpointing: str = "auto"
    gradient_checkpointing_layers: int = -1  # N >= 0 (unless false): exactly the first N decoder layers, every vision block
    compile: str = "auto"  # auto (on GPU) | true | false: torch.compile each decoder layer and vision block (fused norms, rotary)
    # the policy's trainable weights AdamW updates, and its moments: float32 keeps updates below bf16's resolution (~0.4%
    # of a weight); bfloat16 is what a bf16-loaded model gets from HF Trainer: half the memory, room to recompute fewer layers
    master_dtype: str = "float32"  # float32 | bfloat16
    # the language model's Linears multiply in float8 with one scale per tensor (lora.fp8_linears; GPUs: H100 and newer)
    fp8: bool = False
    attn_implementation: str = "varlen"  # varlen: packed rows, images and windows through a variable-length kernel; sdpa | eager
    seed: int = 42
    # distributed
    fsdp_reshard_after_forward: bool = True  # false: keep gathered weights between forward and backward (ZeRO-2-like)
    fsdp_offload: bool = False  # FSDP2 CPU offload of parameters, gradients and optimizer state
    # evaluation, logging, checkpoints
    output_dir: str = "outputs/dpo"
    logging_steps: int = 10
    eval_steps: int = 40
    eval_generate: int = 100  # exact match of greedy replies with the chosen replies of up to this many val pairs (0: off)
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
    if cfg.loss_type not in ("sigmoid", "ipo", "hinge"):
        raise SystemExit(f"--loss_type {cfg.loss_type!r}: choose sigmoid, ipo or hinge")
    if cfg.master_dtype not in ("float32", "bfloat16"):
        raise SystemExit(f"--master_dtype {cfg.master_dtype}: use float32 or bfloat16")
    for name in ("gradient_checkpointing", "compile"):
        setattr(cfg, name, str(getattr(cfg, name)).lower())  # (a --config file may give a boolean)
        if getattr(cfg, name) not in ("auto", "true", "false"):
            raise SystemExit(f"--{name} {getattr(cfg, name)}: use auto, true or false")
    if cfg.learning_rate is None:
        cfg.learning_rate = 3e-3 if cfg.train_type == "lora" else 5e-4
    cfg.val_dataset = [name for name in cfg.val_dataset if name]  # `--val_dataset ""`: no validation set
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# The loss: a pure function of per-pair sequence log-probabilities

def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, loss_type="sigmoid", label_smoothing=0.0):
    """Per-pair preference losses and implicit rewards. Every input is [P]: a sum of log-probabilities over one reply.

    h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x)), the chosen reply's log-ratio minus the rejected's.
      sigmoid: -log sigmoid(beta h)                  DPO, Rafailov et al. 2023, eq. 7
               with label_smoothing e: -(1 - e) log sigmoid(beta h) - e log sigmoid(-beta h): conservative DPO
               (Mitchell 2023), each label taken as flipped with probability e
      ipo:     (h - 1 / (2 beta))^2                  IPO, Azar et al. 2023, the sampled IPO loss (beta = their tau); h of
               sequence sums here, where TRL uses per-token means: an IPO beta from TRL needs rescaling
      hinge:   max(0, 1 - beta h)                    SLiC-HF's calibration loss (Zhao et al. 2023, eq. 1, delta = 1/beta)
                                                     on the reference-normalised h, as TRL's "hinge"
    Rewards: beta x each reply's log-ratio (DPO eq. 5 without the partition function), detached.
    -> (losses [P], chosen_rewards [P], rejected_rewards [P])"""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose sigmoid, ipo or hinge")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


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
# Data: a pair is one Sample whose messages end with the chosen reply and whose `rejected` is the other reply

def load_data(cfg, encoder, rank, world_size):
    """-> (training pairs, validation pairs, kept training indices, the most vision patches of a kept pair's side).
    Every pair is encoded once up front (both
    replies), the processes sharing the work: bad records are found now."""
    train, val = data.load_train_val(cfg.dataset, cfg.val_dataset, cfg.split_dataset_ratio, "dpo", cfg.seed,
                                     cfg.media_root, cfg.skip_bad_records)
    measure = lambda samples: data.measure_lengths(samples, encoder, cfg.skip_bad_records, cfg.num_workers,
                                                   rank=rank, world_size=world_size)
    chosen, rejected = measure(train), measure([rejected_sample(s) for s in train])
    kept = set(chosen[0]) & set(rejected[0])
    return train, val, sorted(kept), max(chosen[3], default=0)  # (both sides of a pair have its images)


def rejected_sample(sample):
    """The pair's rejected side as a Sample of its own (used to measure it; encoding uses Encoder's `reply`)."""
    return data.Sample(sample.messages[:-1] + [{"role": "assistant", "content": sample.rejected}], sample.images,
                       sample.videos, source=sample.source)


def encode_reply(encoder, sample, reply=None):
    """Encode prompt + one reply, labels on that final reply only: earlier assistant turns are shared by both sides
    of the pair, so they carry no preference (and DPO's log-probabilities are sums over the completion)."""
    example = encoder(sample, reply=reply)
    if example is None:
        return None
    labels = example["labels"]
    labelled = (labels != data.IGNORE).nonzero().squeeze(1)
    if len(labelled):
        starts = labelled[torch.cat([torch.tensor([True]), labelled[1:] != labelled[:-1] + 1])]
        labels[: starts[-1]] = data.IGNORE  # keep only the last run of labels: the final reply and its <|im_end|>
    return example


class PairDataset(torch.utils.data.Dataset):
    """Item i: micro-batch i of the plan, its pairs packed into one row [chosen_1 .. chosen_P, rejected_1 .. rejected_P]
    (attention never crosses sequences). With varlen attention each pair's prompt (and its images) is in the row once,
    its rejected reply attending to the chosen example's prompt (data.collate_shared: a 1024-token prompt with two
    1024-token replies is 3,073 tokens instead of 4,096); with SDPA or eager attention, whose masks come from the
    positions, it is there twice. `index` holds the pairs' dataset indices."""

    def __init__(self, samples, encoder, plan, share_prompts):
        self.samples, self.encoder, self.plan, self.share_prompts = samples, encoder, plan, share_prompts

    def __len__(self):
        return len(self.plan)

    def __getitem__(self, i):
        chosen, rejected, index = [], [], []
        for j in self.plan[i]:
            c = encode_reply(self.encoder, self.samples[j])
            r = encode_reply(self.encoder, self.samples[j], reply=self.samples[j].rejected)
            if c is not None and r is not None:  # a val pair over --max_length under --truncation_strategy delete
                chosen.append(c), rejected.append(r), index.append(j)
        if not index:
            return None
        if self.share_prompts:  # the rejected reply i shares chosen reply i's prompt
            batch = data.collate_shared(chosen + rejected, [*range(len(chosen))] * 2)
        else:
            batch = data.collate(chosen + rejected, packing=True)
        batch |= data.vision_windows(batch, self.encoder.config)  # Qwen2.5-VL's window order, built here (data.py)
        batch["index"] = torch.tensor(index)
        batch["chosen_tokens"] = sum(int((c["labels"] != data.IGNORE).sum()) for c in chosen)
        return batch


def spread(indices, batch_size, rank, world_size):
    """For a pass over every index (reference scores, evaluation): this rank's share in micro-batches, as many on every
    rank (FSDP needs all of them in each forward); a rank short of pairs gets [] and runs a stand-in batch for it."""
    mine = indices[rank::world_size]
    return [mine[i : i + batch_size] for i in range(0, math.ceil(len(indices) / world_size), batch_size)]


def make_loader(cfg, samples, encoder, plan):
    # its own generator: creating a loader must not draw from the global RNG, or a resumed run's dropout would differ
    pairs = PairDataset(samples, encoder, plan, share_prompts=cfg.attn_implementation == "varlen")
    return torch.utils.data.DataLoader(pairs, batch_size=None, shuffle=False,
                                       num_workers=cfg.num_workers, pin_memory=torch.cuda.is_available(),
                                       generator=torch.Generator(), worker_init_fn=lambda _: init_worker(cfg.save_on_sigterm))


def init_worker(save_on_sigterm):
    torch.set_num_threads(1)  # workers must not oversubscribe cores
    if save_on_sigterm:  # torchrun and SLURM signal the whole process group: a worker that died would break the save
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (workers still end with their loader, or with the main process)


# ----------------------------------------------------------------------------------------------------------------
# Model: the policy, and the reference copy for full fine-tuning

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


def load_reference(cfg, device, distributed):
    """A frozen copy of cfg.model in eval mode (no dropout: it only scores), bf16 on the GPU; sharded like the policy,
    but always resharding (it runs forward only) and never offloaded."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reference = pretrained(cfg, data.resolve_model(cfg.model), dtype).requires_grad_(False).eval().to(device)
    if distributed:
        reference = shard_model(reference, replace(cfg, fsdp_reshard_after_forward=True, fsdp_offload=False), device)
    return reference


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
# Sequence log-probabilities: the vocabulary projected for labelled positions only and the fp32 log-softmax taken in
# chunks (recomputed in backward), so no [T, vocab] fp32 tensor is ever held; then summed per packed sequence.

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


def sequence_logps(model, batch, device):
    """-> (summed reply log-probability of every sequence of the packed row [S], labelled tokens per sequence [S])."""
    logps, _ = token_logps(model, batch, device)
    # the sequence each labelled position belongs to (cu_seqlens marks where each starts), found on the CPU
    sequence = torch.searchsorted(batch["cu_seqlens"][1:], (batch["labels"][0] != data.IGNORE).nonzero().squeeze(1),
                                  right=True)
    count = len(batch["cu_seqlens"]) - 1
    sums = logps.new_zeros(count).index_add(0, sequence.to(device), logps)
    return sums, torch.bincount(sequence, minlength=count).to(device)


@torch.no_grad()
def reference_logps(model, ref_model, ref_table, batch, device):
    """-> (ref_chosen_logps [P], ref_rejected_logps [P]) from the stored table, the frozen copy, or the adapters-off policy."""
    if ref_table is not None:
        pairs = ref_table[batch["index"]].to(device)
        return pairs[:, 0], pairs[:, 1]
    if ref_model is not None:
        sums, _ = sequence_logps(ref_model, batch, device)
    else:
        with lora.disable_adapters(model):
            sums, _ = sequence_logps(model, batch, device)
    return sums.chunk(2)


def ref_table_path(cfg, split):
    """Stored reference log-probabilities are keyed by everything that changes them: model, data, encoding."""
    key = {k: getattr(cfg, k) for k in ("model", "dataset", "val_dataset", "split_dataset_ratio", "seed", "max_length",
                                       "truncation_strategy", "min_pixels", "max_pixels", "fps", "video_min_frames",
                                       "video_max_frames", "video_max_pixels", "media_root")}
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(cfg.output_dir, f"ref_logps-{split}-{digest}.pt")


@torch.no_grad()
def precompute_reference(model, samples, indices, encoder, cfg, device, rank, world_size, distributed, path):
    """One pass with the starting model (adapters off with LoRA) -> [len(samples), 2] reference log-probabilities of
    (chosen, rejected), saved to `path` (reused when it exists: a resumed run finds it)."""
    if os.path.exists(path):
        return torch.load(path, weights_only=True)
    table = torch.zeros(len(samples), 2)
    plan = spread(indices, cfg.per_device_train_batch_size, rank, world_size)
    model.eval()
    for pairs, batch in zip(plan, make_loader(cfg, samples, encoder, [p or indices[:1] for p in plan])):
        chosen, rejected = reference_logps(model, None, None, batch, device)  # adapters off: a no-op without LoRA
        if pairs:
            table[batch["index"]] = torch.stack([chosen, rejected], 1).float().cpu()
    model.train()
    table = all_reduce(table.to(device), distributed).cpu()  # each pair was scored by one rank, zeros elsewhere
    if rank == 0:
        torch.save(table, path + ".tmp")
        os.replace(path + ".tmp", path)
    return table


# ----------------------------------------------------------------------------------------------------------------
# Metrics: sums over pairs (and chosen tokens), reduced over processes, then divided

STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected", "pairs",
         "nll", "chosen_tokens")


def pair_stats(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, chosen_tokens):
    return torch.stack([losses.detach().sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                        (chosen_rewards > rejected_rewards).float().sum(), chosen_logps.detach().sum(),
                        rejected_logps.detach().sum(), torch.full((), float(len(losses)), device=losses.device),
                        -chosen_logps.detach().sum(), chosen_tokens.sum().float()]).double()


def summarise(sums, cfg, prefix=""):
    s = dict(zip(STATS, sums.tolist()))
    pairs = s["pairs"] or math.nan  # nan when every step of a logging window was skipped (NaN/inf)
    nll = s["nll"] / (s["chosen_tokens"] or math.nan)  # per chosen token, as the --rpo_alpha term
    out = {"loss": s["loss"] / pairs + cfg.rpo_alpha * nll}
    for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"):
        out[k] = s[k] / pairs
    out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
    if cfg.rpo_alpha:
        out["nll_loss"] = nll
    return {prefix + k: v for k, v in out.items()}


def pair_losses(model, ref_model, ref_table, batch, cfg, device):
    """One packed micro-batch of pairs -> (per-pair DPO losses [P], the chosen sequences' logps [P], its STATS sums)."""
    ref_chosen, ref_rejected = reference_logps(model, ref_model, ref_table, batch, device)
    logps, tokens = sequence_logps(model, batch, device)
    chosen, rejected = logps.chunk(2)
    losses, chosen_rewards, rejected_rewards = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta,
                                                        cfg.loss_type, cfg.label_smoothing)
    return losses, chosen, pair_stats(losses, chosen_rewards, rejected_rewards, chosen, rejected, tokens.chunk(2)[0])


def train_step(model, ref_model, ref_table, micro_batches, cfg, device, world_size, distributed):
    """Forward and backward every micro-batch of one step. -> (this process's loss, its STATS sums)."""
    # the loss is a mean over the pairs (and, for --rpo_alpha, the chosen tokens) of the whole global batch
    counts = torch.tensor([[len(b["index"]), b["chosen_tokens"]] for b in micro_batches], dtype=torch.float).sum(0)
    n_pairs, n_chosen_tokens = all_reduce(counts.to(device), distributed)  # (the division stays on the device: no sync)
    step_loss, step_sums = torch.zeros((), device=device), torch.zeros(len(STATS), dtype=torch.float64, device=device)
    for i, batch in enumerate(micro_batches):
        if distributed:
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)  # reduce gradients once per step
        losses, chosen, sums = pair_losses(model, ref_model, ref_table, batch, cfg, device)
        loss = losses.sum() / n_pairs
        if cfg.rpo_alpha:
            loss = loss + cfg.rpo_alpha * -chosen.sum() / n_chosen_tokens
        (loss * world_size).backward()  # FSDP averages gradients over processes
        step_loss += loss.detach()
        step_sums += sums
    return step_loss, step_sums


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
def evaluate_pairs(model, ref_model, ref_table, val, encoder, cfg, device, rank, world_size, distributed):
    """The training metrics on the held-out pairs, policy in eval mode."""
    model.eval()
    plan = spread(list(range(len(val))), cfg.per_device_train_batch_size, rank, world_size)
    sums = torch.zeros(len(STATS), dtype=torch.float64, device=device)
    for pairs, batch in zip(plan, make_loader(cfg, val, encoder, [p or [0] for p in plan])):
        if batch is None:
            continue
        stats = pair_losses(model, ref_model, ref_table, batch, cfg, device)[2]
        if pairs:
            sums += stats
    model.train()
    return summarise(all_reduce(sums, distributed), cfg, prefix="eval_")


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
# Checkpoints (the reference model and its log-probabilities are never saved)

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
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        # leave the DataLoader workers their cores: compute threads that share a core spin-wait, several times slower
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) - cfg.num_workers))  # (torchrun sets OMP_NUM_THREADS)
    if master:
        check_output_dir(cfg)  # seconds, before the slow model load and data encoding
        with open(os.path.join(cfg.output_dir, "args.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)

    resume = cfg.resume_from_checkpoint
    if resume == "latest":
        resume = (checkpoint_dirs(cfg.output_dir) or [None])[-1]
    if cfg.model == Config.model and not os.path.exists(cfg.model):  # reported before any data work
        raise SystemExit(f"{cfg.model} does not exist: the demo starts from a short SFT run; make it with\n"
                         f"    python train_sft.py --max_steps 60 --output_dir outputs/sft_short")
    if cfg.attn_implementation == "varlen":  # a rejected reply attends to its chosen one's prompt (a millisecond)
        data.check_shared_prompt_attention(device)
    model, trainable, total = load_model(cfg, device, resume if cfg.train_type == "full" else None)
    vision = data.VisionConfig(cfg.min_pixels, cfg.max_pixels, cfg.fps, cfg.video_min_frames, cfg.video_max_frames, cfg.video_max_pixels)
    encoder = data.Encoder(data.resolve_model(cfg.model), vision, cfg.max_length, cfg.truncation_strategy,
                           cfg.trust_remote_code)
    train, val, kept, max_patches = load_data(cfg, encoder, rank, world_size)
    # one epoch's micro-batches of pair indices for this process, shuffled with (seed, epoch): a resumed run sees the same
    plan_of = lambda epoch: data.make_plan(kept, [0] * len(kept), cfg.per_device_train_batch_size, False, 0, cfg.seed,
                                           epoch, rank, world_size)
    steps_per_epoch = len(plan_of(0)) // cfg.gradient_accumulation_steps
    if steps_per_epoch == 0:
        raise SystemExit("fewer micro-batches than --gradient_accumulation_steps: use more data or a smaller batch")
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * steps_per_epoch)

    if distributed:
        model = shard_model(model, cfg, device)
    if cfg.compile == "true" or cfg.compile == "auto" and device.type == "cuda":  # after sharding: FSDP2's hooks stay
        for layer in [*model.model.language_model.layers, *model.model.visual.blocks]:  # outside the compiled layer
            layer.compile(dynamic=True)  # rows and images of any size without a recompile (a reference copy: eager)
    # the reference: stored log-probabilities, the policy with adapters off (LoRA), or a frozen copy (full)
    ref_model = ref_table = val_ref_table = None
    if cfg.precompute_ref_logps:
        # scored by the starting model: the policy before its first update (LoRA: adapters off, whatever was resumed)
        scorer, splits = model, ["train", "val"] if val else ["train"]
        if resume and cfg.train_type == "full" and not all(os.path.exists(ref_table_path(cfg, s)) for s in splits):
            scorer = load_reference(cfg, device, distributed)
        ref_table = precompute_reference(scorer, train, kept, encoder, cfg, device, rank, world_size, distributed,
                                         ref_table_path(cfg, "train"))
        if val:
            val_ref_table = precompute_reference(scorer, val, list(range(len(val))), encoder, cfg, device, rank,
                                                 world_size, distributed, ref_table_path(cfg, "val"))
        del scorer
    elif cfg.train_type == "full":
        ref_model = load_reference(cfg, device, distributed)
    # --gradient_checkpointing auto: a micro-batch is one row of its pairs' chosen and rejected sequences
    auto_checkpointing(model, cfg, device, trainable, 2 * cfg.per_device_train_batch_size * cfg.max_length,
                       patches=2 * cfg.per_device_train_batch_size * max_patches)
    # for MFU: the policy's forward and backward, and the reference's forward (a third of that) unless precomputed
    counts = data.parameter_counts(model.config) if device.type == "cuda" else None
    ref_share = 1 if ref_table is not None else 4 / 3
    flops_of = lambda b: data.training_flops(model.config, *data.flop_inputs(b), counts=counts) * ref_share

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
        reference = "precomputed" if ref_table is not None else "frozen copy" if ref_model is not None else "adapters off"
        print(f"{len(kept)} training pairs, {len(val)} validation; {steps_per_epoch} steps per epoch, {total_steps} steps; "
              f"{trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters trainable ({cfg.train_type}); reference: {reference}; "
              f"{world_size} process(es) on {device.type}")
    log = open_log(cfg, master)
    evals = []

    def evaluate():
        result = {"step": state["step"], **evaluate_pairs(model, ref_model, val_ref_table, val, encoder, cfg, device,
                                                          rank, world_size, distributed)}
        if cfg.eval_generate > 0:
            result["eval_accuracy"] = evaluate_accuracy(model, val, encoder, cfg, device, rank, world_size, distributed,
                                                        2 * cfg.per_device_train_batch_size)
        result["elapsed_s"] = time.time() - start_time
        state["eval_loss"] = result["eval_loss"]
        log(result)
        evals.append(result)

    if val and state["step"] == 0:
        evaluate()  # the starting point: what DPO improves on
    model.train()
    new_window = lambda: {"sums": torch.zeros(len(STATS), dtype=torch.float64, device=device), "tokens": 0, "pairs": 0,
                          "flops": 0, "steps": 0, "time": time.time()}
    window = new_window()
    progress = None
    if master and sys.stderr.isatty():
        from tqdm import tqdm

        progress = tqdm(total=total_steps, initial=state["step"], desc="dpo", dynamic_ncols=True)
    # SIGTERM only raises a flag: the step in progress finishes, then every process saves and the run exits 0
    sigterm = {"received": False}
    if cfg.save_on_sigterm:
        default_sigterm = signal.signal(signal.SIGTERM, lambda *_: sigterm.update(received=True))
    stop, bad_in_a_row, checkpoint_path = False, 0, None
    while state["step"] < total_steps and not stop:
        plan = plan_of(state["epoch"])
        loader = iter(make_loader(cfg, train, encoder, plan[state["batch"]:]))
        while state["step"] < total_steps and not stop and state["batch"] + cfg.gradient_accumulation_steps <= len(plan):
            micro_batches = [next(loader) for _ in range(cfg.gradient_accumulation_steps)]
            state["batch"] += cfg.gradient_accumulation_steps
            step_loss, step_sums = train_step(model, ref_model, ref_table, micro_batches, cfg, device, world_size, distributed)
            grad_norm, skipped, stop = optimizer_step(model, optimizer, scheduler, step_loss, cfg, device, distributed,
                                                      sigterm["received"])
            state["step"] += 1
            state["skipped_steps"] += skipped  # no update from it; the step count and the data still advance
            bad_in_a_row = bad_in_a_row + 1 if skipped else 0
            if not skipped:
                window["sums"] += step_sums
            window["tokens"] += sum(b["input_ids"].numel() for b in micro_batches)
            window["pairs"] += sum(len(b["index"]) for b in micro_batches)
            window["steps"] += 1
            if counts:  # (from the host's tensors: no wait for the GPU)
                window["flops"] += sum(map(flops_of, micro_batches))
            if progress:
                progress.update(1)
            if due(cfg.logging_steps, state["step"], total_steps) or bad_in_a_row >= cfg.max_bad_steps:
                sums = all_reduce(window["sums"].clone(), distributed)
                counted = torch.tensor([window["tokens"], window["pairs"], window["flops"]], dtype=torch.float64, device=device)
                tokens, pairs, flops = all_reduce(counted, distributed).tolist()
                elapsed = time.time() - window["time"]
                metrics = {"step": state["step"], **summarise(sums, cfg), "grad_norm": grad_norm,
                           "lr": scheduler.get_last_lr()[0], "epoch": state["epoch"] + state["batch"] / len(plan),
                           "tokens_per_s": tokens / elapsed / world_size, "pairs_per_s": pairs / elapsed / world_size,
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
        if len(evals) > 1:  # the demo's result: preference accuracy up, task accuracy not down
            print("held-out " + ", ".join(f"{k} {evals[0][k]:.2f} -> {evals[-1][k]:.2f}" for k in
                                          ("eval_rewards/accuracies", "eval_accuracy", "eval_loss") if k in evals[0]))
    log.close()
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    finally:  # also after an error (out of memory, say): a GPU run is a process group even alone, and must let go
        if dist.is_initialized():
            dist.destroy_process_group()
