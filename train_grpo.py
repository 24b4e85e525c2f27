"""
train_grpo.py: GRPO and its variants (DAPO, Dr. GRPO, GSPO, CISPO, SAPO, RLOO, REINFORCE++) for Qwen-VL models, with
built-in or vLLM rollouts.

    python train_sft.py --learning_rate 1e-3 --lr_scheduler_type constant --warmup_ratio 0 --max_steps 70 \\
        --output_dir outputs/sft_for_grpo                                  # demo, 1: a mediocre colour namer (0.36)
    python train_grpo.py --model outputs/sft_for_grpo/checkpoint-70        # demo, 2: RL lifts held-out reward to ~0.7
    python train_grpo.py --model Qwen/Qwen2.5-VL-7B-Instruct --dataset rl.jsonl --train_type lora --learning_rate 1e-5 \\
        --reward_funcs accuracy format --reward_weights 1 0.5 --max_completion_length 1024 --beta 0.04
    torchrun --nproc_per_node 8 train_grpo.py --config grpo.yaml --reward_plugin my_rewards.py
    torchrun --nproc_per_node 8 train_grpo.py --config grpo.yaml --use_vllm true --sleep_level 1   # vLLM colocate
    CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6 torchrun --nproc_per_node 7 train_grpo.py --config grpo.yaml --use_vllm true \
        --vllm_mode server --async_generate true             # a vLLM server on GPU 7 (it prints how to start one)

A step (see train): take prompts; sample num_generations completions of each with the policy itself (rollout); score
them (score, with rewards.py); turn the scores into group-relative advantages (group_advantages); update the policy
with the clipped surrogate loss (grpo_loss), num_iterations times per rollout. Records are `messages` prompts
(+ images/videos); every other field (`solution`, ...) goes to the reward functions. Variants: DAPO = --loss_type dapo
--epsilon_high 0.28 --dynamic_sample true --overlong_filter true; Dr. GRPO = --loss_type dr_grpo --scale_rewards none;
GSPO = --importance_sampling_level sequence; CISPO = --loss_type cispo --epsilon_high 4. Multi-turn rollouts with tools:
--multi_turn_plugin env.py --max_turns N (play_episodes; examples/zoom_env.py). train_chord.py builds on this file: its
main is setup + train with CHORD's update.
"""
import contextlib
import fnmatch
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields, replace
from types import SimpleNamespace

import torch
import torch.distributed as dist
import yaml
from torch.utils.checkpoint import checkpoint

import data
import lora
import rewards


@dataclass
class Config:
    # model and data
    model: str = "tiny-qwen2.5-vl"  # local path, hub id, or tiny-qwen2.5-vl / tiny-qwen3-vl
    trust_remote_code: bool = False  # let transformers run Python code shipped with the model (only for repos you trust)
    dataset: list[str] = field(default_factory=lambda: ["demo#160"])  # RL records; "demo#160": 160 demo prompts, 40 steps
    val_dataset: list[str] = field(default_factory=lambda: ["demo"])  # held-out prompts; "demo": the demo's val split
    split_dataset_ratio: float = 0.0  # hold out this fraction of --dataset for validation instead
    media_root: str | None = None  # media paths are absolute, relative to this, or relative to the data file
    skip_bad_records: bool = False  # drop bad records (and report their count) instead of stopping at the first
    max_length: int = 2048  # prompt tokens; longer prompts follow truncation_strategy
    truncation_strategy: str = "error"  # error | left | delete
    num_workers: int = 2  # processes that encode every prompt once before training, to find bad records early
    min_pixels: int | None = None  # image pixel bounds (default: the processor's, or MIN_PIXELS / MAX_PIXELS)
    max_pixels: int | None = None
    fps: float = 2.0
    video_min_frames: int = 4
    video_max_frames: int = 64
    video_max_pixels: int = 128 * 28 * 28
    # rollouts
    num_generations: int = 8  # completions per prompt (the group whose mean is the baseline)
    max_completion_length: int = 8  # new tokens per completion; the demo's answer is a word and <|im_end|>
    temperature: float = 1.0  # sampling temperature; the loss scores the same tempered policy (as TRL does)
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0
    generation_batch_size: int = 0  # completions per generate call on each process (0: a whole rollout at once)
    multi_turn_plugin: str | None = None  # a .py file with step(messages, completion, turn, **columns) -> the next user
    # turn ({"content": ..., "images": [...]}: a tool's result) or None to end the episode (see play_episodes)
    max_turns: int = 1  # replies of the policy per episode at most (> 1 needs --multi_turn_plugin); 1: single-turn
    cuda_graph: bool = True  # GPU: each new token's step replays a CUDA graph (the same numbers, far fewer launches)
    use_vllm: bool = False  # generate with vLLM (same prompts, images, seeds, stop rules as the built-in rollout)
    vllm_mode: str = "colocate"  # colocate: an engine inside each training process, on its GPU | server: a vLLM server
    vllm_gpu_memory_utilization: float = 0.3  # colocate: the share of the GPU the engine takes (its weights + KV cache)
    vllm_max_model_len: int | None = None  # prompt + completion tokens a sequence may hold (default: max_length + max_completion_length)
    vllm_tensor_parallel_size: int = 1  # colocate: processes (GPUs) that share one engine, for a model too big for one GPU
    vllm_enable_prefix_caching: bool = True  # a prompt's completions share its KV cache and image encoding
    vllm_lora_sync: str = "adapter"  # LoRA: adapter (vLLM's LoRA, only the adapter is sent) | merged (W + scale B A sent as weights)
    sleep_level: int = 0  # colocate on GPU, while training: 0 the engine keeps its memory | 1 KV cache freed, weights backed up
    # to CPU | 2 both freed (the next sync sends every weight again). CPU: vLLM has no sleep mode
    offload_model: bool = False  # colocate: the training weights go to CPU while vLLM generates (with --sleep_level 1|2)
    offload_optimizer: bool = False  # colocate: AdamW's moments go to CPU while vLLM generates (with --sleep_level 1|2)
    vllm_server_host: str = "127.0.0.1"  # server mode: where the vLLM server listens
    vllm_server_port: int = 8000
    vllm_server_timeout: float = 240.0  # seconds to wait for the server at start (a 7B model takes ~2 min to come up)
    vllm_server_weight_transfer: str = "auto"  # auto: through /dev/shm to a server on this machine, NCCL elsewhere |
    # nccl: NCCL to a server on this machine too (on another GPU: NCCL cannot join two processes on one GPU)
    async_generate: bool = False  # server mode: the next step's rollout is generated while this step trains (one step
    # off-policy: the completions a step trains on come from the weights of the step before; see train)
    vllm_importance_sampling_correction: bool = False  # weight each token by min(exp(trainer_old - vllm), cap) (TIS)
    vllm_importance_sampling_cap: float = 3.0  # TRL's default cap
    # rewards and advantages
    reward_funcs: list[str] = field(default_factory=lambda: ["accuracy"])  # names in rewards.REWARDS or a plugin
    reward_weights: list[float] | None = None  # one per reward function; default 1.0 each
    reward_plugin: list[str] = field(default_factory=list)  # .py files whose functions become rewards
    reward_timeout: float = 0.0  # seconds a reward function may take on one batch (0: no limit; see rewards.py)
    reward_error: str = "raise"  # a reward raises, times out or returns NaN: raise (stop the run) | skip (None, counted)
    judge_url: str = "http://127.0.0.1:8001/v1"  # reward judge: an OpenAI-compatible endpoint (8000 is the rollout server's)
    judge_model: str = ""  # reward judge: the model name the endpoint serves ("": the first in its /v1/models)
    judge_prompt: str = ""  # reward judge: a file with {question} {completion} {solution} ("": rewards.JUDGE_PROMPT, 0-10)
    judge_max_concurrency: int = 16  # reward judge: requests in flight at once, per process
    scale_rewards: str = "group"  # group | batch | none: what the advantage is divided by (none: Dr. GRPO)
    advantage_estimator: str = "grpo"  # grpo | rloo | reinforce_plus_plus: the baseline (see group_advantages)
    dynamic_sample: bool = False  # DAPO: replace groups whose rewards all agree (no signal) with new prompts
    max_resample_times: int = 3  # extra rounds of prompts per step for dynamic_sample
    overlong_filter: bool = False  # DAPO: completions cut at max_completion_length get no loss
    # loss
    loss_type: str = "grpo"  # grpo | bnpo | dr_grpo | dapo | cispo | sapo (see grpo_loss)
    tau_pos: float = 1.0  # sapo: the soft gate's temperature for tokens of completions with A > 0
    tau_neg: float = 1.05  # sapo: ... with A <= 0 (sharper: the paper finds negative updates the less stable)
    beta: float = 0.0  # KL to the reference; 0 (DAPO, Dr. GRPO, TRL's default) loads no reference model
    epsilon: float = 0.2  # the ratio is clipped to [1 - epsilon, 1 + epsilon_high]
    epsilon_high: float | None = None  # default: epsilon; DAPO's clip-higher: 0.28
    importance_sampling_level: str = "token"  # token | sequence (GSPO)
    num_iterations: int = 1  # updates per rollout (GRPO's mu); > 1 computes the sampling policy's logps once
    top_entropy_quantile: float = 1.0  # < 1: only this fraction of the step's completion tokens of nonzero advantage
    # (the highest-entropy ones) get the policy loss ("Beyond the 80/20 rule": 0.2); 1: every token (see entropy_mask)
    # what is trained
    train_type: str = "full"  # full | lora
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # dropout would make the policy ratio noisy (!= 1 even at the first update)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])  # names, or one regex
    use_rslora: bool = False
    freeze_vit: bool = False
    freeze_aligner: bool = False
    freeze_llm: bool = False
    # optimisation
    learning_rate: float = 2e-4  # the demo's; real models want ~1e-6 (full) or ~1e-5 (LoRA)
    lorap_lr_ratio: float | None = None
    vit_lr: float | None = None
    aligner_lr: float | None = None
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_bad_steps: int = 5  # stop after this many steps in a row with a NaN/inf loss or gradient norm (each one is skipped)
    lr_scheduler_type: str = "constant"  # cosine | linear | constant
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # overrides warmup_ratio when > 0
    per_device_train_batch_size: int = 32  # completions per micro-batch on each process
    gradient_accumulation_steps: int = 1  # a step: batch x accumulation / num_generations prompts per process
    num_train_epochs: float = 1.0
    max_steps: int = -1  # optimizer steps; overrides num_train_epochs when > 0
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
    fsdp_reshard_after_forward: bool = True
    fsdp_offload: bool = False  # FSDP2 CPU offload of parameters, gradients and optimizer state
    # evaluation, logging, checkpoints
    output_dir: str = "outputs/grpo"
    logging_steps: int = 1
    eval_steps: int = 10
    eval_limit: int = 100  # held-out prompts, completed greedily: mean reward and accuracy
    eval_on_start: bool = True  # evaluate before the first step, so the log shows where RL started
    save_steps: int = 100
    save_total_limit: int = 2  # keep the best (by eval reward) and the latest
    log_completions: bool = False  # every completion with its rewards and advantage -> completions.jsonl
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


def parse_config(argv=None, config_class=Config):
    cfg = read_config(config_class, argv)
    for name in ("gradient_checkpointing", "compile"):
        setattr(cfg, name, str(getattr(cfg, name)).lower())  # (a --config file may give a boolean)
    choices = {"loss_type": ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"), "scale_rewards": ("group", "batch", "none"),
               "gradient_checkpointing": ("auto", "true", "false"), "compile": ("auto", "true", "false"),
               "advantage_estimator": ("grpo", "rloo", "reinforce_plus_plus"),
               "importance_sampling_level": ("token", "sequence"), "train_type": ("full", "lora"),
               "reward_error": ("raise", "skip"), "master_dtype": ("float32", "bfloat16"),
               "vllm_mode": ("colocate", "server"), "vllm_lora_sync": ("adapter", "merged"), "sleep_level": (0, 1, 2),
               "vllm_server_weight_transfer": ("auto", "nccl")}
    for name, allowed in choices.items():
        if getattr(cfg, name) not in allowed:
            raise SystemExit(f"--{name} {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    if not 0 < cfg.top_entropy_quantile <= 1:
        raise SystemExit(f"--top_entropy_quantile {cfg.top_entropy_quantile}: the fraction of tokens kept, in (0, 1]")
    if cfg.tau_pos <= 0 or cfg.tau_neg <= 0:
        raise SystemExit(f"--tau_pos {cfg.tau_pos} --tau_neg {cfg.tau_neg}: SAPO's temperatures must be > 0")
    if cfg.temperature <= 0:
        raise SystemExit("--temperature must be > 0: completions are sampled, and the loss scores the policy at that temperature")
    if cfg.num_generations < 2:
        raise SystemExit("--num_generations must be at least 2: the advantage compares completions of one prompt")
    if cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps % cfg.num_generations:
        raise SystemExit(f"per_device_train_batch_size x gradient_accumulation_steps ({cfg.per_device_train_batch_size} x "
                         f"{cfg.gradient_accumulation_steps}) must be a multiple of num_generations ({cfg.num_generations})")
    if (cfg.multi_turn_plugin is None) != (cfg.max_turns == 1) or cfg.max_turns < 1:
        raise SystemExit(f"--multi_turn_plugin {cfg.multi_turn_plugin} --max_turns {cfg.max_turns}: a multi-turn run gives "
                         f"both, the plugin and --max_turns 2 or more (the plugin writes the user turns between replies)")
    if cfg.multi_turn_plugin and cfg.use_vllm and cfg.vllm_mode == "server":
        raise SystemExit("--multi_turn_plugin with --vllm_mode server: the server would re-tokenise the conversation's text, "
                         "which need not give back the tokens the policy sampled; use --vllm_mode colocate or the built-in rollout")
    if cfg.async_generate and not (cfg.use_vllm and cfg.vllm_mode == "server"):
        raise SystemExit("--async_generate true needs --use_vllm true --vllm_mode server: the next step's rollout is "
                         "generated by the server while this process trains (the other rollouts use this GPU)")
    if cfg.async_generate and cfg.dynamic_sample:
        raise SystemExit("--async_generate with --dynamic_sample: a step's extra rounds of prompts depend on the rewards "
                         "of its first round, so they cannot be requested a step ahead; use one of the two")
    world_size, tp = int(os.environ.get("WORLD_SIZE", 1)), cfg.vllm_tensor_parallel_size
    if cfg.use_vllm and cfg.vllm_mode == "colocate" and (tp < 1 or world_size % tp):
        raise SystemExit(f"--vllm_tensor_parallel_size {tp}: in colocate mode each engine spans {tp} training processes, "
                         f"so their number must be a multiple of it (this run has {world_size}: torchrun --nproc_per_node "
                         f"{max(tp, 1)} or more)")
    if (cfg.offload_model or cfg.offload_optimizer) and not (cfg.use_vllm and cfg.vllm_mode == "colocate" and cfg.sleep_level):
        raise SystemExit("--offload_model / --offload_optimizer give vLLM's colocated engine the training state's GPU memory "
                         "while it generates, and take it back while the engine sleeps: they need --use_vllm true "
                         "--vllm_mode colocate --sleep_level 1 (or 2)")
    cfg.epsilon_high = cfg.epsilon if cfg.epsilon_high is None else cfg.epsilon_high
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


def clip_grad_norm(model, max_norm, device, distributed):
    """torch's clip_grad_norm_ on each process's shards of the gradients: the same clipping, without a DTensor
    dispatch per gradient (~30 ms of host time a step on a 3B model while the GPU waits). -> the global norm."""
    grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads).to(device)
    if distributed:  # each process holds a shard of every gradient
        norm = all_reduce(norm.float().square(), distributed).sqrt()
    torch._foreach_mul_(grads, (max_norm / (norm + 1e-6)).clamp(max=1.0).to(grads[0].device))
    return norm


