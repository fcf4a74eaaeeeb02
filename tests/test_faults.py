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


# Row: the loss becomes NaN/inf (a huge learning rate) -> the stage stops, naming the step; NaN weights
# are never saved over good ones.

def test_a_blown_up_run_stops_at_the_step_and_keeps_the_good_checkpoint(base_dir, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from nanochat.tokenizer import Tokenizer
    from tasks.synthetic_aqua import synthetic_texts

    Tokenizer.train_from_iterator(synthetic_texts(200, seed=7), 512).save(base_dir / "tokenizer")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    # lr 1e20: the gradient norm is NaN at step 2 and the loss at step 3 (measured)
    args = ["--depth", "1", "--aspect-ratio", "64", "--head-dim", "32", "--max-seq-len", "64",
            "--device-batch-size", "2", "--total-batch-size", "128", "--source", "synthetic",
            "--num-iterations", "8", "--save-every", "1", "--eval-every", "-1", "--sample-every", "-1",
            "--embedding-lr", "1e20", "--unembedding-lr", "1e20", "--matrix-lr", "1e20", "--no-wandb"]
    ckpt = base_dir / "checkpoints" / "base"
    for log_every, tag in (("1", "logged"), ("4", "quiet")):  # quiet: only the save guard sees it
        res = subprocess.run([sys.executable, "-m", "scripts.base_train", *args, "--tag", tag,
                              "--log-every", log_every], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=300)
        assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
        if tag == "logged":
            assert "the gradient norm is nan at step 2: stopped" in res.stderr
        else:
            assert "the weights are not finite at step 2" in res.stderr and "not saved" in res.stderr
        assert f"step 1 in {ckpt / tag}, is intact" in res.stderr or "is step 1, intact" in res.stderr
        assert sorted(p.name for p in (ckpt / tag).iterdir()) == ["step_000001"]  # nothing after the blow-up
        weights = torch.load(ckpt / tag / "step_000001" / "model.pt", weights_only=True)
        assert all(torch.isfinite(t).all() for t in weights.values())
        assert json.loads((ckpt / tag / "step_000001" / "meta.json").read_text())["step"] == 1
