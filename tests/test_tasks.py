"""Task plumbing (slicing, shuffling, mixtures, sequences, render_mc) and the chat tasks loaded from
Hugging Face, exercised on small local datasets in the real column formats (load_dataset
patched)."""

import json

import pytest

from tasks.common import Task, TaskMixture, TaskSequence, render_mc, validate_messages


class Numbers(Task):
    """Example i is a one-turn chat about the number i."""

    def __init__(self, n, name="numbers", **kwargs):
        super().__init__(**kwargs)
        self.n, self.name = n, name

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {
            "messages": [
                {"role": "user", "content": f"{self.name} {i}?"},
                {"role": "assistant", "content": str(i)},
            ],
            "i": i,
        }

    def evaluate(self, conversation, completion):
        return int(completion.strip() == str(conversation["i"]))


def ids(items):
    return [c["i"] for c in items]


def test_indexing_and_slicing():
    t = Numbers(10)
    assert len(t) == 10 and t[3]["i"] == 3 and t[-1]["i"] == 9
    assert ids(t[2:8:2]) == [2, 4, 6] and ids(t[::-3]) == [9, 6, 3, 0]
    assert ids(t) == list(range(10))
    with pytest.raises(IndexError):
        t[10]
    with pytest.raises(TypeError):
        t["3"]
    import numpy as np

    assert t[np.int64(4)]["i"] == 4  # samplers hand out numpy integers
    r = Numbers(10, start=2, stop=9, step=3)
    assert ids(r) == [2, 5, 8] and len(r) == 3
    assert ids(Numbers(5, stop=100)) == list(range(5))
    assert ids(t.subset(7)) == [7, 8, 9] and t.subset(1, 3).evaluate(t[1], "1") == 1


def test_shuffle_is_deterministic_permutation():
    t = Numbers(50)
    a, b, c = ids(t.shuffle(1)), ids(t.shuffle(1)), ids(t.shuffle(2))
    assert a == b and a != c and sorted(a) == list(range(50)) and a != list(range(50))
    assert ids(Numbers(50, shuffle_seed=1)) == a  # constructor and method agree
    # slicing before and after shuffling
    assert ids(t.shuffle(1).subset(0, 5)) == a[:5]
    assert sorted(ids(Numbers(50, start=10, stop=20, shuffle_seed=3))) == list(range(10, 20))
    sh = t.shuffle(1)
    assert sh.name == "numbers" and sh.evaluate(sh[0], str(sh[0]["i"])) == 1


def test_mixture_interleaves_every_example_once():
    a, b = Numbers(30, "a"), Numbers(10, "b")
    mix = TaskMixture([a, b], seed=5)
    items = list(mix)
    assert len(mix) == 40
    assert sorted((c["task"], c["i"]) for c in items) == sorted(
        [("a", i) for i in range(30)] + [("b", i) for i in range(10)]
    )
    assert [(c["task"], c["i"]) for c in TaskMixture([a, b], seed=5)] == [
        (c["task"], c["i"]) for c in items
    ]
    assert [(c["task"], c["i"]) for c in TaskMixture([a, b], seed=6)] != [
        (c["task"], c["i"]) for c in items
    ]
    # b's examples are spread out, not bunched at the end
    positions = [k for k, c in enumerate(items) if c["task"] == "b"]
    assert positions[0] < 20 and positions[-1] >= 20
    assert mix.evaluate(items[0], str(items[0]["i"])) == 1
    assert mix.evaluate(items[0], "nope") == 0
    with pytest.raises(ValueError, match="task"):
        mix.evaluate({"messages": [], "task": "zzz"}, "1")
    # mixtures are Tasks: they slice and shuffle too; a task listed twice is up-weighted
    assert len(mix[5:10]) == 5 and len(TaskMixture([a, b, b])) == 50


def test_sequence_concatenates_in_order():
    seq = TaskSequence([Numbers(3, "easy"), Numbers(2, "hard")])
    assert [(c["task"], c["i"]) for c in seq] == [
        ("easy", 0),
        ("easy", 1),
        ("easy", 2),
        ("hard", 0),
        ("hard", 1),
    ]
    with pytest.raises(ValueError):
        TaskSequence([])


def test_render_mc():
    s = render_mc("What is the capital of France?", ["A", "B", "C"], ["Paris", "Rome", "Oslo"])
    assert s.startswith("What is the capital of France?\n\nA) Paris\nB) Rome\nC) Oslo\n\n")
    assert "letter" in s.split("\n")[-1] and "A, B, C" in s
    with pytest.raises(ValueError):
        render_mc("q", ["A", "B"], ["x"])


