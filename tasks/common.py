"""Datasets as chat tasks: a small indexable base class, mixtures, sequences and the MC prompt.

A Task is a read-only list of conversation dicts
    {"messages": [{"role": "user", ...}, {"role": "assistant", ...}], ...extra keys}
that can be sliced (start/stop/step), shuffled deterministically by seed, and that knows how to
grade a model completion (`evaluate`). Multiple-choice tasks add the keys "letters", "answer" and
"options".

Views (subset/shuffle) never copy the data: they only hold a list of indices into the base task, so
a 100k-row task shuffled and cut to 500 rows costs 100k ints, not 100k conversations.
"""

from __future__ import annotations

import operator
import os
import random
import re
import sys


def log(msg: str) -> None:
    """Print once per job (rank 0 only under torchrun) to stderr, so that task warnings stay out of
    data written to stdout."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(msg, file=sys.stderr, flush=True)


class Task:
    """Base class: subclasses implement num_examples() and get_example(i), the rest is shared.

    start/stop/step select a sub-range of the underlying examples (python slice semantics, applied
    before shuffling); shuffle_seed, if given, permutes that sub-range deterministically.
    """

    name = "task"
    # "generative" (sample then grade) or "categorical" (compare option logits)
    eval_type = "generative"

    def __init__(
        self,
        start: int = 0,
        stop: int | None = None,
        step: int = 1,
        shuffle_seed: int | None = None,
    ):
        if step == 0:
            raise ValueError("Task step must be non-zero")
        self.start, self.stop, self.step, self.shuffle_seed = start, stop, step, shuffle_seed
        # built lazily: num_examples() may need the data loaded
        self._indices: list[int] | None = None

    # -- to implement ------------------------------------------------------------------------------
    def num_examples(self) -> int:
        """Number of underlying examples, before start/stop/step."""
        raise NotImplementedError

    def get_example(self, index: int) -> dict:
        """The conversation for underlying example `index` (0 <= index < num_examples())."""
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> int:
        """1 if `completion` (the assistant's text) answers `conversation` correctly, else 0."""
        raise NotImplementedError(f"{type(self).__name__} has no evaluate()")

    # -- shared ------------------------------------------------------------------------------------
    def _index_map(self) -> list[int]:
        if self._indices is None:
            idx = list(range(*slice(self.start, self.stop, self.step).indices(self.num_examples())))
            if self.shuffle_seed is not None:
                random.Random(self.shuffle_seed).shuffle(idx)
            self._indices = idx
        return self._indices

    def __len__(self) -> int:
        return len(self._index_map())

    def __getitem__(self, key):
        indices = self._index_map()
        if isinstance(key, slice):
            return [self.get_example(i) for i in indices[key]]
        try:
            key = operator.index(key)  # numpy / torch integers too
        except TypeError:
            raise TypeError(
                f"{type(self).__name__} indices must be int or slice, not {type(key).__name__}"
            ) from None
        if key < 0:
            key += len(indices)
        if not 0 <= key < len(indices):
            raise IndexError(f"{self.name}: index {key} out of range for {len(indices)} examples")
        return self.get_example(indices[key])

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def subset(self, start: int = 0, stop: int | None = None, step: int = 1) -> "Task":
        """A view of this task's current items [start:stop:step] (after any shuffle)."""
        return _View(self, self._index_map()[start:stop:step])

    def shuffle(self, seed: int) -> "Task":
        """A deterministically shuffled view: same seed, same order, on every machine and rank."""
        idx = list(self._index_map())
        random.Random(seed).shuffle(idx)
        return _View(self, idx)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, len={len(self)})"


class _View(Task):
    """A list of indices into a parent task (what subset() and shuffle() return)."""

    def __init__(self, parent: Task, indices: list[int]):
        super().__init__()
        self.parent = parent
        self._parent_indices = indices
        self.name = parent.name
        self.eval_type = parent.eval_type

    def num_examples(self) -> int:
        return len(self._parent_indices)

    def get_example(self, index: int) -> dict:
        return self.parent[self._parent_indices[index]]

    def evaluate(self, conversation: dict, completion: str) -> int:
        return self.parent.evaluate(conversation, completion)


class _Composite(Task):
    """What TaskMixture and TaskSequence share: a flat list of (task number, index) pairs."""

    def __init__(self, tasks: list[Task], **kwargs):
        if not tasks:
            raise ValueError(f"{type(self).__name__} needs at least one task")
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.name = "+".join(t.name for t in self.tasks)
        types = {t.eval_type for t in self.tasks}
        self.eval_type = types.pop() if len(types) == 1 else "mixed"
        self._pairs = self._build_pairs()

    def _build_pairs(self) -> list[tuple[int, int]]:
        raise NotImplementedError

    def num_examples(self) -> int:
        return len(self._pairs)

    def get_example(self, index: int) -> dict:
        t, i = self._pairs[index]
        conv = self.tasks[t][i]
        conv.setdefault("task", self.tasks[t].name)  # lets evaluate() route back to the owning task
        return conv

    def evaluate(self, conversation: dict, completion: str) -> int:
        name = conversation.get("task")
        owners = [t for t in self.tasks if t.name == name]
        if not owners:
            raise ValueError(
                f"{type(self).__name__}: conversation has task={name!r}, not one of "
                f"{[t.name for t in self.tasks]}; evaluate with the task that produced it"
            )
        return owners[0].evaluate(conversation, completion)


