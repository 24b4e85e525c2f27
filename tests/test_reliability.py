"""Faults a long run meets, on the tiny model: SIGTERM (preemption), a kill during a checkpoint write, NaN/inf steps,
an unwritable or full output folder; and --trust_remote_code, weights_only loads. train_sft.py and train_dpo.py."""
import ast
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import data
import train_dpo
import train_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_demo_file(tmp_path, n=24):
    """The first n demo SFT records, image paths made absolute. With a dataset other than the demo, no validation."""
    src = data.demo_path("sft", "train")
    out = tmp_path / f"train{n}.jsonl"
    with open(src) as f, open(out, "w") as g:
        for line in list(f)[:n]:
            record = json.loads(line)
            record["images"] = [os.path.join(os.path.dirname(src), p) for p in record["images"]]
            g.write(json.dumps(record) + "\n")
    return str(out)


def sft_args(tmp_path, out, *extra):
    return ["--dataset", small_demo_file(tmp_path), "--num_workers", "0", "--eval_generate", "0", "--per_device_train_batch_size", "4",
            "--logging_steps", "1", "--learning_rate", "1e-3", "--output_dir", str(out), *extra]


def dpo_args(out, *extra):
    return ["--model", "tiny-qwen2.5-vl", "--dataset", data.demo_path("dpo", "train") + "#12", "--val_dataset", "",
            "--per_device_train_batch_size", "2", "--num_workers", "0", "--logging_steps", "1", "--eval_generate", "0",
            "--train_type", "lora", "--learning_rate", "1e-2", "--output_dir", str(out), *extra]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return {m["step"]: m["loss"] for m in read_metrics(out) if "loss" in m}


def weights(checkpoint):
    adapter = os.path.join(checkpoint, "adapter_model.safetensors")
    return load_file(adapter if os.path.exists(adapter) else os.path.join(checkpoint, "model.safetensors"))