def gather_lists(values, distributed):
    """{name: list} from every process -> {name: the lists joined in rank order}."""
    if not distributed:
        return values
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, values)
    return {k: [x for part in parts for x in part[k]] for k in values}


# ----------------------------------------------------------------------------------------------------------------
# Data: prompts in a shuffled order per epoch; each rollout takes the next global batch, each process its slice

PROMPT = {"train_on": "none", "add_generation_prompt": True}  # a prompt: no labels, ends with "<|im_start|>assistant\n"


def load_data(cfg, encoder, rank, world_size):
    """-> (training records, held-out records, indices of the usable training records, the most vision patches of a
    usable prompt). Every prompt is encoded once
    up front, each process taking a share: bad records are found now, not at step 900."""
    train, val = data.load_train_val(cfg.dataset, cfg.val_dataset, cfg.split_dataset_ratio, "rl", cfg.seed,
                                     cfg.media_root, cfg.skip_bad_records)
    kept, _, _, patches = data.measure_lengths(train, encoder, cfg.skip_bad_records, cfg.num_workers, PROMPT, rank, world_size)
    return train, val, kept, max(patches, default=0)


def next_prompts(kept, prompts_per_rank, cfg, state, rank, world_size):
    """This process's prompts for one rollout round. The order is shuffled with (seed, epoch); state["cursor"] counts
    the global batches taken this epoch, so a resumed run continues with exactly the next prompts."""
    per_epoch = len(kept) // (prompts_per_rank * world_size)
    if per_epoch == 0:
        raise SystemExit(f"{len(kept)} prompts for a global batch of {prompts_per_rank * world_size}; use more data")
    if state["cursor"] >= per_epoch:
        state["epoch"], state["cursor"] = state["epoch"] + 1, 0
    order = list(kept)
    random.Random(cfg.seed * 1000 + state["epoch"]).shuffle(order)
    start = (state["cursor"] * world_size + rank) * prompts_per_rank
    state["cursor"] += 1
    return order[start : start + prompts_per_rank]


# ----------------------------------------------------------------------------------------------------------------
# Model: the policy, and the reference it is kept close to (beta != 0): with LoRA the policy with its adapters off
# (lora.disable_adapters), with full fine-tuning a frozen copy

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


def load_reference(cfg, device, distributed):
    """A frozen copy of cfg.model in eval mode (no dropout: it only scores), bf16 on the GPU; sharded like the policy,
    but always resharding (it runs forward only) and never offloaded."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    reference = pretrained(cfg, data.resolve_model(cfg.model), dtype).requires_grad_(False).eval().to(device)
    if distributed:
        reference = shard_model(reference, replace(cfg, fsdp_reshard_after_forward=True, fsdp_offload=False), device)
    return reference


# ----------------------------------------------------------------------------------------------------------------
# Rollout: prompts -> num_generations completions each, sampled from the policy itself

def stop_tokens(encoder):
    """Completions end at Qwen's end-of-turn token; <|endoftext|> also stops a base model."""
    return [t for t in (encoder.im_end, encoder.tokenizer.convert_tokens_to_ids("<|endoftext|>")) if t is not None]


def truncated(completion_ids, encoder):
    return completion_ids[-1] not in stop_tokens(encoder)


def sampling_seeds(cfg, step, round, first_prompt, num_prompts):
    """One seed per completion of num_prompts prompts, prompt-major, from (seed, step, round of dynamic sampling,
    the prompt's index in the step's global batch, the completion's index in its group): a completion does not depend
    on the process or the generate call it lands in, so N processes sample what 1 does."""
    key = lambda j, k: f"{cfg.seed}/{step}/{round}/{first_prompt + j}/{k}".encode()
    return [int.from_bytes(hashlib.sha256(key(j, k)).digest()[:8], "little")
            for j in range(num_prompts) for k in range(cfg.num_generations)]


@torch.no_grad()
def rollout(model, encoder, samples, cfg, device, greedy=False, prompts=None, seeds=None):
    """Complete each prompt sample num_generations times (once if greedy) with the policy itself, sampled with
    --temperature/--top_p/--top_k/--repetition_penalty, each completion from its own seed (SeededSampler).
    -> (completion_ids, texts), prompt-major. A completion ends with <|im_end|> (kept: the policy learns to stop) or
    is cut at max_completion_length. Batched generate calls over left-padded rows; each prompt is encoded (media
    decoded, resized, patchified) once and its row repeated. `prompts`: the samples already encoded."""
    from torch.distributed.fsdp import FSDPModule

    prompts = prompts or [encoder(s, **PROMPT) for s in samples]
    rows = [p for p in prompts for _ in range(1 if greedy else cfg.num_generations)]
    tokenizer, stop = encoder.tokenizer, stop_tokens(encoder)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[-1]
    # vision placeholders are never sampled: the model would look for an image that is not there
    suppressed = [encoder.image_pad, encoder.video_pad] + tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>"])
    was_training = model.training
    model.eval()
    # FSDP2: each unit gathers its weights once for the whole generation (the policy, unsharded in bf16, for that
    # time), not again at every new token
    gather_once = isinstance(model, FSDPModule)
    if gather_once:
        model.set_reshard_after_forward(False)
    completion_ids = []
    size = cfg.generation_batch_size or len(rows)
    for start in range(0, len(rows), size):
        sampler = None if greedy else SeededSampler(seeds[start : start + size], cfg.temperature, cfg.top_k, cfg.top_p, device)
        # --compile serves the log-prob passes, not generation: under a KV cache each decoder layer's graph specialises
        # on its layer index and on the cache's state, so generation alone fills torch's recompile limit (8 graphs of
        # the layer's code) and the training forward that comes after runs uncompiled (seen with 12 layers on CPU).
        # The autocast cache stays off: a CUDA graph must not record casts cached outside it
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False), \
                torch.compiler.set_stance("force_eager"):
            completion_ids += generate(model, rows[start : start + size], cfg.max_completion_length, stop, pad, suppressed,
                                       sampler, 1.0 if greedy else cfg.repetition_penalty, cfg.cuda_graph)
    if gather_once:
        for unit in model.modules():
            if isinstance(unit, FSDPModule):
                unit.reshard()
        model.set_reshard_after_forward(cfg.fsdp_reshard_after_forward)  # shard_model's setting, on every unit
    model.train(was_training)
    return completion_ids, [tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]


# ----------------------------------------------------------------------------------------------------------------
# Decoding: the seeded sampler, a static KV cache, each new token's step replayed as a CUDA graph

class SeededSampler:
    """Sampling in which each completion depends only on its own seed: logits [rows, vocab] -> scores whose argmax
    is each row's sample.

    The Gumbel-max trick: with u_v ~ U(0, 1) independent and g_v = -log(-log u_v), argmax_v (z_v / T + g_v) is an
    exact draw from softmax(z / T). So the sampler divides the logits by the temperature, filters them as
    transformers' warpers do (top-k, then top-p of what is left), and adds Gumbel noise from each row's own
    torch.Generator. Row i's t-th token takes the t-th draw of generator i whatever the other rows are, however they
    are padded and whichever process runs them: a finished row keeps drawing (its token is padding). A vLLM backend
    gets the same seeds per request. The cost, one draw per row and token, is small next to the forward."""

    def __init__(self, seeds, temperature, top_k, top_p, device):
        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    def __call__(self, scores):
        scores = scores / self.temperature
        if 0 < self.top_k < scores.shape[-1]:  # the k most likely tokens (and any tied with the k-th)
            scores = scores.masked_fill(scores < scores.topk(self.top_k).values[:, -1:], -math.inf)
        if self.top_p < 1:  # the fewest most likely tokens whose probability adds up to top_p
            ascending, order = scores.sort()
            drop = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p
            drop[:, -1] = False  # the most likely token always stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), -math.inf)
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, device=scores.device) for g in self.generators])
        return scores - torch.log(-torch.log(u))


@contextlib.contextmanager
def fsdp_hooks_off(model):
    """FSDP2 runs hooks around each unit's forward: gather its weights, order its streams. Decoding needs none of them
    (generate keeps every unit gathered) and a CUDA graph cannot record the stream waits; so they are set aside."""
    from torch.distributed.fsdp import FSDPModule

    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    hooks = [(m._forward_pre_hooks, m._forward_hooks) for m in units]
    for m in units:
        m._forward_pre_hooks, m._forward_hooks = type(m._forward_pre_hooks)(), type(m._forward_hooks)()
    try:
        yield
    finally:
        for m, (pre, post) in zip(units, hooks):
            m._forward_pre_hooks, m._forward_hooks = pre, post


@torch.no_grad()
def generate(model, prompts, max_new_tokens, stop, pad, suppressed, sampler=None, repetition_penalty=1.0, cuda_graph=True):
    """Encoded prompts -> one list of new token ids per prompt, up to and including its first stop token (at most
    max_new_tokens). Greedy, or the argmax of sampler(logits) (SeededSampler); `suppressed` tokens are never chosen.

    transformers' generate() takes ~70 ms a token for 64 rows of a 3B model on an H100 however little the GPU has to do:
    Python launches each layer's kernels (~30, twice that with LoRA) one by one. Here the prompts go once through the
    model's own forward (vision included) into a static KV cache. Every later token goes through the language model
    alone with the same shapes and buffers (token, mask, positions and cache advance in place), so on a GPU that step
    is recorded once as a CUDA graph and replayed; sampling stays eager (a few dozen small kernels a token). Under
    FSDP2 the prefill gathers each unit's weights, which stay gathered (rollout's set_reshard_after_forward(False));
    the steps run without FSDP's hooks."""
    from transformers import StaticCache

    device = next(model.parameters()).device
    rows, width = len(prompts), max(len(e["input_ids"]) for e in prompts)
    input_ids = torch.full((rows, width), pad)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    position_ids = torch.zeros((4, rows, width), dtype=torch.long)  # the encoder's text + 3 rope rows; 0 on padding
    for row, e in enumerate(prompts):  # left padding: every prompt's last token sits in the last column
        n = len(e["input_ids"])
        input_ids[row, width - n:], attention_mask[row, width - n:] = e["input_ids"], 1
        position_ids[:, row, width - n:] = e["position_ids"]
    vision = {k: torch.cat([e[k] for e in prompts if k in e]).to(device)
              for k in data.VISION_KEYS if any(k in e for e in prompts)}
    cache = StaticCache(config=model.config, max_cache_len=width + max_new_tokens)
    logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), position_ids=position_ids.to(device),
                   past_key_values=cache, use_cache=True, logits_to_keep=1, **vision).logits[:, -1].float()

    # the decode step's buffers: the token in, the positions it may attend to (the prompt's and every new one), and
    # its rope position, one past the prompt's largest (Qwen-VL's positions run on from the largest image position)
    token = torch.full((rows, 1), pad, device=device)
    mask = torch.zeros((rows, 1, 1, width + max_new_tokens), dtype=torch.bool, device=device)
    mask[:, 0, 0, :width] = attention_mask.bool()
    cached = cache.layers[0].cumulative_length  # tokens in the cache: a device tensor the cache advances itself
    position_offset = (position_ids[1:].amax(dim=(0, 2)) + 1 - width).to(device)

    additive = model.config.text_config._attn_implementation == "eager"  # eager attention adds its mask to the scores

    def step():  # token -> the logits that follow it
        mask.index_fill_(3, cached.view(1), True)
        position = (position_offset + cached).view(1, rows, 1).expand(3, rows, 1)
        allowed = torch.where(mask, 0.0, torch.finfo(torch.float32).min) if additive else mask
        hidden = model.model.language_model(input_ids=token, attention_mask=allowed, position_ids=position,
                                            past_key_values=cache, use_cache=True).last_hidden_state
        return model.lm_head(hidden[:, -1]).float()

    seen = None  # the repetition penalty's tokens: the prompt's (not its padding) and every one generated
    if repetition_penalty != 1:
        counts = torch.zeros(logits.shape, dtype=torch.long, device=device)
        seen = counts.scatter_add_(1, input_ids.to(device), attention_mask.to(device)) > 0
    stop_ids, suppressed = torch.tensor(stop, device=device), torch.tensor(suppressed, device=device)
    finished = torch.zeros(rows, dtype=torch.bool, device=device)
    new_tokens, graph = [], None
    with fsdp_hooks_off(model):
        for t in range(max_new_tokens):
            if seen is not None:  # transformers' repetition penalty: a seen token's logit is pushed toward "unlikely"
                logits = torch.where(seen, torch.where(logits < 0, logits * repetition_penalty, logits / repetition_penalty), logits)
            logits = logits.index_fill(1, suppressed, -math.inf)
            chosen = (logits if sampler is None else sampler(logits)).argmax(-1).masked_fill(finished, pad)
            new_tokens.append(chosen)
            finished |= torch.isin(chosen, stop_ids)
            # a host sync: every 16 tokens, not every token (a finished row only adds padding)
            if t + 1 == max_new_tokens or (t % 16 == 15 and bool(finished.all())):
                break
            if seen is not None:
                seen.scatter_(1, chosen[:, None], True)
            token.copy_(chosen[:, None])
            if graph is None and device.type == "cuda" and cuda_graph and t > 0:  # t = 0 ran eagerly: a graph's warm-up
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # records the kernels, runs nothing
                    graph_logits = step()
            if graph is not None:
                graph.replay()  # overwrites graph_logits
                logits = graph_logits
            else:
                logits = step()
    completions = torch.stack(new_tokens, 1).tolist()
    return [row[: next((i + 1 for i, t in enumerate(row) if t in stop), len(row))] for row in completions]


# ----------------------------------------------------------------------------------------------------------------
# Rollout with vLLM: the same samples, seeds, stop rules and images as rollout(), generated by a vLLM engine in this
# process (colocate) or by a vLLM server (server); the policy's weights go to it after every optimizer step

VLLM_SUPPRESSED = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]  # as rollout()'s `suppressed`
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
# media reach vLLM as data.py prepared them (vllm_prompt); its processor must not resize or resample them again (the
# smart_resize of a resized image can differ when min and max pixels are close). Set for the engine, not per request:
# vLLM 0.32's server refuses per-request processor kwargs unless started with --trust-request-mm-kwargs
VLLM_PROCESSOR_KWARGS = {"do_resize": False, "do_sample_frames": False}


