"""BPE tokenizer: trained with our Rust `rustbpe`, encoded with `tiktoken`, plus chat rendering.

Why two libraries: rustbpe learns merges fast from a text stream; tiktoken encodes fast and is the
de-facto format for byte-level BPE. The learned merges are just a `{token_bytes: rank}` table plus
the regex split pattern, which is all tiktoken needs.

Ids: 0..255 are the raw bytes, 256.. are the merges in learning order, and the special tokens get
the ids right after the last merge. Special tokens are only ever produced by `encode_special` /
the chat renderer: text that *looks* like "<|bos|>" is encoded as ordinary bytes, so user data can
never inject control tokens.

On disk (`<base>/tokenizer/`, or NANOCHAT_TOKENIZER_DIR: run_aquarat_small.sh gives each run
its own, `<base>/runs/<run>/tokenizer/`):
  tokenizer.tiktoken   the mergeable ranks, tiktoken's own format ("<base64 bytes> <rank>" per
                       line; `tiktoken.load.load_tiktoken_bpe` reads it)
  tokenizer.json       split pattern, special tokens, vocab size, the ranks file's sha256, meta
  token_bytes.pt       int32 [vocab]: bytes each id stands for (0 for specials), for bits per byte
Every file is written to a temp name and renamed; tokenizer.json is written last and carries the
hash of the ranks file, so a save that died half-way is detected on load instead of mixing.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import tiktoken

if TYPE_CHECKING:
    import torch

from nanochat.files import atomic_path, write_bytes_atomic, write_text_atomic

SPECIAL_TOKENS = [
    "<|bos|>",  # begins every document; the model's "start of text"
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",  # the assistant calls the python tool
    "<|output_start|>",
    "<|output_end|>",  # the tool's output, fed back (never trained on)
]

# GPT-4 (cl100k) style split, except digits are grouped by at most 2 instead of 3: with a small
# vocabulary, spending merges on every 3-digit number is wasteful, and 1-2 digit chunks keep
# arithmetic in AQuA-style problems more regular.
SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}"""
    r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)


def split_pattern(max_digits: int = 2) -> str:
    """SPLIT_PATTERN with digit runs chunked by at most max_digits (1-3; 3 is GPT-4's choice). Three
    lets a vocabulary that can afford it hold every number below 1000 as one token, which makes
    "which option holds 120?" a one-token match instead of a two-token one (120 vs 126 vs 12)."""
    if max_digits not in (1, 2, 3):
        raise ValueError(f"max_digits must be 1, 2 or 3, got {max_digits}")
    return SPLIT_PATTERN.replace(r"\p{N}{1,2}", rf"\p{{N}}{{1,{max_digits}}}")


