"""Rewards: each shipped reward on tricky cases, plugins, and the weighted sum in compute_rewards."""

import math
import os
import sys
import threading
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    # plugins write into REWARDS: give every test its own copy so they cannot leak into each other
    monkeypatch.setattr(rewards, "REWARDS", dict(rewards.REWARDS))


# ----------------------------------------------------------------------------- accuracy

ACCURACY_CASES = [
    # (completion, solution, expected)
    (r"so \boxed{\frac{1}{2}}", "0.5", 1.0),
    ("<answer>1/2</answer>", r"\frac{1}{2}", 1.0),
    ("<answer>0.5</answer>", r"\dfrac12", 1.0),
    ("<answer>-0.5</answer>", r"-\frac{1}{2}", 1.0),
    ("<answer>-0.5</answer>", r"\frac{-1}{2}", 1.0),
    ("<answer>1/3</answer>", "0.333", 0.0),  # exact values: no tolerance
    (r"\boxed{\frac{3}{4}}", "0.75", 1.0),  # nested braces inside \boxed
    (r"\boxed{\frac{3}{4}}", "3", 0.0),  # a naive \boxed{[^}]*} would read "\frac{3"
    (r"first \boxed{2}, finally \boxed{3}", "3", 1.0),  # the last box wins
    ("<answer>2</answer> <answer>3</answer>", "3", 1.0),  # the last answer wins
    ("<answer> \\boxed{7} </answer>", "7", 1.0),  # a box inside the answer tags
    ("<answer>1,000</answer>", "1000", 1.0),
    ("<answer>1,000,000.5</answer>", "1000000.5", 1.0),
    ("<answer>1,5</answer>", "15", 0.0),  # not a thousands separator: compared as text
    ("<answer>-3</answer>", "3", 0.0),
    ("<answer>3.0</answer>", "3", 1.0),
    ("<answer>$42$</answer>", "42", 1.0),
    ("<answer>42.</answer>", "42", 1.0),
    ("<answer>Answer: 42</answer>", "42", 1.0),
    ("<answer>50%</answer>", "50", 1.0),  # decision: a percentage equals its number and its fraction
    ("<answer>50%</answer>", "0.5", 1.0),
    (r"<answer>50\%</answer>", "50%", 1.0),
    ("<answer>0.5</answer>", "50%", 1.0),
    ("<answer>50</answer>", "0.5", 0.0),  # without a % sign, 50 is 50
    ("<answer>50%</answer>", "50%", 1.0),
    ("<answer>50%</answer>", "0.5%", 0.0),  # both percentages: the numbers must be equal
    ("<answer>1/0</answer>", "1/0", 1.0),  # no value: equal as text
    ("<answer>(B)</answer>", "B", 1.0),
    ("<answer>B.</answer>", "(B)", 1.0),
    ("<answer>B)</answer>", "B", 1.0),
    ("<answer>Answer: B</answer>", "B", 1.0),
    ("<answer>B. cats</answer>", "B", 1.0),  # decision: the option letter with its text still picks option B
    ("<answer>(b) cats</answer>", "<answer>B</answer>", 1.0),
    ("<answer>cats</answer>", "B. cats", 0.0),  # decision: the option text alone is not the option
    ("<answer>C</answer>", "(B)", 0.0),
    ("<answer>A cat</answer>", "A", 0.0),  # a letter with no marker before text is a sentence, not an option
    ("<answer>  New   York </answer>", "new york", 1.0),
    (r"<answer>$\text{Paris}$.</answer>", "paris", 1.0),
    ("<answer>Paris</answer>", "London", 0.0),
    ("I think it is 5 but not sure", "5", 0.0),  # no tags: the whole text is the answer
    ("  5  ", "5", 1.0),
    ("<answer>5", "5", 0.0),  # an unclosed tag is no answer
    ("", "5", 0.0),
    ("<answer>5</answer>", r"The answer is \boxed{5}", 1.0),
]


@pytest.mark.parametrize("completion, solution, expected", ACCURACY_CASES)
def test_accuracy(completion, solution, expected):
    assert rewards.accuracy([completion], solution=[solution]) == [expected]


def test_accuracy_without_solution_is_none():
    assert rewards.accuracy(["<answer>5</answer>"] * 2, solution=[None, 5]) == [None, 1.0]
    assert rewards.accuracy(["<answer>5</answer>"], prompts=["q"]) == [None]  # no solution column at all


