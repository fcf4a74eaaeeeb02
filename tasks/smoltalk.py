"""SmolTalk (HuggingFaceTB/smol-smoltalk): general chat conversations for mid-training and SFT.

Splits "train" (~460k conversations) and "test" (~24k). Rows are {"messages": [{"role",
"content"}, ...]} with an optional system message first. A row that breaks the chat rules raises a
ValueError naming its index when it is read: rows are checked lazily, since validating 460k rows up
front costs more than it saves.
"""

from tasks.common import Task, load_hf_dataset, validate_messages

HF_PATH = "HuggingFaceTB/smol-smoltalk"


class SmolTalk(Task):
    name = "smoltalk"
    eval_type = "generative"

    def __init__(self, split: str = "train", **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be 'train' or 'test', not {split!r}")
        self.split = split
        self.ds = load_hf_dataset(
            HF_PATH,
            None,
            split,
            hint="SmolTalk is only used for mid-training/SFT "
            "mixtures; on an offline machine leave it out (e.g. use the synthetic mixture).",
        )

    def num_examples(self) -> int:
        return len(self.ds)

    def get_example(self, index: int) -> dict:
        messages = self.ds[index]["messages"]
        try:
            validate_messages(messages)
        except ValueError as e:
            raise ValueError(f"{HF_PATH} {self.split} row {index}: {e}") from None
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