@pytest.mark.parametrize(
    "messages,error",
    [
        ([], "non-empty"),
        ([{"role": "user", "content": "hi"}], "at least one user"),
        (
            [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}],
            "expected 'user'",
        ),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
            "expected 'assistant'",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
            ],
            "last message",
        ),
        ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "role 'bot'"),
        (
            [{"role": "user", "content": " "}, {"role": "assistant", "content": "b"}],
            "empty content",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "b"},
            ],
            "system",
        ),
        (
            [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": [{"type": "code", "text": "x"}]},
            ],
            "part 0",
        ),
        (
            [{"role": "user", "content": 3}, {"role": "assistant", "content": "b"}],
            "must be a string",
        ),
    ],
)
def test_validate_messages_rejects(messages, error):
    with pytest.raises(ValueError, match=error):
        validate_messages(messages)


def test_validate_messages_accepts():
    validate_messages(
        [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "a"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "x"},
                    {"type": "python", "text": "1+1"},
                    {"type": "python_output", "text": "2"},
                ],
            },
        ]
    )


# ------------------------------------------------------------------------------------------------
# CustomJSON


def test_customjson(tmp_path):
    from tasks.customjson import CustomJSON

    good = [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        {
            "messages": [
                {"role": "system", "content": "s"},
                {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": "and 3+3?"},
                {"role": "assistant", "content": "6"},
            ]
        },
    ]
    p = tmp_path / "conv.jsonl"
    p.write_text(json.dumps(good[0]) + "\n\n" + json.dumps(good[1]) + "\n")
    t = CustomJSON(p)
    assert len(t) == 2 and t[0]["messages"] == good[0] and t[1]["messages"] == good[1]["messages"]
    t[0]["messages"][0]["content"] = "mutated"
    assert t[0]["messages"][0]["content"] == "hi"  # items are copies

    for line, error in [
        ("{oops", ":3: not valid JSON"),
        (json.dumps({"conversation": []}), ":3: an object line needs a 'messages'"),
        (json.dumps([{"role": "user", "content": "x"}]), ":3: needs at least one user"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[1]) + "\n" + line + "\n")
        with pytest.raises(ValueError, match=error):
            CustomJSON(bad)
    with pytest.raises(FileNotFoundError):
        CustomJSON(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no conversations"):
        CustomJSON(tmp_path / "empty.jsonl")


# ------------------------------------------------------------------------------------------------
# Hugging Face tasks on local data in their real column formats


@pytest.fixture
def fake_hub(monkeypatch):
    """Patch datasets.load_dataset to serve small in-memory tables keyed by (path, name, split)."""
    import datasets

    tables, calls = {}, []

    def load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if (path, name, split) not in tables:
            raise ConnectionError(f"no route to host for {path}")
        return datasets.Dataset.from_list(tables[(path, name, split)])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return tables, calls


def test_smoltalk(fake_hub):
    from tasks.smoltalk import SmolTalk

    tables, calls = fake_hub
    tables[("HuggingFaceTB/smol-smoltalk", None, "test")] = [
        {
            "messages": [
                {"content": "hi", "role": "user"},
                {"content": "hello!", "role": "assistant"},
            ],
            "source": "x",
        },
        {
            "messages": [
                {"content": "sys", "role": "system"},
                {"content": "q", "role": "user"},
                {"content": "a", "role": "assistant"},
            ],
            "source": "y",
        },
        {
            "messages": [{"content": "q", "role": "user"}, {"content": "q2", "role": "user"}],
            "source": "z",
        },
    ]
    t = SmolTalk("test")
    assert calls == [("HuggingFaceTB/smol-smoltalk", None, "test")]
    assert len(t) == 3 and t[0]["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
    ]
    assert t[1]["messages"][0]["role"] == "system"
    with pytest.raises(ValueError, match="smol-smoltalk test row 2"):
        t[2]
    with pytest.raises(RuntimeError, match="Could not load HuggingFaceTB/smol-smoltalk"):
        SmolTalk("train")
    with pytest.raises(ValueError):
        SmolTalk("validation")


def test_gsm8k(fake_hub):
    from tasks.gsm8k import GSM8K, extract_answer

    tables, _ = fake_hub
    tables[("openai/gsm8k", "main", "test")] = [
        {
            "question": "Natalia sold clips to 48 of her friends in April, and then she sold half "
            "as many clips in May. How many clips did Natalia sell altogether in April and May?",
            "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
            "<<48+24=72>>72 clips altogether in April and May.\n#### 72",
        },
        {
            "question": "Big money?",
            "answer": "It is 1,000 + 234 = <<1000+234=1234>>1,234\n#### 1,234",
        },
        {"question": "broken", "answer": "no final line"},
    ]
    t = GSM8K("main", "test")
    c = t[0]
    assert c["answer"] == "72"
    assert c["messages"][1]["content"] == (
        "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips "
        "altogether in April and May.\nAnswer: 72"
    )
    assert t.evaluate(c, c["messages"][1]["content"]) == 1
    assert t.evaluate(c, "so 72.\nAnswer: 72.0") == 1
    assert t.evaluate(c, "Answer: 71") == 0 and t.evaluate(c, "72") == 0
    assert t[1]["answer"] == "1234" and t.evaluate(t[1], "#### 1,234") == 1
    assert extract_answer("Answer: 5 ... Answer: $-3.5") == "-3.5"
    with pytest.raises(ValueError, match="row 2"):
        t[2]
    with pytest.raises(RuntimeError, match="openai/gsm8k"):
        GSM8K("main", "train")


def test_mmlu(fake_hub):
    from tasks.mmlu import MMLU

    tables, _ = fake_hub
    row = {
        "question": "2 + 2 = ?",
        "subject": "elementary_mathematics",
        "choices": ["3", "4", "5", "22"],
        "answer": 1,
    }
    tables[("cais/mmlu", "all", "validation")] = [row, dict(row, answer=3)]
    tables[("cais/mmlu", "auxiliary_train", "train")] = [{"train": row}]
    t = MMLU("all", "validation")
    c = t[0]
    assert (
        t.eval_type == "categorical" and c["answer"] == "B" and c["letters"] == ["A", "B", "C", "D"]
    )
    assert c["messages"][0]["content"] == render_mc("2 + 2 = ?", "ABCD", ["3", "4", "5", "22"])
    assert (
        c["messages"][1]["content"] == "B"
        and c["options"][1] == "B)4"
        and c["subject"] == "elementary_mathematics"
    )
    assert t.evaluate(c, "B") == 1 and t.evaluate(c, " (B) 4") == 1 and t.evaluate(c, "A") == 0
    assert t.evaluate(c, "Because...") == 0 and t.evaluate(c, "E") == 0
    assert t[1]["answer"] == "D"
    assert MMLU("auxiliary_train", "train")[0]["answer"] == "B"
    with pytest.raises(ValueError):
        MMLU("auxiliary_train", "test")


def test_arc(fake_hub):
    from tasks.arc import ARC

    tables, _ = fake_hub
    tables[("allenai/ai2_arc", "ARC-Challenge", "test")] = [
        {
            "id": "q1",
            "question": "Which is a gas?",
            "choices": {"text": ["ice", "steam", "rock"], "label": ["A", "B", "C"]},
            "answerKey": "B",
        },
        {
            "id": "q2",
            "question": "Pick four.",
            "choices": {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]},
            "answerKey": "4",
        },
        {
            "id": "q3",
            "question": "bad",
            "choices": {"text": ["x", "y"], "label": ["A", "B"]},
            "answerKey": "C",
        },
    ]
    t = ARC("ARC-Challenge", "test")
    assert t.name == "arc_challenge" and t.eval_type == "categorical"
    assert t[0]["answer"] == "B" and t[0]["letters"] == ["A", "B", "C"]
    assert t[1]["answer"] == "D" and t[1]["options"] == ["A)one", "B)two", "C)three", "D)four"]
    assert "D) four" in t[1]["messages"][0]["content"]
    assert t.evaluate(t[1], "D") == 1 and t.evaluate(t[0], "D") == 0  # D is not a choice of q1
    with pytest.raises(ValueError, match="row 2"):
        t[2]
    with pytest.raises(ValueError):
        ARC("ARC-Hard")


def test_mixture_of_real_task_types(fake_hub, tmp_path):
    """A mid-training mixture: synthetic AQuA + custom chat + MMLU, each graded by its own task."""
    from tasks.customjson import CustomJSON
    from tasks.mmlu import MMLU
    from tasks.synthetic_aqua import SyntheticAqua

    tables, _ = fake_hub
    tables[("cais/mmlu", "all", "dev")] = [
        {"question": "q", "subject": "s", "choices": list("wxyz"), "answer": 0}
    ]
    p = tmp_path / "c.jsonl"
    p.write_text(
        json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
        + "\n"
    )
    mix = TaskMixture([SyntheticAqua("train", 20), CustomJSON(p), MMLU("all", "dev")], seed=0)
    assert len(mix) == 22 and mix.eval_type == "mixed"
    for c in mix:
        validate_messages(c["messages"])
        if c["task"] == "synthetic_aqua":
            assert mix.evaluate(c, c["messages"][1]["content"]) == 1
        if c["task"] == "mmlu":
            assert mix.evaluate(c, "A") == 1
