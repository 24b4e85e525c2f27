"""
train_chord.py: CHORD for Qwen-VL models: on-policy GRPO on prompts and off-policy SFT on expert replies, in one
loss with a scheduled weight (Zhang et al. 2025, "On-Policy RL Meets Off-Policy Experts", arXiv 2508.11408).

    python train_chord.py                                 # demo: the base tiny model learns to name colours on CPU
    python train_chord.py --model Qwen/Qwen2.5-VL-7B-Instruct --dataset rl.jsonl --chord_sft_dataset expert.jsonl \\
        --train_type lora --learning_rate 1e-5 --reward_funcs accuracy format --max_completion_length 1024 \\
        --chord_mu_peak 0.9 --chord_mu_valley 0.05 --chord_mu_decay_steps 200 --chord_enable_phi_function true
    torchrun --nproc_per_node 8 train_chord.py --config chord.yaml --reward_plugin my_rewards.py

One step is one GRPO step exactly as in train_grpo.py (rollout, rewards, group-relative advantages, clipped surrogate
loss), and, next to each of its micro-batches, chord_sft_per_device_train_batch_size expert examples (as ms-swift
draws them): the loss is (1 - mu) * L_GRPO + mu * L_SFT, mu = chord_mu(step) rising to --chord_mu_peak and then
decaying to --chord_mu_valley (CHORD-mu), and L_SFT the token-mean NLL of the expert replies, each token optionally
weighted by p (1 - p) (CHORD-phi, --chord_enable_phi_function). Expert data: --chord_sft_dataset in any SFT format;
not given: the demo's SFT split for the demo prompts, else each RL record's `solution` as its expert reply.
"""
import math
from dataclasses import dataclass, field

import torch

import data
import train_grpo as grpo


@dataclass
class Config(grpo.Config):
    """train_grpo.py's options, the demo's defaults for CHORD, and CHORD's own: the expert data and the weight mu."""
    dataset: list[str] = field(default_factory=lambda: ["demo#480"])  # RL prompts; "demo#480": 480 demo prompts
    max_length: int = 2048  # tokens of a prompt or of an expert example; longer ones follow truncation_strategy
    learning_rate: float = 5e-4  # the demo's (from the base model); real models want ~1e-6 (full) or ~1e-5 (LoRA)
    output_dir: str = "outputs/chord"
    chord_sft_dataset: list[str] = field(default_factory=list)  # SFT-format expert records ("demo": the demo task's);
    # not given: the demo task's SFT split for the demo prompts, else each RL record's `solution` as its expert reply
    chord_sft_per_device_train_batch_size: int = 16  # expert examples next to each GRPO micro-batch on each process
    chord_mu_warmup_steps: int = 0  # mu rises linearly from 0 to chord_mu_peak over these steps ...
    chord_mu_decay_steps: int = 100  # ... then decays with a cosine to chord_mu_valley over these, and stays there
    chord_mu_peak: float = 0.9  # peak 0.9, valley 0.05 over 200 decay steps: ms-swift's CHORD example
    chord_mu_valley: float = 0.05  # a constant mu: peak = valley (0 is pure GRPO, 1 pure SFT)
    chord_enable_phi_function: bool = False  # CHORD-phi: weight each expert token's NLL by p (1 - p)


def parse_config(argv=None):
    return grpo.parse_config(argv, Config)


# ----------------------------------------------------------------------------------------------------------------
# Expert data: SFT examples in a shuffled order per epoch, one micro-batch next to each GRPO micro-batch

EXPERT = {"train_on": "assistant"}  # how an expert example is encoded: labels on its assistant replies


