"""Profile train_sft.py's real loop (data loading, the step, logging) with PyTorch's profiler.

    python examples/profile_sft.py --wait 5 --steps 2 -- --model /tmp/qwen2.5-vl-3b --dataset rows.jsonl ...

Everything after `--` goes to train_sft.py. Steps are counted by the LR scheduler (one call per optimizer step), so the
profile covers whole steps after `--wait` warm-up steps. Prints the ops by CPU and by GPU time, the time by kernel
family (matrix multiplies, attention, compiled elementwise kernels, copies, ...: on the GPU its kernels, on CPU the ops'
own time), how much of the profiled time the GPU was busy (the rest it waited on the host), and writes a Chrome trace
(chrome://tracing, Perfetto).
"""
import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_sft  # noqa: E402


# (family, pattern on a CUDA kernel's or an aten op's name), the first match wins: attention before matrix multiplies
# (flash attention kernels are CUTLASS ones too)
FAMILIES = [
    ("attention", r"flash|fmha|attention|sdpa|cudnn"),
    ("matrix multiplies", r"gemm|cutlass|xmma|nvjet|cublas|scaled_mm|aten::(mm|addmm|bmm|baddbmm|matmul)$"),
    ("communication", r"nccl|all_gather|reduce_scatter|all_reduce"),
    ("optimizer (multi-tensor)", r"multi_tensor|adam|foreach"),
    ("compiled elementwise (Triton)", r"^triton|CompiledFunction|Torch-Compiled"),
    ("copies and casts", r"copy|memcpy|memset|cast|CatArrayBatched|aten::(cat|to|_to_copy|contiguous|clone)$"),
    ("reductions, norms, softmax, loss", r"reduce|norm|softmax|cross_entropy|nll|aten::(sum|max|amax|mean)$"),
    ("indexing and gathers", r"index|gather|scatter|embedding|masked_select"),
    ("data loading (host)", r"DataLoader"),
    ("other elementwise", r"elementwise|vectorized|aten::(add|mul|div|sub|pow|exp|rsqrt|silu|gelu|neg|where)"),
]


def kernel_families(timed):
    """[(kernel or op name, microseconds)] -> {family: microseconds}, every family of FAMILIES and "other"."""
    totals = {family: 0.0 for family, _ in FAMILIES} | {"other": 0.0}
    for name, us in timed:
        family = next((f for f, pattern in FAMILIES if re.search(pattern, name, re.IGNORECASE)), "other")
        totals[family] += us
    return totals


def family_table(totals, steps, where):
    total = sum(totals.values()) or 1.0
    lines = [f"| kernel family ({where}) | ms a step | share |", "| --- | --- | --- |"]
    for family, us in sorted(totals.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {family} | {us / 1e3 / steps:.1f} | {us / total:.0%} |")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wait", type=int, default=5, help="steps before profiling (compilation, allocator warm-up)")
    parser.add_argument("--steps", type=int, default=2, help="steps profiled")
    parser.add_argument("--trace", default="sft_trace.json")
    args = parser.parse_args(argv[:split])
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    profiler = torch.profiler.profile(activities=activities,
                                      schedule=torch.profiler.schedule(wait=args.wait, warmup=1, active=args.steps, repeat=1))
    scheduler_step = torch.optim.lr_scheduler.LambdaLR.step

    def step_and_tick(self, *a, **k):  # the scheduler steps once per optimizer step: the profiler's step boundary
        result = scheduler_step(self, *a, **k)
        profiler.step()
        return result

    torch.optim.lr_scheduler.LambdaLR.step = step_and_tick
    profiler.start()
    try:
        train_sft.main(argv[split + 1:])
    finally:
        profiler.stop()
        torch.optim.lr_scheduler.LambdaLR.step = scheduler_step
    averages = profiler.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if not torch.cuda.is_available():  # the ops' own time, nested ops not counted twice
        print(family_table(kernel_families((a.key, a.self_cpu_time_total) for a in averages
                                           if not a.key.startswith("ProfilerStep")), args.steps, "CPU ops"))
    else:
        print(averages.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
        events = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        print(family_table(kernel_families((e.name, e.time_range.elapsed_us()) for e in events), args.steps, "GPU kernels"))
        if events:
            busy = sum(e.time_range.elapsed_us() for e in events)
            span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
            print(f"GPU busy {busy / 1e3:.0f} ms of {span / 1e3:.0f} ms profiled ({busy / span:.0%}; kernels may overlap)")
    profiler.export_chrome_trace(args.trace)
    print(f"trace: {args.trace}")


if __name__ == "__main__":
    main()
