"""ARC (allenai/ai2_arc): grade-school science questions, ARC-Easy or ARC-Challenge, categorical.

Rows: id, question, choices {"text": [...], "label": [...]}, answerKey.
"""

from tasks.common import Task, first_letter, load_hf_dataset, render_mc

HF_PATH = "allenai/ai2_arc"


class ARC(Task):
    name = "arc"
    eval_type = "categorical"

    def __init__(self, subset: str = "ARC-Easy", split: str = "test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("ARC-Easy", "ARC-Challenge"):
            raise ValueError(f"ARC subset must be 'ARC-Easy' or 'ARC-Challenge', not {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train|validation|test, not {split!r}")
        self.subset, self.split = subset, split
        self.name = "arc_easy" if subset == "ARC-Easy" else "arc_challenge"
        self.ds = load_hf_dataset(HF_PATH, subset, split)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        texts, labels = row["choices"]["text"], row["choices"]["label"]
        if len(texts) != len(labels) or not 2 <= len(texts) <= 26 or row["answerKey"] not in labels:
            raise ValueError(
                f"{HF_PATH} {self.subset}/{self.split} row {index}: answerKey {row['answerKey']!r} "
                f"is not among the choice labels {labels}"
            )
        # a few rows label their choices 1-4 instead of A-D: relabel every row A, B, ... by
        # position (the answer key with them), so that every item is graded by letter
        letters = [chr(ord("A") + i) for i in range(len(texts))]
        answer = letters[labels.index(row["answerKey"])]
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], letters, texts)},
                {"role": "assistant", "content": answer},
            ],
            "letters": letters,
            "answer": answer,
            "options": [f"{letter}){text}" for letter, text in zip(letters, texts)],
        }

    def evaluate(self, conversation: dict, completion: str) -> int:
        return int(first_letter(completion, conversation["letters"]) == conversation["answer"])
