"""Reward functions for RL (GRPO, CHORD), their registry, and loading user plugins.

The contract. A reward is a plain function

    def my_reward(completions: list[str], **columns) -> list[float | None]

`completions` are the generated texts of one batch. `columns` holds every extra field of the RL records
(`solution`, ...), each a list aligned with `completions`, plus `prompts`; the trainer may add
`completion_lengths` (tokens per completion), `max_completion_length` and the judge's settings (`judge_url`,
`judge_model`, `judge_prompt`, `judge_max_concurrency`: its --judge_* flags). A reward takes the columns it needs
by name and ignores the rest through `**kwargs`. It returns one value per completion: a number, or `None` for
"not applicable" (e.g. no `solution` in that record), which is left out of the weighted sum. When every reward
is `None` for a completion, its total is 0.0.

A reward that raises, hangs (past --reward_timeout seconds) or returns NaN stops the run with the reward's name, the
record and the cause; with --reward_error skip its value becomes None for the completions affected instead, counted in
the metric reward_errors/<name> (see compute_rewards). A wrong number of values always stops the run.

    python train_grpo.py ... --reward_funcs accuracy format --reward_weights 1.0 0.2    # shipped rewards, REWARDS

A plugin is any .py file; every public function defined in it (name not starting with `_`; helpers get a `_`)
becomes a reward under its name, and every class defined in it with a `__call__` is instantiated without arguments
and registered under its class name and its `name` attribute, if any. A plugin name equal to a shipped one replaces
it (with a warning). Imported names are not registered.

    python train_grpo.py ... --reward_plugin my_rewards.py --reward_funcs accuracy cites_units short \\
        --reward_weights 1 0.5 0.1

    # my_rewards.py
    import re
    from rewards import repetition

    def cites_units(completions, solution=None, **kwargs):
        return [1.0 if re.search(r"\\b(cm|kg|s)\\b", c) else 0.0 for c in completions]

    def repetition_4gram(completions, **kwargs):   # change a shipped reward's parameter by wrapping it
        return repetition(completions, ngram_size=4)

    class Short:
        name = "short"
        def __call__(self, completions, **kwargs):
            return [1.0 if len(c) < 400 else 0.0 for c in completions]
"""

import importlib.util
import inspect
import json
import math
import numbers
import random as _random
import re
import signal
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

# ----------------------------------------------------------------------------- answer extraction and matching


def extract_answer(text: str) -> str:
    """The last <answer>...</answer>, else the last \\boxed{...} (braces balanced), else the whole text; stripped.
    A \\boxed{} inside the <answer> tags is unwrapped too."""
    tagged = re.findall(r"<answer>(.*?)</answer>", text, re.DOTALL)
    if tagged:
        text = tagged[-1]
    for start in reversed([m.end() for m in re.finditer(r"\\boxed\s*\{", text)]):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return text.strip()


def _normalise(s: str) -> str:
    """Strip what does not change an answer: math delimiters, \\text{}, an "Answer:" prefix, a trailing period."""
    s = s.strip().rstrip(".").strip()
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
            s = s[len(left):len(s) - len(right)].strip()
    s = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\%", "%").replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\ ", " ")
    s = re.sub(r"^(?:the\s+)?(?:final\s+)?answer\s*(?:is\b\s*:?|:)\s*", "", s, flags=re.IGNORECASE)
    s = s.rstrip(".").strip()
    return re.sub(r"\s+", " ", s)


_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][+-]?\d+)?|[+-]?\.\d+")


def _number(s: str) -> Fraction | None:
    """A plain number, with optional thousands separators (1,000): exact, as a Fraction."""
    if not _NUMBER.fullmatch(s):
        return None
    return Fraction(s.replace(",", ""))


def numeric_value(s: str) -> Fraction | None:
    """The exact value of a number or a fraction (`1/2`, `\\frac{1}{2}`, `\\dfrac12`, `-\\frac{1}{2}`), else None."""
    s = s.replace(" ", "")
    m = (re.fullmatch(r"(-?)\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}", s) or re.fullmatch(r"(-?)\\[dt]?frac(\d)(\d)", s)
         or re.fullmatch(r"(-?)([^/]+)/([^/]+)", s))
    if not m:
        return _number(s)
    numerator, denominator = _number(m.group(2)), _number(m.group(3))
    if numerator is None or not denominator:  # not numbers, or division by zero
        return None
    return (-1 if m.group(1) else 1) * numerator / denominator