def vllm_engine(cfg, device, max_media=(1, 0)):
    """colocate: a vLLM engine for cfg.model inside this process, on its GPU (bf16) or on the CPU (fp32, the tests).
    max_media: the most images and videos one prompt has (main measures them on the data). -> vllm.LLM"""
    # engine and worker run in this process (vLLM's default is a child process): the policy's tensors reach the
    # worker by reference (collective_rpc without pickling), and a torchrun process group is the engine's own
    # (CPU: vLLM's worker pins its threads; the trainer's must be 1, torch.set_num_threads(1) or OMP_NUM_THREADS=1
    # before the engine starts, or both crawl ~50x slower on shared cores)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    on_gpu = device.type == "cuda"
    lora_adapter = cfg.train_type == "lora" and cfg.vllm_lora_sync == "adapter"
    kwargs = {}
    if not on_gpu:  # vLLM's CPU backend reserves 92% of RAM for the KV cache unless told otherwise
        kwargs.update(kv_cache_memory_bytes=64 << 20, enforce_eager=True)
    if lora_adapter:
        kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=next(r for r in LORA_RANKS if r >= cfg.lora_rank))
    return LLM(model=data.resolve_model(cfg.model), trust_remote_code=cfg.trust_remote_code,
               # --vllm_tensor_parallel_size consecutive processes hold one engine's shards (vllm_group_rollout)
               tensor_parallel_size=cfg.vllm_tensor_parallel_size, dtype=torch.bfloat16 if on_gpu else torch.float32,
               seed=cfg.seed,
               max_model_len=cfg.vllm_max_model_len or cfg.max_length + cfg.max_completion_length,
               gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
               enable_prefix_caching=cfg.vllm_enable_prefix_caching,
               limit_mm_per_prompt={"image": max_media[0], "video": max_media[1]},
               # under torchrun each process's engine joins the group torchrun made (TRL's colocate mode); alone: "uni"
               distributed_executor_backend="external_launcher" if "RANK" in os.environ else "uni",
               enable_sleep_mode=on_gpu and cfg.sleep_level > 0,
               mm_processor_kwargs=VLLM_PROCESSOR_KWARGS,
               # the log-probabilities of the distribution each token was drawn from: after temperature, top-k/top-p and
               # the suppressed tokens (raw_logprobs, vLLM's default, are those of the untempered logits)
               logprobs_mode="processed_logprobs", **kwargs)


def vllm_prompt(sample, prompt, encoder):
    """One vLLM request's input for a prompt that encoder() encoded: its token ids with each image's (or Qwen2.5-VL
    video's) run of placeholder tokens collapsed to one, which vLLM's processor expands again, and the media as
    data.py prepares them: images resized (PIL bicubic, as transformers' processor) to smart_resize's size for the
    encoder's bounds, a video's frames as Encoder.video_frames samples and resizes them (the engine's processor leaves
    both as they are: VLLM_PROCESSOR_KWARGS). So the vision tokens and pixels are the ones the loss sees;
    vllm_rollout checks vLLM's expanded ids against the encoder's."""
    from PIL import Image

    ids, pads = prompt["input_ids"].tolist(), {encoder.image_pad, encoder.video_pad}
    if encoder.model_type == "qwen3_vl" and sample.videos:
        # a timestamp and a <|vision_start|>...<|vision_end|> per frame pair, which replace the video's own pair in
        # transformers (and data.py) but go inside it in vLLM's processor: so vLLM gets the bare <|video_pad|>
        text = encoder.render(sample, add_generation_prompt=True).replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>")
        ids = encoder.tokenizer.encode(text, add_special_tokens=False)
    else:
        ids = [t for i, t in enumerate(ids) if t not in pads or i == 0 or ids[i - 1] != t]
    media = {}
    if sample.images:
        images = [data.load_image(p) for p in sample.images]
        media["image"] = [im.resize(encoder.image_size(im)[::-1], Image.BICUBIC) for im in images]  # PIL: (w, h)
    if sample.videos:
        media["video"] = []
        for path in sample.videos:
            frames, indices, video_fps = encoder.video_frames(path)
            metadata = {"fps": video_fps, "frames_indices": indices.tolist(), "total_num_frames": int(indices[-1]) + 1,
                        "video_backend": "decord", "do_sample_frames": False}
            media["video"].append((frames, metadata))
    return {"prompt_token_ids": ids, **({"multi_modal_data": media} if media else {})}


@torch.no_grad()
def vllm_rollout(llm, encoder, samples, prompts, cfg, seeds=None, greedy=False, lora_request=None):
    """rollout() with vLLM: each prompt sample completed num_generations times (once if greedy), prompt-major, in one
    request per prompt (its media processed once), whose k-th completion vLLM samples with request_seed + k: a
    function of the prompt's first seed, so of (seed, step, prompt), as the built-in rollout's (vLLM's sampler, so
    not its draws; greedy is the same). Each ends with its stop token (kept) or is cut at max_completion_length. The
    vision placeholders are never sampled: they are vLLM bad words (a one-token bad word is set to -inf at every
    step, as rollout() does).
    -> (completion_ids, texts, vllm_logprobs: per completion, the log-probability of each token under the distribution
    it was drawn from)."""
    from vllm import SamplingParams

    prompts = prompts or [encoder(s, **PROMPT) for s in samples]
    per_prompt = 1 if greedy else cfg.num_generations
    stop = stop_tokens(encoder)
    params = []
    for j in range(len(samples)):
        sampling = dict(temperature=0.0) if greedy else dict(
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, repetition_penalty=cfg.repetition_penalty,
            seed=request_seed(seeds, j, per_prompt))
        params.append(SamplingParams(n=per_prompt, max_tokens=cfg.max_completion_length, stop_token_ids=stop,
                                     bad_words=VLLM_SUPPRESSED, logprobs=0, detokenize=False, **sampling))
    requests = [vllm_prompt(sample, prompt, encoder) for sample, prompt in zip(samples, prompts)]
    outputs = llm.generate(requests, params, lora_request=lora_request, use_tqdm=False)
    completion_ids, vllm_logprobs = [], []
    for j, out in enumerate(outputs):
        expected = prompts[j]["input_ids"].tolist()
        if list(out.prompt_token_ids) != expected:
            raise RuntimeError(f"vLLM expanded prompt {j} to {len(out.prompt_token_ids)} tokens, the encoder to "
                               f"{len(expected)} ({out.prompt_token_ids.count(encoder.image_pad)} vs "
                               f"{expected.count(encoder.image_pad)} image tokens): its processor resized the media otherwise")
        for completion in sorted(out.outputs, key=lambda c: c.index):
            completion_ids.append(list(completion.token_ids))
            vllm_logprobs.append([step[t].logprob for t, step in zip(completion.token_ids, completion.logprobs)])
    texts = [encoder.tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
    return completion_ids, texts, vllm_logprobs


def request_seed(seeds, j, per_prompt):
    """The seed of the vLLM request for prompt j's per_prompt completions, whose k-th vLLM samples with seed + k: its
    first completion's seed (sampling_seeds), brought below 2**63 - per_prompt (vLLM's limit is 2**63)."""
    return seeds[j * per_prompt] % (2**63 - per_prompt)


def vllm_group_rollout(vllm, encoder, samples, prompts, cfg, seeds=None, greedy=False):
    """vllm_rollout on the engine this process shares with the others of its tensor-parallel group
    (--vllm_tensor_parallel_size): vLLM's external launcher runs the same requests on every process of a group, so
    each process sends the group's prompts, in rank order, and keeps the completions of its own."""
    if vllm.tp_group is None:
        return vllm_rollout(vllm.llm, encoder, samples, prompts, cfg, seeds, greedy, vllm.lora_request)
    prompts = prompts or [encoder(s, **PROMPT) for s in samples]
    parts = [None] * dist.get_world_size(vllm.tp_group)
    dist.all_gather_object(parts, (samples, [{"input_ids": p["input_ids"]} for p in prompts], seeds), group=vllm.tp_group)
    outputs = vllm_rollout(vllm.llm, encoder, [s for part in parts for s in part[0]], [p for part in parts for p in part[1]],
                           cfg, None if greedy else [x for part in parts for x in part[2]], greedy, vllm.lora_request)
    per_prompt = 1 if greedy else cfg.num_generations
    start = per_prompt * sum(len(part[0]) for part in parts[: dist.get_group_rank(vllm.tp_group, dist.get_rank())])
    return tuple(output[start : start + per_prompt * len(samples)] for output in outputs)


def vllm_logps(vllm_logprobs, mask):
    """Per-completion lists of vLLM's log-probabilities -> [B, T] like the trainer's (0 where mask is False)."""
    out = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return out.masked_scatter(mask, torch.tensor([x for row in vllm_logprobs for x in row], device=mask.device))


def vllm_importance_weights(old_logps, sampled_logps, mask, cap):
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"; TRL's and ms-swift's vllm_importance_sampling_correction): the completions were drawn by vLLM, not by
    the trainer's policy, whose numbers differ (kernels, bf16); each token's loss is weighted by
    w_t = min(exp(old_t - vllm_t), cap), with old the trainer's log-probabilities of the sampling policy.
    -> (w [B, T], vllm_logprob_diff: mean |old - vllm| over the completion tokens)."""
    log_ratio = (old_logps - sampled_logps).masked_fill(~mask, 0.0)
    diff = (log_ratio.abs() * mask).sum() / mask.sum().clamp(min=1)
    return torch.exp(log_ratio).clamp(max=cap).masked_fill(~mask, 0.0).detach(), diff.detach()


# Weight sync: after every optimizer step the engine gets the policy's weights, in Hugging Face checkpoint names,
# read from the training tensors themselves (never through a file), one tensor at a time.

def policy_tensors(model):
    """-> (checkpoint name, parameter, the LoRA layer whose base weight it is or None) for each weight vLLM holds:
    LoRA's A and B are not among them, and a wrapped Linear's `x.base_layer.weight` is vLLM's `x.weight`."""
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            continue
        layer = modules[name[: -len(".base_layer.weight")]] if name.endswith(".base_layer.weight") else None
        yield name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "").replace(".base_layer.", "."), param, layer


def policy_weights(model, merge_lora):
    """-> (checkpoint name, full tensor) of every weight of the policy, lazily: an FSDP2 shard is gathered
    (DTensor.full_tensor()) only when the engine asks for that tensor, and freed once it has been copied, so no process
    holds more than one gathered tensor (vLLM buffers a fused layer's few). LoRA: a wrapped Linear's weight is its base
    weight, or with merge_lora W + scaling * B @ A (in fp32, as lora.LoRALinear.merge computes it)."""
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    for name, param, layer in policy_tensors(model):
        tensor = full(param.detach())
        if layer is not None and merge_lora:
            delta = full(layer.lora_B.weight.detach()).float() @ full(layer.lora_A.weight.detach()).float()
            tensor = (tensor.float() + delta * layer.scaling).to(tensor.dtype)
        yield name, tensor


@torch.no_grad()
def vllm_sync_weights(llm, model, cfg):
    """The policy's current weights into the colocated engine. Full fine-tuning and --vllm_lora_sync merged: every
    weight, reloaded in place by the worker's reload_weights (vLLM's layerwise reload: it buffers a layer's tensors,
    then reruns the layer's post-load processing; the CPU backend repacks its linear weights there, which is why
    model.load_weights alone leaves them empty on CPU). LoRA adapter sync: only the adapter, as a new vLLM LoRA
    (vLLM 0.26 and 0.32 load one from a folder only: it is written to /dev/shm, which is memory, and deleted once
    loaded); the previous one is removed. Then the caches that hold results of the old weights are emptied (prefix
    cache; encoder cache, else the next image request fails with "Encoder cache miss"). -> the LoRARequest to
    generate with (None: the weights themselves were replaced)."""
    adapter = cfg.train_type == "lora" and cfg.vllm_lora_sync == "adapter"
    lora_request = None
    if not adapter or cfg.sleep_level == 2:  # sleep level 2 dropped the engine's weights: the base goes in again
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": policy_weights(model, merge_lora=not adapter),
                                                     "is_checkpoint_format": True})
    if adapter:
        from vllm.lora.request import LoRARequest

        lora_id = max(llm.llm_engine.list_loras(), default=0) + 1  # a new id: vLLM never reloads an id it holds
        lora_request = LoRARequest(f"policy-{lora_id}", lora_id, vllm_adapter_dir(model, cfg, lora_id))
        llm.llm_engine.add_lora(lora_request)  # loads it now, so the folder can go
        shutil.rmtree(os.path.dirname(lora_request.lora_path), ignore_errors=True)  # this process's folder
        for old in llm.llm_engine.list_loras() - {lora_request.lora_int_id}:
            llm.llm_engine.remove_lora(old)
    llm.llm_engine.reset_encoder_cache()
    llm.reset_prefix_cache()
    return lora_request