class TaskMixture(_Composite):
    """Every example of every task, interleaved in a deterministic shuffled order (seed).

    To up-weight a small task, pass it more than once (e.g. [smoltalk, aqua, aqua]).
    """

    def __init__(self, tasks: list[Task], seed: int = 42, **kwargs):
        self.seed = seed
        super().__init__(tasks, **kwargs)

    def _build_pairs(self) -> list[tuple[int, int]]:
        pairs = [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]
        random.Random(self.seed).shuffle(pairs)
        return pairs


class TaskSequence(_Composite):
    """Tasks one after another, in order (for curricula: easy first, hard later)."""

    def _build_pairs(self) -> list[tuple[int, int]]:
        return [(t, i) for t, task in enumerate(self.tasks) for i in range(len(task))]


def render_mc(question: str, letters, choices) -> str:
    """Prompt for a categorical multiple-choice question; the answer is the bare letter.

    The letter comes right after its choice text ("- Paris=A" style is avoided: "A) Paris" reads
    naturally and puts each letter before its text, as in AQuA-RAT's own options).
    """
    letters, choices = list(letters), list(choices)
    if len(letters) != len(choices):
        raise ValueError(f"render_mc: {len(letters)} letters but {len(choices)} choices")
    lines = [str(question).strip(), ""]
    lines += [f"{letter}) {str(choice).strip()}" for letter, choice in zip(letters, choices)]
    lines += ["", f"Reply with the letter of the correct choice ({', '.join(letters)}) only."]
    return "\n".join(lines)


def load_hf_dataset(path: str, name: str | None, split: str, hint: str = ""):
    """datasets.load_dataset, with one clear message when the Hub is unreachable or the split is
    wrong."""
    try:
        import datasets

        return datasets.load_dataset(path, name, split=split)
    except Exception as e:  # network, auth, missing split: all end the same way for the user
        what = f"{path}" + (f" ({name})" if name else "") + f" split {split!r}"
        raise RuntimeError(
            f"Could not load {what} from Hugging Face: {type(e).__name__}: {e}. "
            + (hint or "Check the network (or HF_DATASETS_OFFLINE / the local HF cache).")
        ) from e


_ROLES = ("system", "user", "assistant")
_PART_TYPES = ("text", "python", "python_output")


def validate_messages(messages) -> list[dict]:
    """Check a conversation's messages (raises ValueError naming the message) and return them.

    Rules (those of nanochat/tokenizer.render_conversation): a list of {"role", "content"} dicts; an
    optional system message first; then user/assistant alternating, starting with user and ending
    with assistant. content is a non-empty string, or (assistant only) a list of
    {"type", "text"} parts.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    body = (
        messages[1:]
        if isinstance(messages[0], dict) and messages[0].get("role") == "system"
        else messages
    )
    if len(body) < 2:
        raise ValueError("needs at least one user and one assistant message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be an object with 'role' and 'content'")
        if m["role"] not in _ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}, expected one of {_ROLES}")
        if m["role"] == "system" and i != 0:
            raise ValueError(f"message {i}: a system message may only come first")
        content = m["content"]
        if isinstance(content, str):
            if not content.strip():
                raise ValueError(f"message {i} ({m['role']}) has empty content")
        elif isinstance(content, list) and m["role"] == "assistant":
            for j, part in enumerate(content):
                if not (
                    isinstance(part, dict)
                    and part.get("type") in _PART_TYPES
                    and isinstance(part.get("text"), str)
                ):
                    raise ValueError(
                        f"message {i} part {j} must be "
                        f"{{'type': one of {_PART_TYPES}, 'text': str}}"
                    )
        else:
            raise ValueError(f"message {i} ({m['role']}) content must be a string")
    offset = len(messages) - len(body)
    for i, m in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ValueError(
                f"message {i + offset} has role {m['role']!r}, expected {expected!r} "
                "(user and assistant must alternate, starting with user)"
            )
    if body[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's (the training target)")
    return messages


def first_letter(completion: str, letters) -> str | None:
    """The choice letter a categorical completion starts with ("B", " (B)", "B) Paris", "B."), or
    None."""
    m = re.match(r"\s*\(?([A-Z])(?![A-Za-z0-9])", completion or "")
    return m.group(1) if m and m.group(1) in letters else None