def assert_complete(checkpoint, weights_file="model.safetensors"):
    for name in (weights_file, "training_state.pt", "trainer_state.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(checkpoint, name)), name
    assert not any(n.endswith(".tmp") for n in os.listdir(os.path.dirname(checkpoint)))


@pytest.fixture(autouse=True)
def default_sigterm():
    """Each test starts with the default SIGTERM handler, and ends with it even when main() was stopped by an
    exception (the scripts put it back themselves when they return or stop on NaN)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def call_counter(function, on_call):
    """`function`, wrapped: on_call(n, result) replaces the result of its n-th call (1-based)."""
    calls = [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        return on_call(calls[0], function(*args, **kwargs))

    return wrapped


# ----------------------------------------------------------------------------------------------------------------
# SIGTERM: the step finishes, a checkpoint is saved, exit 0; resuming continues the same loss curve

# Runs a script's main() with one function paused at its n-th call until the test has signalled the process:
# the signal then always lands in the same step.
GATED_RUN = """
import importlib, os, sys, time
sys.path.insert(0, {root!r})
script, target, call_number, gate = sys.argv[1:5]
module_name, function_name = target.split(":")
module = importlib.import_module(module_name)
original, calls = getattr(module, function_name), [0]

def gated(*args, **kwargs):
    calls[0] += 1
    if calls[0] == int(call_number):
        open(os.path.join(gate, "ready"), "w").close()
        while not os.path.exists(os.path.join(gate, "go")):
            time.sleep(0.02)
    return original(*args, **kwargs)

setattr(module, function_name, gated)
importlib.import_module(script).main(sys.argv[5:])
"""


def test_sft_sigterm_saves_exits_0_and_resume_continues_the_loss_curve(tmp_path):
    wrapper = tmp_path / "gated_run.py"
    wrapper.write_text(GATED_RUN.format(root=ROOT))
    gate = tmp_path / "gate"
    gate.mkdir()
    common = ("--max_steps", "5", "--save_steps", "100")
    killed = tmp_path / "killed"
    # paused in step 2's forward; a DataLoader worker is running: torchrun and SLURM signal the whole process group
    proc = subprocess.Popen([sys.executable, str(wrapper), "train_sft", "train_sft:token_logps", "2", str(gate)] +
                            sft_args(tmp_path, killed, *common, "--num_workers", "1"),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 120
    while not (gate / "ready").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[0][-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)
    (gate / "go").touch()
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-3000:]
    checkpoint = str(killed / "checkpoint-2")
    assert f"SIGTERM: saved {checkpoint} at step 2 of 5" in output and "--resume_from_checkpoint latest" in output
    assert_complete(checkpoint)
    assert sorted(losses(killed)) == [1, 2]  # it stopped after the step it was in

    train_sft.main(sft_args(tmp_path, killed, *common, "--resume_from_checkpoint", "latest"))
    straight = tmp_path / "straight"
    train_sft.main(sft_args(tmp_path, straight, *common))
    expected, got = losses(straight), losses(killed)
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5]
    for step in expected:
        assert abs(got[step] - expected[step]) < 1e-6, (step, got[step], expected[step])


def test_dpo_sigterm_saves_and_returns(tmp_path, capsys):
    def signal_in_step_2(n, result):
        if n == 2:
            assert signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None), "no SIGTERM handler: this would end pytest"
            os.kill(os.getpid(), signal.SIGTERM)
        return result

    original = train_dpo.dpo_loss
    train_dpo.dpo_loss = call_counter(original, signal_in_step_2)
    try:
        train_dpo.main(dpo_args(tmp_path, "--max_steps", "4", "--save_steps", "100"))  # returns: the script exits 0
    finally:
        train_dpo.dpo_loss = original
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone with the run
    assert f"SIGTERM: saved {tmp_path / 'checkpoint-2'} at step 2 of 4" in capsys.readouterr().out
    assert_complete(str(tmp_path / "checkpoint-2"), "adapter_model.safetensors")
    assert [m["step"] for m in read_metrics(tmp_path) if "loss" in m] == [1, 2]


# ----------------------------------------------------------------------------------------------------------------
# Killed while writing a checkpoint: the half-written checkpoint-N.tmp is never resumed from, and is removed

class Killed(BaseException):
    """Stands for SIGKILL: nothing in the script catches it, so the files stay as a kill leaves them."""


def test_kill_during_checkpoint_write_resumes_from_the_previous_one(tmp_path, monkeypatch, capsys):
    args = sft_args(tmp_path, tmp_path, "--max_steps", "4", "--save_steps", "2", "--save_total_limit", "0")

    real_save = torch.save

    def save(obj, path, *a, **k):  # the second checkpoint's training state: half a file, then the process dies
        if "checkpoint-4.tmp" in str(path):
            with open(path, "wb") as f:
                f.write(b"\x80\x02partial")
            raise Killed()
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(Killed):
        train_sft.main(args)
    monkeypatch.setattr(torch, "save", real_save)
    assert os.path.exists(tmp_path / "checkpoint-4.tmp" / "model.safetensors") and not os.path.exists(tmp_path / "checkpoint-4")
    capsys.readouterr()

    train_sft.main(args + ["--resume_from_checkpoint", "latest"])
    out = capsys.readouterr().out
    assert f"removed {tmp_path / 'checkpoint-4.tmp'}" in out and f"resumed from {tmp_path / 'checkpoint-2'} at step 2" in out
    assert_complete(str(tmp_path / "checkpoint-4"))
    rows = [m for m in read_metrics(tmp_path) if "loss" in m]  # steps 1-4 before the kill, then 3-4 again
    assert [m["step"] for m in rows] == [1, 2, 3, 4, 3, 4]
    for before, after in zip(rows[2:4], rows[4:]):
        assert abs(before["loss"] - after["loss"]) < 1e-6, (before, after)


# ----------------------------------------------------------------------------------------------------------------
# NaN/inf: the step is skipped (no update), counted, and the run goes on; too many in a row stop it

def nan_gradient(logps):
    """The same values with a NaN gradient: sqrt has an infinite slope at 0, times 0."""
    return logps + 0 * (logps * 0).abs().sqrt()


def test_sft_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    def poison(n, result):
        logps, count = result
        if n == 2:
            return nan_gradient(logps), count  # finite loss, NaN gradient norm
        if n == 3:
            return logps * math.nan, count  # NaN loss
        return result

    monkeypatch.setattr(train_sft, "token_logps", call_counter(train_sft.token_logps, poison))
    train_sft.main(sft_args(tmp_path, tmp_path, "--max_steps", "4", "--save_steps", "1", "--save_total_limit", "0"))
    rows = {m["step"]: m for m in read_metrics(tmp_path) if "loss" in m}
    assert [rows[s]["skipped_steps"] for s in (1, 2, 3, 4)] == [0, 1, 2, 2]
    assert math.isnan(rows[2]["grad_norm"]) and math.isnan(rows[2]["loss"])  # no finite step in that window to report
    assert math.isfinite(rows[4]["loss"]) and math.isfinite(rows[4]["grad_norm"])
    checkpoints = [weights(str(tmp_path / f"checkpoint-{s}")) for s in (1, 2, 3, 4)]
    for name in checkpoints[0]:
        assert torch.equal(checkpoints[0][name], checkpoints[1][name]) and torch.equal(checkpoints[1][name], checkpoints[2][name])
    assert any(not torch.equal(checkpoints[2][n], checkpoints[3][n]) for n in checkpoints[2])  # step 4 trained
    with open(tmp_path / "checkpoint-3" / "trainer_state.json") as f:
        state = json.load(f)
    assert state["batch"] == 3 and state["skipped_steps"] == 2  # the data position advanced past the skipped batches


def test_sft_too_many_bad_steps_in_a_row_stop_with_finite_checkpoints(tmp_path, monkeypatch):
    poison = lambda n, result: (result[0] * math.nan, result[1]) if n >= 2 else result
    monkeypatch.setattr(train_sft, "token_logps", call_counter(train_sft.token_logps, poison))
    with pytest.raises(SystemExit) as stopped:
        train_sft.main(sft_args(tmp_path, tmp_path, "--max_steps", "6", "--save_steps", "1", "--save_total_limit", "0",
                                "--max_bad_steps", "2"))
    message = str(stopped.value)
    assert "stopped at step 3" in message and "NaN/inf in 2 steps in a row" in message and "--learning_rate" in message
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert read_metrics(tmp_path)[-1]["skipped_steps"] == 2
    assert [os.path.basename(c) for c in train_sft.checkpoint_dirs(str(tmp_path))] == ["checkpoint-1", "checkpoint-2"]
    for checkpoint in train_sft.checkpoint_dirs(str(tmp_path)):
        assert all(t.isfinite().all() for t in weights(checkpoint).values()), checkpoint


def test_sft_bad_steps_between_log_lines_are_counted_in_their_step(tmp_path, monkeypatch):
    """Between log, eval and save steps too, a skipped step is counted in its own step (the step's one host sync
    reads it), and too many in a row stop the run at the last of them."""
    token_logps = train_sft.token_logps
    poison = lambda n, result: (result[0] * math.nan, result[1]) if n in (2, 3) else result
    monkeypatch.setattr(train_sft, "token_logps", call_counter(token_logps, poison))
    train_sft.main(sft_args(tmp_path, tmp_path / "a", "--max_steps", "5", "--logging_steps", "5", "--save_steps", "0"))
    assert [m["skipped_steps"] for m in read_metrics(tmp_path / "a") if "loss" in m] == [2]
    poison = lambda n, result: (result[0] * math.nan, result[1]) if n >= 2 else result
    monkeypatch.setattr(train_sft, "token_logps", call_counter(token_logps, poison))
    with pytest.raises(SystemExit) as stopped:
        train_sft.main(sft_args(tmp_path, tmp_path / "b", "--max_steps", "8", "--logging_steps", "100", "--save_steps", "0",
                                "--max_bad_steps", "2"))
    assert "stopped at step 3" in str(stopped.value) and "NaN/inf in 2 steps in a row" in str(stopped.value)


def test_dpo_nonfinite_step_is_skipped_and_the_run_continues(tmp_path, monkeypatch):
    poison = lambda n, result: (result[0] * math.nan, *result[1:]) if n == 2 else result
    monkeypatch.setattr(train_dpo, "dpo_loss", call_counter(train_dpo.dpo_loss, poison))
    train_dpo.main(dpo_args(tmp_path, "--max_steps", "3", "--save_steps", "1", "--save_total_limit", "0"))
    rows = {m["step"]: m for m in read_metrics(tmp_path) if "loss" in m}
    assert [rows[s]["skipped_steps"] for s in (1, 2, 3)] == [0, 1, 1]
    assert math.isnan(rows[2]["loss"]) and math.isfinite(rows[3]["loss"])
    one, two, three = (weights(str(tmp_path / f"checkpoint-{s}")) for s in (1, 2, 3))
    assert all(torch.equal(one[n], two[n]) for n in one)
    assert any(not torch.equal(two[n], three[n]) for n in two)


def test_dpo_bad_steps_between_log_lines_are_counted_in_their_step(tmp_path, monkeypatch):
    """Between log, eval and save steps too, a skipped step is counted in its own step (the step's one host sync
    reads it), and too many in a row stop the run at the last of them."""
    dpo_loss = train_dpo.dpo_loss
    poison = lambda n, result: (result[0] * math.nan, *result[1:]) if n in (2, 3) else result
    monkeypatch.setattr(train_dpo, "dpo_loss", call_counter(dpo_loss, poison))
    train_dpo.main(dpo_args(tmp_path / "a", "--max_steps", "5", "--logging_steps", "5", "--save_steps", "0"))
    assert [m["skipped_steps"] for m in read_metrics(tmp_path / "a") if "loss" in m] == [2]
    poison = lambda n, result: (result[0] * math.nan, *result[1:]) if n >= 2 else result
    monkeypatch.setattr(train_dpo, "dpo_loss", call_counter(dpo_loss, poison))
    with pytest.raises(SystemExit) as stopped:
        train_dpo.main(dpo_args(tmp_path / "b", "--max_steps", "6", "--logging_steps", "100", "--save_steps", "0",
                                "--max_bad_steps", "2"))
    assert "stopped at step 3" in str(stopped.value) and "NaN/inf in 2 steps in a row" in str(stopped.value)


# ----------------------------------------------------------------------------------------------------------------
# The output folder is checked before the model is loaded or any data encoded

@pytest.fixture
def nothing_loads(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("the model or data was loaded before the output folder was checked")

    for module in (train_sft, train_dpo):
        monkeypatch.setattr(module, "load_model", fail)
    monkeypatch.setattr(data, "Encoder", fail)


@pytest.mark.parametrize("script", [train_sft, train_dpo])
def test_unwritable_output_dir_stops_before_loading(tmp_path, script, nothing_loads):
    (tmp_path / "a_file").write_text("")
    out = tmp_path / "a_file" / "run"  # a folder under a regular file: fails even as root
    args = dpo_args(out) if script is train_dpo else sft_args(tmp_path, out)
    with pytest.raises(SystemExit) as stopped:
        script.main(args)
    assert f"--output_dir {out} is not writable" in str(stopped.value) and "Not a directory" in str(stopped.value)


@pytest.mark.parametrize("script", [train_sft, train_dpo])
def test_full_disk_stops_before_loading(tmp_path, script, nothing_loads, monkeypatch):
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))  # 1 MiB free
    args = dpo_args(tmp_path / "run", "--train_type", "full") if script is train_dpo else sft_args(tmp_path, tmp_path / "run")
    with pytest.raises(SystemExit) as stopped:
        script.main(args)
    assert "0.0 GiB free" in str(stopped.value) and "needed for 3 checkpoint(s)" in str(stopped.value)  # 2 kept + 1 new


def test_resumed_run_needs_room_for_one_new_checkpoint(tmp_path, monkeypatch):
    """The checkpoints already written are rotated out: only the next one needs new space."""
    cfg = train_sft.parse_config(sft_args(tmp_path, tmp_path))
    size = train_sft.checkpoint_size(cfg)
    for step in (2, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - int(1.5 * size), int(1.5 * size)))
    train_sft.check_output_dir(cfg)  # passes: 1 new checkpoint fits
    (tmp_path / "checkpoint-4").rmdir()
    with pytest.raises(SystemExit, match="needed for 2 checkpoint"):
        train_sft.check_output_dir(cfg)


def test_disk_estimate_is_close_to_a_real_full_checkpoint(tmp_path):
    train_sft.main(sft_args(tmp_path, tmp_path, "--max_steps", "1", "--save_steps", "1"))
    checkpoint = tmp_path / "checkpoint-1"
    size = sum(f.stat().st_size for f in checkpoint.iterdir())
    estimate = train_sft.checkpoint_size(train_sft.parse_config(sft_args(tmp_path, tmp_path)))
    assert 0.8 < estimate / size < 1.2, (estimate, size)
    lora = train_dpo.checkpoint_size(train_dpo.parse_config(dpo_args(tmp_path)))
    assert 0 < lora < estimate / 2


# ----------------------------------------------------------------------------------------------------------------
# Loading: --trust_remote_code reaches transformers; torch.load never unpickles arbitrary objects

@pytest.mark.parametrize("script", [train_sft, train_dpo])
@pytest.mark.parametrize("trust", ["true", "false"])
def test_trust_remote_code_reaches_from_pretrained(tmp_path, script, trust, monkeypatch):
    from transformers import AutoModelForImageTextToText

    seen = []

    def from_pretrained(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise StopIteration  # enough: the call was made

    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained", from_pretrained)
    args = dpo_args(tmp_path) if script is train_dpo else sft_args(tmp_path, tmp_path)
    cfg = script.parse_config(args + ["--trust_remote_code", trust])
    cpu = torch.device("cpu")
    calls = [lambda: script.load_model(cfg, cpu)] + ([lambda: train_dpo.load_reference(cfg, cpu, False)] if script is train_dpo else [])
    for call in calls:
        with pytest.raises(StopIteration):  # the policy and, for DPO, the frozen reference
            call()
    assert seen == [trust == "true"] * len(calls)


@pytest.mark.parametrize("script", [train_sft, train_dpo])
def test_every_torch_load_is_weights_only(script):
    tree = ast.parse(open(script.__file__).read())
    loads = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and ast.unparse(node.func) == "torch.load"]
    assert loads
    for node in loads:
        assert any(k.arg == "weights_only" and ast.unparse(k.value) == "True" for k in node.keywords), ast.unparse(node)


@pytest.mark.parametrize("module", ["train_sft", "train_dpo", "train_grpo", "train_chord"])
def test_trust_remote_code_reaches_the_encoder(module, tmp_path, monkeypatch):
    """The tokenizer and config loads (data.Encoder) follow --trust_remote_code as the model load does."""
    import importlib

    from transformers import AutoConfig, AutoTokenizer

    script, seen = importlib.import_module(module), []

    def record(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        raise StopIteration  # enough: the call was made

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", record)
    for trust in ("true", "false"):
        with pytest.raises(StopIteration):
            script.main(["--model", "tiny-qwen2.5-vl", "--trust_remote_code", trust, "--output_dir", str(tmp_path / trust)])
    monkeypatch.setattr(AutoConfig, "from_pretrained", record)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **k: None)
    with pytest.raises(StopIteration):  # the config load, reached with a stand-in tokenizer
        data.Encoder(data.resolve_model("tiny-qwen2.5-vl"), trust_remote_code=True)
    assert seen == [True, False, True]