RANKS_FILE = "tokenizer.tiktoken"
CONFIG_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.pt"
FORMAT_NAME = "nanochat-aquarat-tokenizer"
FORMAT_VERSION = 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Tokenizer:
    """A byte-level BPE tokenizer with chat special tokens.

    Build it with `train_from_iterator`, `load`, or the constructor: a split pattern and the
    merges as {token bytes: rank} (or rustbpe's [(bytes, rank)]); the special tokens default to
    SPECIAL_TOKENS numbered right after the merges."""

    def __init__(
        self,
        pattern: str,
        mergeable_ranks,
        special_tokens: dict[str, int] | None = None,
        meta: dict | None = None,
    ):
        pairs = list(
            mergeable_ranks.items() if isinstance(mergeable_ranks, dict) else mergeable_ranks
        )
        ranks = {bytes(tok): int(rank) for tok, rank in pairs}  # a dict or rustbpe's pairs
        if len(ranks) != len(pairs):
            raise ValueError("mergeable ranks contain the same token bytes twice")
        n = len(ranks)
        if sorted(ranks.values()) != list(range(n)):
            raise ValueError(f"mergeable ranks must be exactly 0..{n - 1} with no gaps or repeats")
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            # Without every single byte some text would be unencodable.
            raise ValueError(
                f"mergeable ranks lack {len(missing)} of the 256 single bytes "
                f"(e.g. byte {missing[0]})"
            )
        if special_tokens is None:
            special_tokens = {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
        special_tokens = dict(special_tokens)
        absent = [name for name in SPECIAL_TOKENS if name not in special_tokens]
        if absent:
            raise ValueError(f"special tokens {absent} are missing (need all of {SPECIAL_TOKENS})")
        if sorted(special_tokens.values()) != list(range(n, n + len(special_tokens))):
            raise ValueError(
                f"special token ids must follow the merges: {n}..{n + len(special_tokens) - 1}"
            )
        self.pattern = pattern
        self.mergeable_ranks = ranks
        self.special_tokens = special_tokens
        self.meta = dict(meta or {})
        self.enc = tiktoken.Encoding(
            name=f"nanochat-aquarat-{n + len(special_tokens)}",
            pat_str=pattern,
            mergeable_ranks=ranks,
            special_tokens=special_tokens,
        )
        self.bos_token_id = special_tokens["<|bos|>"]
        self.directory: Path | None = None  # where load() read it from
        self._fingerprint: dict | None = None  # computed once: the ranks never change

    # ------------------------------------------------------------------ construction
    @classmethod
    def train_from_iterator(
        cls, text_iterator, vocab_size: int, pattern: str = SPLIT_PATTERN, buffer_size: int = 8192
    ) -> "Tokenizer":
        """Learn merges with rustbpe so that merges + specials = vocab_size ids in total."""
        n_special = len(SPECIAL_TOKENS)
        if vocab_size < 256 + n_special:
            raise ValueError(
                f"vocab_size={vocab_size} is too small: need at least 256 byte tokens "
                f"+ {n_special} special tokens = {256 + n_special}"
            )
        import rustbpe

        if not hasattr(rustbpe, "Tokenizer"):
            raise RuntimeError(
                "this rustbpe build has no Tokenizer class; rebuild it "
                "(uv sync --reinstall-package rustbpe)"
            )
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(
            text_iterator, vocab_size - n_special, buffer_size=buffer_size, pattern=pattern
        )
        return cls(bpe.get_pattern(), bpe.get_mergeable_ranks())

    @classmethod
    def load(cls, directory) -> "Tokenizer":
        directory = Path(directory)
        config_path, ranks_path = directory / CONFIG_FILE, directory / RANKS_FILE
        for path in (config_path, ranks_path):
            if not path.is_file():
                raise FileNotFoundError(
                    f"tokenizer file {path} is missing; "
                    "train one with `uv run python -m scripts.tok_train`"
                )
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{config_path} is not valid JSON ({exc}); "
                "re-run `uv run python -m scripts.tok_train`"
            ) from exc
        if config.get("format") != FORMAT_NAME:
            raise ValueError(
                f"{config_path} is not a {FORMAT_NAME} file (format={config.get('format')!r})"
            )
        raw = ranks_path.read_bytes()
        if config.get("ranks_sha256") != _sha256(raw):
            raise ValueError(
                f"{ranks_path} does not match {config_path} (a save was interrupted or a file was "
                f"replaced); re-run `uv run python -m scripts.tok_train`"
            )
        ranks = {}
        for lineno, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as exc:
                raise ValueError(
                    f"{ranks_path}:{lineno}: expected '<base64 token> <rank>', got {line[:60]!r}"
                ) from exc
        tok = cls(config["pattern"], ranks, config["special_tokens"], config.get("meta"))
        tok.directory = directory
        return tok

    def _ranks_file_bytes(self) -> bytes:
        lines = [
            f"{base64.b64encode(tok).decode('ascii')} {rank}"
            for tok, rank in sorted(self.mergeable_ranks.items(), key=lambda kv: kv[1])
        ]
        return ("\n".join(lines) + "\n").encode("ascii")

    def fingerprint(self) -> dict:
        """What a checkpoint records of the tokenizer it was trained with: a model only makes sense
        with exactly these merges (ids mean tokens), so loading it with another one is refused."""
        if self._fingerprint is None:
            self._fingerprint = {
                "vocab_size": self.get_vocab_size(),
                "ranks_sha256": _sha256(self._ranks_file_bytes()),
            }
        return dict(self._fingerprint)

    def save(self, directory) -> Path:
        """Write the three files into `directory` (created if needed); returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        raw = self._ranks_file_bytes()
        write_bytes_atomic(directory / RANKS_FILE, raw)
        with atomic_path(directory / TOKEN_BYTES_FILE) as tmp:
            import torch  # torch is imported where used: tok_eval starts seconds faster

            torch.save(self.token_bytes(), tmp)
        config = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "vocab_size": self.get_vocab_size(),
            "num_merges": len(self.mergeable_ranks) - 256,
            "pattern": self.pattern,
            "special_tokens": self.special_tokens,
            "ranks_file": RANKS_FILE,
            "ranks_sha256": _sha256(raw),
            "meta": self.meta,
        }
        write_text_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return directory

    # ------------------------------------------------------------------ vocabulary
    def get_vocab_size(self) -> int:
        return self.enc.n_vocab

    def get_bos_token_id(self) -> int:
        return self.bos_token_id

    def get_special_tokens(self) -> list[str]:
        return list(self.special_tokens)

    def get_pattern(self) -> str:
        return self.pattern

    def get_mergeable_ranks(self) -> dict[bytes, int]:
        return dict(self.mergeable_ranks)

    def encode_special(self, name: str) -> int:
        try:
            return self.special_tokens[name]
        except KeyError:
            raise ValueError(
                f"unknown special token {name!r}; known: {self.get_special_tokens()}"
            ) from None

    def id_to_token(self, token_id: int) -> str:
        """The text of one id (bytes that are not valid UTF-8 on their own show as U+FFFD)."""
        return self.enc.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")

    def token_bytes(self) -> torch.Tensor:
        """int32 [vocab]: UTF-8 bytes each id stands for, 0 for specials (they are not text)."""
        import torch

        out = torch.zeros(self.get_vocab_size(), dtype=torch.int32)
        for tok, rank in self.mergeable_ranks.items():
            out[rank] = len(tok)
        return out

    # ------------------------------------------------------------------ encode / decode
    def _to_id(self, token) -> int:
        if isinstance(token, str):
            return self.encode_special(token)
        if isinstance(token, int) and 0 <= token < self.get_vocab_size():
            return token
        raise ValueError(
            "prepend/append must be a special token name or an id in "
            f"[0, {self.get_vocab_size()}), "
            f"got {token!r}"
        )

    def encode(self, text, prepend=None, append=None, num_threads: int = 8):
        """str -> list[int]; list[str] -> list[list[int]]. Special-token text stays plain text.
        prepend/append: an id or a special token name added to each sequence."""
        pre = [self._to_id(prepend)] if prepend is not None else []
        post = [self._to_id(append)] if append is not None else []
        if isinstance(text, str):
            return pre + self.enc.encode_ordinary(text) + post
        if isinstance(text, (list, tuple)):
            bad = [i for i, t in enumerate(text) if not isinstance(t, str)]
            if bad:
                raise TypeError(
                    f"encode() got a list whose item {bad[0]} is "
                    f"{type(text[bad[0]]).__name__}, not str"
                )
            return [
                pre + ids + post
                for ids in self.enc.encode_ordinary_batch(list(text), num_threads=num_threads)
            ]
        raise TypeError(f"encode() takes a str or a list of str, got {type(text).__name__}")

    def encode_array(self, text: str, prepend=None) -> np.ndarray:
        """encode() of one text as an int32 array, made without a Python int per token (what the
        pretraining loader packs). tiktoken releases the GIL while it tokenises, so threads
        calling this run on as many cores as they have."""
        ids = self.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        if prepend is None:
            return ids.astype(np.int32)
        out = np.empty(len(ids) + 1, dtype=np.int32)
        out[0], out[1:] = self._to_id(prepend), ids
        return out

    __call__ = encode

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.get_vocab_size()]
        if bad:
            raise ValueError(f"cannot decode id {bad[0]}: vocab has {self.get_vocab_size()} ids")
        return self.enc.decode(ids)

    # ------------------------------------------------------------------ chat rendering
    def render_conversation(
        self, conversation: dict, max_tokens: int | None = 2048
    ) -> tuple[list[int], list[int]]:
        """Token ids of a whole conversation and a loss mask of the same length: 1 exactly on what
        the assistant must learn to produce (its text, its python calls with their delimiters, and
        <|assistant_end|>), 0 on everything else (bos, user turns, <|assistant_start|>, tool
        output).
        Truncated to max_tokens (None: no truncation)."""
        messages = _validated_messages(conversation)
        ids, mask = [], []

        def add(tokens, m):
            ids.extend(tokens)
            mask.extend([m] * len(tokens))

        sp = self.special_tokens
        add([self.bos_token_id], 0)
        for msg in messages:
            if msg["role"] == "user":
                add([sp["<|user_start|>"]], 0)
                add(self.encode(msg["content"]), 0)
                add([sp["<|user_end|>"]], 0)
                continue
            add([sp["<|assistant_start|>"]], 0)  # the prompt supplies it at inference time
            content = msg["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for part in parts:
                text_ids = self.encode(part["text"])
                if part["type"] == "text":
                    add(text_ids, 1)
                elif part["type"] == "python":  # the model writes the call, delimiters included
                    add([sp["<|python_start|>"]] + text_ids + [sp["<|python_end|>"]], 1)
                else:  # python_output comes from the tool: never trained to predict it
                    add([sp["<|output_start|>"]] + text_ids + [sp["<|output_end|>"]], 0)
            add([sp["<|assistant_end|>"]], 1)  # learning to stop is part of the answer
        if max_tokens is not None:
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
            ids, mask = ids[:max_tokens], mask[:max_tokens]
        return ids, mask

    def render_for_completion(self, conversation: dict) -> list[int]:
        """Prompt ids for sampling: the conversation minus its final assistant message (which must
        be last), followed by <|assistant_start|> so the model continues as the assistant."""
        messages = _validated_messages(conversation)
        if messages[-1]["role"] != "assistant":
            raise ValueError(
                "render_for_completion expects the conversation to end with the assistant message "
                f"to be completed; it ends with role {messages[-1]['role']!r}"
            )
        ids, _ = self.render_conversation({"messages": messages[:-1]}, max_tokens=None)
        return ids + [self.special_tokens["<|assistant_start|>"]]


PART_TYPES = ("text", "python", "python_output")


def _content_text(content, where: str) -> str:
    """User/system content: a string, or a list of text parts joined together."""
    if isinstance(content, list):
        if any(
            not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str)
            for p in content
        ):
            raise ValueError(
                f"{where}: a list content may only hold {{'type': 'text', 'text': str}} parts"
            )
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise ValueError(
            f"{where}: content must be a str or a list of parts, got {type(content).__name__}"
        )
    if not content.strip():
        raise ValueError(f"{where}: content is empty")
    return content


def _validated_messages(conversation) -> list[dict]:
    """Check the conversation shape and return its messages with any system prompt merged into the
    first user message. Raises ValueError naming the offending message."""
    if not isinstance(conversation, dict):
        raise ValueError(
            "a conversation must be a dict with a 'messages' list, "
            f"got {type(conversation).__name__}"
        )
    messages = conversation.get("messages")
    if not isinstance(messages, list):
        raise ValueError("conversation has no 'messages' list")
    if not messages:
        raise ValueError("conversation has an empty 'messages' list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"messages[{i}] must be a dict, got {type(msg).__name__}")
        if msg.get("role") not in ("system", "user", "assistant"):
            raise ValueError(
                f"messages[{i}] has unknown role {msg.get('role')!r} "
                "(expected system, user or assistant)"
            )
        if "content" not in msg:
            raise ValueError(f"messages[{i}] ({msg['role']}) has no 'content'")

    out = []
    start = 0
    system = None
    if messages[0]["role"] == "system":
        system = _content_text(messages[0]["content"], "messages[0] (system)")
        start = 1
        if len(messages) < 2 or messages[1]["role"] != "user":
            raise ValueError("a system message must be followed by a user message")
    for i, msg in enumerate(messages[start:], start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msg["role"] != expected:
            rule = (
                "a system message may only come first"
                if msg["role"] == "system"
                else "roles alternate user/assistant, starting with user"
            )
            raise ValueError(
                f"messages[{i}] has role {msg['role']!r} but {expected!r} was expected ({rule})"
            )
        where = f"messages[{i}] ({msg['role']})"
        if msg["role"] == "user":
            text = _content_text(msg["content"], where)
            # the chat format has no system role: prepend it to the first user turn
            if system is not None:
                text = system + "\n\n" + text
                system = None
            out.append({"role": "user", "content": text})
            continue
        content = msg["content"]
        if isinstance(content, str):
            if not content.strip():
                raise ValueError(f"{where}: content is empty")
        elif isinstance(content, list):
            if not content:
                raise ValueError(f"{where}: content is an empty list of parts")
            for j, part in enumerate(content):
                if (
                    not isinstance(part, dict)
                    or part.get("type") not in PART_TYPES
                    or not isinstance(part.get("text"), str)
                ):
                    raise ValueError(
                        f"{where}: part {j} must be "
                        f"{{'type': one of {PART_TYPES}, 'text': str}}, got {part!r:.80}"
                    )
        else:
            raise ValueError(
                f"{where}: content must be a str or a list of parts, got {type(content).__name__}"
            )
        out.append({"role": "assistant", "content": content})
    return out


# ---------------------------------------------------------------------- the project's tokenizer
def tokenizer_dir() -> Path:
    """NANOCHAT_TOKENIZER_DIR when set (run_aquarat_small.sh sets one per run), else
    <base>/tokenizer."""
    from nanochat.files import get_base_dir

    return Path(os.environ.get("NANOCHAT_TOKENIZER_DIR") or get_base_dir() / "tokenizer")


def get_tokenizer(directory=None) -> Tokenizer:
    """The tokenizer in `directory` (default tokenizer_dir())."""
    directory = Path(directory) if directory is not None else tokenizer_dir()
    if not (directory / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"no tokenizer at {directory}: train one first with "
            "`uv run python -m scripts.tok_train` "
            f"(same NANOCHAT_BASE_DIR and NANOCHAT_TOKENIZER_DIR)"
        )
    return Tokenizer.load(directory)


def get_token_bytes(device="cpu", directory=None) -> torch.Tensor:
    """1-D int32 tensor [vocab]: bytes per token id (0 for specials), for bits-per-byte."""
    import torch

    directory = Path(directory) if directory is not None else tokenizer_dir()
    path = directory / TOKEN_BYTES_FILE
    if path.is_file():
        token_bytes = torch.load(path, map_location="cpu")
    else:  # older/hand-made dirs: derive it from the tokenizer itself
        token_bytes = get_tokenizer(directory).token_bytes()
    return token_bytes.to(device)


def tokenizer_record(tokenizer: Tokenizer) -> dict:
    """For checkpoint meta: where the tokenizer lives (relative to the base dir when inside it, so
    a base dir fetched from a GPU node to a laptop still resolves) and its fingerprint."""
    from nanochat.files import get_base_dir

    directory = Path(tokenizer.directory or tokenizer_dir()).resolve()
    try:
        where = str(directory.relative_to(get_base_dir().resolve()))
    except ValueError:
        where = str(directory)
    return {"dir": where, **tokenizer.fingerprint()}
