"""GSM8K (openai/gsm8k, "main"): grade-school math word problems with worked solutions.

The reference solution marks calculator steps as "<<48/2=24>>" and ends with "#### 72". The target
keeps the worked solution without the calculator marks and ends with "Answer: 72", the same closing
line style as the AQuA tasks. Grading is generative: the number after the last "Answer:" (or "####")
in the completion must equal the reference number.
"""

import re

from tasks.common import Task, load_hf_dataset

HF_PATH = "openai/gsm8k"
_CALC = re.compile(r"<<[^<>]*>>")
_FINAL = re.compile(r"(?:Answer:|####)\s*\$?\s*(-?[\d,]*\.?\d+)", re.I)


def parse_number(s: str) -> float | None:
    try:
        return float(s.replace(",", ""))
    except (ValueError, AttributeError):
        return None


def extract_answer(completion: str) -> str | None:
    """The number after the last "Answer:" / "####" in a completion, as written (commas removed)."""
    hits = _FINAL.findall(completion or "")
    return hits[-1].replace(",", "") if hits else None


def gsm8k_target(solution: str) -> tuple[str, str]:
    """(assistant target, final number) from a GSM8K reference solution."""
    if "####" not in solution:
        raise ValueError("solution has no '#### <answer>' line")
    body, final = solution.rsplit("####", 1)
    final = final.strip().replace(",", "")
    if parse_number(final) is None:
        raise ValueError(f"final answer {final!r} is not a number")
    body = _CALC.sub("", body).strip()
    return (body + "\n" if body else "") + f"Answer: {final}", final


class GSM8K(Task):
    name = "gsm8k"
    eval_type = "generative"

    def __init__(self, subset: str = "main", split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if subset not in ("main", "socratic") or split not in ("train", "test"):
            raise ValueError(
                "GSM8K subset must be main|socratic and split train|test, "
                f"got {subset!r}, {split!r}"
            )
        self.split = split
        self.ds = load_hf_dataset(HF_PATH, subset, split)

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        row = self.ds[index]
        try:
            target, final = gsm8k_target(row["answer"])
        except ValueError as e:
            raise ValueError(f"{HF_PATH} {self.split} row {index}: {e}") from None
        return {
            "messages": [
                {"role": "user", "content": row["question"].strip()},
                {"role": "assistant", "content": target},
            ],
            "answer": final,
        }

    def evaluate(self, conversation: dict, completion: str) -> int:
        got, ref = parse_number(extract_answer(completion)), parse_number(conversation["answer"])
        return int(got is not None and ref is not None and abs(got - ref) < 1e-6)
