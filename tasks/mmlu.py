"""MMLU (cais/mmlu): 57 subjects of four-choice questions, graded categorically (the letter only).

Configs: "all" (splits test / validation / dev) and "auxiliary_train" (split train, ~100k questions
used for mid-training). Rows: question, subject, choices (4 strings), answer (0-3).
"""

from tasks.common import Task, first_letter, load_hf_dataset, render_mc

HF_PATH = "cais/mmlu"
LETTERS = ("A", "B", "C", "D")


class MMLU(Task):
    name = "mmlu"
    eval_type = "categorical"

    def __init__(self, subset: str = "all", split: str = "test", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("all", "auxiliary_train"):
            raise ValueError(f"MMLU subset must be 'all' or 'auxiliary_train', not {subset!r}")
        if subset == "auxiliary_train" and split != "train":
            raise ValueError("MMLU auxiliary_train only has split 'train'")
        self.subset, self.split = subset, split
        self.ds = load_hf_dataset(HF_PATH, subset, split)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        if "train" in row and isinstance(row["train"], dict):  # auxiliary_train rows come wrapped
            row = row["train"]
        choices, answer = row["choices"], row["answer"]
        if len(choices) != 4 or not isinstance(answer, int) or not 0 <= answer < 4:
            raise ValueError(
                f"{HF_PATH} {self.subset}/{self.split} row {index}: "
                "expected 4 choices and answer 0-3"
            )
        letter = LETTERS[answer]
        return {
            "messages": [
                {"role": "user", "content": render_mc(row["question"], LETTERS, choices)},
                {"role": "assistant", "content": letter},
            ],
            "letters": list(LETTERS),
            "answer": letter,
            "options": [f"{letter}){choice}" for letter, choice in zip(LETTERS, choices)],
            "subject": row.get("subject", ""),
        }

    def evaluate(self, conversation: dict, completion: str) -> int:
        return int(first_letter(completion, conversation["letters"]) == conversation["answer"])