def load_expert_data(cfg, encoder, train, kept, rank, world_size):
    """The expert examples of the SFT part -> (samples, indices of the usable ones, their lengths in tokens).
    --chord_sft_dataset in any SFT format ("demo", "demo#N": the demo task's SFT split); not given: the same for the
    demo prompts, else every RL record with its `solution` as the assistant reply (right only when the solution is a
    whole reply, in the format the rewards expect, not a bare final answer)."""
    given = cfg.chord_sft_dataset or (["demo"] if all(map(data.is_demo, cfg.dataset)) else [])
    if given:
        expert = data.load_dataset(given, "sft", cfg.seed, cfg.media_root, cfg.skip_bad_records)
    else:
        missing = [train[i].source for i in kept if train[i].extra.get("solution") is None]
        if missing:
            raise SystemExit(f"{missing[0]}: no `solution` to use as the expert reply ({len(missing)} record(s) lack one); "
                             f"give the expert data with --chord_sft_dataset")
        expert = [data.Sample(train[i].messages + [{"role": "assistant", "content": str(train[i].extra["solution"])}],
                              train[i].images, train[i].videos, source=train[i].source) for i in kept]
    # encoded once up front, each process taking a share, as the prompts are: bad records are found now
    usable, lengths, _, _ = data.measure_lengths(expert, encoder, cfg.skip_bad_records, cfg.num_workers, EXPERT, rank, world_size)
    return expert, usable, lengths


def next_expert_batch(expert_plan, state):
    """This process's next expert micro-batch (sample indices). The order is shuffled with (seed, epoch) as in
    train_sft.py; state["sft_cursor"] counts the micro-batches taken this epoch, so a resumed run continues exactly."""
    plan = expert_plan(state["sft_epoch"])
    if state["sft_cursor"] >= len(plan):
        state["sft_epoch"], state["sft_cursor"] = state["sft_epoch"] + 1, 0
        plan = expert_plan(state["sft_epoch"])
    state["sft_cursor"] += 1
    return plan[state["sft_cursor"] - 1]


# ----------------------------------------------------------------------------------------------------------------
# Loss: the weight mu of the SFT part, and the SFT part itself

