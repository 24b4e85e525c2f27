"""Multi-turn rollouts with tools (issue 20, item 4: train_grpo.py --multi_turn_plugin env.py --max_turns N): an
episode's training example against the chat template's encoding of the whole conversation and against the one-turn
example (tokens, labels, positions, log-probabilities, packed rows), the episode loop (where episodes end, the seeds
of later turns), 2-turn runs of main() end to end (turns logged, rewards that see the whole conversation, an exact
resume), examples/zoom_env.py, and the same episodes through vLLM where it is installed."""

import importlib.util
import json
import os
import sys

import pytest
import torch
from PIL import Image

import data
import rewards
import train_chord
import train_grpo
import train_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")
TOOL_TURN = "Here is the zoomed region. <image> Answer the question."

# the test plugin: one tool turn with an image (a crop of the record's demo picture, handed over as a PIL image), then None
ONE_TOOL_TURN = f'''
from PIL import Image


def step(messages, completion, turn, images=(), **columns):
    if turn > 1:
        return None
    first = images[0] if isinstance(images[0], Image.Image) else Image.open(images[0])
    return {{"content": "{TOOL_TURN}", "images": [first.crop((0, 0, 40, 40))]}}
'''

# a reward that is 1 where its columns hold the whole episode: the prompt, the reply, the tool's turn and image, the
# last reply (the completion scored); 0 elsewhere
SEES_CONVERSATION = f'''
from PIL import Image


def conversation(completions, prompts, messages, images, turns, **columns):
    return [float(m[:len(p)] == p and [x["role"] for x in m[len(p):]] == ["assistant", "user", "assistant"]
                  and m[-2]["content"] == "{TOOL_TURN}" and m[-1]["content"] == c and t == 2 and len(ims) == 2
                  and isinstance(ims[0], str) and isinstance(ims[1], Image.Image))
            for c, p, m, ims, t in zip(completions, prompts, messages, images, turns)]
'''