def numbers_match(a: str, b: str) -> bool:
    """Equal values. When one side only is a percentage, `50%` matches `50` and `0.5`: datasets write it both ways."""
    x, y = numeric_value(a.removesuffix("%")), numeric_value(b.removesuffix("%"))
    if x is None or y is None:
        return False
    if a.endswith("%") == b.endswith("%"):
        return x == y
    percent, other = (x, y) if a.endswith("%") else (y, x)
    return other in (percent, percent / 100)


def choice_letter(s: str) -> str | None:
    """The option letter of a multiple-choice answer: `B`, `(B)`, `B.`, `B)`, `B:`, also followed by the option
    text (`B. cats`, `(b) cats`). A bare letter must be upper case: `a` alone is an English word."""
    m = re.fullmatch(r"\(([A-Za-z])\)(?:\s.*)?|([A-Z])(?:[.):](?:\s.*)?)?", s, re.DOTALL)
    return (m.group(1) or m.group(2)).upper() if m else None


def answers_match(predicted: str, solution: str) -> bool:
    """Numbers by exact value, then choice letters, then text by normalised exact match (case, spaces)."""
    predicted, solution = _normalise(extract_answer(predicted)), _normalise(extract_answer(solution))
    if numbers_match(predicted, solution):
        return True
    letters = choice_letter(predicted), choice_letter(solution)
    if letters[0] is not None and letters[1] is not None:
        return letters[0] == letters[1]
    return predicted.lower() == solution.lower()


# ----------------------------------------------------------------------------- shipped rewards


def _per_record(score, completions, solution):
    """score(completion, solution) for each record; None where the record has no solution."""
    solution = solution if solution is not None else [None] * len(completions)
    return [None if s is None else score(c, s) for c, s in zip(completions, solution)]


def accuracy(completions, solution=None, **kwargs):
    """1.0 if the completion's answer equals the solution, 0.0 if not, None without a solution. Both sides go through
    extract_answer, so the solution may carry <answer> tags or \\boxed{}. Numbers compare by exact value (`1,000` =
    `1000`, `0.5` = `1/2` = `\\frac{1}{2}`; `50%` = `50` = `0.5`), letters as options (`(B)` = `B.` = `Answer: B` =
    `B. cats`, but not `cats`), the rest as text (case, spaces, `$`, `\\text{}`, a trailing period ignored)."""
    return _per_record(lambda c, s: float(answers_match(c, str(s))), completions, solution)


_TAG = r"(?:(?!</?(?:think|answer)>).)*"  # any text that opens or closes no think/answer tag


def format(completions, **kwargs):  # noqa: A001 - the name users pass on the command line
    """1.0 if the whole completion is `<think>...</think> <answer>...</answer>` (surrounding whitespace allowed)."""
    pattern = re.compile(rf"\s*<think>{_TAG}</think>\s*<answer>{_TAG}</answer>\s*", re.DOTALL)
    return [1.0 if pattern.fullmatch(c) else 0.0 for c in completions]


def format_lenient(completions, **kwargs):
    """1.0 if `<think>...</think>` and then `<answer>...</answer>` appear anywhere, in that order."""
    pattern = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)
    return [1.0 if pattern.search(c) else 0.0 for c in completions]


_BOX = r"\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]"


def parse_box(text: str) -> list[float] | None:
    """The first box [x1, y1, x2, y2] in a text: a `"bbox_2d": [...]` (Qwen2.5-VL's JSON) first, else any list
    of four numbers (`[10, 20, 30, 40]`, `[[10, 20, 30, 40]]`). None if there is none."""
    m = re.search(r'"bbox_2d"\s*:\s*' + _BOX, text) or re.search(_BOX, text)
    try:
        return [float(v) for v in m.groups()] if m else None
    except ValueError:  # e.g. "1.2.3"
        return None


def box_iou(a: list[float], b: list[float]) -> float:
    """Intersection over union of two [x1, y1, x2, y2] boxes; 0.0 if either is degenerate (x2 <= x1 or y2 <= y1)."""
    if a[2] <= a[0] or a[3] <= a[1] or b[2] <= b[0] or b[3] <= b[1]:
        return 0.0
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    intersection = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union


