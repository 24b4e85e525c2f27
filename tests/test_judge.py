"""The judge reward (rewards.judge): against a small chat-completions server in the test (scores parsed, the prompt's
slots filled, concurrency bounded, errors that name the completion, --reward_timeout and --reward_error), and where
vLLM is installed against a real vLLM OpenAI server of the tiny model on CPU:
    python -m pytest -q tests/test_judge.py                  # the local server; the vLLM test is skipped
    .venv-vllm/bin/python -m pytest -q tests/test_judge.py   # and the real server"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402
from bench import stop_vllm_server as stop_server  # noqa: E402

QUESTION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>How many cats are there?"}]


class Judge(ThreadingHTTPServer):
    """A chat-completions endpoint on 127.0.0.1: answers each request with reply(prompt text), after `delay` seconds
    (cut short by `release`); records every request body and the most requests it had in flight at once."""

    daemon_threads = True
    request_queue_size = 64  # many clients connect at once

    def __init__(self):
        super().__init__(("127.0.0.1", 0), JudgeHandler)
        self.url = f"http://127.0.0.1:{self.server_port}/v1"
        self.reply = lambda prompt: "Score: 7"
        self.delay, self.release = 0.0, threading.Event()
        self.requests, self.in_flight, self.max_in_flight, self.lock = [], 0, 0, threading.Lock()


class JudgeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, code, body):
        raw = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def do_GET(self):
        self.send(200, {"object": "list", "data": [{"id": "served-judge", "object": "model"}]})

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with server.lock:
            server.requests.append(body)
            server.in_flight += 1
            server.max_in_flight = max(server.max_in_flight, server.in_flight)
        server.release.wait(server.delay)
        with server.lock:
            server.in_flight -= 1
        reply = server.reply(body["messages"][0]["content"])
        if isinstance(reply, int):  # an HTTP error code
            self.send(reply, {"error": {"message": "This model's maximum context length is 32 tokens"}})
        else:
            self.send(200, {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]})



@pytest.fixture
def judge_server():
    server = Judge()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the score in a reply

SCORE_CASES = [
    ("Score: 7", 7.0),
    ("8/10", 8.0),
    ("The answer matches the reference.\nScore: 10", 10.0),
    ("**Score:** 9/10", 9.0),
    ("score is 4.5", 4.5),
    ("I would give it 6 out of 10.", 6.0),
    ("7", 7.0),
    ("0.", 0.0),
    ("First glance 3/10, but on reflection\nScore: 5", 5.0),  # the last score wins
    ("<think>maybe Score: 2</think>It is right. Score: 8", 8.0),  # drafts in the thinking are left out
    ("Score: 11", None),  # outside 0-10
    ("Score: 85/100", None),  # not out of 10
    ("80/100", None),
    ("The response is good.", None),
    ("", None),
]


@pytest.mark.parametrize("reply, expected", SCORE_CASES)
def test_judge_score(reply, expected):
    assert rewards.judge_score(reply) == expected


# ----------------------------------------------------------------------------- against the local server


def test_judge_scores_and_fills_the_prompt(judge_server):
    """Each reply's score / 10, in the completions' order; the default prompt holds the question (last user turn, no
    media tag), the completion and the solution; the model is the one the endpoint serves; temperature 0."""
    replies = {"<answer>three cats</answer>": "Score: 7", "two": "Not right.\n8/10", "none": "0"}
    judge_server.reply = lambda prompt: next(r for c, r in replies.items() if f"Response:\n{c}\n" in prompt)
    values = rewards.judge(list(replies), prompts=[QUESTION] * 3, solution=["3"] * 3, judge_url=judge_server.url)
    assert values == [0.7, 0.8, 0.0]
    assert sorted(r["messages"][0]["content"] for r in judge_server.requests) == sorted(
        rewards.JUDGE_PROMPT.format(question="How many cats are there?", completion=c, solution="3") for c in replies)
    for body in judge_server.requests:
        assert body["model"] == "served-judge" and body["temperature"] == 0.0 and len(body["messages"]) == 1


def test_judge_prompt_file(judge_server, tmp_path):
    """A --judge_prompt file: its slots filled in one pass (a completion that writes "{solution}" leaks nothing), other
    braces left as they are; --judge_model sent as given; a prompt without {solution} judges records without one,
    a prompt with it gives them None and sends nothing."""
    path = tmp_path / "judge.txt"
    path.write_text('Q: {question}\nA: {completion}\nRef: {solution}\nReply as {"score": N} or Score: N')
    columns = dict(prompts=[QUESTION, "What is 2 + 2?"], judge_url=judge_server.url + "/", judge_prompt=str(path),
                   judge_model="my-judge")
    assert rewards.judge(["I peeked: {solution}", "4"], solution=["3", None], **columns) == [0.7, None]
    (body,) = judge_server.requests
    assert body["model"] == "my-judge"
    assert body["messages"][0]["content"] == ('Q: How many cats are there?\nA: I peeked: {solution}\nRef: 3\n'
                                              'Reply as {"score": N} or Score: N')
    path.write_text("{question} -> {completion}")
    assert rewards.judge(["4"], solution=None, **{**columns, "prompts": ["What is 2 + 2?"]}) == [0.7]
    assert judge_server.requests[-1]["messages"][0]["content"] == "What is 2 + 2? -> 4"
    path.write_text("no slot for the completion")
    with pytest.raises(ValueError, match="no {completion} slot"):
        rewards.judge(["4"], **columns)


@pytest.mark.parametrize("max_concurrency", [1, 4, 16])
def test_judge_concurrency_is_bounded(judge_server, max_concurrency):
    """32 slow replies: never more than judge_max_concurrency requests in flight, and that many at once."""
    judge_server.delay = 0.02 if max_concurrency == 1 else 0.1
    values = rewards.judge([f"answer {i}" for i in range(32)], prompts=[QUESTION] * 32, solution=["3"] * 32,
                           judge_url=judge_server.url, judge_max_concurrency=max_concurrency)
    assert values == [0.7] * 32 and len(judge_server.requests) == 32
    assert judge_server.max_in_flight == max_concurrency


def test_malformed_reply_names_the_completion(judge_server):
    """A reply with no score: the error names the completion (index, first characters) and the reply, also through
    compute_rewards; with --reward_error skip the batch's judge values are None, counted."""
    judge_server.reply = lambda prompt: "I cannot tell." if "seven" in prompt else "Score: 9"
    completions = ["<answer>3</answer>", "There are seven cats, " + "meow " * 50, "3"]
    columns = dict(prompts=[QUESTION] * 3, solution=["3"] * 3, judge_url=judge_server.url)
    with pytest.raises(ValueError, match=r"judge reply for completion 1 \('There are seven cats, meow .*'\.\.\.\) has no score "
                                         r"from 0 to 10 .*: 'I cannot tell.'"):
        rewards.judge(completions, **columns)
    with pytest.raises(rewards.RewardError, match=r"(?s)reward 'judge' failed on record 1: .*completion 1 \('There are seven"):
        rewards.compute_rewards(["judge"], None, completions, columns)
    errors = {}
    total, per_function = rewards.compute_rewards(["judge", "accuracy"], [1.0, 1.0], completions, columns,
                                                  on_error="skip", errors=errors)
    assert per_function["judge"] == [None] * 3 and errors == {"judge": 3}
    assert total == [1.0, 0.0, 1.0]  # the other rewards still count
    judge_server.reply = lambda prompt: 400
    with pytest.raises(RuntimeError, match="HTTP 400: .*maximum context length"):
        rewards.judge(completions, **columns)


