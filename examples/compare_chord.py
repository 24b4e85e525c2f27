"""
compare_chord.py: CHORD against SFT-then-GRPO on the demo task, from the base tiny model, with the same number of
optimizer steps; prints one markdown table of held-out accuracy and wall time.

    python examples/compare_chord.py            # CPU, one thread per run: about 4 min on an idle machine

The two arms (each script run as a command-line program, with its demo defaults unless named here):
  (a) train_sft.py for --steps_sft steps (the README's GRPO recipe: lr 1e-3 constant, 16 examples a step), then
      train_grpo.py from its last checkpoint for --steps_grpo steps (its demo defaults: lr 2e-4, 4 prompts x 8);
  (b) train_chord.py from the base model for steps_sft + steps_grpo steps, each step the same 4 prompts x 8
      completions plus 16 expert examples (the demo's SFT split, train_chord.py's default expert data), lr 1e-3 as the
      SFT arm: from the base model every completion gets reward 0, so GRPO's advantage and gradient are 0 and CHORD's
      first steps are SFT at CHORD's learning rate (Adam ignores mu's scale when the SFT part is the only gradient).
      mu falls from 0.9 to 0.05 (ms-swift's CHORD example) with a cosine over the first steps_sft steps, the steps
      arm (a) spends on SFT: the expert carries early training, GRPO the rest, with mu 0.05 of SFT kept on.
Held-out accuracy: the `eval_accuracy` that train_grpo.py and train_chord.py log (the same evaluate(): greedy
completions of the 100 prompts of the demo's val split, at most 8 new tokens, scored by rewards.accuracy against
`solution`); the SFT checkpoint's is train_grpo.py's first eval (before its first step). Extra flags for one script:
--sft_args "...", --grpo_args "...", --chord_args "..." (appended, so they override the ones set here).
"""
import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS_PER_STEP = 4  # train_grpo.py's and train_chord.py's demo defaults: 32 completions / 8 per prompt


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps_sft", type=int, default=70, help="SFT steps of arm (a); CHORD's mu decays over as many")
    p.add_argument("--steps_grpo", type=int, default=40, help="GRPO steps of arm (a) after SFT")
    p.add_argument("--out", default="outputs/compare_chord", help="output folder: one subfolder per run, logs, results.md")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)), help="torch threads per run")
    p.add_argument("--model", default="tiny-qwen2.5-vl", help="the base model of both arms")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--eval_steps", type=int, default=10, help="held-out eval every N steps of the RL runs")
    p.add_argument("--sft_args", default="", help="extra flags for train_sft.py")
    p.add_argument("--grpo_args", default="", help="extra flags for train_grpo.py")
    p.add_argument("--chord_args", default="", help="extra flags for train_chord.py")
    return p.parse_args()


def run(name, argv, out, threads):
    """Run one training script to the end, its output in OUT/NAME.log -> wall seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    print(f"[{name}] {shlex.join(argv)}", flush=True)
    start = time.time()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        code = subprocess.run([sys.executable, *argv], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - start
    if code != 0:
        raise SystemExit(f"[{name}] failed (exit {code}) after {wall:.0f} s; see {os.path.join(out, name + '.log')}")
    print(f"[{name}] done in {wall:.0f} s", flush=True)
    return wall


def evals(output_dir):
    """{step: eval_accuracy} from a run's metrics.jsonl."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["eval_accuracy"] for r in rows if "eval_accuracy" in r}


def main():
    args = parse_args()
    out = os.path.abspath(args.out)
    S, G = args.steps_sft, args.steps_grpo
    dirs = {name: os.path.join(out, name) for name in ("sft", "grpo", "chord")}
    for d in dirs.values():
        shutil.rmtree(d, ignore_errors=True)  # metrics.jsonl appends: a rerun starts from empty folders
    os.makedirs(out, exist_ok=True)
    common = ["--seed", str(args.seed)]
    rl = ["--eval_steps", str(args.eval_steps), "--eval_limit", "100", "--save_total_limit", "1"]

    sft = ["train_sft.py", "--model", args.model, *common, "--max_steps", str(S), "--learning_rate", "1e-3",
           "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--per_device_train_batch_size", "16",
           "--eval_generate", "0", "--eval_steps", str(S), "--save_steps", str(S), "--output_dir", dirs["sft"],
           *shlex.split(args.sft_args)]
    grpo = ["train_grpo.py", "--model", os.path.join(dirs["sft"], f"checkpoint-{S}"), *common,
            "--dataset", f"demo#{PROMPTS_PER_STEP * G}", "--max_steps", str(G), *rl, "--output_dir", dirs["grpo"],
            *shlex.split(args.grpo_args)]
    chord = ["train_chord.py", "--model", args.model, *common,
             "--dataset", f"demo#{PROMPTS_PER_STEP * (S + G)}", "--max_steps", str(S + G), *rl,
             "--learning_rate", "1e-3", "--lr_scheduler_type", "constant", "--chord_sft_per_device_train_batch_size", "16",
             "--chord_mu_warmup_steps", "0", "--chord_mu_peak", "0.9", "--chord_mu_valley", "0.05",
             "--chord_mu_decay_steps", str(S), "--output_dir", dirs["chord"], *shlex.split(args.chord_args)]

    wall = {"sft": run("sft", sft, out, args.threads)}
    wall["grpo"] = run("grpo", grpo, out, args.threads)
    wall["chord"] = run("chord", chord, out, args.threads)
    grpo_acc, chord_acc = evals(dirs["grpo"]), evals(dirs["chord"])

    def cell(accs, step):
        return f"{accs[step]:.2f}" if step in accs else "n/a"

    cmd = lambda argv: "`python " + shlex.join([args.out + a[len(out):] if a.startswith(out) else a for a in argv]) + "`"
    rows = [("SFT (arm a, part 1)", f"{S}", cell(grpo_acc, 0), f"{wall['sft']:.0f}", cmd(sft)),
            ("SFT then GRPO", f"{S} + {G}", cell(grpo_acc, G), f"{wall['sft'] + wall['grpo']:.0f}", cmd(grpo)),
            (f"CHORD (at step {S})", f"{S}", cell(chord_acc, S), "", "(same run)"),
            ("CHORD", f"{S + G}", cell(chord_acc, S + G), f"{wall['chord']:.0f}", cmd(chord))]
    table = ["| method | optimizer steps | held-out accuracy | wall s | command |", "| --- | --- | --- | --- | --- |"]
    table += ["| " + " | ".join(r) + " |" for r in rows]
    note = (f"Held-out accuracy: greedy completions of the demo's 100 val prompts, rewards.accuracy against `solution` "
            f"(the eval_accuracy of train_grpo.py / train_chord.py); model {args.model}, seed {args.seed}, "
            f"{args.threads} thread(s) per run.")
    text = "\n".join(table) + "\n\n" + note + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