def chord_mu(step, warmup_steps, decay_steps, peak, valley):
    """CHORD-mu's weight of the SFT loss at optimizer step `step` (0 = before the first update): linear from 0 to
    `peak` over warmup_steps, then a cosine from `peak` down to `valley` over decay_steps, then `valley`:
        mu = peak * step / warmup                                                    step < warmup
        mu = valley + (peak - valley) * (1 + cos(pi * (step - warmup) / decay)) / 2  warmup <= step < warmup + decay
        mu = valley                                                                  after
    This is the schedule of the CHORD authors' code (Trinity-RFT's mu_schedule_function, which ms-swift copies and
    calls with the number of steps done): CHORD-mu (Zhang et al. 2025) starts mu high, to imitate the expert, and
    lowers it to a small valley, to explore; held at the valley, the expert data stays on as a regulariser."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    if step >= warmup_steps + decay_steps:
        return valley
    return valley + (peak - valley) * 0.5 * (1 + math.cos(math.pi * (step - warmup_steps) / decay_steps))


def chord_sft_loss(logps, mask, enable_phi_function, num_items_in_batch=None):
    """The SFT part of CHORD: the token-mean negative log-likelihood of the expert replies.
    logps, mask: [B, T] per expert-reply token. CHORD-phi (Zhang et al. 2025): each token's -log p is weighted by
    phi = p (1 - p) of its own probability, detached (as in the authors' Trinity-RFT code), so tokens the model already
    knows (p near 1) and tokens it finds very unlikely (p near 0: learning them would pull the policy far from itself)
    both count little, and the tokens it is unsure of count most; the sum is still
    divided by the number of tokens, not by the sum of the weights, so phi also lowers the SFT part's overall size.
    num_items_in_batch: the expert tokens of the whole global batch (every process and micro-batch, counted before
    the first backward), so that a split batch gives the same gradient; None: this batch's tokens.
    Gradient: d loss / d logp_t = -phi_t / n (phi_t = 1 without phi)."""
    mask = mask.to(logps.dtype)
    per_token_loss = -logps
    if enable_phi_function:
        p = logps.detach().exp()
        per_token_loss = per_token_loss * (p * (1 - p))  # tokens the model knows, or finds absurd, weigh little
    return (per_token_loss * mask).sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)


# ----------------------------------------------------------------------------------------------------------------
# Step

def train_step(run, micro, expert_micro, mu, sigterm=False):
    """GRPO's step (train_grpo.train_step) with each GRPO micro-batch followed by its expert micro-batch (encoded
    examples): one optimizer step on the gradient of (1 - mu) * L_GRPO + mu * L_SFT, skipped when a loss or the
    gradient norm is NaN/inf on any process. -> (the loss metrics of the global batch, skipped?, SIGTERM anywhere?)"""
    model, cfg, device = run.model, run.cfg, run.device
    num_items = grpo.completion_tokens(micro, device, run.distributed)
    # the SFT part: a token mean over the expert replies of the whole global batch, counted before any backward too
    reply_lengths = [[int((e["labels"] != data.IGNORE).sum()) for e in examples] for examples in expert_micro]
    sft_items = grpo.all_reduce(torch.tensor(float(sum(map(sum, reply_lengths))), device=device), run.distributed).clamp(min=1)
    sums = {}
    for i, mb in enumerate(micro):
        last = i == len(micro) - 1
        if run.distributed:  # reduce gradients once per step, at its last backward: the SFT one, unless mu is 0
            model.set_requires_gradient_sync(last and mu == 0)
        loss, metrics = grpo.micro_batch_loss(model, mb, num_items, len(micro), cfg, device, run.world_size)
        ((1 - mu) * loss * run.world_size).backward()  # FSDP averages gradients over processes
        # the SFT part on this micro-batch's expert examples, scored by the untempered policy (as SFT does); with
        # mu 0 it is only measured, for the log
        if run.distributed:
            model.set_requires_gradient_sync(last)
        with torch.set_grad_enabled(mu > 0):
            logps, _, mask = grpo.completion_logps(model, expert_micro[i], reply_lengths[i], device, 1.0)
            sft_loss = chord_sft_loss(logps, mask, cfg.chord_enable_phi_function, sft_items)
        if mu > 0:
            (mu * sft_loss * run.world_size).backward()
        metrics.update(sft_loss=sft_loss.detach(), sft_nll=(-logps.detach() * mask).sum() / sft_items)
        sums = {k: sums.get(k, 0) + v for k, v in metrics.items()}
    grad_norm, skipped, stop = grpo.optimizer_step(model, run.optimizer, run.scheduler,
                                                   (1 - mu) * sums["loss"] + mu * sums["sft_loss"], cfg, device,
                                                   run.distributed, sigterm)
    totals = dict(zip(sums, grpo.all_reduce(torch.stack(list(sums.values())), run.distributed).tolist()))
    n, grpo_loss, sft_loss, sft_nll = (totals.pop(k) for k in ("tokens", "loss", "sft_loss", "sft_nll"))
    return {"loss": (1 - mu) * grpo_loss + mu * sft_loss, "mu": mu, "grpo_loss": grpo_loss, "sft_loss": sft_loss,
            "sft_nll": sft_nll, **{k: v / max(n, 1.0) for k, v in totals.items()}, "grad_norm": grad_norm,
            "lr": run.scheduler.get_last_lr()[0]}, skipped, stop


# ----------------------------------------------------------------------------------------------------------------

def main(argv=None):
    """train_grpo.py's run and loop; the update is CHORD's step, with the expert data beside the prompts."""
    cfg = parse_config(argv)
    run = grpo.setup(cfg, state={"sft_epoch": 0, "sft_cursor": 0})  # the expert data's cursor resumes exactly too
    expert, expert_kept, expert_lengths = load_expert_data(cfg, run.encoder, run.train, run.kept, run.rank, run.world_size)
    expert_plan = lambda epoch: data.make_plan(expert_kept, expert_lengths, cfg.chord_sft_per_device_train_batch_size,
                                               False, cfg.max_length, cfg.seed, epoch, run.rank, run.world_size)
    if run.master:
        per_step = cfg.chord_sft_per_device_train_batch_size * cfg.gradient_accumulation_steps * run.world_size
        print(f"{len(expert_kept)} expert examples, {per_step} per step")

    def update(micro, sigterm):
        mu = chord_mu(run.state["step"], cfg.chord_mu_warmup_steps, cfg.chord_mu_decay_steps, cfg.chord_mu_peak,
                      cfg.chord_mu_valley)
        # one expert micro-batch next to each GRPO micro-batch (as ms-swift draws them), taken whatever mu is
        expert_micro = [[run.encoder(expert[j], **EXPERT) for j in next_expert_batch(expert_plan, run.state)] for _ in micro]
        return train_step(run, micro, expert_micro, mu, sigterm)

    return grpo.train(run, update)


if __name__ == "__main__":
    try:
        main()
    finally:  # also after an error (out of memory, say): a GPU run is a process group even alone, and must let go
        if grpo.dist.is_initialized():
            grpo.dist.destroy_process_group()