def test_no_judge_at_the_url():
    """Nothing listens at judge_url: the error says how to start a judge there, with the model if one is named."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    start = f"start one with `python -m vllm.entrypoints.openai.api_server --model {{}} --port {port}`"
    with pytest.raises(ConnectionError, match=f"no judge at {url} .*: " + start.format("Qwen/Qwen2.5-7B-Instruct")):
        rewards.judge(["3"], prompts=[QUESTION], solution=["3"], judge_url=url, judge_model="Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(ConnectionError, match=f"no judge at {url} .*: " + start.format("MODEL")):  # asking for its model
        rewards.judge(["3"], prompts=[QUESTION], solution=["3"], judge_url=url)
    with pytest.raises(rewards.RewardError, match=f"reward 'judge' failed on record 0: .*no judge at {url}"):
        rewards.compute_rewards(["judge"], None, ["3"], dict(prompts=[QUESTION], solution=["3"], judge_url=url))


def test_reward_timeout_stops_a_slow_judge(judge_server):
    """A judge slower than --reward_timeout: the run stops at the limit (not when the replies come), naming the reward;
    with skip, None; requests not yet sent are not sent."""
    judge_server.delay = 30.0
    columns = dict(prompts=[QUESTION] * 8, solution=["3"] * 8, judge_url=judge_server.url, judge_max_concurrency=2)
    start = time.monotonic()
    with pytest.raises(rewards.RewardError, match=r"reward 'judge' on 8 completions .*still running after 0.5 s"):
        rewards.compute_rewards(["judge"], None, ["3"] * 8, columns, timeout=0.5)
    errors = {}
    _, per_function = rewards.compute_rewards(["judge"], None, ["3"] * 8, columns, timeout=0.5, on_error="skip",
                                              errors=errors)
    assert time.monotonic() - start < 5
    assert per_function["judge"] == [None] * 8 and errors == {"judge": 8}
    time.sleep(0.2)
    assert len(judge_server.requests) == 4  # two in flight per call; the other six of each call never sent


def test_trainer_passes_the_judge_settings(judge_server, tmp_path):
    """train_grpo.score() hands --judge_* to the reward as columns: the demo's prompts reach the judge."""
    pytest.importorskip("torch")
    import dataclasses

    import data
    import train_grpo

    path = tmp_path / "judge.txt"
    path.write_text("{question} | {completion} | {solution}")
    cfg = train_grpo.parse_config(["--reward_funcs", "judge", "--judge_url", judge_server.url, "--judge_model", "j",
                                   "--judge_prompt", str(path), "--judge_max_concurrency", "3"])
    samples = [dataclasses.replace(s, extra={**s.extra, "solution": "red"}) for s in data.load_dataset(["demo#2"], "rl", seed=0)]
    total, per_function = train_grpo.score(samples, [[1, 2]] * 4, ["red", "blue", "green", "red"], cfg, 2)
    assert total.tolist() == pytest.approx([0.7] * 4) and len(judge_server.requests) == 4
    sent = sorted(r["messages"][0]["content"] for r in judge_server.requests)
    questions = [rewards._question(s.messages) for s in samples]
    assert sent == sorted(f"{q} | {c} | red" for q, c in zip([q for q in questions for _ in range(2)], ["red", "blue", "green", "red"]))
    assert {r["model"] for r in judge_server.requests} == {"j"}


