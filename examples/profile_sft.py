"""Profile train_sft.py's real loop (data loading, the step, logging) with PyTorch's profiler.

    python examples/profile_sft.py --wait 5 --steps 2 -- --model /tmp/qwen2.5-vl-3b --dataset rows.jsonl ...

Everything after `--` goes to train_sft.py. Steps are counted by the LR scheduler (one call per optimizer step), so the
profile covers whole steps after `--wait` warm-up steps. Prints the ops by CPU and by GPU time, and how much of the
profiled time the GPU was busy (the rest it waited on the host), and writes a Chrome trace (chrome://tracing, Perfetto).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_sft  # noqa: E402


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
    if torch.cuda.is_available():
        print(averages.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=60))
        events = [e for e in profiler.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        if events:
            busy = sum(e.time_range.elapsed_us() for e in events)
            span = max(e.time_range.end for e in events) - min(e.time_range.start for e in events)
            print(f"GPU busy {busy / 1e3:.0f} ms of {span / 1e3:.0f} ms profiled ({busy / span:.0%}; kernels may overlap)")
    profiler.export_chrome_trace(args.trace)
    print(f"trace: {args.trace}")


if __name__ == "__main__":
    main()