def iou(completions, solution=None, **kwargs):
    """IoU of the first box in the completion's answer with the solution box, absolute pixels as Qwen2.5-VL emits
    them. The solution is a list, a `{"bbox_2d": [...]}` object or a JSON string. 0.0 if unparsable."""
    def score(completion, solution):
        target = parse_box(solution if isinstance(solution, str) else json.dumps(solution))
        if target is None:
            raise ValueError(f"solution {solution!r} holds no box [x1, y1, x2, y2]")
        predicted = parse_box(extract_answer(completion))
        return box_iou(predicted, target) if predicted is not None else 0.0

    return _per_record(score, completions, solution)


def _integer(s: str) -> int | None:
    value = numeric_value(_normalise(s))
    return int(value) if value is not None and value.denominator == 1 else None


def count(completions, solution=None, **kwargs):
    """1.0 if the answer is exactly the integer solution (`3`, `3.`, `$3$`, `1,000`), else 0.0. An answer that is
    not just a number (`3 cats`) gets 0.0; None without a solution."""
    def score(completion, solution):
        target = _integer(extract_answer(str(solution)))
        if target is None:
            raise ValueError(f"count solution {solution!r} is not an integer")
        return float(_integer(extract_answer(completion)) == target)

    return _per_record(score, completions, solution)


def length(completions, max_completion_length=None, overlong_buffer=None, completion_lengths=None, **kwargs):
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): 0 up to max - buffer, then linearly down to -1 at
    max, -1 beyond. Lengths are `completion_lengths` (tokens) when the trainer passes them, else whitespace-split
    words. The buffer defaults to a fifth of the maximum, DAPO's 4096 of 20480."""
    if max_completion_length is None:
        raise ValueError("the length reward needs max_completion_length (the trainer passes --max_completion_length)")
    if overlong_buffer is None:
        overlong_buffer = max_completion_length // 5
    if completion_lengths is None:
        completion_lengths = [len(c.split()) for c in completions]
    expected = max_completion_length - overlong_buffer
    # (expected - n) / buffer reaches -1 at n = max; clipped there, and a zero buffer is a hard cut
    return [0.0 if n <= expected else max(-1.0, (expected - n) / overlong_buffer) if overlong_buffer else -1.0
            for n in completion_lengths]


def repetition(completions, ngram_size=3, max_penalty=-1.0, **kwargs):
    """(1 - unique n-grams / n-grams) * max_penalty over lower-cased words; 0.0 for fewer than ngram_size words."""
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be <= 0, got {max_penalty}")
    rewards = []
    for c in completions:
        words = c.lower().split()
        if len(words) < ngram_size:
            rewards.append(0.0)
            continue
        ngrams = [tuple(words[i:i + ngram_size]) for i in range(len(words) - ngram_size + 1)]
        rewards.append((1 - len(set(ngrams)) / len(ngrams)) * max_penalty)
    return rewards


def random(completions, **kwargs):
    """Uniform in [0, 1): a reward with no signal, to check the plumbing."""
    return [_random.random() for _ in completions]


# ----------------------------------------------------------------------------- a judge model

JUDGE_PROMPT = """You are grading a response to a question. Any image the question refers to is not shown to you.

Question:
{question}

Reference answer:
{solution}

Response:
{completion}

Rate how correct and complete the response is, compared with the reference answer, from 0 (wrong or no answer) to 10
(correct and complete). Explain in one or two sentences, then end with a line `Score: N`, N an integer from 0 to 10."""

JUDGE_SLOTS = re.compile(r"\{(question|completion|solution)\}")
JUDGE_REQUEST_TIMEOUT = 600.0  # seconds one judge request may take (--reward_timeout bounds the whole batch)