# ----------------------------------------------------------------------------- against a real vLLM server


@pytest.fixture(scope="module")
def vllm_judge():
    """vLLM's OpenAI server of the tiny Qwen2.5-VL on 127.0.0.1, started with the command the judge's error message
    prints plus the CPU settings of tests/test_vllm.py (text only: no media), ended by its process group id. -> its url
    and the path of its log."""
    pytest.importorskip("vllm")
    import data

    port, model = free_port(), data.resolve_model("tiny-qwen2.5-vl")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--port", str(port),
               "--host", "127.0.0.1", "--max-model-len", "1024", "--limit-mm-per-prompt", json.dumps({"image": 0, "video": 0}),
               "--dtype", "float32", "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20)]
    log_path = os.path.join(os.path.dirname(model), f"vllm-judge-{port}.log")
    log = open(log_path, "w")
    process = subprocess.Popen(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                rewards._judge_request(url, "/models")
                break
            except ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError(f"the vLLM server did not start; its log {log_path}:\n{open(log_path).read()[-3000:]}")
                time.sleep(1.0)
        yield url, log_path
    finally:
        if process.poll() is None:
            stop_server(process)
        log.close()


def test_judge_against_vllm_server(vllm_judge, monkeypatch):
    """The tiny random model as the judge: every completion gets a chat completion back (the replies are recorded), and
    the reward is each reply's score / 10 when all parse, else (reward_error skip) None for the batch, counted. The
    model rarely writes a score: what is checked is the plumbing."""
    url, log_path = vllm_judge
    replies, request = {}, rewards._judge_request  # prompt text -> the model's reply

    def recording(url, path, body=None, model=""):
        answer = request(url, path, body, model)
        if path == "/chat/completions":
            replies[body["messages"][0]["content"]] = answer["choices"][0]["message"]["content"]
        return answer

    monkeypatch.setattr(rewards, "_judge_request", recording)
    completions = ["<answer>3</answer>", "There are two cats.", "three", "I do not know"]
    columns = dict(prompts=[QUESTION] * 4, solution=["3"] * 4, judge_url=url, judge_max_concurrency=2)
    errors = {}
    _, per_function = rewards.compute_rewards(["judge"], None, completions, columns, on_error="skip", errors=errors)
    values = per_function["judge"]
    assert len(values) == 4 and all(v is None or 0.0 <= v <= 1.0 for v in values)
    sent = [rewards.JUDGE_PROMPT.format(question="How many cats are there?", completion=c, solution="3") for c in completions]
    assert replies and set(replies) <= set(sent) and all(isinstance(r, str) for r in replies.values())
    if not errors:
        assert set(replies) == set(sent)
        assert values == pytest.approx([rewards.judge_score(replies[text]) / 10 for text in sent])
    else:  # a reply without a score (requests not yet sent then are not sent): None for the batch, counted
        assert errors == {"judge": 4} and values == [None] * 4
        assert any(rewards.judge_score(r) is None for r in replies.values())
    print(f"the tiny judge's replies: {list(replies.values())}")
    assert "POST /v1/chat/completions HTTP/1.1\" 200" in open(log_path).read()  # vLLM's access log