# ----------------------------------------------------------------------------- format

FORMAT_CASES = [
    # (completion, strict, lenient)
    ("<think>a</think><answer>b</answer>", 1.0, 1.0),
    ("  <think>\nlong\nthought\n</think>\n\n<answer> 5 </answer>\n", 1.0, 1.0),
    ("<think>a</think> trailing <answer>b</answer>", 0.0, 1.0),
    ("Sure! <think>a</think><answer>b</answer>", 0.0, 1.0),
    ("<think>a</think><answer>b</answer> and more", 0.0, 1.0),
    ("<think>a</think><answer>b</answer><answer>c</answer>", 0.0, 1.0),  # strict: exactly one answer
    ("<think>a<think>b</think><answer>c</answer>", 0.0, 1.0),
    ("<answer>b</answer><think>a</think>", 0.0, 0.0),  # wrong order
    ("<think>a</think>", 0.0, 0.0),
    ("<answer>b</answer>", 0.0, 0.0),
    ("", 0.0, 0.0),
]


@pytest.mark.parametrize("completion, strict, lenient", FORMAT_CASES)
def test_format(completion, strict, lenient):
    assert rewards.format([completion]) == [strict]
    assert rewards.format_lenient([completion]) == [lenient]


# ----------------------------------------------------------------------------- iou

IOU_CASES = [
    # (completion, solution, expected)
    ("<answer>[10, 20, 30, 40]</answer>", [10, 20, 30, 40], 1.0),
    # [0,0,10,10] vs [5,5,15,15]: intersection 5*5 = 25, union 100 + 100 - 25 = 175
    ("<answer>[0, 0, 10, 10]</answer>", [5, 5, 15, 15], 25 / 175),
    # [10,20,30,40] vs [20,30,40,60]: intersection 10*10 = 100, union 20*20 + 20*30 - 100 = 900
    ('<answer>[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}]</answer>', "[20, 30, 40, 60]", 100 / 900),
    ('```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "cat"}, {"bbox_2d": [0, 0, 1, 1]}]\n```', [10, 20, 30, 40], 1.0),
    ('<answer>{"label": "dog", "bbox_2d": [10.5, 20, 30, 40]}</answer>', {"bbox_2d": [10.5, 20, 30, 40]}, 1.0),
    ("<answer>[[10, 20, 30, 40]]</answer>", "[[10, 20, 30, 40]]", 1.0),
    ("<answer>[0, 0, 10, 10]</answer>", [20, 20, 30, 30], 0.0),  # disjoint
    ("<answer>[0, 0, 10, 10]</answer>", [10, 0, 20, 10], 0.0),  # touching edges: zero area in common
    ("<answer>a cat at the left</answer>", [0, 0, 10, 10], 0.0),  # unparsable
    ("<answer>[0, 0, 10]</answer>", [0, 0, 10, 10], 0.0),  # three numbers
    ("<answer>[10, 10, 0, 0]</answer>", [0, 0, 10, 10], 0.0),  # degenerate: x2 < x1
    ("<answer>[0, 0, 0, 10]</answer>", [0, 0, 10, 10], 0.0),  # degenerate: zero width
]


@pytest.mark.parametrize("completion, solution, expected", IOU_CASES)
def test_iou(completion, solution, expected):
    assert rewards.iou([completion], solution=[solution]) == [pytest.approx(expected)]


def test_iou_without_solution_and_bad_solution():
    assert rewards.iou(["[0, 0, 1, 1]"], solution=[None]) == [None]
    with pytest.raises(ValueError, match="no box"):
        rewards.iou(["[0, 0, 1, 1]"], solution=["left"])


# ----------------------------------------------------------------------------- count

COUNT_CASES = [
    ("<answer>3</answer>", 3, 1.0),
    ("<answer>3</answer>", "3", 1.0),
    (r"\boxed{3}", "<answer>3</answer>", 1.0),
    ("<answer> $3$. </answer>", 3, 1.0),
    ("<answer>1,000</answer>", 1000, 1.0),
    ("<answer>3.0</answer>", 3, 1.0),
    ("<answer>4</answer>", 3, 0.0),
    ("<answer>3.5</answer>", 3, 0.0),
    ("<answer>300%</answer>", 3, 0.0),
    ("<answer>3 cats</answer>", 3, 0.0),  # decision: the answer must be the number alone
    ("<answer>three</answer>", 3, 0.0),
    ("no answer", 3, 0.0),
]