def vllm_adapter_dir(model, cfg, lora_id):
    """The adapter in PEFT's format (what vLLM's LoRA loader reads) in a folder in memory (/dev/shm), this process's
    own (each process has its engine); under FSDP2 only the LoRA weights are gathered (2 x rank / width of the
    model). -> the folder."""
    weights = {n: p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()
               for n, p in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    root = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()  # (no /dev/shm: macOS, only slower)
    folder = os.path.join(root, f"grpo-vllm-{os.getpid()}", f"adapter-{lora_id}")
    lora.save_adapter(model, folder, state_dict=weights, base_model_name_or_path=cfg.model)
    return folder


def vllm_sleep(llm, cfg):
    """colocate on GPU, before training: --sleep_level 1 frees the KV cache and backs the weights up to CPU, 2 frees
    both (the next vllm_sync_weights sends every weight). The CPU backend has no sleep mode: nothing to free."""
    if llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
        llm.sleep(level=cfg.sleep_level)


def vllm_wake(llm, cfg, tags=None):
    """After training: tags ["weights"] before vllm_sync_weights and ["kv_cache"] after it keep the peak lower (the KV
    cache is allocated once the sync's buffers are freed); None: both."""
    if llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
        llm.wake_up(tags=tags)


@torch.no_grad()
def move_training_state(model, optimizer, cfg, device):
    """--offload_model / --offload_optimizer (colocate): the policy's weights and AdamW's state to `device`: to CPU
    while vLLM generates (its KV cache takes their memory), back before the log-probabilities. Under FSDP2,
    Module.to moves each shard and FSDP re-points its own views of them (fully_shard's _apply)."""
    if cfg.offload_model:
        model.to(device)
    if cfg.offload_optimizer:
        for state in optimizer.state.values():  # (empty before the first step)
            for key, value in state.items():
                if torch.is_tensor(value):  # fused AdamW keeps its step count on the parameters' device too
                    state[key] = value.to(device)
    if device.type == "cpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()  # the caching allocator's freed blocks, to the driver: vLLM allocates outside it


# ----------------------------------------------------------------------------------------------------------------
# Rollout with a vLLM server (--vllm_mode server): vLLM's own OpenAI server, no serving code of ours. Generation over
# HTTP (/v1/chat/completions, vLLM's extensions: seed, bad_words, stop_token_ids, return_token_ids). Weights, from
# process 0, through endpoints vLLM 0.26 and 0.32 both have (VLLM_SERVER_DEV_MODE=1): to a server on this machine
# through memory (/dev/shm: full weights reloaded by the workers, /collective_rpc reload_weights; a LoRA adapter
# loaded as a new vLLM LoRA, /v1/load_lora_adapter), which works on CPU and with the server on the trainer's own GPU;
# to a server elsewhere over NCCL (GPU only; NCCL cannot join two processes on one GPU).

def vllm_server_local(cfg):
    """Whether the server runs on this machine (then it reads the weights from this machine's /dev/shm)."""
    import socket

    host = cfg.vllm_server_host
    if host in ("localhost", "::1", "0.0.0.0", socket.gethostname(), socket.getfqdn()):
        return True
    try:
        address = socket.gethostbyname(host)
        return address.startswith("127.") or address == socket.gethostbyname(socket.gethostname())
    except OSError:  # a name that does not resolve: not this machine (vllm_server_wait will say no server answers)
        return False


def vllm_server_shm(cfg):
    """Whether the weights reach the server through this machine's /dev/shm (else over NCCL from process 0)."""
    return cfg.vllm_server_weight_transfer == "auto" and vllm_server_local(cfg)


def vllm_server_env(cfg):
    """The environment the server needs: its development endpoints (weight updates, cache resets); a LoRA adapter
    loaded at run time (LoRA runs on this machine: the adapter folder must be readable by the server)."""
    adapter = cfg.train_type == "lora" and cfg.vllm_lora_sync == "adapter" and vllm_server_shm(cfg)
    return {"VLLM_SERVER_DEV_MODE": "1", **({"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if adapter else {})}


def vllm_takes_request_media_kwargs_untrusted():
    """Whether this machine's vLLM server takes a request's media_io_kwargs (a video's frame indices and fps) without
    --trust-request-mm-kwargs: vLLM 0.26 does and has no such flag, 0.32 refuses them without it."""
    import importlib.util

    spec = importlib.util.find_spec("vllm")
    if spec is None:  # (not installed here: the server is elsewhere; a recent vLLM assumed)
        return False
    for folder, _, files in os.walk(os.path.join(os.path.dirname(spec.origin), "entrypoints")):  # (its server flags)
        for name in files:
            if name.endswith(".py"):
                with open(os.path.join(folder, name), errors="replace") as f:
                    if "trust_request_mm_kwargs" in f.read():
                        return False
    return True


def vllm_server_command(cfg, max_media=(1, 0)):
    """The command that starts a server this run can use (printed when none answers; the tests run it), in the
    environment vllm_server_env gives: with vLLM's LoRA for a LoRA run on this machine, with an NCCL weight-transfer
    engine for a server elsewhere, trusting a request's media_io_kwargs and chat template where prompts have videos."""
    shm = vllm_server_shm(cfg)
    videos = max_media[1] > 0
    media_kwargs_flag = videos and not vllm_takes_request_media_kwargs_untrusted()
    lora_rank = next(r for r in LORA_RANKS if r >= cfg.lora_rank)
    return ["python", "-m", "vllm.entrypoints.openai.api_server", "--model", data.resolve_model(cfg.model),
            "--host", cfg.vllm_server_host, "--port", str(cfg.vllm_server_port), "--seed", str(cfg.seed),
            "--max-model-len", str(cfg.vllm_max_model_len or cfg.max_length + cfg.max_completion_length),
            "--limit-mm-per-prompt", json.dumps({"image": max_media[0], "video": max_media[1]}),
            "--logprobs-mode", "processed_logprobs", "--mm-processor-kwargs", json.dumps(VLLM_PROCESSOR_KWARGS),
            *(["--enable-lora", "--max-loras", "1", "--max-lora-rank", str(lora_rank)]
              if "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in vllm_server_env(cfg) else []),
            *(["--trust-request-mm-kwargs"] if media_kwargs_flag else []),
            *(["--trust-request-chat-template"] if videos else []),  # (Qwen3-VL's, in vllm_server_rollout)
            *([] if shm else ["--weight-transfer-config", json.dumps({"backend": "nccl"})])]


VLLM_SERVER_RETRIES = 5  # tries of a request before the run stops: 1 + 2 + 4 + 8 s of backoff


def vllm_server_request(cfg, path, body=None, retries=None, timeout=None):
    """GET (body None) or POST JSON to the server -> the decoded reply. A server that does not answer gets `retries`
    tries with backoff, then ConnectionError naming it (main adds the step and the checkpoint to resume from); an
    HTTP error (the server answered) is not retried."""
    import urllib.error
    import urllib.request

    url, retries = f"http://{cfg.vllm_server_host}:{cfg.vllm_server_port}{path}", retries or VLLM_SERVER_RETRIES
    request = urllib.request.Request(url, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    for attempt in range(retries):
        try:
            with urllib.request.urlopen(request, timeout=timeout or max(cfg.vllm_server_timeout, 60)) as response:
                reply = response.read()
                try:
                    return json.loads(reply or b"null")
                except json.JSONDecodeError:  # /v1/load_lora_adapter answers in plain text
                    return reply.decode()
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"vLLM server {url}: HTTP {e.code}: {e.read().decode()[:500]}") from None
        except (urllib.error.URLError, OSError) as e:
            if attempt == retries - 1:
                raise ConnectionError(f"vLLM server {url} did not answer ({e}) after {retries} tries") from None
            time.sleep(2**attempt)


def vllm_server_wait(cfg, max_media=(1, 0)):
    """Wait up to --vllm_server_timeout seconds for the server's /health, or stop with how to start one. -> the name
    it serves the model under (its /v1/models)."""
    import shlex

    deadline = time.monotonic() + cfg.vllm_server_timeout
    while True:
        try:
            vllm_server_request(cfg, "/health", retries=1, timeout=5)
            return vllm_server_request(cfg, "/v1/models")["data"][0]["id"]
        except ConnectionError:
            if time.monotonic() > deadline:
                raise SystemExit(f"no vLLM server at {cfg.vllm_server_host}:{cfg.vllm_server_port} after "
                                 f"{cfg.vllm_server_timeout:.0f} s: start one on the rollout GPUs with\n  "
                                 f"{' '.join(f'{k}={v}' for k, v in vllm_server_env(cfg).items())} "
                                 f"{shlex.join(vllm_server_command(cfg, max_media))}\nor point --vllm_server_host / "
                                 f"--vllm_server_port at it")
            time.sleep(1.0)


def vllm_server_rollout(model_name, encoder, samples, prompts, cfg, seeds=None, greedy=False):
    """vllm_rollout() against the server: one chat completion request per prompt for its n completions (sent at once:
    the server batches them; seeds as vllm_rollout's), the sample's messages with its media as vllm_prompt prepares
    them, in data URLs: images as PNGs, a video as its sampled and resized frames (vLLM's "video/jpeg" URL, a list of
    base64 pictures, here PNGs: each is decoded by its own format, so nothing is lost) with their indices and fps in
    the request's media_io_kwargs. The server's chat template is the model folder's, as the encoder's (Qwen3-VL with
    a video: sent with the request, below), and its prompt token ids are checked against the encoder's.
    -> as vllm_rollout."""
    import base64
    import io
    import re
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    if any(len(s.videos) > 1 for s in samples):  # (the frames' indices and fps go per request, not per video)
        raise NotImplementedError("--vllm_mode server: a prompt with more than one video (use --vllm_mode colocate)")
    # Qwen3-VL: vLLM's processor puts a video's per-frame timestamps and vision pairs inside the chat template's
    # <|vision_start|><|video_pad|><|vision_end|>, which transformers (and data.py) replace; so a request with a video
    # brings the model's own template with a bare <|video_pad|> there, as colocate's vllm_prompt sends its tokens
    video_template = encoder.tokenizer.chat_template.replace("<|vision_start|><|video_pad|><|vision_end|>", "<|video_pad|>") \
        if encoder.model_type == "qwen3_vl" else None

    def png(image):  # -> base64 of a lossless PNG
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    per_prompt = 1 if greedy else cfg.num_generations
    bodies = []
    for j, (sample, prompt) in enumerate(zip(samples, prompts)):
        media = vllm_prompt(sample, prompt, encoder).get("multi_modal_data", {})
        images, videos = iter(media.get("image", [])), media.get("video", [])
        messages, video_kwargs = [], {}
        for m in sample.messages:
            parts = []
            for piece in re.split(f"({re.escape(data.IMAGE_TAG)}|{re.escape(data.VIDEO_TAG)})", m["content"]):
                if piece == data.IMAGE_TAG:
                    parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64," + png(next(images))}})
                elif piece == data.VIDEO_TAG:
                    frames, metadata = videos[0]
                    url = "data:video/jpeg;base64," + ",".join(png(Image.fromarray(f)) for f in frames)
                    parts.append({"type": "video_url", "video_url": {"url": url}})
                    video_kwargs = {"video": {k: metadata[k] for k in ("fps", "frames_indices", "total_num_frames")}}
                elif piece:
                    parts.append({"type": "text", "text": piece})
            messages.append({"role": m["role"], "content": parts})
        sampling = {"temperature": 0.0} if greedy else {
            "temperature": cfg.temperature, "top_p": cfg.top_p, "repetition_penalty": cfg.repetition_penalty,
            "seed": request_seed(seeds, j, per_prompt), **({"top_k": cfg.top_k} if cfg.top_k > 0 else {})}
        bodies.append({"model": model_name, "messages": messages, "n": per_prompt, "max_tokens": cfg.max_completion_length,
                       "stop_token_ids": stop_tokens(encoder), "bad_words": VLLM_SUPPRESSED, "logprobs": True,
                       "top_logprobs": 0, "return_token_ids": True,
                       **({"media_io_kwargs": video_kwargs} if video_kwargs else {}),
                       **({"chat_template": video_template} if video_kwargs and video_template else {}), **sampling})
    with ThreadPoolExecutor(max_workers=min(len(bodies), 64)) as pool:
        replies = list(pool.map(lambda body: vllm_server_request(cfg, "/v1/chat/completions", body), bodies))
    completion_ids, vllm_logprobs = [], []
    for j, reply in enumerate(replies):
        expected = prompts[j]["input_ids"].tolist()
        if reply["prompt_token_ids"] != expected:
            raise RuntimeError(f"the vLLM server encoded prompt {j} as {len(reply['prompt_token_ids'])} tokens, "
                               f"the encoder as {len(expected)}: another chat template, or a server started without "
                               f"--mm-processor-kwargs '{{\"do_resize\": false}}'")
        for choice in sorted(reply["choices"], key=lambda c: c["index"]):
            completion_ids.append(choice["token_ids"])
            vllm_logprobs.append([t["logprob"] for t in choice["logprobs"]["content"]])
    texts = [encoder.tokenizer.decode(c, skip_special_tokens=True) for c in completion_ids]
    return completion_ids, texts, vllm_logprobs


def vllm_server_weight_group(cfg, device, group_port=51216):
    """Process 0's NCCL group with every worker of the server (GPU only): process 0 is rank 0 and hosts the
    rendezvous (vLLM's StatelessProcessGroup, then PyNcclCommunicator: the same in 0.26 and 0.32); the workers join
    when the server gets /init_weight_transfer_engine, so that call runs beside our own join. -> the communicator."""
    import socket
    from concurrent.futures import ThreadPoolExecutor

    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.utils import StatelessProcessGroup

    workers = vllm_server_request(cfg, "/get_world_size")["world_size"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # our address as the server sees it
        probe.connect((cfg.vllm_server_host, cfg.vllm_server_port))
        address = probe.getsockname()[0]
    init_info = {"master_address": address, "master_port": group_port, "rank_offset": 1, "world_size": 1 + workers}
    with ThreadPoolExecutor(1) as pool:  # the server's call returns once its workers have joined
        joined = pool.submit(vllm_server_request, cfg, "/init_weight_transfer_engine", {"init_info": init_info})
        group = StatelessProcessGroup.create(host=address, port=group_port, rank=0, world_size=1 + workers)
        communicator = PyNcclCommunicator(group, device=device)
        joined.result()
    return communicator


@torch.no_grad()
def vllm_server_sync_weights(communicator, model, cfg, rank):
    """The policy's weights to the server over NCCL (GPU only), vLLM's protocol: /start_weight_update, then
    /update_weights with every tensor's name, dtype and shape while process 0 broadcasts the tensors in that order
    (bf16, one at a time: every process gathers each FSDP2 shard, process 0 sends it), /finish_weight_update (vLLM's
    layerwise reload processes each layer), then its prefix and encoder caches emptied. LoRA is sent merged (an
    adapter folder would have to be on the server's disk)."""
    from concurrent.futures import ThreadPoolExecutor

    weights = policy_weights(model, merge_lora=cfg.train_type == "lora")
    if rank != 0:
        for _ in weights:  # the gathers are collectives: every process takes part
            pass
        return
    names, shapes = zip(*[(name, list(param.shape)) for name, param, _ in policy_tensors(model)])  # (no gather)
    metadata = {"names": list(names), "dtype_names": ["bfloat16"] * len(names), "shapes": list(shapes)}
    vllm_server_request(cfg, "/start_weight_update", {})
    with ThreadPoolExecutor(1) as pool:  # the server's call returns once its workers have received every tensor
        received = pool.submit(vllm_server_request, cfg, "/update_weights", {"update_info": metadata})
        for _, tensor in weights:
            communicator.broadcast(tensor.to(torch.bfloat16).contiguous(), src=0, stream=torch.cuda.current_stream())
        received.result()
    for path in ("/finish_weight_update", "/reset_prefix_cache", "/reset_encoder_cache"):
        vllm_server_request(cfg, path, {})


@torch.no_grad()
def vllm_server_sync_local(vllm, model, cfg, rank, step, dtype, file_bytes=1 << 30):
    """The policy's weights to a server on this machine, through memory (/dev/shm). Full fine-tuning and
    --vllm_lora_sync merged: process 0 writes every weight (in `dtype`, in Hugging Face names) as safetensors files
    of ~file_bytes, one FSDP2 gather at a time (every process takes part), and the server's workers reload them in
    place (/collective_rpc reload_weights with weights_path: vLLM's layerwise reload, as colocate's sync); the folder
    goes once they have. LoRA adapter: the adapter (vllm_adapter_dir) loaded as a new LoRA under a new name
    (/v1/load_lora_adapter: it is read now, so the folder goes), the previous name unloaded; vllm.lora_name is then
    the model name to request. Then the server's prefix and encoder caches are emptied, as colocate's."""
    from safetensors.torch import save_file

    adapter = cfg.train_type == "lora" and cfg.vllm_lora_sync == "adapter"
    if adapter:
        folder = vllm_adapter_dir(model, cfg, step)  # (every process gathers the LoRA weights; process 0's is sent)
        name = f"policy-{vllm.run_id}-{step}"
        if rank == 0:
            vllm_server_request(cfg, "/v1/load_lora_adapter", {"lora_name": name, "lora_path": folder})
            if vllm.lora_name:
                vllm_server_request(cfg, "/v1/unload_lora_adapter", {"lora_name": vllm.lora_name})
        shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
        vllm.lora_name = name
    else:
        if vllm.weights_root is None:  # /dev/shm if it holds the weights (a container's may be 64 MiB), else disk
            nbytes = sum(param.numel() for _, param, _ in policy_tensors(model)) * dtype.itemsize
            shm = os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 1.2 * nbytes
            vllm.weights_root = "/dev/shm" if shm else tempfile.gettempdir()
            if not shm and rank == 0:
                print(f"/dev/shm has no room for the {nbytes / 2**30:.1f} GiB of weights: they go to the server through "
                      f"{vllm.weights_root} (disk: slower; docker run --shm-size gives a container more)", flush=True)
        folder = os.path.join(vllm.weights_root, f"grpo-vllm-{os.getpid()}", "weights")
        part, files = {}, 0

        def write():  # the tensors gathered so far -> the next file
            nonlocal part, files
            os.makedirs(folder, exist_ok=True)
            save_file(part, os.path.join(folder, f"model-{files:05d}.safetensors"))
            part, files = {}, files + 1

        for name, tensor in policy_weights(model, merge_lora=cfg.train_type == "lora"):
            if rank == 0:  # (the gathers are collectives: every process takes part)
                part[name] = tensor.to(device="cpu", dtype=dtype).contiguous()
                if sum(t.nbytes for t in part.values()) >= file_bytes:
                    write()
        if rank == 0:
            if part:
                write()
            try:
                vllm_server_request(cfg, "/collective_rpc", {"method": "reload_weights", "kwargs": {
                    "weights_path": folder, "is_checkpoint_format": True}})
            finally:
                shutil.rmtree(os.path.dirname(folder), ignore_errors=True)
    if rank == 0:
        for path in ("/reset_prefix_cache", "/reset_encoder_cache"):
            vllm_server_request(cfg, path, {})


# The three things the loop asks of vLLM: start it, send it the weights, generate

def start_vllm(cfg, device, rank, samples, resumed, model, optimizer):
    """--use_vllm: the engine in this process (colocate), or the server's name (and, for a server on another machine,
    process 0's NCCL group with it).
    samples: every record, for the most images and videos one prompt has (vLLM reserves room for them; multi-turn,
    one more image per tool turn). With --offload_model / --offload_optimizer the engine starts while the training
    state is on CPU (vLLM takes its share of what is free then) and sleeps before it comes back."""
    max_media = (max(len(s.images) for s in samples) + cfg.max_turns - 1, max(len(s.videos) for s in samples))
    vllm = SimpleNamespace(llm=None, lora_request=None, tp_group=None, model_name=None, communicator=None, sleeping=set(),
                           synced_step=None if resumed else 0,  # a resumed policy is not the checkpoint vLLM loaded
                           shm=False, run_id=None, lora_name=None, weights_root=None,  # (server mode)
                           ahead=None, pool=None)  # (--async_generate)
    if cfg.vllm_mode == "colocate":
        if device.type == "cpu":  # vLLM's CPU worker pins its own threads: more here and both crawl (~50x)
            torch.set_num_threads(1)
        move_training_state(model, optimizer, cfg, torch.device("cpu"))
        tp = cfg.vllm_tensor_parallel_size
        if tp > 1:  # the processes that share an engine, as vLLM groups them (every process creates every group)
            world_size = dist.get_world_size()
            vllm.tp_group, _ = dist.new_subgroups_by_enumeration([list(range(r, r + tp)) for r in range(0, world_size, tp)])
        vllm.llm = vllm_engine(cfg, device, max_media)
        if cfg.offload_model or cfg.offload_optimizer:
            vllm_sleep(vllm.llm, cfg)
            vllm.sleeping = {"weights", "kv_cache"}
            vllm.synced_step = None if cfg.sleep_level == 2 else vllm.synced_step  # (level 2 dropped the weights)
            move_training_state(model, optimizer, cfg, device)
    else:
        vllm.shm = vllm_server_shm(cfg)
        if device.type != "cuda" and not vllm.shm:
            raise SystemExit(f"--vllm_server_host {cfg.vllm_server_host} --vllm_server_weight_transfer "
                             f"{cfg.vllm_server_weight_transfer}: the weights would go over NCCL, which needs GPUs; on "
                             f"CPU run the server on this machine (127.0.0.1) with --vllm_server_weight_transfer auto")
        vllm.model_name = vllm_server_wait(cfg, max_media)
        vllm.communicator = vllm_server_weight_group(cfg, device) if rank == 0 and not vllm.shm else None
        # the LoRA adapters' names on the server carry process 0's id, so that every process asks for the same one
        vllm.run_id = gather_lists({"id": [f"{os.getpid()}-{time.time_ns()}"]}, dist.is_initialized())["id"][0]
        vllm.synced_step = None  # the server may hold another run's weights: the first step sends this policy's
    return vllm


def sync_vllm(run):
    """The policy's weights (after the optimizer steps since the last sync) into vLLM, unless it has them; a sleeping
    engine wakes its weights only (its KV cache wakes in wake_vllm, after the sync's buffers are freed)."""
    vllm, cfg = run.vllm, run.cfg
    if vllm.synced_step == run.state["step"]:
        return
    vllm.synced_step = run.state["step"]
    if cfg.vllm_mode == "server":
        with server_errors(run):
            if vllm.shm:
                dtype = torch.bfloat16 if run.device.type == "cuda" else torch.float32  # (the server's)
                vllm_server_sync_local(vllm, run.model, cfg, run.rank, run.state["step"], dtype)
            else:
                vllm_server_sync_weights(vllm.communicator, run.model, cfg, run.rank)
        if run.distributed:  # no process sends requests before the server holds every weight
            dist.barrier()
        return
    if "weights" in vllm.sleeping:
        vllm_wake(vllm.llm, cfg, ["weights"])
        vllm.sleeping.discard("weights")
    vllm.lora_request = vllm_sync_weights(vllm.llm, run.model, cfg)


def wake_vllm(run):
    """colocate, before generating: the training state off the GPU (--offload_model / --offload_optimizer), then
    whatever of the engine sleeps back (its KV cache; its weights too if no sync woke them)."""
    vllm, cfg = run.vllm, run.cfg
    move_training_state(run.model, run.optimizer, cfg, torch.device("cpu"))
    if vllm.sleeping:
        vllm_wake(vllm.llm, cfg, sorted(vllm.sleeping))
        vllm.sleeping = set()


def sleep_vllm(run):
    """colocate, after generating: the engine sleeps (--sleep_level 1|2) and the training state comes back."""
    if run.cfg.sleep_level > 0:
        vllm_sleep(run.vllm.llm, run.cfg)
        run.vllm.sleeping = {"weights", "kv_cache"}
    move_training_state(run.model, run.optimizer, run.cfg, run.device)


def generate_completions(run, samples, prompts, seeds, num_generations=None):
    """Prompts -> (completion_ids, texts, vLLM's sampled log-probabilities or None): the built-in rollout, or vLLM.
    num_generations: completions per prompt, if not --num_generations (the later turns of multi-turn episodes: 1)."""
    cfg, vllm = run.cfg, run.vllm
    if num_generations is not None:
        cfg = replace(cfg, num_generations=num_generations)
    if vllm is None:
        return (*rollout(run.model, run.encoder, samples, cfg, run.device, prompts=prompts, seeds=seeds), None)
    if cfg.vllm_mode == "server":
        return vllm_server_rollout(vllm.lora_name or vllm.model_name, run.encoder, samples, prompts, cfg, seeds)
    return vllm_group_rollout(vllm, run.encoder, samples, prompts, cfg, seeds)


def eval_generator(run):
    """The held-out evaluation's greedy generate(samples, prompts) -> (completion_ids, texts) with vLLM, its weights
    the policy's now (synced; colocate: the engine awake, sleep_vllm after), or None: the built-in rollout (no vLLM;
    --async_generate, whose next rollout is being generated by the server with the weights it holds)."""
    vllm, cfg = run.vllm, run.cfg
    if vllm is None or cfg.async_generate:
        return None
    sync_vllm(run)
    if vllm.llm:
        wake_vllm(run)
        return lambda samples, prompts: vllm_group_rollout(vllm, run.encoder, samples, prompts, cfg, greedy=True)[:2]

    def from_server(samples, prompts):
        with server_errors(run):
            return vllm_server_rollout(vllm.lora_name or vllm.model_name, run.encoder, samples, prompts, cfg, greedy=True)[:2]
    return from_server


def draw_prompts(run, state, step, round=1):
    """This process's prompts of a rollout round (next_prompts moves state's cursor), encoded, and their completions'
    sampling seeds. -> (samples, encoded prompts, seeds)"""
    samples = [run.train[i] for i in next_prompts(run.kept, run.prompts_per_rank, run.cfg, state, run.rank, run.world_size)]
    prompts = [run.encoder(s, **PROMPT) for s in samples]
    return samples, prompts, sampling_seeds(run.cfg, step, round, run.rank * run.prompts_per_rank, len(samples))


def request_rollout(run, step):
    """--async_generate: the rollout of `step` requested now, from a thread that sends its HTTP requests while this
    process trains, with the prompts and seeds that step draws (on a copy of the state: the step takes the cursor
    when it takes the rollout, so a checkpoint written in between resumes with these prompts). -> its step, samples,
    prompts, seeds, the state's epoch and cursor after drawing them (position) and the rollout's future"""
    from concurrent.futures import ThreadPoolExecutor

    run.vllm.pool = run.vllm.pool or ThreadPoolExecutor(1)
    ahead = dict(run.state)
    samples, prompts, seeds = draw_prompts(run, ahead, step)
    future = run.vllm.pool.submit(generate_completions, run, samples, prompts, seeds)
    return SimpleNamespace(step=step, samples=samples, prompts=prompts, seeds=seeds, future=future,
                           position={"epoch": ahead["epoch"], "cursor": ahead["cursor"]})


@contextlib.contextmanager
def server_errors(run):
    """A vLLM server that stops answering (vllm_server_request's ConnectionError) ends the run with the step and the
    checkpoint to resume from once a server answers again."""
    try:
        yield
    except ConnectionError as e:
        last = (checkpoint_dirs(run.cfg.output_dir) or [None])[-1]
        resume = f"with --resume_from_checkpoint {last}" if last else "again (no checkpoint yet)"
        raise SystemExit(f"{e}, at step {run.state['step']} of {run.total_steps}: start the server again and run the "
                         f"same command {resume}") from None


# ----------------------------------------------------------------------------------------------------------------
# Multi-turn rollouts with tools (--multi_turn_plugin env.py --max_turns N): each completion of a group is its own
# episode. After each reply the plugin's step(messages, completion, turn, **columns) is asked for the next user turn:
# messages is the conversation so far (the reply `completion` last), turn the replies so far, columns the record's
# fields, `images` (the episode's so far, the record's first) and max_turns; it returns {"content": text with an
# <image> tag per image, "images": [paths or PIL images]} (a tool's result) or None to end the episode. The next reply
# is generated with the whole conversation as its prompt, grown token by token: the previous prompt, the reply as
# sampled (labelled: the loss covers what the policy generated) and the user turn as the chat template writes it
# (not labelled). The rewards score the last reply, with the whole conversation as `messages` (score)

def load_multi_turn_plugin(path):
    """The step(messages, completion, turn, **columns) function of a --multi_turn_plugin file."""
    if not (path.endswith(".py") and os.path.isfile(path)):
        raise SystemExit(f"--multi_turn_plugin {path}: no such .py file")
    module = rewards.import_file(path, "multi_turn_plugin")
    if not callable(getattr(module, "step", None)):
        raise SystemExit(f"--multi_turn_plugin {path} has no function step(messages, completion, turn, **columns)")
    return module.step


def turn_seed(seed, turn):
    """The sampling seed of an episode's reply at `turn` (2, 3, ...) from its first reply's (sampling_seeds): a reply
    depends neither on the process nor on the other episodes, and a resumed run samples it again."""
    return int.from_bytes(hashlib.sha256(f"{seed}/turn/{turn}".encode()).digest()[:8], "little")


def next_prompt(prompt, reply_ids, messages, images, encoder):
    """An episode's next prompt, encoded: `prompt` (the encoded prompt of the turn) + the reply sampled from it
    (`reply_ids`, labelled) + the user turn that `messages` (the conversation so far) ends with, as the chat template
    writes it after the reply's <|im_end|> up to the next "<|im_start|>assistant\\n" (not labelled), its `images`
    (paths or PIL images) encoded after the prompt's; the multimodal positions of the whole. The tokens, labels and
    positions of encoding the whole conversation with its replies labelled (tests/test_multi_turn.py), except that
    the replies are the tokens sampled rather than their text tokenised again."""
    text = encoder.render(data.Sample(messages), add_generation_prompt=True)
    end = "<|im_end|>"
    turn_text = text[text.rindex(end, 0, text.rindex(end)) + len(end):]  # what follows the reply's end
    pixels, grids = zip(*[encoder.encode_image(image) for image in images]) if images else ((), ())
    pieces = turn_text.split("<|image_pad|>")  # one pad per image so far: each becomes its image's vision tokens
    turn_text = pieces[0] + "".join("<|image_pad|>" * (int(grid.prod()) // encoder.merge_size**2) + piece
                                    for grid, piece in zip(grids, pieces[1:]))
    dtype = prompt["input_ids"].dtype
    reply = torch.tensor(reply_ids, dtype=dtype)
    turn_ids = torch.tensor(encoder.tokenizer.encode(turn_text, add_special_tokens=False), dtype=dtype)
    example = {k: v for k, v in prompt.items() if k in data.VISION_KEYS or k == "second_per_grid_ts"}
    for key, new in (("pixel_values", pixels), ("image_grid_thw", grids)) if images else ():
        example[key] = torch.cat([prompt[key], *new] if key in prompt else new)
    example["input_ids"] = torch.cat([prompt["input_ids"], reply, turn_ids])
    example["labels"] = torch.cat([prompt["labels"], torch.full((len(reply) + len(turn_ids),), data.IGNORE)])
    n = len(prompt["input_ids"])
    example["labels"][n - 1 : n - 1 + len(reply)] = reply  # shifted, as completion_example labels a completion
    return encoder.add_positions(example)


def next_turn(env, episode, turn, encoder, cfg):
    """Ask the plugin for the user turn after the episode's latest reply (`turn`: the replies so far) and, if it gives
    one, make the episode's next prompt (next_prompt). -> whether the episode goes on: not when the plugin returns
    None, nor when the next prompt would pass --max_length (the episode ends with the reply it has)."""
    columns = {**episode["sample"].extra, "images": list(episode["images"]), "max_turns": cfg.max_turns}
    user = env([dict(m) for m in episode["messages"]], episode["text"], turn, **columns)
    if user is None:
        return False
    content, images = (user.get("content"), list(user.get("images") or [])) if isinstance(user, dict) else (None, [])
    if isinstance(content, str) and data.IMAGE_TAG not in content:  # as in records: untagged images go first
        content = data.IMAGE_TAG * len(images) + content
    if not isinstance(content, str) or content.count(data.IMAGE_TAG) != len(images) or data.VIDEO_TAG in content \
            or data.SPECIAL_TOKEN_IN_TEXT.search(content):
        raise ValueError(f"--multi_turn_plugin: step() after reply {turn} returned {repr(user)[:300]}; expected None or "
                         f"{{'content': text with one <image> per image (or none: they go first), no <video> and no "
                         f"special tokens, 'images': [paths or PIL images]}}")
    messages = episode["messages"] + [{"role": "user", "content": content}]
    prompt = next_prompt(episode["prompt"], episode["completion_ids"], messages, images, encoder)
    if len(prompt["input_ids"]) > cfg.max_length:
        return False
    episode.update(prompt=prompt, messages=messages, images=episode["images"] + images)
    return True


def play_episodes(env, generate, encoder, samples, prompts, seeds, first, cfg, device, distributed):
    """Multi-turn rollouts: each first reply of `first` = (completion_ids, texts, sampled log-probabilities or None),
    prompt-major as rollout() gives them, goes on as its own episode of up to --max_turns replies: while the plugin
    gives a user turn (next_turn), the next reply is generated from the episode's next prompt by
    generate(samples, prompts, seeds) (one completion per prompt, as `first`), with a seed from its first reply's
    and the turn (turn_seed; seeds None: greedy). An episode ends when the plugin returns None, when its reply was cut
    at max_completion_length (no <|im_end|> to go on from), or when its next prompt would pass --max_length, so the
    episodes of a group may end at different turns. -> (per episode: its replies' tokens joined, what the loss
    covers; its last reply's text, what the rewards score; its replies' sampled log-probabilities joined, or None;
    the episodes: {sample, prompt (the last turn's, with the earlier replies labelled), completion_ids (the last
    reply), text, messages (the whole conversation, replies included), images (every turn's), turns})"""
    completion_ids, texts, sampled_logps = first
    per_prompt = len(completion_ids) // len(samples)
    episodes = [{"sample": samples[i // per_prompt], "prompt": prompts[i // per_prompt], "completion_ids": ids,
                 "text": text, "messages": samples[i // per_prompt].messages + [{"role": "assistant", "content": text}],
                 "images": list(samples[i // per_prompt].images), "turns": 1}
                for i, (ids, text) in enumerate(zip(completion_ids, texts))]
    policy_ids = [list(ids) for ids in completion_ids]
    policy_logps = None if sampled_logps is None else [list(logps) for logps in sampled_logps]
    going = list(range(len(episodes)))
    for turn in range(1, cfg.max_turns):
        going = [i for i in going if not truncated(episodes[i]["completion_ids"], encoder)
                 and next_turn(env, episodes[i], turn, encoder, cfg)]
        # generation is a collective under FSDP: while any process has an episode going, every process generates
        # (one with none: a stand-in prompt, whose reply is dropped)
        if not all_reduce(torch.tensor(float(len(going)), device=device), distributed, "max").item():
            break
        rows = [episodes[i] for i in going]
        replies, reply_texts, reply_logps = generate(
            [data.Sample(e["messages"], e["images"], e["sample"].videos) for e in rows] or samples[:1],
            [e["prompt"] for e in rows] or prompts[:1],
            None if seeds is None else [turn_seed(seeds[i], turn + 1) for i in going] or [0])
        for k, i in enumerate(going):
            episode = episodes[i]
            episode.update(completion_ids=replies[k], text=reply_texts[k], turns=turn + 1,
                           messages=episode["messages"] + [{"role": "assistant", "content": reply_texts[k]}])
            policy_ids[i] += replies[k]
            if policy_logps is not None:
                policy_logps[i] += reply_logps[k]
    return policy_ids, [e["text"] for e in episodes], policy_logps, episodes


# ----------------------------------------------------------------------------------------------------------------
# Rewards, and which groups the step trains on

def score(samples, completion_ids, texts, cfg, num_generations, errors=None, episodes=None):
    """Rewards of completions (num_generations per sample, prompt-major). Columns: every record field repeated per
    completion, plus prompts, images, completion_lengths, max_completion_length. -> (total [N], per-function lists).
    `errors` counts the completions whose reward failed, per reward (--reward_error skip). Multi-turn (`episodes`,
    play_episodes): texts are the last replies, and the columns add messages (the whole conversation, replies
    included) and turns; images are every turn's, completion_lengths the last replies'."""
    repeat = lambda values: [v for v in values for _ in range(num_generations)]
    columns = {k: repeat([s.extra.get(k) for s in samples]) for k in sorted({k for s in samples for k in s.extra})}
    columns.update(prompts=repeat([s.messages for s in samples]), images=repeat([s.images for s in samples]),
                   completion_lengths=[len(c) for c in completion_ids], max_completion_length=cfg.max_completion_length)
    if episodes is not None:
        columns.update(messages=[e["messages"] for e in episodes], turns=[e["turns"] for e in episodes],
                       images=[e["images"] for e in episodes],
                       completion_lengths=[len(e["completion_ids"]) for e in episodes])
    columns.update(judge_url=cfg.judge_url, judge_model=cfg.judge_model, judge_prompt=cfg.judge_prompt,
                   judge_max_concurrency=cfg.judge_max_concurrency)  # rewards.judge's settings
    total, per_function = rewards.compute_rewards(cfg.reward_funcs, cfg.reward_weights, texts, columns,
                                                  cfg.reward_timeout, cfg.reward_error, errors)
    return torch.tensor(total, dtype=torch.float32), per_function


def make_groups(samples, prompts, completion_ids, texts, total, per_function, num_generations, sampled_logps=None,
                episodes=None):
    """One dict per prompt: its sample, encoded prompt, completions, their texts and rewards (and with vLLM, the
    log-probability vLLM sampled each token with; multi-turn, each completion's episode)."""
    G = num_generations
    return [{"sample": sample, "prompt": prompts[j], "completion_ids": completion_ids[j * G : (j + 1) * G],
             "texts": texts[j * G : (j + 1) * G], "rewards": total[j * G : (j + 1) * G],
             "per_function": {k: v[j * G : (j + 1) * G] for k, v in per_function.items()},
             "sampled_logps": sampled_logps[j * G : (j + 1) * G] if sampled_logps is not None else None,
             "episodes": episodes[j * G : (j + 1) * G] if episodes is not None else None}
            for j, sample in enumerate(samples)]


def has_signal(group):
    return bool(group["rewards"].max() > group["rewards"].min())  # equal rewards: zero advantage, no gradient


# ----------------------------------------------------------------------------------------------------------------
# Advantages

def group_advantages(rewards, num_generations, scale_rewards="group", estimator="grpo"):
    """GRPO's group-relative advantage with outcome rewards (Shao et al. 2024, DeepSeekMath §4.1.2):
    A_i = (r_i - mean(group)) / (std(group) + 1e-4), for every token of completion i; the group mean is the baseline,
    so no value model is needed. rewards: [N], each prompt's completions consecutive. scale_rewards: group (as
    written), batch (the std of all N rewards: groups that barely differ are not blown up) or none (Dr. GRPO, Liu et al.
    2025 §3.1: dividing by the group std weights too-easy and too-hard prompts up). Stds are unbiased (torch.std).
    estimator: the baseline.
      grpo                 the group mean, as above
      rloo                 the mean of the group's other G - 1 rewards (RLOO, Ahmadian et al. 2024, "Back to Basics"):
                           a baseline that does not depend on r_i, so the estimate is unbiased; r_i - mean(others) is
                           G / (G - 1) * (r_i - mean(group)). Then divided as scale_rewards says
      reinforce_plus_plus  c_i = r_i - mean(group), then (c_i - mean(c)) / (std(c) + 1e-4) over all N (REINFORCE++
                           with the group baseline, Hu et al. 2025: normalised over the global batch, which the caller
                           passes); scale_rewards does not apply"""
    grouped = rewards.view(-1, num_generations)
    centred = (grouped - grouped.mean(1, keepdim=True)).flatten()
    if estimator == "rloo":
        centred = centred * num_generations / (num_generations - 1)
    elif estimator == "reinforce_plus_plus":
        return (centred - centred.mean()) / (centred.std() + 1e-4)
    elif estimator != "grpo":
        raise ValueError(f"estimator must be grpo, rloo or reinforce_plus_plus, got {estimator!r}")
    if scale_rewards == "none":
        return centred
    if scale_rewards == "group":
        std = grouped.std(1).repeat_interleave(num_generations)
    elif scale_rewards == "batch":
        std = rewards.std()
    else:
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    return centred / (std + 1e-4)


def loss_mask(groups, cfg, encoder):
    """[completions] bool: which completions carry loss. With --dynamic_sample the agreeing groups that only fill the
    batch carry none; with --overlong_filter a completion cut at max_completion_length carries none (its reward
    judges an unfinished answer, DAPO §3.4)."""
    keep = torch.ones(len(groups) * cfg.num_generations, dtype=torch.bool)
    if cfg.dynamic_sample:
        keep &= torch.tensor([has_signal(g) for g in groups for _ in range(cfg.num_generations)])
    if cfg.overlong_filter:
        keep &= torch.tensor([not truncated(c, encoder) for g in groups for c in g["completion_ids"]])
    return keep


def rollout_metrics(groups, generated, advantages, rounds, errors, cfg, distributed):
    """Means (and stds of rewards and advantages) over every process's completions, the longest completion, the
    rounds of dynamic sampling, and the completions whose reward failed (reward_errors/<name>, --reward_error skip)."""
    if cfg.reward_error == "skip":
        generated.update({f"reward_errors/{name}": [errors.get(name, 0)] for name in cfg.reward_funcs})
    values = gather_lists({**generated, "advantage": advantages.tolist()}, distributed)
    out = {}
    for name, v in values.items():
        if name.startswith("reward_errors/"):
            out[name] = float(sum(v))
        elif v:
            out[name] = sum(v) / len(v)
            if name.startswith("reward") or name == "advantage":
                out[name + "_std"] = torch.tensor(v, dtype=torch.float64).std().item() if len(v) > 1 else 0.0
    out["completion_length_max"] = float(max(values["completion_length"]))
    out["rollout_rounds"] = rounds
    return out


def note_completions(generated, groups, encoder):
    """What the log reports of every completion generated (kept for the step or not). Multi-turn: a completion is an
    episode (its length: every reply's tokens), and `turns` its replies."""
    for g in groups:
        if g.get("episodes") is not None:
            generated.setdefault("turns", []).extend(e["turns"] for e in g["episodes"])
        generated.setdefault("reward", []).extend(g["rewards"].tolist())
        for name, values in g["per_function"].items():
            generated.setdefault(f"reward/{name}", []).extend(v for v in values if v is not None)
        generated.setdefault("completion_length", []).extend(len(c) for c in g["completion_ids"])
        generated.setdefault("truncated", []).extend(float(truncated(c, encoder)) for c in g["completion_ids"])
        generated.setdefault("zero_std_groups", []).append(float(not has_signal(g)))


def completion_rows(batch, step):
    """completions.jsonl rows: the prompt, the completion, each reward and the advantage; multi-turn, the completion is
    the last reply, `conversation` the turns after the prompt (their text) and `turns` the replies."""
    rows = [{"step": step, "prompt": g["sample"].messages[-1]["content"], "images": g["sample"].images, "completion": text,
             "reward": g["rewards"][k].item(), **{f"reward/{n}": v[k] for n, v in g["per_function"].items()},
             **({} if g.get("episodes") is None else {"turns": g["episodes"][k]["turns"],
                                                      "conversation": g["episodes"][k]["messages"][len(g["sample"].messages):]})}
            for g in batch["groups"] for k, text in enumerate(g["texts"])]
    for row, advantage in zip(rows, batch["advantages"].tolist()):
        row["advantage"] = advantage
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Loss

def grpo_loss(logps, old_logps, ref_logps, advantages, mask, beta, epsilon, epsilon_high, loss_type,
              importance_sampling_level="token", max_completion_length=None, num_items_in_batch=None, tau_pos=1.0,
              tau_neg=1.05, policy_mask=None, token_weights=None):
    """The clipped surrogate loss of GRPO and its variants -> (loss, metrics).

    logps, old_logps, ref_logps, mask: [B, T] per completion token (old: the policy that sampled the completions;
    ref: the reference, None when beta == 0); advantages: [B], one per completion.
    Ratio: per token r_t = exp(logp_t - old_t) (PPO; GRPO, Shao et al. 2024 eq. 3), or per sequence (GSPO, Zheng et
    al. 2025 §4) s = exp(mean_t(logp_t - old_t)), the geometric mean of a completion's token ratios, for every token.
    Per-token loss: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) + beta KL_t (GRPO eq. 3 with DAPO's decoupled
    clip-higher bound, Yu et al. 2025 §3.1); cispo: -sg(min(r, 1 + epsilon_high)) A logp_t + beta KL_t (MiniMax-M1
    2025 §3.1: the weight is clipped and detached, so no token loses its gradient as under the PPO clip; TRL and
    ms-swift pass the cap itself as epsilon_high, here the cap is 1 + epsilon_high, as in the paper's clip(r, ...));
    sapo: -f(r) A + beta KL_t with f(r) = (4 / tau) sigmoid(tau (r - 1)), tau = tau_pos where A > 0 else tau_neg (SAPO,
    Gao et al. 2025, arXiv 2511.20347): a soft gate instead of the hard clip; f'(1) = 1, so on policy the gradient is
    the plain policy gradient, and it fades smoothly (4 s (1 - s), s = sigmoid(tau (r - 1))) as r leaves 1.
    policy_mask: bool [B, T] or None: only these tokens get the policy term (the high-entropy ones, entropy_mask);
    the KL term and the normalisers below still cover `mask` (as TRL and ms-swift do, and the paper's objective, 1 / sum
    |o_i|; its released verl code divides by the kept tokens instead, which Adam's scale-free steps mostly absorb).
    token_weights: [B, T] or None: each token's policy term times its weight (vLLM's truncated importance sampling).
    KL_t: the k3 estimator of KL(policy || ref) (GRPO eq. 4): exp(ref_t - logp_t) - (ref_t - logp_t) - 1 >= 0.
    Aggregation (loss_type), with S = the sum of per-token loss * mask:
      grpo     mean over each completion's tokens, then over the B completions (GRPO eq. 3)
      bnpo     S / tokens of this batch
      dr_grpo  S / (B * max_completion_length): a constant, so no bias towards long or short completions (Dr. GRPO)
      dapo     S / num_items_in_batch: the completion tokens of the whole global batch, every process and accumulation
               step (counted before the first backward), so a token weighs the same however the batch is split
               (DAPO §3.3); None: this batch's tokens
      cispo    as dapo (MiniMax-M1's objective normalises by the batch's tokens)
      sapo     as dapo (the SAPO paper's token-level average)
    With old_logps = logps.detach() (num_iterations 1) the ratio is 1 and the gradient is REINFORCE with the group mean
    as the baseline: d loss / d logp_t = -A / normaliser.
    Metrics: kl (token mean; 0 when beta is 0); clip_low, clip_high, clip_region: the fraction of tokens whose gradient
    the clip removed (ratio below 1 - epsilon with A < 0, above 1 + epsilon_high with A > 0; cispo: weight capped;
    sapo: always 0, it has no hard clip)."""
    mask = mask.to(logps.dtype)
    advantages = advantages[:, None]
    log_ratio = logps - old_logps
    if importance_sampling_level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1))[:, None]
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be token or sequence, got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio).expand_as(logps)
    if loss_type == "cispo":
        per_token_loss = -torch.clamp(ratio, max=1 + epsilon_high).detach() * advantages * logps
        clipped_low, clipped_high = torch.zeros_like(ratio, dtype=torch.bool), ratio > 1 + epsilon_high
    elif loss_type == "sapo":
        tau = torch.where(advantages > 0, tau_pos, tau_neg).to(logps.dtype)
        per_token_loss = -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * advantages
        clipped_low = clipped_high = torch.zeros_like(ratio, dtype=torch.bool)
    else:
        per_token_loss = -torch.min(ratio * advantages, torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantages)
        clipped_low, clipped_high = (ratio < 1 - epsilon) & (advantages < 0), (ratio > 1 + epsilon_high) & (advantages > 0)
    if policy_mask is not None:
        per_token_loss = per_token_loss * policy_mask.to(logps.dtype)
        clipped_low, clipped_high = clipped_low & policy_mask, clipped_high & policy_mask
    if token_weights is not None:
        per_token_loss = per_token_loss * token_weights
    kl = torch.zeros_like(logps)
    if beta != 0:
        kl = torch.exp(ref_logps - logps) - (ref_logps - logps) - 1
        per_token_loss = per_token_loss + beta * kl
    summed = (per_token_loss * mask).sum()
    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif loss_type == "bnpo":
        loss = summed / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("loss_type dr_grpo needs max_completion_length")
        loss = summed / (logps.shape[0] * max_completion_length)
    elif loss_type in ("dapo", "cispo", "sapo"):
        loss = summed / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    else:
        raise ValueError(f"loss_type must be grpo, bnpo, dr_grpo, dapo, cispo or sapo, got {loss_type!r}")
    mean = lambda x: ((x.to(mask.dtype) * mask).sum() / mask.sum().clamp(min=1)).detach()
    return loss, {"kl": mean(kl), "clip_low": mean(clipped_low), "clip_high": mean(clipped_high),
                  "clip_region": mean(clipped_low | clipped_high)}


def entropy_threshold(entropies, quantile):
    """The (1 - quantile) quantile of a flat tensor of entropies, as torch.quantile computes it (linear interpolation
    between the two nearest ranks) but without its limit of 2^24 values, which a step of long completions on many
    GPUs passes. No values (no token carries a policy gradient): 0, and no token needs it."""
    values = entropies.sort().values
    if len(values) == 0:
        return entropies.new_zeros(())
    rank = (1 - quantile) * (len(values) - 1)
    low = math.floor(rank)
    return torch.lerp(values[low], values[min(low + 1, len(values) - 1)], rank - low)


def entropy_mask(entropies, mask, quantile, threshold=None):
    """The tokens that get the policy loss under --top_entropy_quantile rho (Wang et al. 2025, "Beyond the 80/20 rule:
    high-entropy minority tokens drive effective RL for LLM reasoning", arXiv 2506.01939: the forking tokens, where
    the policy hesitates, carry the learning). entropies, mask: [B, T] -> bool [B, T]: True for the tokens of `mask`
    whose entropy is at least the (1 - rho) quantile of the masked entropies (entropy_threshold); rho 1: mask itself.
    threshold: that quantile taken over more tokens than these (the loop's: every process's tokens of the step with a
    nonzero advantage, step_entropy_threshold). Ties at the threshold are all kept (`>=`, as TRL and ms-swift): the
    completions of a prompt share their first position's entropy, so a group's first tokens go in or out together."""
    mask = mask.bool()
    if quantile >= 1:
        return mask
    if threshold is None:
        threshold = entropy_threshold(entropies[mask], quantile)
    return mask & (entropies >= threshold)


# Log-probabilities of completion tokens: prompt + completion packed into one row, the vocabulary projected for the
# completion positions only and the fp32 log-softmax taken in chunks (recomputed in backward).

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


def completion_example(prompt, completion_ids, encoder):
    """Prompt + completion -> an Example whose labels are the completion tokens (shifted, as data.py's: labels[t] is
    the target of position t) and the prompt's (none; in a multi-turn episode's prompt, its earlier replies:
    next_prompt), with the model's multimodal positions for the whole sequence."""
    completion = torch.tensor(completion_ids, dtype=prompt["input_ids"].dtype)
    example = {k: v for k, v in prompt.items() if k in data.VISION_KEYS or k == "second_per_grid_ts"}
    example["input_ids"] = torch.cat([prompt["input_ids"], completion])
    example["labels"] = torch.cat([prompt["labels"], torch.full_like(completion, data.IGNORE)])
    n = len(prompt["input_ids"])
    example["labels"][n - 1 : n - 1 + len(completion)] = completion
    return encoder.add_positions(example)


def completion_logps(model, examples, lengths, device, temperature, with_entropy=False, heads=None):
    """One packed forward of prompt + completion examples -> (logps, entropy or None, mask), each [B, longest
    completion]. heads: example i shares example heads[i]'s prompt, which is then in the row once (data.collate_shared);
    None: every example whole. The mask is built from the host's lengths: no sync."""
    batch = data.collate(examples, packing=True) if heads is None else data.collate_shared(examples, heads)
    batch |= data.vision_windows(batch, model.config)  # Qwen2.5-VL's window order from the CPU's grids (data.py)
    flat_logps, flat_entropy = token_logps(model, batch, device, temperature, with_entropy)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).to(device, non_blocking=True)
    spread = lambda flat: flat.new_zeros(mask.shape).masked_scatter(mask, flat)
    return spread(flat_logps), spread(flat_entropy) if with_entropy else None, mask


# ----------------------------------------------------------------------------------------------------------------
# Step: a rollout's completions -> micro-batches -> num_iterations optimizer steps

def micro_batches(batch, encoder, cfg, device):
    """per_device_train_batch_size completions each, as prompt + completion examples, in rollout order (multi-turn:
    an episode's last prompt + its last reply, every reply labelled). With varlen attention a group's completions in
    a micro-batch share its prompt (`heads`: the first of them), which the forward then holds once: with a 256-token
    prompt, 8 completions of 512 are 4,360 tokens instead of 6,144, and the prompt's images go through the vision
    tower once."""
    size, micro = cfg.per_device_train_batch_size, []
    sampled = None  # vLLM's sampled log-probabilities, per completion token
    if batch["groups"][0]["sampled_logps"] is not None:
        sampled = [x for g in batch["groups"] for x in g["sampled_logps"]]
    for start in range(0, len(batch["completion_ids"]), size):
        ids = batch["completion_ids"][start : start + size]
        groups = [batch["groups"][(start + k) // cfg.num_generations] for k in range(len(ids))]
        if groups[0].get("episodes") is None:
            examples = [completion_example(g["prompt"], c, encoder) for g, c in zip(groups, ids)]
        else:  # multi-turn: the episode's last prompt (its earlier replies labelled in it) + its last reply
            episodes = [g["episodes"][(start + k) % cfg.num_generations] for k, g in enumerate(groups)]
            examples = [completion_example(e["prompt"], e["completion_ids"], encoder) for e in episodes]
        heads = None
        if cfg.attn_implementation == "varlen" and groups[0].get("episodes") is None:  # (an episode's prompt is its own)
            heads = [next(i for i in range(len(ids)) if groups[i] is g) for g in groups]
        micro.append({"examples": examples, "heads": heads,
                      "lengths": [len(c) for c in ids], "advantages": batch["advantages"][start : start + size].to(device),
                      "keep": batch["keep"][start : start + size].to(device)})
        if sampled is not None:
            micro[-1]["sampled_logps"] = sampled[start : start + size]
    return micro


def compare_with_vllm(mb, logps, mask, cfg):
    """vLLM's sampled log-probabilities against the trainer's of the sampling policy (logps [B, T], mask: the
    completion tokens) -> mb["vllm_diff"]: [summed |trainer - vLLM| over the tokens that carry loss, their count], and
    with --vllm_importance_sampling_correction mb["is_weights"] (vllm_importance_weights)."""
    keep = mask & mb["keep"][:, None]
    weights, mean_diff = vllm_importance_weights(logps.detach(), vllm_logps(mb["sampled_logps"], mask), keep,
                                                 cfg.vllm_importance_sampling_cap)
    if cfg.vllm_importance_sampling_correction:
        mb["is_weights"] = weights
    mb["vllm_diff"] = torch.stack([mean_diff * keep.sum(), keep.sum().float()])


@torch.no_grad()
def fixed_logps(model, reference, micro, cfg, device):
    """What stays fixed while a rollout is trained on, computed in eval mode: the sampling policy's logps (only for
    num_iterations > 1: otherwise the policy has not moved, and the loss takes the detached current ones) and the
    reference's (beta != 0); with --top_entropy_quantile < 1, the sampling policy's entropies, which pick the tokens
    that get the policy loss (entropy_mask) in every update of the rollout; with vLLM, when this pass runs, the
    comparison with vLLM's log-probabilities (compare_with_vllm; else the first update makes it from its own forward,
    which is the sampling policy's too)."""
    model.eval()
    high_entropy = cfg.top_entropy_quantile < 1
    for mb in micro:
        # with num_iterations 1 and high_entropy this pass runs for the entropies alone: one more no-grad forward
        if cfg.num_iterations > 1 or high_entropy:
            logps, entropy, mask = completion_logps(model, mb["examples"], mb["lengths"], device, cfg.temperature,
                                                    high_entropy, mb["heads"])
            if cfg.num_iterations > 1:
                mb["old_logps"] = logps
            if high_entropy:
                mb["entropy"], mb["token_mask"] = entropy, mask & mb["keep"][:, None]
            if "sampled_logps" in mb:
                compare_with_vllm(mb, logps, mask, cfg)
        if cfg.beta != 0 and reference is not None:
            mb["ref_logps"] = completion_logps(reference, mb["examples"], mb["lengths"], device, cfg.temperature,
                                               heads=mb["heads"])[0]
        elif cfg.beta != 0:
            with lora.disable_adapters(model):
                mb["ref_logps"] = completion_logps(model, mb["examples"], mb["lengths"], device, cfg.temperature,
                                                   heads=mb["heads"])[0]
    model.train()


def micro_batch_loss(model, mb, num_items, num_micro, cfg, device, world_size):
    """GRPO's loss on one micro-batch, scaled so that the gradients of every micro-batch of every process add up to
    the global batch's -> (loss, its metrics as sums over the micro-batch's tokens)."""
    dapo_like = cfg.loss_type in ("dapo", "cispo", "sapo")
    logps, entropy, mask = completion_logps(model, mb["examples"], mb["lengths"], device, cfg.temperature, True,
                                            mb["heads"])
    if "sampled_logps" in mb and "vllm_diff" not in mb:  # (the rollout's first update, with no fixed_logps pass)
        compare_with_vllm(mb, logps, mask, cfg)
    mask = mask & mb["keep"][:, None]
    # --top_entropy_quantile < 1: only the tokens at or above the step's threshold (train: every process's tokens) get
    # the policy loss, picked by fixed_logps' entropies
    policy_mask = (entropy_mask(mb["entropy"], mask, cfg.top_entropy_quantile, mb["entropy_threshold"])
                   if "entropy_threshold" in mb else None)
    loss, m = grpo_loss(logps, mb.get("old_logps", logps.detach()), mb.get("ref_logps"), mb["advantages"], mask,
                        cfg.beta, cfg.epsilon, cfg.epsilon_high, cfg.loss_type, cfg.importance_sampling_level,
                        cfg.max_completion_length, num_items if dapo_like else None, tau_pos=cfg.tau_pos,
                        tau_neg=cfg.tau_neg, policy_mask=policy_mask, token_weights=mb.get("is_weights"))
    if not dapo_like:
        loss = loss / (num_micro * world_size)  # the mean over every micro-batch of every process
    n = mask.sum()
    return loss, {"loss": loss.detach(), **{k: v * n for k, v in m.items()}, "entropy": (entropy * mask).sum(), "tokens": n.float()}


def completion_tokens(micro, device, distributed):
    """The completion tokens that carry loss in the global batch, counted before any backward (dapo/cispo divide by
    it). From host values: no sync."""
    tokens = sum(sum(n for n, k in zip(mb["lengths"], mb["keep"].tolist()) if k) for mb in micro)
    return all_reduce(torch.full((), float(tokens), device=device), distributed).clamp(min=1)


def step_entropy_threshold(micro, quantile, distributed):
    """--top_entropy_quantile's threshold for the step (entropy_mask): the (1 - quantile) quantile of the entropies
    (fixed_logps') of every process's completion tokens that carry loss and a nonzero advantage, known before any
    backward. The paper ranks the tokens of a DAPO batch, after dynamic sampling dropped the groups whose rewards all
    agree; here those groups stay unless --dynamic_sample, and their tokens (often long, high-entropy failures) would
    take the quantile's places while getting no policy gradient. Processes hold different numbers of tokens: each
    sends its own, padded to the most any holds."""
    mine = torch.cat([mb["entropy"][mb["token_mask"] & (mb["advantages"] != 0)[:, None]] for mb in micro])
    if distributed:
        sizes = [torch.zeros(1, dtype=torch.long, device=mine.device) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([len(mine)], device=mine.device))
        sizes = [int(n) for n in sizes]
        padded = [mine.new_zeros(max(sizes)) for _ in sizes]
        dist.all_gather(padded, torch.cat([mine, mine.new_zeros(max(sizes) - len(mine))]))
        mine = torch.cat([p[:n] for p, n in zip(padded, sizes)])
    return entropy_threshold(mine, quantile)


def train_step(run, micro, sigterm=False):
    """Forward and backward every micro-batch, then one optimizer step (optimizer_step: skipped when the loss or the
    gradient norm is NaN/inf on any process). -> (the loss metrics of the global batch, skipped?, SIGTERM anywhere?)"""
    model, cfg, device = run.model, run.cfg, run.device
    num_items = completion_tokens(micro, device, run.distributed)
    sums = {}
    for i, mb in enumerate(micro):
        if run.distributed:
            model.set_requires_gradient_sync(i == len(micro) - 1)  # reduce gradients once per step
        loss, metrics = micro_batch_loss(model, mb, num_items, len(micro), cfg, device, run.world_size)
        (loss * run.world_size).backward()  # FSDP averages gradients over processes
        sums = {k: sums.get(k, 0) + v for k, v in metrics.items()}
    grad_norm, skipped, stop = optimizer_step(model, run.optimizer, run.scheduler, sums["loss"], cfg, device,
                                              run.distributed, sigterm)
    totals = dict(zip(sums, all_reduce(torch.stack(list(sums.values())), run.distributed).tolist()))
    n = max(totals.pop("tokens"), 1.0)
    return {"loss": totals.pop("loss"), **{k: v / n for k, v in totals.items()}, "grad_norm": grad_norm,
            "lr": run.scheduler.get_last_lr()[0]}, skipped, stop


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


# ----------------------------------------------------------------------------------------------------------------
# Schedule, evaluation, logging, checkpoints

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


def evaluate(model, val, encoder, cfg, device, rank, world_size, distributed, env=None, generate=None):
    """Greedy completions of the first eval_limit held-out prompts -> mean reward, and accuracy (rewards.accuracy
    against `solution`) over the records that have one. With a multi-turn plugin (`env`): greedy episodes
    (play_episodes), scored on their last replies, and their mean turns. generate(samples, prompts) -> (completion_ids,
    texts), greedy: vLLM's (eval_generator), else the built-in rollout."""
    samples = val[: cfg.eval_limit]
    mine, size = samples[rank::world_size], cfg.per_device_train_batch_size
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # reward sum, prompts, correct, with a solution, turns
    generate = generate or (lambda chunk, prompts: rollout(model, encoder, chunk, cfg, device, greedy=True, prompts=prompts))
    greedy = lambda chunk, prompts, seeds: (*generate(chunk, prompts), None)
    for i in range(0, max(len(mine), math.ceil(len(samples) / world_size)), size):
        chunk = mine[i : i + size] or samples[:1]  # every process runs the same number of generate calls
        prompts = [encoder(s, **PROMPT) for s in chunk]
        completion_ids, texts, _ = greedy(chunk, prompts, None)
        episodes = None
        if env is not None:
            completion_ids, texts, _, episodes = play_episodes(env, greedy, encoder, chunk, prompts, None,
                                                               (completion_ids, texts, None), cfg, device, distributed)
        if mine[i : i + size]:
            total, _ = score(chunk, completion_ids, texts, cfg, 1, episodes=episodes)
            correct = [c for c in rewards.accuracy(texts, solution=[s.extra.get("solution") for s in chunk]) if c is not None]
            turns = sum(e["turns"] for e in episodes) if episodes else len(chunk)
            sums += torch.tensor([total.sum().item(), len(chunk), sum(correct), len(correct), turns], dtype=torch.float64,
                                 device=device)
    reward, prompts, correct, with_solution, turns = all_reduce(sums, distributed).tolist()
    return {"eval_reward": reward / max(prompts, 1), **({"eval_accuracy": correct / with_solution} if with_solution else {}),
            **({"eval_turns": turns / max(prompts, 1)} if env is not None else {})}


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


def checkpoint_dirs(output_dir):
    """Complete checkpoints only (a half-written one is still named *.tmp), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in os.listdir(output_dir) if n.startswith("checkpoint-") and n[len("checkpoint-"):].isdigit()]
    return [os.path.join(output_dir, n) for n in sorted(names, key=lambda n: int(n.split("-")[1]))]


def checkpoint_score(trainer_state):
    """Of the checkpoints, the one kept besides the latest has the lowest score: the highest eval reward."""
    reward = trainer_state.get("eval_reward")
    return None if reward is None else -reward


NOT_COPIED = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.index.json", "config.json", "generation_config.json",
              "trainer_state.json")


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
# The run: everything the loop needs, built once; then the loop

def setup(cfg, state=None):
    """Processes, output folder, rewards, the policy (and reference), data, optimizer, schedule, the state to resume
    from. `state`: extra fields of the trainer state (train_chord.py's expert-data cursor). -> the run."""
    distributed, rank, world_size, device = setup_distributed()
    master = rank == 0
    torch.manual_seed(cfg.seed)
    if master:
        check_output_dir(cfg)  # seconds, before the slow model load and prompt encoding
        with open(os.path.join(cfg.output_dir, "args.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=2)
    for path in cfg.reward_plugin:
        names = rewards.load_reward_plugin(path)
        if master:
            print(f"rewards from {path}: {', '.join(names)}")
    env = load_multi_turn_plugin(cfg.multi_turn_plugin) if cfg.multi_turn_plugin else None  # (before the slow loads)
    resume = cfg.resume_from_checkpoint
    if resume == "latest":
        resume = (checkpoint_dirs(cfg.output_dir) or [None])[-1]
    if cfg.attn_implementation == "varlen":  # a group's completions attend to its first's prompt (a millisecond)
        data.check_shared_prompt_attention(device)
    model, trainable, total = load_model(cfg, device, resume if cfg.train_type == "full" else None)
    reference = load_reference(cfg, device, distributed) if cfg.beta != 0 and cfg.train_type == "full" else None
    if distributed:
        model = shard_model(model, cfg, device)
    if cfg.compile == "true" or cfg.compile == "auto" and device.type == "cuda":  # after sharding: FSDP2's hooks stay
        for layer in [*model.model.language_model.layers, *model.model.visual.blocks]:  # outside the compiled layer
            layer.compile(dynamic=True)  # rows and images of any size without a recompile (the reference: eager)
    vision = data.VisionConfig(cfg.min_pixels, cfg.max_pixels, cfg.fps, cfg.video_min_frames, cfg.video_max_frames, cfg.video_max_pixels)
    encoder = data.Encoder(data.resolve_model(cfg.model), vision, cfg.max_length, cfg.truncation_strategy,
                           cfg.trust_remote_code)
    train, val, kept, max_patches = load_data(cfg, encoder, rank, world_size)
    # --gradient_checkpointing auto: a micro-batch holds per_device_train_batch_size prompts and their completions; a
    # colocated vLLM engine that does not sleep keeps its share of the GPU while the policy trains; the vision patches
    # are the prompts' (multi-turn: a tool's images come on top, so the bound of any tokens is taken)
    awake = cfg.use_vllm and cfg.vllm_mode == "colocate" and cfg.sleep_level == 0 and device.type == "cuda"
    auto_checkpointing(model, cfg, device, trainable, cfg.per_device_train_batch_size * (cfg.max_length + cfg.max_completion_length),
                       cfg.vllm_gpu_memory_utilization * torch.cuda.mem_get_info(device)[1] if awake else 0,
                       patches=None if cfg.multi_turn_plugin else cfg.per_device_train_batch_size * max_patches)
    prompts_per_rank = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps // cfg.num_generations
    rollouts_per_epoch = max(len(kept) // (prompts_per_rank * world_size), 1)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * rollouts_per_epoch * cfg.num_iterations)
    groups = lora.param_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.lorap_lr_ratio, cfg.vit_lr, cfg.aligner_lr)
    optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                                  fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps))
    state = {"step": 0, "epoch": 0, "cursor": 0, "eval_reward": None, "skipped_steps": 0, **(state or {})}
    if resume:
        state.update(load_checkpoint(resume, model, optimizer, scheduler, cfg))
        if master:
            print(f"resumed from {resume} at step {state['step']}")
    vllm = start_vllm(cfg, device, rank, train + val, resume is not None, model, optimizer) if cfg.use_vllm else None
    if master:
        print(f"{len(kept)} prompts, {len(val)} held out; {prompts_per_rank * world_size} prompts x {cfg.num_generations} "
              f"completions per rollout, {total_steps} steps; {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters "
              f"trainable ({cfg.train_type}); {world_size} process(es) on {device.type}")
    return SimpleNamespace(cfg=cfg, distributed=distributed, rank=rank, world_size=world_size, device=device, master=master,
                           model=model, reference=reference, encoder=encoder, train=train, val=val, kept=kept,
                           prompts_per_rank=prompts_per_rank, rollouts_per_epoch=rollouts_per_epoch, total_steps=total_steps,
                           optimizer=optimizer, scheduler=scheduler, state=state, vllm=vllm, env=env, log=open_log(cfg, master))


def train(run, update):
    """The GRPO loop: prompts -> rollout -> rewards -> group-relative advantages -> num_iterations updates.
    update(micro, sigterm) -> (metrics, skipped, stop): train_step here, CHORD's step in train_chord.py."""
    cfg, state, encoder, G = run.cfg, run.state, run.encoder, run.cfg.num_generations
    device, rank, distributed = run.device, run.rank, run.distributed
    start_time = time.time()
    counts = data.parameter_counts(run.model.config) if device.type == "cuda" else None  # for the update's MFU
    completions_file = open(os.path.join(cfg.output_dir, "completions.jsonl"), "a") if run.master and cfg.log_completions else None

    def clock():  # on GPU, after the queued kernels have run: else they are billed to the next phase
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    def run_eval():
        generate = eval_generator(run)
        result = evaluate(run.model, run.val, encoder, cfg, device, rank, run.world_size, distributed, run.env, generate)
        if generate and run.vllm.llm:
            sleep_vllm(run)
        state["eval_reward"] = result["eval_reward"]
        run.log({"step": state["step"], **result})
        return result

    first_eval = run_eval() if run.val and cfg.eval_on_start and state["step"] == 0 else None
    last_eval = first_eval
    run.model.train()
    window = []  # the metrics of each step since the last log line
    # SIGTERM only raises a flag: the step in progress finishes, then every process saves and the run exits 0
    sigterm = {"received": False}
    if cfg.save_on_sigterm:
        default_sigterm = signal.signal(signal.SIGTERM, lambda *_: sigterm.update(received=True))
    stop, bad_in_a_row, checkpoint_path = False, 0, None
    while state["step"] < run.total_steps and not stop:
        # sampling has its own seeds (sampling_seeds); every other random draw of this rollout and its updates
        # (dropout, a random reward) follows from (seed, step, process): a resumed run continues exactly
        step_seed = (cfg.seed * 1_000_003 + state["step"]) * 1009 + rank
        torch.manual_seed(step_seed)
        random.seed(step_seed)
        start = clock()
        ahead, rollout_wait_s = run.vllm.ahead if run.vllm else None, 0.0
        if ahead is not None:  # --async_generate: this step's rollout, generated while the last step trained, is
            with server_errors(run):  # done before the sync replaces the weights it was generated with
                ahead.completions = ahead.future.result()
            run.vllm.ahead, rollout_wait_s = None, clock() - start
        sync_start = clock()
        if run.vllm:  # the optimizer steps since the last rollout (or evaluation), to vLLM
            sync_vllm(run)
        weight_sync_s = clock() - sync_start
        if run.vllm and run.vllm.llm:
            wake_vllm(run)
        # rollout and rewards. DAPO's dynamic sampling (§3.2): while too few groups disagree (equal rewards: no
        # signal), more rounds of new prompts, up to max_resample_times; agreeing groups fill what is still missing
        groups, generated, errors = [], {}, {}
        for rounds in range(1, 2 + (cfg.max_resample_times if cfg.dynamic_sample else 0)):
            if ahead is None:
                samples, prompts, seeds = draw_prompts(run, state, state["step"], rounds)
                generating = clock()
                with server_errors(run):
                    completion_ids, texts, sampled_logps = generate_completions(run, samples, prompts, seeds)
                rollout_wait_s += clock() - generating
            else:  # the prompts and seeds it was requested with; the state's cursor moves past them now
                samples, prompts, seeds, (completion_ids, texts, sampled_logps) = \
                    ahead.samples, ahead.prompts, ahead.seeds, ahead.completions
                state.update(ahead.position)
            if cfg.async_generate and state["step"] + cfg.num_iterations < run.total_steps:
                # the next rollout, with the weights just sent, generated by the server while this one trains:
                # one step off-policy (vllm_importance_sampling_correction weighs each token by the lag's ratio)
                run.vllm.ahead = request_rollout(run, state["step"] + cfg.num_iterations)
            episodes = None
            if run.env:  # --multi_turn_plugin: each completion goes on as its own episode, up to --max_turns replies
                completion_ids, texts, sampled_logps, episodes = play_episodes(
                    run.env, lambda s, p, seeds: generate_completions(run, s, p, seeds, num_generations=1), encoder,
                    samples, prompts, seeds, (completion_ids, texts, sampled_logps), cfg, device, distributed)
            total, per_function = score(samples, completion_ids, texts, cfg, G, errors, episodes)
            new = make_groups(samples, prompts, completion_ids, texts, total, per_function, G, sampled_logps, episodes)
            note_completions(generated, new, encoder)
            groups += new
            need_more = torch.tensor(float(sum(map(has_signal, groups)) < run.prompts_per_rank), device=device)
            if not cfg.dynamic_sample or not all_reduce(need_more, distributed, "max").item():
                break  # every process runs the same number of rounds: generation is a collective under FSDP
        if cfg.dynamic_sample:  # informative groups first
            groups = sorted(groups, key=lambda g: not has_signal(g))
        groups = groups[: run.prompts_per_rank]
        # advantages over the global batch (a group never straddles processes; "batch" scaling and reinforce_plus_plus
        # need every reward)
        my_rewards = torch.cat([g["rewards"] for g in groups])
        everything = torch.tensor(gather_lists({"r": my_rewards.tolist()}, distributed)["r"])
        n = len(my_rewards)
        advantages = group_advantages(everything, G, cfg.scale_rewards, cfg.advantage_estimator)
        batch = {"groups": groups, "completion_ids": [c for g in groups for c in g["completion_ids"]],
                 "advantages": advantages[rank * n : (rank + 1) * n],
                 "keep": loss_mask(groups, cfg, encoder)}
        if cfg.log_completions:
            rows = gather_lists({"rows": completion_rows(batch, state["step"])}, distributed)["rows"]
            if run.master:
                completions_file.writelines(json.dumps(r) + "\n" for r in rows)
                completions_file.flush()
        stats = rollout_metrics(groups, generated, batch["advantages"], rounds, errors, cfg, distributed)
        if run.vllm and run.vllm.llm:  # colocate: the engine's memory goes back to training
            sleep_vllm(run)
        rollout_end = clock()
        micro = micro_batches(batch, encoder, cfg, device)
        fixed_logps(run.model, run.reference, micro, cfg, device)
        if run.vllm:
            stats["weight_sync_s"] = weight_sync_s
        if run.vllm and cfg.vllm_mode == "server":  # the time the trainer waited for the server's completions
            stats["rollout_wait_s"] = rollout_wait_s  # (async: what of the rollout the last step did not hide)
        if cfg.top_entropy_quantile < 1:  # one threshold for the rollout's updates, over every process's tokens
            threshold = step_entropy_threshold(micro, cfg.top_entropy_quantile, distributed)
            for mb in micro:
                mb["entropy_threshold"] = threshold
            stats["entropy_threshold"] = threshold.item()
        logprob_end = clock()
        # every prompt + completion token goes through each update (counted on the host: no wait for the device)
        stats.update(rollout_s=rollout_end - start, logprob_s=logprob_end - rollout_end,
                     tokens=sum(len(e["input_ids"]) for mb in micro for e in mb["examples"]))
        if counts:  # the useful FLOPs of one update (its MFU: over update_s)
            stats["flops"] = sum(data.training_flops(run.model.config, *data.flop_inputs(mb["examples"]), counts=counts)
                                 for mb in micro)
        for _ in range(cfg.num_iterations):
            start = clock()
            metrics, skipped, stop = update(micro, sigterm["received"])
            update_s = clock() - start
            if run.vllm and "vllm_logprob_diff" not in stats:  # how far vLLM's numbers are from the trainer's, for
                # the same policy and tokens (async: and the policy one step on); known after fixed_logps or the update
                diff = all_reduce(sum(mb["vllm_diff"] for mb in micro), distributed)
                stats["vllm_logprob_diff"] = (diff[0] / diff[1].clamp(min=1)).item()
            window.append({**stats, **metrics, "update_s": update_s,
                           "step_s": stats["rollout_s"] + stats["logprob_s"] + update_s})
            stats.update(rollout_s=0.0, logprob_s=0.0)  # later iterations reuse the rollout and its fixed log-probs
            state["step"] += 1
            state["skipped_steps"] += skipped  # no update from it; the step count and the prompts still advance
            bad_in_a_row = bad_in_a_row + 1 if skipped else 0
            if due(cfg.logging_steps, state["step"], run.total_steps) or bad_in_a_row >= cfg.max_bad_steps:
                averaged = {k: max(w[k] for w in window) if k.endswith("_max") else sum(w[k] for w in window) / len(window)
                            for k in window[0]}
                averaged["tokens_per_s"] = averaged.pop("tokens") / averaged["step_s"]  # this process's, over the window
                if device.type == "cuda":
                    averaged["mfu"] = averaged.pop("flops") / averaged["update_s"] / data.PEAK_FLOPS  # the update's
                    averaged["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                run.log({"step": state["step"], "epoch": state["epoch"] + state["cursor"] / run.rollouts_per_epoch,
                         **averaged, "skipped_steps": state["skipped_steps"]},
                        progress_note(state["step"], run.total_steps, averaged["step_s"]))
                window = []
            if bad_in_a_row >= cfg.max_bad_steps:
                if cfg.save_on_sigterm:
                    signal.signal(signal.SIGTERM, default_sigterm)
                raise SystemExit(f"stopped at step {state['step']}: the loss or gradient norm was NaN/inf in {bad_in_a_row} steps "
                                 f"in a row ({state['skipped_steps']} skipped in all; none changed the weights, so every checkpoint "
                                 f"is finite). Try a lower --learning_rate or --max_grad_norm, check the rewards and the data "
                                 f"(python data.py check FILE), or raise --max_bad_steps to skip more")
            if state["step"] >= run.total_steps:
                break  # (after SIGTERM a rollout's other iterations run too: resuming mid-rollout is not exact)
        # evaluate and save at rollout boundaries (every step when num_iterations is 1); after SIGTERM, save and stop
        if run.val and not stop and due(cfg.eval_steps, state["step"], run.total_steps, cfg.num_iterations):
            last_eval = run_eval()
        if stop or due(cfg.save_steps, state["step"], run.total_steps, cfg.num_iterations):
            checkpoint_path = save_checkpoint(run.model, run.optimizer, run.scheduler, cfg, state, rank, distributed)
    if cfg.save_on_sigterm:
        signal.signal(signal.SIGTERM, default_sigterm)
    if run.master and stop:
        print(f"SIGTERM: saved {checkpoint_path} at step {state['step']} of {run.total_steps}; to go on, run the same "
              f"command with --resume_from_checkpoint latest", flush=True)
    elif run.master:
        print(f"done: {state['step']} steps in {time.time() - start_time:.0f} s; checkpoints in {cfg.output_dir}")
        for key in ("eval_reward", "eval_accuracy"):
            if first_eval is not None and last_eval is not first_eval and key in last_eval:
                print(f"held-out {key[5:]} (greedy, {min(len(run.val), cfg.eval_limit)} prompts): start {first_eval[key]:.3f} "
                      f"-> end {last_eval[key]:.3f} ({last_eval[key] - first_eval[key]:+.3f})")
    if run.vllm and run.vllm.pool:  # (after SIGTERM a requested rollout may be in flight: it is not waited for)
        run.vllm.pool.shutdown(wait=False, cancel_futures=True)
    run.log.close()
    if completions_file:
        completions_file.close()
    if run.vllm and run.vllm.llm:  # the engine's teardown first: vLLM 0.32's ends the process group too (else its
        run.vllm.llm.llm_engine.engine_core.shutdown()  # exit handler finds the group gone and prints a traceback)
    if distributed and dist.is_initialized():
        dist.destroy_process_group()
    return state


def main(argv=None):
    run = setup(parse_config(argv))
    return train(run, lambda micro, sigterm: train_step(run, micro, sigterm))


if __name__ == "__main__":
    try:
        main()
    finally:  # also after an error (out of memory, say): a GPU run is a process group even alone, and must let go
        if dist.is_initialized():
            dist.destroy_process_group()
