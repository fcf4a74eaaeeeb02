"""Faults and hostile input (issue 13's fault matrix), one test per row.

Row: hostile completions reaching the RL reward (huge numbers, unicode digits, 100 KB of text,
control characters, `Answer:` repeated) -> a letter or None and a reward of 0 or 1, never an
exception, in bounded time. Property-based with hypothesis, plus the worst cases written out.
"""

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanochat.rl import correctness_reward, well_formed
from tasks.aqua import extract_letter
from tasks.synthetic_aqua import SyntheticAqua

TASK = SyntheticAqua("test", num_examples=5)
CONV = TASK[0]
LETTERS = {None, "A", "B", "C", "D", "E"}
PIECES = ["Answer:", "Answer: ", "answer is", "(", ")", "C", "E", "F", "=", "=>", "\n", " ", ".", "-",
          "1e308", "9" * 400, "٣", "３", "\u200b", "\x00", "\x1b[31m", "**", "$", "%", "option", "A)",
          "1/3", "0.5", "yes", "no"]


def check(completion: str, options=None) -> None:
    t0 = time.perf_counter()
    letter = extract_letter(completion, options)
    reward = correctness_reward(TASK, CONV, completion)
    well_formed(completion, finished=True)
    assert letter in LETTERS and reward in (0.0, 1.0)
    assert time.perf_counter() - t0 < 2.0, f"{len(completion)} chars took {time.perf_counter() - t0:.1f} s"


option_lists = st.one_of(
    st.none(),
    st.just(CONV["options"]),
    st.lists(st.text(max_size=30), max_size=7),  # malformed options must not crash the fallback either
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=3000), option_lists)
def test_any_text_gets_a_reward_without_raising(completion, options):
    check(completion, options)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(PIECES), max_size=400).map("".join), option_lists)
def test_answer_shaped_noise_gets_a_reward_without_raising(completion, options):
    check(completion, options)


def test_the_worst_cases_written_out():
    options = CONV["options"]
    for completion in [
        "Answer: " * 20_000,                           # the statement repeated 20k times
        "x" * 100_000,                                 # 100 KB with no answer
        ("step 1 = 2\n" * 10_000) + "Answer: C",       # a long rationale, then an answer
        "9" * 50_000,                                  # a 50,000-digit number against the options
        "1e308 * 1e308 = inf\nnan",                    # overflow and not-a-number
        "٣٤٥ ３４５ Answer: \u0663",                   # unicode digits
        "\x00\x01\x1b[31mAnswer: B\x7f",               # control characters
        "Answer: A\nAnswer: B\nAnswer: A",             # two different letters: hedging earns 0
    ]:
        check(completion, options)
    assert correctness_reward(TASK, CONV, "Answer: A\nAnswer: B") == 0.0