_SCORE = re.compile(r"score(?:\s*(?:of|is))?[\s:*=]{0,5}(\d+(?:\.\d+)?)(?:\s*/\s*10\b)?"  # Score: 7, **Score:** 7/10
                    r"|(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b"  # 8/10, 8 out of 10
                    r"|^\s*(\d+(?:\.\d+)?)\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)  # a line that is a number


def judge_score(reply: str) -> float | None:
    """The 0-10 score in a judge's reply: the last `Score: 7` (`**Score:** 7/10`, `score is 7.5`), `8/10`, `8 out of
    10`, or a line that is only a number; a <think>...</think> block is left out (drafts). None if there is none, or if
    it is outside 0-10 (`Score: 85/100` is no score out of 10)."""
    matches = list(_SCORE.finditer(re.sub(r"<think>.*?</think>", "", reply, flags=re.DOTALL)))
    if not matches:
        return None
    value = float(next(group for group in matches[-1].groups() if group is not None))
    return value if 0 <= value <= 10 else None


def _question(prompt) -> str:
    """The text of a prompt's last user turn, <image>/<video> tags removed (the judge gets no media). A prompt is a
    list of messages (content a string, or OpenAI-style parts) or a string."""
    if isinstance(prompt, str):
        text = prompt
    else:
        content = [m for m in prompt if m["role"] == "user"][-1]["content"]
        text = content if isinstance(content, str) else " ".join(p["text"] for p in content if p.get("type") == "text")
    return re.sub(r"<image>|<video>", "", text).strip()


def _judge_request(url: str, path: str, body: dict | None = None, model: str = "") -> dict:
    """GET (body None) or POST JSON to the judge endpoint -> the decoded reply. No server: ConnectionError with the
    command that starts one; an HTTP error (the server answered, e.g. a prompt too long for it): RuntimeError."""
    request = urllib.request.Request(url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=JUDGE_REQUEST_TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise RuntimeError(f"judge {url + path}: HTTP {error.code}: {error.read().decode(errors='replace')[:500]}") from None
    except (urllib.error.URLError, OSError) as error:
        cause = getattr(error, "reason", error)
        if isinstance(cause, TimeoutError):
            raise TimeoutError(f"judge {url + path} did not reply in {JUDGE_REQUEST_TIMEOUT:g} s") from None
        port = urllib.parse.urlsplit(url).port or 80
        raise ConnectionError(f"no judge at {url} ({cause}): start one with `python -m vllm.entrypoints.openai.api_server "
                              f"--model {model or 'MODEL'} --port {port}`, or point --judge_url at one") from None


def judge(completions, prompts=None, solution=None, judge_url=None, judge_model="", judge_prompt="",
          judge_max_concurrency=16, **kwargs):
    """score / 10 from a judge model behind an OpenAI-compatible chat endpoint (`judge_url`, e.g. a vLLM server's
    http://127.0.0.1:8001/v1): each completion is put into the prompt (the file `judge_prompt`, else JUDGE_PROMPT)
    through its slots {question} (the last user turn of the record's prompt), {completion} and {solution}, sent as one
    user message at temperature 0, and the score is read from the reply (judge_score). Up to `judge_max_concurrency`
    requests are in flight at once. `judge_model` "" asks the endpoint for the first model it serves. A record with no
    solution gets None when the prompt has a {solution} slot (write a prompt without it to judge with no reference).
    A reply with no score from 0 to 10 is an error naming the completion and the reply (with --reward_error skip the
    batch's judge values become None, as for any reward that raises)."""
    if not judge_url:
        raise ValueError("the judge reward needs judge_url (the trainer passes --judge_url)")
    if judge_max_concurrency < 1:
        raise ValueError(f"judge_max_concurrency must be >= 1, got {judge_max_concurrency}")
    template = Path(judge_prompt).read_text(encoding="utf-8") if judge_prompt else JUDGE_PROMPT
    slots = set(JUDGE_SLOTS.findall(template))
    if "completion" not in slots:
        raise ValueError(f"judge prompt {judge_prompt or 'JUDGE_PROMPT'} has no {{completion}} slot")
    if "question" in slots and prompts is None:
        raise ValueError("the judge prompt's {question} slot needs prompts (the trainer passes them)")
    url = judge_url.rstrip("/")
    model = judge_model or _judge_request(url, "/models")["data"][0]["id"]
    solution = solution if solution is not None else [None] * len(completions)

    def ask(i):
        if "solution" in slots and solution[i] is None:
            return None
        values = {"completion": completions[i], "solution": str(solution[i]),
                  "question": _question(prompts[i]) if "question" in slots else ""}
        # one pass over the template: a completion that writes "{solution}" is not filled in
        text = JUDGE_SLOTS.sub(lambda m: values[m.group(1)], template)
        body = _judge_request(url, "/chat/completions", {"model": model, "temperature": 0.0,
                                                         "messages": [{"role": "user", "content": text}]}, model)
        which = f"judge reply for completion {i} ({completions[i][:80]!r}{'...' if len(completions[i]) > 80 else ''})"
        try:
            reply = body["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise ValueError(f"{which} is no chat completion: {json.dumps(body)[:500]}") from None
        score = judge_score(reply)
        if score is None:
            raise ValueError(f"{which} has no score from 0 to 10 (`Score: N`): {reply[-500:]!r}")
        return score / 10

    pool = ThreadPoolExecutor(max_workers=min(judge_max_concurrency, max(len(completions), 1)))
    try:
        futures = [pool.submit(ask, i) for i in range(len(completions))]
        return [future.result() for future in futures]
    finally:  # after an error or --reward_timeout no new request starts (those in flight end on their own)
        pool.shutdown(wait=False, cancel_futures=True)


REWARDS = {
    "accuracy": accuracy, "format": format, "format_lenient": format_lenient, "iou": iou, "count": count,
    "length": length, "repetition": repetition, "random": random, "judge": judge,
}

# ----------------------------------------------------------------------------- plugins


def import_file(path, prefix):
    """A user's .py file imported as module `<prefix>_<file stem>` (reward plugins; train_grpo's multi-turn plugins)."""
    spec = importlib.util.spec_from_file_location(f"{prefix}_{Path(path).stem}", path)
    if spec is None:
        raise ValueError(f"cannot import {path}: not a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up here
    spec.loader.exec_module(module)
    return module


def load_reward_plugin(path: str) -> list[str]:
    """Import a user's .py file and register its rewards into REWARDS (see the module docstring); return their names."""
    module = import_file(path, "reward_plugin")
    found = {}
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private, or imported into the plugin rather than defined there
        if inspect.isfunction(obj):
            found[name] = obj
        elif inspect.isclass(obj) and any("__call__" in vars(c) for c in obj.__mro__ if c is not object):
            instance = obj()
            found[name] = instance
            if isinstance(getattr(instance, "name", None), str):
                found[instance.name] = instance
    for name, fn in found.items():
        if name in REWARDS:
            print(f"warning: reward {name!r} from plugin {path} replaces the existing one", file=sys.stderr)
        REWARDS[name] = fn
    return list(found)


# ----------------------------------------------------------------------------- the weighted sum


class RewardTimeout(BaseException):
    """Raised inside a reward that ran past --reward_timeout. A BaseException, as KeyboardInterrupt is, so that the
    reward's own `except Exception:` cannot swallow it."""


class RewardError(RuntimeError):
    """A reward raised or timed out: the message names the reward, the record and the cause."""


def _run(fn, completions: list[str], columns: dict, timeout: float) -> list:
    """fn(completions, **columns), stopped after `timeout` seconds (0: no limit).

    The limit is a SIGALRM timer whose handler raises RewardTimeout inside the reward: it stops Python code and
    blocking calls (sleep, sockets, waiting on a subprocess) and leaves no thread running behind it. Its limits: it
    works in the main thread only (Python runs signal handlers there), and C code that does not return to the
    interpreter (a regex that backtracks for ever, one long numpy call) is stopped only once it returns. A reward that
    starts threads or processes of its own must stop them itself."""
    if not timeout:
        return fn(completions, **columns)

    def expire(signum, frame):
        raise RewardTimeout(f"still running after {timeout:g} s (--reward_timeout)")

    previous = signal.signal(signal.SIGALRM, expire)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            return fn(completions, **columns)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:  # restored even if the alarm fires as the reward returns
        signal.signal(signal.SIGALRM, previous)


def _describe(completions: list[str], columns: dict, i: int) -> str:
    """Record i as `completion=..., solution=..., prompts=...`, each value shortened: enough to find it in the data."""
    fields = {"completion": completions[i], **{k: v[i] for k, v in columns.items()
                                                 if isinstance(v, (list, tuple)) and len(v) == len(completions)}}
    short = lambda text: text if len(text) <= 100 else text[:100] + "..."
    return ", ".join(f"{k}={short(repr(v))}" for k, v in fields.items())


def _call(name: str, fn, completions: list[str], columns: dict, timeout: float) -> list:
    try:
        return _run(fn, completions, columns, timeout)
    except RewardTimeout as error:  # which record hangs is unknown: the batch's first is shown
        raise RewardError(f"reward {name!r} on {len(completions)} completions (the first: "
                          f"{_describe(completions, columns, 0)}): {error}") from None
    except Exception as error:
        # call the reward on one record at a time to name the first that fails, so the message points at the data
        aligned = [k for k, v in columns.items() if isinstance(v, (list, tuple)) and len(v) == len(completions)]
        index = None
        for i in range(len(completions)):
            try:
                _run(fn, completions[i:i + 1], {**columns, **{k: columns[k][i:i + 1] for k in aligned}}, timeout)
            except RewardTimeout:
                break
            except Exception:
                index = i
                break
        where = f"record {index}" if index is not None else "the batch (no record fails alone; record 0 shown)"
        raise RewardError(f"reward {name!r} failed on {where}: {_describe(completions, columns, index or 0)}: "
                          f"{type(error).__name__}: {error}") from error


_WARNED = set()  # rewards whose failure has been reported once (--reward_error skip)


def compute_rewards(reward_names, reward_weights, completions, columns, timeout=0.0, on_error="raise", errors=None):
    """Call each reward on the batch and sum them with weights, skipping None. Returns (total, per_function):
    total[i] is the weighted sum for completions[i] (0.0 if every reward is None for it); per_function maps each
    name to its values. `reward_weights` None means 1.0 each.

    A reward that raises, runs past `timeout` seconds (0: no limit; see _run) or returns NaN or inf: on_error "raise"
    stops with an error that names the reward, the record and the cause; "skip" makes its value None (not applicable)
    for the completions affected (the whole batch for an exception or a timeout, the entries for NaN and inf), adds
    their number to errors[name] (`errors`: a dict, if given) and prints a warning once per reward. A wrong number
    of values or a value that is no number always raises: a bug in the reward, not bad luck with one record."""
    unknown = [name for name in reward_names if name not in REWARDS]
    if unknown:
        raise KeyError(f"unknown reward(s) {unknown}; available: {sorted(REWARDS)} (add yours with --reward_plugin)")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be raise or skip, got {on_error!r}")
    if timeout and threading.current_thread() is not threading.main_thread():
        raise RuntimeError("--reward_timeout needs the main thread (it uses SIGALRM): compute rewards there, or set it to 0")
    if reward_weights is None:
        reward_weights = [1.0] * len(reward_names)
    if len(reward_weights) != len(reward_names):
        raise ValueError(f"{len(reward_weights)} reward weights for {len(reward_names)} rewards {list(reward_names)}")
    total = [0.0] * len(completions)
    per_function = {}
    for name, weight in zip(reward_names, reward_weights):
        failed, cause = 0, None
        try:
            values = _call(name, REWARDS[name], completions, columns, timeout)
        except RewardError as error:
            if on_error == "raise":
                raise
            values, failed, cause = [None] * len(completions), len(completions), error
        if not isinstance(values, (list, tuple)) or len(values) != len(completions):
            got = len(values) if isinstance(values, (list, tuple)) else type(values).__name__
            raise ValueError(f"reward {name!r} must return a list of {len(completions)} values, got {got}")
        per_function[name] = []
        for i, v in enumerate(values):
            if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)):
                raise ValueError(f"reward {name!r} returned {v!r} for record {i}: expected a finite float, int or None")
            if v is not None and not math.isfinite(v):
                message = f"reward {name!r} returned {v!r} for record {i}: {_describe(completions, columns, i)}"
                if on_error == "raise":
                    raise ValueError(message + ": expected a finite float, int or None")
                v, failed, cause = None, failed + 1, cause or message
            per_function[name].append(None if v is None else float(v))
        if failed:
            if errors is not None:
                errors[name] = errors.get(name, 0) + failed
            if name not in _WARNED:
                _WARNED.add(name)
                print(f"warning: {cause}; its value is None for the completions affected (--reward_error skip), "
                      f"counted in reward_errors/{name}; this warning is not repeated", file=sys.stderr)
        total = [t + weight * v if v is not None else t for t, v in zip(total, per_function[name])]
    return total, per_function