@pytest.mark.parametrize("completion, solution, expected", COUNT_CASES)
def test_count(completion, solution, expected):
    assert rewards.count([completion], solution=[solution]) == [expected]


def test_count_without_solution_and_bad_solution():
    assert rewards.count(["<answer>3</answer>"], solution=[None]) == [None]
    assert rewards.count(["<answer>3</answer>"]) == [None]
    with pytest.raises(ValueError, match="not an integer"):
        rewards.count(["3"], solution=["many"])


# ----------------------------------------------------------------------------- length

LENGTH_CASES = [
    # max 100, buffer 20: 0 up to 80 tokens, then (80 - n) / 20, -1 from 100 on
    (0, 0.0), (79, 0.0), (80, 0.0), (81, -0.05), (90, -0.5), (99, -0.95), (100, -1.0), (101, -1.0), (1000, -1.0),
]


@pytest.mark.parametrize("n, expected", LENGTH_CASES)
def test_length_tokens(n, expected):
    got = rewards.length(["ignored"], max_completion_length=100, overlong_buffer=20, completion_lengths=[n])
    assert got == [pytest.approx(expected)]


def test_length_words_default_buffer_and_missing_max():
    # no completion_lengths: whitespace-split words; buffer defaults to max // 5 = 2, so 0 up to 8 words
    completions = [" ".join(["w"] * n) for n in (8, 9, 10, 11)]
    assert rewards.length(completions, max_completion_length=10) == [0.0, -0.5, -1.0, -1.0]
    assert rewards.length(["a b c"], max_completion_length=3, overlong_buffer=0) == [0.0]
    with pytest.raises(ValueError, match="max_completion_length"):
        rewards.length(["a"])


# ----------------------------------------------------------------------------- repetition

REPETITION_CASES = [
    ("the cat sat on the mat", 0.0),  # 4 trigrams, all unique
    ("a b", 0.0),  # shorter than n
    ("", 0.0),
    # 8 words, 6 trigrams: (a b c) x2, (b c a) x2, (c a b) x2 -> 3 unique: (1 - 3/6) * -1
    ("a b c a b c a b", -0.5),
    # "go go go go go": 3 trigrams, 1 unique: (1 - 1/3) * -1; case is ignored
    ("go Go GO go go", -2 / 3),
]


@pytest.mark.parametrize("completion, expected", REPETITION_CASES)
def test_repetition(completion, expected):
    assert rewards.repetition([completion]) == [pytest.approx(expected)]


def test_repetition_parameters():
    assert rewards.repetition(["a b a b"], ngram_size=2, max_penalty=-0.5) == [pytest.approx((1 - 2 / 3) * -0.5)]
    with pytest.raises(ValueError):
        rewards.repetition(["a b c"], max_penalty=1.0)


def test_random_in_range():
    values = rewards.random(["x"] * 100, solution=[1] * 100)
    assert len(values) == 100 and all(0.0 <= v < 1.0 for v in values) and len(set(values)) > 50


def test_registry_holds_the_shipped_rewards():
    assert set(rewards.REWARDS) == {"accuracy", "format", "format_lenient", "iou", "count", "length", "repetition",
                                    "random", "judge"}


def test_rewards_ignore_unknown_columns():
    completion = "<think>x</think><answer>5</answer>"
    extra = {"prompts": ["q"], "image_path": ["/x.png"], "max_completion_length": 50}
    for name, fn in rewards.REWARDS.items():
        if name == "judge":  # needs a server: tests/test_judge.py passes it the trainer's columns
            continue
        solution = [[0, 0, 1, 1]] if name == "iou" else ["5"]
        assert len(fn([completion], solution=solution, **extra)) == 1, name


# ----------------------------------------------------------------------------- plugins

PLUGIN = '''
import re
from rewards import accuracy as imported_accuracy  # imported, not defined here: not registered

def has_cat(completions, **kwargs):
    return [1.0 if "cat" in c else 0.0 for c in completions]

def _helper(x):
    return x

def format(completions, **kwargs):  # replaces the shipped one, with a warning
    return [0.25 for _ in completions]

class ShortBonus:
    name = "short"
    def __call__(self, completions, solution=None, **kwargs):
        return [None if s is None else float(len(c) < 10) for c, s in zip(completions, solution)]

class NotAReward:
    pass
'''


