"""Conversations from a local JSON-lines file: how to add your own chat data to mid-training or SFT.

Each non-blank line is either a list of messages or an object with a "messages" list:
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, ...]}
Every line is validated when the task is created (tasks.common.validate_messages); the first bad
line raises a ValueError naming file:line and the problem, so nothing trains on a half-valid file.
"""

import json
from pathlib import Path

from tasks.common import Task, validate_messages


class CustomJSON(Task):
    name = "customjson"
    eval_type = "generative"

    def __init__(self, path, **kwargs):
        super().__init__(**kwargs)
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"CustomJSON: {self.path} does not exist")
        self.conversations = []
        with open(self.path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{self.path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
                messages = obj.get("messages") if isinstance(obj, dict) else obj
                if isinstance(obj, dict) and "messages" not in obj:
                    raise ValueError(f"{where}: an object line needs a 'messages' list")
                try:
                    validate_messages(messages)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                self.conversations.append(
                    [{"role": m["role"], "content": m["content"]} for m in messages]
                )
        if not self.conversations:
            raise ValueError(f"CustomJSON: {self.path} holds no conversations")

    def num_examples(self) -> int:
        return len(self.conversations)

    def get_example(self, index: int) -> dict:
        return {"messages": [dict(m) for m in self.conversations[index]]}