def load_zoom_env():
    spec = importlib.util.spec_from_file_location("zoom_env", os.path.join(ROOT, "examples", "zoom_env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reply(encoder, text):
    """A reply as the policy samples it: the text's tokens and <|im_end|>."""
    return encoder.tokenizer.encode(text, add_special_tokens=False) + [encoder.im_end]


def labelled(example):
    return (example["labels"] != data.IGNORE).nonzero().squeeze(1).tolist()


# ----------------------------------------------------------------------------- the training example of an episode


def test_episode_example_is_the_conversation_encoded_and_extends_the_one_turn_example(tiny_model_path):
    """prompt + reply 1 + the tool's turn (next_prompt) + reply 2 (completion_example) has the tokens, positions and
    vision inputs of the chat template's encoding of the whole conversation (less the "\\n" the template writes after
    the last <|im_end|>), and labels exactly on the two replies, as that encoding labels its assistant turns. Its first
    turn is the one-turn example: the same tokens, labels and positions; the tool's tokens carry no labels; and the
    first reply's log-probabilities are the one-turn example's (attention is causal), alone or packed in one row."""
    encoder = data.Encoder(tiny_model_path)
    sample = data.load_dataset(["demo#2"], "rl", seed=0)[0]
    prompt = encoder(sample, **train_grpo.PROMPT)
    first, second = reply(encoder, "<zoom>1,2,30,40</zoom>"), reply(encoder, "red")
    crop = Image.open(sample.images[0]).crop((1, 2, 30, 40)).resize((56, 56))
    messages = sample.messages + [{"role": "assistant", "content": "<zoom>1,2,30,40</zoom>"}, {"role": "user", "content": TOOL_TURN}]
    next_prompt = train_grpo.next_prompt(prompt, first, messages, [crop], encoder)
    example = train_grpo.completion_example(next_prompt, second, encoder)

    whole = encoder(data.Sample(messages + [{"role": "assistant", "content": "red"}], sample.images + [crop]),
                    train_on="assistant")
    assert encoder.tokenizer.decode(whole["input_ids"][-1:]) == "\n"
    for key in ("input_ids", "labels"):
        assert torch.equal(example[key], whole[key][:-1]), key
    assert torch.equal(example["position_ids"], whole["position_ids"][:, :-1])
    for key in ("pixel_values", "image_grid_thw"):
        assert torch.equal(example[key], whole[key]), key
    assert len(example["image_grid_thw"]) == 2
    # the label masks: the encoder's (every assistant turn) and ours (every reply the policy sampled) are the replies
    n1, n2 = len(prompt["input_ids"]), len(next_prompt["input_ids"])
    replies = list(range(n1 - 1, n1 - 1 + len(first))) + list(range(n2 - 1, n2 - 1 + len(second)))
    assert labelled(example) == labelled({"labels": whole["labels"][:-1]}) == replies
    assert example["labels"][replies].tolist() == first + second

    one_turn = train_grpo.completion_example(prompt, first, encoder)
    n = len(one_turn["input_ids"])
    for key in ("input_ids", "labels"):
        assert torch.equal(example[key][:n], one_turn[key]), key
    assert torch.equal(example["position_ids"][:, :n], one_turn["position_ids"])
    tool = example["input_ids"][n:n2]  # the tool's turn: "\n<|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n"
    assert (tool == encoder.image_pad).sum() == example["image_grid_thw"][1].prod() // encoder.merge_size**2
    assert (example["labels"][n - 1 : n2 - 1] == data.IGNORE).all()  # no position predicts a tool token

    cfg = train_grpo.parse_config(["--model", tiny_model_path])
    model = train_grpo.load_model(cfg, CPU)[0].eval()
    with torch.no_grad():
        alone, _, _ = train_grpo.completion_logps(model, [one_turn], [len(first)], CPU, 1.0)
        episode, _, _ = train_grpo.completion_logps(model, [example], [len(first) + len(second)], CPU, 1.0)
        packed, _, mask = train_grpo.completion_logps(model, [one_turn, example], [len(first), len(first) + len(second)],
                                                      CPU, 1.0)
    torch.testing.assert_close(episode[0, : len(first)], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[0, : len(first)], alone[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[1], episode[0], rtol=1e-5, atol=1e-5)
    assert mask.sum(1).tolist() == [len(first), len(first) + len(second)]


def test_zoom_env_turn_becomes_the_next_prompt():
    """examples/zoom_env.py's turn, through next_turn: the episode's prompt gains the crop (a PIL image) and the
    messages the tool's turn; the env sees the record's fields and the episode's images."""
    encoder = data.Encoder(data.resolve_model("tiny-qwen2.5-vl"))
    sample = data.load_dataset(["demo#2"], "rl", seed=0)[0]
    prompt = encoder(sample, **train_grpo.PROMPT)
    cfg = train_grpo.parse_config(["--multi_turn_plugin", os.path.join(ROOT, "examples", "zoom_env.py"), "--max_turns", "2"])
    step = train_grpo.load_multi_turn_plugin(cfg.multi_turn_plugin)
    text = "<zoom>10,10,50,40</zoom>"
    episode = {"sample": sample, "prompt": prompt, "completion_ids": reply(encoder, text), "text": text,
               "messages": sample.messages + [{"role": "assistant", "content": text}], "images": list(sample.images), "turns": 1}
    assert train_grpo.next_turn(step, episode, 1, encoder, cfg)
    assert episode["messages"][-1] == {"role": "user", "content": TOOL_TURN}
    assert len(episode["images"]) == 2 and episode["images"][1].size == (75, 56)  # 40 x 30, scaled up
    assert len(episode["prompt"]["image_grid_thw"]) == 2
    # a prompt past --max_length ends the episode instead
    episode["prompt"], episode["messages"], episode["images"] = prompt, episode["messages"][:-1], episode["images"][:1]
    assert not train_grpo.next_turn(step, episode, 1, encoder, train_grpo.parse_config(
        ["--multi_turn_plugin", cfg.multi_turn_plugin, "--max_turns", "2", "--max_length", str(len(prompt["input_ids"]) + 20)]))


# ----------------------------------------------------------------------------- the episode loop


def test_episodes_end_at_their_own_turns_and_later_turns_have_their_own_seeds():
    """Each completion is its own episode: it ends when the plugin returns None, when its reply was cut at
    max_completion_length (the plugin is not asked), or at --max_turns; every later reply is generated from the
    episode's own prompt with turn_seed(its first seed, turn). Returned: every reply's tokens joined (what the loss
    covers), the last reply's text (what the rewards score), and the conversation."""
    encoder = data.Encoder(data.resolve_model("tiny-qwen2.5-vl"))
    samples = data.load_dataset(["demo#2"], "rl", seed=0)
    prompts = [encoder(s, **train_grpo.PROMPT) for s in samples]
    cfg = train_grpo.parse_config(["--num_generations", "2", "--max_completion_length", "3", "--max_turns", "3",
                                   "--multi_turn_plugin", os.path.join(ROOT, "examples", "zoom_env.py")])
    tokens = lambda text: encoder.tokenizer.encode(text, add_special_tokens=False)
    asked = []

    def env(messages, completion, turn, images=(), **columns):  # "stop" ends; anything else gets a text turn
        asked.append((completion, turn, columns["solution"]))
        return None if "stop" in completion else {"content": f"turn {turn} done, go on"}

    calls = []

    def generate(turn_samples, turn_prompts, seeds):  # a reply per prompt: "go" for even seeds, "stop" for odd ones
        calls.append(seeds)
        texts = ["go" if seed % 2 == 0 else "stop" for seed in seeds]
        return [tokens(t) + [encoder.im_end] for t in texts], texts, [[-0.5] * (len(tokens(t)) + 1) for t in texts]

    replies = [tokens("go") + [encoder.im_end], tokens("go go go")[:3], tokens("stop") + [encoder.im_end],
               tokens("go") + [encoder.im_end]]  # the second: cut at max_completion_length
    texts = [encoder.tokenizer.decode(r, skip_special_tokens=True) for r in replies]
    first = (replies, texts, [[-1.0] * len(r) for r in replies])
    seeds = [11, 12, 13, 14]
    assert train_grpo.truncated(replies[1], encoder) and not train_grpo.truncated(replies[0], encoder)
    joined, texts, logps, episodes = train_grpo.play_episodes(env, generate, encoder, samples, prompts, seeds, first, cfg,
                                                              CPU, False)
    # after reply 1 the plugin is asked for episodes 0, 2 and 3 (1 was cut off), then only where it gave a turn
    assert [(c, t) for c, t, _ in asked[:3]] == [("go", 1), ("stop", 1), ("go", 1)]
    assert [s for _, _, s in asked[:3]] == [samples[i].extra["solution"] for i in (0, 1, 1)]  # the record's fields
    expected_seeds = [train_grpo.turn_seed(11, 2), train_grpo.turn_seed(14, 2)]
    assert calls[0] == expected_seeds
    assert len({train_grpo.turn_seed(11, 2), train_grpo.turn_seed(11, 3), train_grpo.turn_seed(12, 2)}) == 3
    turns = [e["turns"] for e in episodes]
    assert turns[1] == turns[2] == 1 and turns[0] > 1 and turns[3] > 1 and max(turns) <= cfg.max_turns
    for i, e in enumerate(episodes):
        assert texts[i] == e["text"] and e["messages"][-1] == {"role": "assistant", "content": e["text"]}
        assert [m["role"] for m in e["messages"][len(e["sample"].messages):]] == ["assistant", "user"] * (e["turns"] - 1) + ["assistant"]
        assert len(joined[i]) == len(logps[i]) == sum(len(tokens(m["content"])) + 1 for m in e["messages"]
                                                       if m["role"] == "assistant") - (i == 1)  # (1: cut, no <|im_end|>)
        example = train_grpo.completion_example(e["prompt"], e["completion_ids"], encoder)
        assert example["labels"][example["labels"] != data.IGNORE].tolist() == joined[i]  # every reply labelled, no more
        assert ("turn 1 done, go on" in encoder.tokenizer.decode(example["input_ids"])) == (e["turns"] > 1)


def test_plugin_and_flag_errors(tmp_path):
    """A plugin's malformed turn is an error that names the plugin; the flags come together; vLLM server mode (which
    would re-tokenise the replies' text) is refused; a file with no step(), or none at all, stops the run at start."""
    encoder = data.Encoder(data.resolve_model("tiny-qwen2.5-vl"))
    sample = data.load_dataset(["demo#1"], "rl", seed=0)[0]
    cfg = train_grpo.parse_config(["--multi_turn_plugin", os.path.join(ROOT, "examples", "zoom_env.py"), "--max_turns", "2"])
    episode = {"sample": sample, "prompt": encoder(sample, **train_grpo.PROMPT), "completion_ids": reply(encoder, "x"),
               "text": "x", "messages": sample.messages + [{"role": "assistant", "content": "x"}],
               "images": list(sample.images), "turns": 1}
    for bad in ({"content": "two <image><image>", "images": [sample.images[0]]}, {"text": "hi"}, "hi",
                {"content": "<|im_start|>system"}):
        with pytest.raises(ValueError, match="multi_turn_plugin"):
            train_grpo.next_turn(lambda *a, **k: bad, episode, 1, encoder, cfg)
    for flags in (["--max_turns", "2"], ["--multi_turn_plugin", "env.py"],
                  ["--multi_turn_plugin", "env.py", "--max_turns", "2", "--use_vllm", "true", "--vllm_mode", "server"]):
        with pytest.raises(SystemExit):
            train_grpo.parse_config(flags)
    (tmp_path / "no_step.py").write_text("def other(): pass\n")
    for path in (str(tmp_path / "no_step.py"), str(tmp_path / "missing.py")):
        with pytest.raises(SystemExit, match="multi_turn_plugin"):
            train_grpo.load_multi_turn_plugin(path)
    cfg = train_chord.parse_config(["--multi_turn_plugin", "env.py", "--max_turns", "3"])  # CHORD is GRPO's loop
    assert (cfg.multi_turn_plugin, cfg.max_turns) == ("env.py", 3)


# ----------------------------------------------------------------------------- 2-turn runs of main()


@pytest.fixture(scope="module")
def finisher(tmp_path_factory):
    """The tiny model after a short SFT on the demo: it answers with a colour and <|im_end|>, so its first replies
    end (the base model's run on to max_completion_length, which ends an episode)."""
    out = str(tmp_path_factory.mktemp("finisher"))
    train_sft.main(["--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--max_steps", "30",
                    "--per_device_train_batch_size", "8", "--eval_steps", "0", "--eval_generate", "0", "--save_steps", "30",
                    "--num_workers", "0", "--output_dir", out])
    return os.path.join(out, "checkpoint-30")


def multi_turn_args(model, folder):
    (folder / "one_tool_turn.py").write_text(ONE_TOOL_TURN)
    (folder / "sees_conversation.py").write_text(SEES_CONVERSATION)
    return ["--model", model, "--dataset", "demo#32", "--val_dataset", "demo#4", "--eval_limit", "4", "--num_generations", "4",
            "--per_device_train_batch_size", "8", "--max_completion_length", "8", "--num_workers", "0", "--learning_rate", "1e-3",
            "--multi_turn_plugin", str(folder / "one_tool_turn.py"), "--max_turns", "3",
            "--reward_plugin", str(folder / "sees_conversation.py"), "--reward_funcs", "conversation", "random"]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def four_steps(finisher, tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi_turn")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))  # the plugin's reward must not outlive the run
        train_grpo.main(multi_turn_args(finisher, folder) + ["--max_steps", "4", "--save_steps", "2", "--save_total_limit", "3",
                                                             "--eval_steps", "4", "--log_completions", "true",
                                                             "--output_dir", str(folder / "run")])
    return folder


def test_two_turn_run_logs_turns_and_rewards_see_the_conversation(four_steps):
    metrics = read_jsonl(four_steps / "run" / "metrics.jsonl")
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(m["turns"] == 2 for m in steps)  # every episode: a reply, the tool's turn, a reply
    assert all(m["reward/conversation"] == 1 for m in steps)  # the rewards saw every episode whole
    assert all(m["reward/random_std"] > 0 and m["grad_norm"] > 0 for m in steps)
    assert [m["eval_turns"] for m in metrics if "eval_reward" in m] == [2, 2]  # held-out episodes, at the start and end
    completions = read_jsonl(four_steps / "run" / "completions.jsonl")
    assert len(completions) == 4 * 8
    for row in completions:
        assert row["turns"] == 2 and [m["role"] for m in row["conversation"]] == ["assistant", "user", "assistant"]
        assert row["conversation"][1]["content"] == TOOL_TURN and row["conversation"][2]["content"] == row["completion"]


def test_two_turn_resume_continues_exactly(four_steps, finisher, monkeypatch):
    """4 steps straight, and 2 + a resume for 2 more: the same episodes, metrics and weights."""
    from safetensors.torch import load_file

    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))
    out = four_steps / "resumed"
    train_grpo.main(multi_turn_args(finisher, four_steps) + [
        "--max_steps", "4", "--save_steps", "2", "--eval_steps", "0", "--output_dir", str(out),
        "--resume_from_checkpoint", str(four_steps / "run" / "checkpoint-2")])
    straight = [m for m in read_jsonl(four_steps / "run" / "metrics.jsonl") if "loss" in m][2:]
    again = [m for m in read_jsonl(out / "metrics.jsonl") if "loss" in m]
    assert [m["step"] for m in again] == [m["step"] for m in straight] == [3, 4]
    for a, b in zip(straight, again):
        for key in ("turns", "reward", "reward/random", "completion_length", "loss", "entropy", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    a, b = (load_file(str(d / "checkpoint-4" / "model.safetensors")) for d in (four_steps / "run", out))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


# a tool turn only after the replies to "red" prompts: in a step, one process may have no episode going while the other has
ONLY_RED = """
from PIL import Image


def step(messages, completion, turn, images=(), solution=None, **columns):
    if solution != "red":
        return None
    return {"content": "Closer: <image>", "images": [Image.open(images[0]).crop((0, 0, 30 + 10 * turn, 40))]}
"""


def test_two_processes_match_one(finisher, tmp_path):
    """2 processes (FSDP2, gloo) with 8 completions each run the same episodes as 1 process with 16, though their
    episodes end at other turns: a process with none going generates a stand-in (generation is a collective)."""
    from conftest import run_torchrun

    (tmp_path / "only_red.py").write_text(ONLY_RED)
    common = ["--model", finisher, "--dataset", "demo#32", "--val_dataset", "demo#4", "--eval_limit", "4", "--num_generations",
              "4", "--max_completion_length", "8", "--num_workers", "0", "--max_steps", "3", "--save_steps", "0",
              "--eval_steps", "3", "--reward_funcs", "accuracy", "--multi_turn_plugin", str(tmp_path / "only_red.py"),
              "--max_turns", "3"]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29539"]
    p = run_torchrun(torchrun + ["train_grpo.py"] + common + ["--per_device_train_batch_size", "8", "--output_dir", two],
                     two, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    train_grpo.main(common + ["--per_device_train_batch_size", "16", "--output_dir", one])
    a, b = (read_jsonl(os.path.join(d, "metrics.jsonl")) for d in (one, two))
    assert [m["step"] for m in a] == [m["step"] for m in b] == [0, 1, 2, 3, 3]
    assert 1 < max(m.get("turns", 1) for m in a) and min(m.get("turns", 2) for m in a) < 3  # episodes of 1 to 3 replies
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in ("turns", "reward", "completion_length", "loss", "entropy", "grad_norm", "eval_reward", "eval_turns"):
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-5), key


# ----------------------------------------------------------------------------- examples/zoom_env.py


def test_zoom_env_good_box_no_tag_turn_limit():
    zoom_env = load_zoom_env()
    path = data.load_dataset(["demo#1"], "rl", seed=0)[0].images[0]
    image = Image.open(path).convert("RGB")
    turn = zoom_env.step([], "Let me look. <zoom>10, 20, 70, 50</zoom>", 1, images=[path], max_turns=3)
    assert turn["content"] == TOOL_TURN and len(turn["images"]) == 1
    crop = turn["images"][0]
    assert crop.size == (112, 56)  # 60 x 30 scaled up to a shorter side of 56, aspect kept
    assert crop.tobytes() == image.crop((10, 20, 70, 50)).resize((112, 56), Image.BICUBIC).tobytes()
    big = zoom_env.step([], "<zoom>0,0,100,90</zoom>", 1, images=[image])["images"][0]
    assert big.size == (100, 90)  # large enough already: not resized
    # cut to the image (3..6 x 4..112), then a thin strip: scaled no further than the image's side, stretched to 56
    assert zoom_env.step([], "<zoom>3.5,4.2,5.1,300</zoom>", 1, images=[image])["images"][0].size == (56, 112)
    assert zoom_env.step([], "It is red.", 1, images=[path]) is None  # an answer ends the episode
    assert zoom_env.step([], "<zoom>10,20,70,50</zoom>", 3, images=[path], max_turns=3) is None  # no turn left


@pytest.mark.parametrize("box, why", [("1,2,3", "4 numbers"), ("a,b,c,d", "numbers"), ("30,20,10,40", "greater"),
                                      ("200,200,300,300", "overlap"), ("nan,1,2,3", "finite"), ("", "4 numbers")])
def test_zoom_env_malformed_box_is_a_user_turn_not_an_error(box, why):
    zoom_env = load_zoom_env()
    image = Image.new("RGB", (112, 80))
    turn = zoom_env.step([], f"<zoom>{box}</zoom>", 1, images=[image])
    assert turn["images"] == [] and "invalid" in turn["content"] and why in turn["content"]
    assert "<image>" not in turn["content"] and "112" in turn["content"] and "80" in turn["content"]


# ----------------------------------------------------------------------------- vLLM


def test_vllm_episodes_equal_the_builtin_ones(finisher):
    """The same greedy episodes through vllm_rollout (colocate, CPU) as through the built-in rollout: the tool's PIL
    images reach vLLM, and its prompts (checked token for token against the encoder's) are the episodes' prompts."""
    pytest.importorskip("vllm")
    torch.set_num_threads(1)  # before vLLM's CPU worker binds its threads
    cfg = train_grpo.parse_config(["--model", finisher, "--max_completion_length", "8", "--use_vllm", "true",
                                   "--multi_turn_plugin", "env.py", "--max_turns", "3"])
    encoder = data.Encoder(data.resolve_model(cfg.model))
    samples = data.load_dataset(["demo#4"], "rl", seed=0)
    prompts = [encoder(s, **train_grpo.PROMPT) for s in samples]
    namespace = {}
    exec(ONE_TOOL_TURN, namespace)
    llm = train_grpo.vllm_engine(cfg, CPU, max_media=(cfg.max_turns, 0))
    model = train_grpo.load_model(cfg, CPU)[0]
    builtin = lambda s, p, seeds: (*train_grpo.rollout(model, encoder, s, cfg, CPU, greedy=True, prompts=p), None)
    vllm = lambda s, p, seeds: train_grpo.vllm_rollout(llm, encoder, s, p, cfg, greedy=True)
    a, b = (train_grpo.play_episodes(namespace["step"], generate, encoder, samples, prompts, None,
                                     generate(samples, prompts, None), cfg, CPU, False) for generate in (builtin, vllm))
    assert [e["turns"] for e in a[3]] == [e["turns"] for e in b[3]] == [2] * 4
    assert a[0] == b[0] and a[1] == b[1]
    assert [len(x) for x in b[2]] == [len(x) for x in b[0]]  # vLLM's log-probabilities of every reply's tokens