def test_plugin_registers_functions_and_classes(tmp_path, capsys):
    path = tmp_path / "my_rewards.py"
    path.write_text(PLUGIN)
    added = rewards.load_reward_plugin(str(path))
    assert sorted(added) == ["ShortBonus", "format", "has_cat", "short"]
    assert "replaces" in capsys.readouterr().err
    assert "_helper" not in rewards.REWARDS and "imported_accuracy" not in rewards.REWARDS
    assert "NotAReward" not in rewards.REWARDS and rewards.REWARDS["accuracy"] is rewards.accuracy

    completions = ["a cat", "a dog that is long", "cat cat cat cat"]
    columns = {"solution": ["x", None, "y"], "prompts": ["p"] * 3}
    total, per_function = rewards.compute_rewards(["has_cat", "short", "format"], [2.0, 0.5, 1.0], completions, columns)
    assert per_function == {"has_cat": [1.0, 0.0, 1.0], "short": [1.0, None, 0.0], "format": [0.25, 0.25, 0.25]}
    assert total == [2.0 + 0.5 + 0.25, 0.25, 2.0 + 0.25]


# ----------------------------------------------------------------------------- compute_rewards


def test_compute_rewards_weights_and_none():
    completions = ["<think>t</think><answer>4</answer>", "<answer>5</answer>", "nothing"]
    columns = {"solution": ["4", "4", None], "prompts": ["p"] * 3}
    total, per_function = rewards.compute_rewards(["accuracy", "format"], [1.0, 0.5], completions, columns)
    assert per_function == {"accuracy": [1.0, 0.0, None], "format": [1.0, 0.0, 0.0]}
    assert total == [1.5, 0.0, 0.0]
    total, _ = rewards.compute_rewards(["accuracy", "format"], None, completions, columns)  # None: weights 1.0
    assert total == [2.0, 0.0, 0.0]
    total, _ = rewards.compute_rewards(["accuracy"], [1.0], ["a", "b"], {"solution": [None, None]})
    assert total == [0.0, 0.0]  # every reward None: 0.0, not NaN


def test_compute_rewards_errors():
    rewards.REWARDS["short_list"] = lambda completions, **kwargs: [1.0]
    rewards.REWARDS["bad_value"] = lambda completions, **kwargs: ["1.0" for _ in completions]
    rewards.REWARDS["nan"] = lambda completions, **kwargs: [math.nan for _ in completions]

    def fails_on_x(completions, solution, **kwargs):
        return [float(int(s)) for s in solution]

    rewards.REWARDS["fails_on_x"] = fails_on_x
    completions, columns = ["a", "b", "c"], {"solution": ["1", "x", "2"], "prompts": ["p"] * 3}
    with pytest.raises(KeyError, match="available.*accuracy"):
        rewards.compute_rewards(["nope"], None, completions, columns)
    with pytest.raises(ValueError, match="2 reward weights for 1"):
        rewards.compute_rewards(["accuracy"], [1.0, 2.0], completions, columns)
    with pytest.raises(ValueError, match=r"'short_list'.*3 values, got 1"):
        rewards.compute_rewards(["short_list"], None, completions, columns)
    with pytest.raises(ValueError, match="'bad_value'"):
        rewards.compute_rewards(["bad_value"], None, completions, columns)
    with pytest.raises(ValueError, match="'nan'"):
        rewards.compute_rewards(["nan"], None, completions, columns)
    with pytest.raises(RuntimeError) as error:
        rewards.compute_rewards(["accuracy", "fails_on_x"], None, completions, columns)
    message = str(error.value)
    assert "'fails_on_x'" in message and "record 1" in message and "solution='x'" in message
    assert isinstance(error.value.__cause__, ValueError)


def test_compute_rewards_truncates_long_records():
    def boom(completions, **kwargs):
        raise ZeroDivisionError("boom")

    rewards.REWARDS["boom"] = boom
    with pytest.raises(RuntimeError, match=r"'boom' failed on record 0") as error:
        rewards.compute_rewards(["boom"], None, ["y" * 1000], {"solution": ["z" * 1000]})
    assert len(str(error.value)) < 320 and "ZeroDivisionError: boom" in str(error.value)  # each field shortened


def test_compute_rewards_error_of_the_batch_as_a_whole():
    def at_most_two(completions, **kwargs):  # fails on the batch only: no single record to blame
        if len(completions) > 2:
            raise ValueError("at most two")
        return [0.0 for _ in completions]

    rewards.REWARDS["at_most_two"] = at_most_two
    with pytest.raises(RuntimeError, match=r"'at_most_two' failed on the batch \(no record fails alone.*'a'"):
        rewards.compute_rewards(["at_most_two"], None, ["a", "b", "c"], {})


# ----------------------------------------------------------------------------- rewards that raise, hang or return NaN


def flaky_rewards():
    """A reward that raises on the record whose solution is "x", one that sleeps, one that returns NaN for "x"."""
    def raises_on_x(completions, solution, **kwargs):
        return [float(int(s)) for s in solution]

    def sleeps(completions, **kwargs):
        try:
            time.sleep(30)
        except Exception:  # a reward's own except clause must not swallow the timeout
            pass
        return [1.0 for _ in completions]

    def nan_on_x(completions, solution, **kwargs):
        return [math.nan if s == "x" else 1.0 for s in solution]

    rewards.REWARDS.update(raises_on_x=raises_on_x, sleeps=sleeps, nan_on_x=nan_on_x)
    return ["a", "b", "c"], {"solution": ["1", "x", "2"], "prompts": ["what is in the picture?"] * 3}


def test_reward_failures_raise_with_name_record_and_cause():
    completions, columns = flaky_rewards()
    with pytest.raises(RuntimeError, match=r"'raises_on_x' failed on record 1: completion='b', solution='x', "
                                           r"prompts='what is in the picture\?': ValueError"):
        rewards.compute_rewards(["raises_on_x"], None, completions, columns)
    start = time.time()
    with pytest.raises(RuntimeError, match=r"'sleeps' on 3 completions .*solution='1'.*after 0.2 s \(--reward_timeout\)"):
        rewards.compute_rewards(["accuracy", "sleeps"], None, completions, columns, timeout=0.2)
    assert time.time() - start < 5  # control came back, not after the 30 s sleep
    with pytest.raises(ValueError, match=r"'nan_on_x' returned nan for record 1: completion='b', solution='x'"):
        rewards.compute_rewards(["nan_on_x"], None, completions, columns)


def test_reward_failures_skip_count_and_warn_once(capsys):
    completions, columns = flaky_rewards()
    rewards._WARNED.clear()
    errors = {}
    total, per_function = rewards.compute_rewards(["accuracy", "raises_on_x", "sleeps", "nan_on_x"], [1, 1, 1, 0.5],
                                                  completions, columns, timeout=0.2, on_error="skip", errors=errors)
    assert per_function["raises_on_x"] == per_function["sleeps"] == [None] * 3  # the call failed: the whole batch
    assert per_function["nan_on_x"] == [1.0, None, 1.0]  # only the NaN entry
    assert per_function["accuracy"] == [0.0, 0.0, 0.0] and total == [0.5, 0.0, 0.5]
    assert errors == {"raises_on_x": 3, "sleeps": 3, "nan_on_x": 1}
    warnings = capsys.readouterr().err
    assert warnings.count("warning:") == 3 and "'raises_on_x' failed on record 1" in warnings
    rewards.compute_rewards(["raises_on_x"], None, completions, columns, on_error="skip", errors=errors)
    assert errors["raises_on_x"] == 6 and "warning" not in capsys.readouterr().err  # counted again, warned once
    rewards.REWARDS["short_list"] = lambda completions, **kwargs: [1.0]
    with pytest.raises(ValueError, match="3 values, got 1"):  # a wrong length is a bug: it raises even under skip
        rewards.compute_rewards(["short_list"], None, completions, columns, on_error="skip")


def test_reward_timeout_needs_the_main_thread():
    completions, columns = flaky_rewards()
    outcome = []
    worker = threading.Thread(target=lambda: outcome.append(
        pytest.raises(RuntimeError, rewards.compute_rewards, ["sleeps"], None, completions, columns, timeout=0.1,
                      on_error="skip")))  # not skipped: the timeout cannot work here at all
    worker.start()
    worker.join()
    assert str(outcome[0].value).startswith("--reward_timeout needs the main thread")
