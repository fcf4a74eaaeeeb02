"""AQuA-RAT (DeepMind, 2017): ~100k algebra word problems, five options A-E, a written rationale.

Sources, in the same example order whichever is used:
  - Hugging Face `deepmind/aqua_rat` ("raw" config; splits train/validation/test),
  - a local directory with prepared JSONL (`train.jsonl`, `validation.jsonl`, `test.jsonl`, written
    by `python -m scripts.prepare_aqua`), or the ORIGINAL JSON-lines files of the AQuA-RAT
    repository (`train.json`, `dev.json` = validation, `test.json`).
With data_dir=None, `<base>/data/aqua_rat/<split>.jsonl` is used when prepare_aqua has written it,
otherwise the Hub.

Each item is a chat conversation:
  user:      the question, the five options one per line, and the instruction AQUA_INSTRUCTION
  assistant: the rationale (its own trailing answer statement removed, see clean_rationale)
             followed by exactly one final line "Answer: X"
plus "letters" (A-E), "answer" (the gold letter) and "options" (["A)21.5", ...]).

Grading is generative: extract_letter(completion) must name the gold letter.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tasks.common import Task, load_hf_dataset, log

AQUA_LETTERS = ("A", "B", "C", "D", "E")
ANSWER_PREFIX = "Answer:"  # the final line of every target is f"{ANSWER_PREFIX} {letter}"
_FINAL_ANSWER = re.compile(r"(?:^|\n)Answer: [A-E]\s*\Z")  # a well-formed completion's end
AQUA_INSTRUCTION = 'Solve step by step, then end with the line "Answer: <letter>".'
HF_PATH, HF_CONFIG = "deepmind/aqua_rat", "raw"
SPLITS = ("train", "validation", "test")
ORIGINAL_FILES = {"train": "train.json", "validation": "dev.json", "test": "test.json"}

_OFFLINE_HINT = (
    "AQuA-RAT needs the Hugging Face Hub or a local copy: pass data_dir= (scripts: --data-dir) "
    "pointing at a folder with the original train.json/dev.json/test.json, or run "
    "`python -m scripts.prepare_aqua --source-dir <that folder>` once to write "
    "<base>/data/aqua_rat/*.jsonl, which is then used by default."
)


# ------------------------------------------------------------------------------------------------
# Rows: parsing and validation


class BadRow(ValueError):
    """A row that breaks the AQuA-RAT format (reason in the message)."""


_OPTION_RE = re.compile(r"^\s*([A-Za-z])\s*\)(.*)$", re.S)


def parse_option(option: str) -> tuple[str, str]:
    """ "A)21.5" -> ("A", "21.5"); also accepts "A) 21.5". Raises BadRow on anything else."""
    if not isinstance(option, str):
        raise BadRow(f"option {option!r} is not a string")
    m = _OPTION_RE.match(option)
    if not m:
        raise BadRow(f"option {option!r} is not of the form 'A)value'")
    return m.group(1), m.group(2).strip()


def validate_row(row) -> dict:
    """Check one raw row and return it normalised: question, values (5), options, rationale and
    correct."""
    if not isinstance(row, dict):
        raise BadRow(f"row is a {type(row).__name__}, expected an object")
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise BadRow("question is missing or empty")
    options = row.get("options")
    if not isinstance(options, (list, tuple)) or len(options) != 5:
        n = len(options) if isinstance(options, (list, tuple)) else type(options).__name__
        raise BadRow(f"expected exactly 5 options A-E, got {n}")
    values = []
    for expected, option in zip(AQUA_LETTERS, options):
        letter, value = parse_option(option)
        if letter != expected:
            raise BadRow(
                f"option {option!r} should be labelled {expected} (options must be A-E in order)"
            )
        if not value:
            raise BadRow(f"option {expected} has no value")
        values.append(value)
    correct = row.get("correct")
    if not isinstance(correct, str) or correct.strip() not in AQUA_LETTERS:
        raise BadRow(f"correct={correct!r} is not one of A-E")
    rationale = row.get("rationale") or ""
    if not isinstance(rationale, str):
        raise BadRow("rationale is not a string")
    return {
        "question": question.strip(),
        "values": values,
        "options": [f"{letter}){v}" for letter, v in zip(AQUA_LETTERS, values)],
        "rationale": rationale.strip(),
        "correct": correct.strip(),
    }


def iter_validated(
    rows, split: str, source: str, on_bad_row: str = "skip", max_examples: int | None = None
):
    """Yield normalised rows; a bad row is reported (split, index, source) and skipped or raised."""
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', not {on_bad_row!r}")
    kept, bad = 0, []
    for index, row in enumerate(rows):
        if max_examples is not None and kept >= max_examples:
            break
        try:
            if isinstance(row, BadRow):  # a line that was not even JSON
                raise row
            yield validate_row(row)
            kept += 1
        except BadRow as e:
            msg = f"AQuA-RAT {split} row {index} ({source}): {e}"
            if on_bad_row == "error":
                raise BadRow(
                    msg + " (on_bad_row='skip' / --on-bad-row skip drops such rows)"
                ) from None
            bad.append(msg)
    if bad:
        shown = "\n  ".join(bad[:5]) + (f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        log(f"AQuA-RAT {split}: skipped {len(bad)} bad row(s) from {source}:\n  {shown}")


def read_jsonl_rows(path: Path):
    """Rows of a JSON-lines file; a line that is not UTF-8 or not JSON becomes a BadRow (reported by
    index). A UTF-16 file (what some Windows editors save) is refused as a whole, naming the fix."""
    with open(path, "rb") as f:
        head = f.read(4)
        if head[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\0" in head:
            raise ValueError(
                f"{path} is UTF-16 text, not UTF-8: convert it, e.g. "
                f"iconv -f UTF-16 -t UTF-8 {path} > {Path(path).stem}.utf8.json"
            )
        f.seek(3 if head[:3] == b"\xef\xbb\xbf" else 0)  # a UTF-8 byte-order mark is harmless
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadRow(
                    f"line {lineno} is not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                    f"{e.start + 1}): re-save the file as UTF-8"
                )
                continue
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield BadRow(f"line {lineno} is not valid JSON ({e.msg})")


def default_data_dir() -> Path:
    """<base>/data/aqua_rat: where scripts.prepare_aqua writes and AquaRat looks first."""
    from nanochat.files import get_base_dir

    return get_base_dir() / "data" / "aqua_rat"


def find_local_file(data_dir, split: str) -> Path | None:
    """Prepared `<split>.jsonl` if present, else the original AQuA-RAT file name, else None."""
    data_dir = Path(data_dir)
    for name in (f"{split}.jsonl", ORIGINAL_FILES[split]):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def load_rows(
    split: str,
    data_dir=None,
    on_bad_row: str = "skip",
    max_examples: int | None = None,
    use_prepared: bool = True,
) -> tuple[list[dict], str]:
    """Validated, normalised rows of one split and a description of where they came from.

    data_dir given: that folder only. Otherwise <base>/data/aqua_rat/<split>.jsonl when present
    (and use_prepared), else the Hugging Face Hub.
    """
    if split not in SPLITS:
        raise ValueError(f"AQuA-RAT split must be one of {SPLITS}, not {split!r}")
    if data_dir is not None:
        path = find_local_file(data_dir, split)
        if path is None:
            raise FileNotFoundError(
                f"No AQuA-RAT {split} file in {data_dir}: expected {split}.jsonl "
                f"(scripts.prepare_aqua) or {ORIGINAL_FILES[split]} (original AQuA-RAT)"
            )
    elif use_prepared:
        # only prepare_aqua's own output is picked up implicitly
        path = default_data_dir() / f"{split}.jsonl"
        path = path if path.is_file() else None
    else:
        path = None
    if path is not None:
        rows = read_jsonl_rows(path)
        source = str(path)
    else:
        rows = load_hf_dataset(HF_PATH, HF_CONFIG, split, hint=_OFFLINE_HINT)
        source = f"hf:{HF_PATH}/{HF_CONFIG}"
    return list(iter_validated(rows, split, source, on_bad_row, max_examples)), source


# ------------------------------------------------------------------------------------------------
# Extracting the committed answer letter from free text

# The letter itself is case-sensitive even inside case-insensitive patterns: "a" and "c" are words
# and variables, never answers.
_L = r"(?<![A-Za-z0-9])\(?(?-i:(?P<letter>[A-E]))(?![A-Za-z0-9])\)?"
# separators between "answer" and the letter; each repetition consumes a keyword (no regex blow-up)
_SEP = (
    r"(?:\s*(?:is|was|will\s+be|would\s+be|should\s+be|must\s+be|shall\s+be|=|:|-|–|—|->|=>|⇒))*\s*"
)
_OPT = r"(?:(?:option|choice)\s*[:\-]?\s*)?"
_ANSWER_PATTERNS = [
    # "Answer: C", "the answer is (C)", "ANSWER:C", "Ans - C", "answer will be option C",
    # "Answer = E"
    re.compile(r"\b(?:answer|ans)\b" + _SEP + _OPT + _L, re.I),
    # "correct option is B", "CORRECT OPTION:OPTION E", "right choice: D"
    re.compile(r"\b(?:correct|right|best)\s+(?:option|choice)" + _SEP + _OPT + _L, re.I),
    # "C is the correct option", "E is the answer", "Therefore A is correct"
    re.compile(_L + r"\s+is\s+(?:the\s+)?(?:correct|right|answer)\b", re.I),
    # "option C is correct", "choice (B) is the right one"
    re.compile(
        r"\b(?:option|choice)\s*[:\-]?\s*" + _L + r"\s+is\s+(?:the\s+)?(?:correct|right|answer)\b",
        re.I,
    ),
    # "Option C" / "So, choice B." as a whole line or closing sentence
    re.compile(
        r"(?:^|[.!?;:]\s+)(?:(?:so|thus|hence|therefore|the|final|correct|right)[,\s]+)*"
        r"(?:option|choice)\s*[:\-]?\s*" + _L + r"[ \t]*[.!]?[ \t]*$",
        re.I | re.M,
    ),
    # "=> C", "==> D", "∴ B" closing a line
    re.compile(r"(?:=>|==>|⇒|->|→|∴)\s*" + _L + r"[ \t]*[.!]?[ \t]*$", re.M),
]
# Words that may follow an answer letter on the same line without making it suspicious.
_OK_NEXT_WORDS = {
    "is",
    "as",
    "since",
    "because",
    "which",
    "with",
    "here",
    "option",
    "choice",
    "correct",
    "right",
    "would",
    "will",
    "should",
    "must",
    "the",
    "it",
    "so",
    "hence",
    "thus",
    "therefore",
    "for",
    "from",
    "after",
    "by",
    "given",
    "i",
    "we",
    "answer",
    "only",
    "seems",
    "looks",
    "fits",
}
_AFTER_BAD = re.compile(
    r"""^(?:\s*(?:or|and|/|,|&)\s*\(?(?-i:[A-E])(?![A-Za-z0-9])  # "A or B": undecided
         |['’]s\b                                         # "A's share": a person
         |[ \t]*[=<>+*/^]                                 # "A = 5": a variable
       )""",
    re.I | re.X,
)
_NEXT_WORD = re.compile(r"^[ \t]+([a-z]+)\b")
_BARE_LINE = re.compile(r"^\s*\(?(?-i:([A-E]))\)?[.!]?\s*$")


def _letter_ok(text: str, m: re.Match) -> bool:
    after = text[m.end("letter") :]
    if after.startswith(")"):
        after = after[1:]
    if _AFTER_BAD.match(after):
        return False
    w = _NEXT_WORD.match(after)
    return not (w and w.group(1) not in _OK_NEXT_WORDS)  # "the answer is A bit larger" is prose


def find_answer_statements(text: str) -> list[tuple[int, int, str]]:
    """All explicit answer statements as (start, end, letter), sorted by position."""
    found = []
    for pat in _ANSWER_PATTERNS:
        for m in pat.finditer(text):
            if _letter_ok(text, m):
                found.append((m.start(), m.end(), m.group("letter")))
    lines = [ln for ln in text.rstrip().split("\n")]
    if lines:  # a final line that is nothing but a letter ("D", "(D)", "D.") commits to it
        m = _BARE_LINE.match(lines[-1])
        if m:
            start = len(text.rstrip()) - len(lines[-1])
            found.append((start, start + len(lines[-1]), m.group(1)))
    found.sort(key=lambda x: (x[1], x[0]))
    return found


_CURRENCY = r"(?:\$|₹|£|€|rs\.?|inr|usd)"
_NUM = (
    r"[-+−]?(?:\d+\s+\d+/\d+"  # a mixed number: 2 1/2
    r"|\d+(?:\.\d+)?/\d+(?:\.\d+)?"  # a fraction: 16/7
    r"|\d{1,3}(?:,\d{3})+(?:\.\d+)?"  # thousands separators: 1,200.50
    r"|\d+(?:\.\d+)?|\.\d+)"  # plain: 12, 3.5, .5
)
_VALUE_RE = re.compile(
    r"^\s*" + _CURRENCY + r"?\s*(" + _NUM + r")\s*(?:" + _CURRENCY + r"|[a-z%°²³/.\s])*$", re.I
)
# a number in running text; "25km" counts, "2x" (a coefficient) and "x2" do not
_NUM_IN_TEXT = re.compile(
    r"(?:(?<=[Rr]s\.)|(?<![\w.]))" + _NUM + r"(?![\d/]|\.\d|,\d|[xyznk](?![a-z]))"
)


def _to_float(s: str) -> float | None:
    s = s.replace(",", "").replace("−", "-").strip()
    try:
        if " " in s:  # mixed number "3 1/2"
            whole, frac = s.split(None, 1)
            n, d = frac.split("/")
            sign = -1.0 if whole.startswith("-") else 1.0
            return float(whole) + sign * float(n) / float(d)
        if "/" in s:
            n, d = s.split("/")
            return float(n) / float(d)
        return float(s)
    except (ValueError, ZeroDivisionError):
        return None


def option_number(value: str) -> float | None:
    """The number an option value stands for ("$1,200" -> 1200, "16/7 hours" -> 2.2857), or None."""
    m = _VALUE_RE.match(value)
    return _to_float(m.group(1)) if m else None


# A final value must read as a result: "= 25km", "x: Rs. 500", "≈ 3.3", or a line that starts
# with it. "x = -5 and 3" or "dropped by 20%" end in numbers that are not the result on their own.
# "is 12" is not enough either: questions are full of "...is 30% of N", and a completion that
# merely parrots the question must not earn a reward (with "is" allowed, 35 of 754 bare questions
# matched some option).
_RESULT_LEAD = re.compile(
    r"(?:^|=|:|≈|~|\b(?:approx\.?|approximately))\s*" + _CURRENCY + r"?\s*$", re.I
)


def final_number(text: str) -> float | None:
    """The final computed value: the last number of the last line with a digit, if it reads as a
    result."""
    for line in reversed(text.strip().split("\n")):
        if re.search(r"\d", line):
            nums = list(_NUM_IN_TEXT.finditer(line))
            if not nums:
                return None
            last = nums[-1]
            if not _RESULT_LEAD.search(line[: last.start()]):
                return None
            return _to_float(last.group(0))
    return None


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= max(1e-9, 1e-3 * max(abs(a), abs(b)))


_MARKUP = re.compile(r"\\(?:boxed|text|textbf|mathrm)\{\s*([^{}]*?)\s*\}")


def _strip_markup(completion: str) -> str:
    """Drop the markup models like to wrap answers in: **C**, $C$, \\boxed{C}, \\text{C}."""
    for _ in range(3):  # nested: \\boxed{\\text{C}}
        completion = _MARKUP.sub(r"\1", completion)
    completion = completion.replace("**", "")
    return re.sub(r"\$\(?([A-E])\)?\$", r"\1", completion)


def answer_letters(completion: str) -> list[str]:
    """The letters of every explicit answer statement in the completion, in order of position."""
    if not completion:
        return []
    return [letter for _, _, letter in find_answer_statements(_strip_markup(completion))]


def extract_letter(completion: str, options: list[str] | None = None) -> str | None:
    """The answer letter (A-E) a completion commits to, or None.

    1. The LAST explicit answer statement ("Answer: C", "the answer is (C)", "C is the correct
       option", "Option C" closing a line, "=> C", a last line that is just "C", ...). Letters are
       uppercase A-E only; a letter followed by another choice ("A or B"), by "=" (a variable) or by
       ordinary prose ("A bit") does not count.
    2. Otherwise, with options given: the final number of the text (its last line with a digit)
       compared with the options' numeric values (units and currency stripped, 0.1% tolerance);
       exactly one option must match.
    3. Otherwise None. Precision over recall: a wrong letter is a wrong RL reward.
    """
    if not completion:
        return None
    letters = answer_letters(completion)
    if letters:
        return letters[-1]
    if not options:
        return None
    target = final_number(completion)
    if target is None:
        return None
    hits = []
    for i, option in enumerate(options):
        try:
            letter, value = parse_option(option)
        except BadRow:
            letter, value = AQUA_LETTERS[i] if i < 5 else None, str(option)
        x = option_number(value)
        if letter and x is not None and _close(x, target):
            hits.append(letter)
    return hits[0] if len(hits) == 1 else None


# ------------------------------------------------------------------------------------------------
# Conversations


# lead-in words left before a removed closing statement, on its own line only ("So the correct")
_TRAILING_FILLER = re.compile(
    r"(?:[ \t,;:\-=>⇒∴]|\b(?:so|thus|hence|therefore|the|correct|right|final|"
    r"and|option|choice|is|then|my)\b)*\Z",
    re.I,
)


def clean_rationale(rationale: str) -> str:
    """Drop the rationale's closing answer statement: the target ends in exactly one "Answer: X".

    Only a statement on the LAST line is removed, together with what follows it on that line when
    that is short (an echoed value like ") 109 rolls") and lead-in words before it ("So the
    correct"). Statements earlier in the text are kept: they are part of the reasoning. Whatever the
    original letter said, the target's final line carries the gold letter (a handful of AQuA-RAT
    rows disagree).
    """
    text = rationale.strip()
    if not text:
        return ""
    last_start = text.rfind("\n") + 1
    statements = [s for s in find_answer_statements(text) if s[0] >= last_start]
    if not statements:
        return text
    start, end, _ = statements[-1]
    for (
        s,
        e,
        _,
    ) in statements:  # overlapping matches ("Answer: Option C" and "Option C"): cut the widest
        if e > start:
            start = min(start, s)
    if len(text) - end > 30:  # a long tail after the letter is more reasoning, keep it all
        return text
    # the statement may itself open with lead-ins ("Correct answer") that the pattern started after
    head = text[:start]
    head = head[: len(head) - len(_TRAILING_FILLER.search(head).group(0))] if head else head
    return head.rstrip()


def option_line(letter: str, value: str) -> str:
    return f"{letter}) {value}"


def render_aqua_prompt(question: str, values: list[str], letters=AQUA_LETTERS) -> str:
    """The user message shared by AquaRat and SyntheticAqua."""
    opts = "\n".join(option_line(letter, v) for letter, v in zip(letters, values))
    return f"{question.strip()}\n\n{opts}\n\n{AQUA_INSTRUCTION}"


def make_aqua_conversation(question: str, values: list[str], rationale: str, answer: str) -> dict:
    """One AQuA-style item: prompt, target (rationale + one final 'Answer: X'), MC keys."""
    target = (rationale.strip() + "\n" if rationale.strip() else "") + f"{ANSWER_PREFIX} {answer}"
    return {
        "messages": [
            {"role": "user", "content": render_aqua_prompt(question, values)},
            {"role": "assistant", "content": target},
        ],
        "letters": list(AQUA_LETTERS),
        "answer": answer,
        "options": [f"{letter}){v}" for letter, v in zip(AQUA_LETTERS, values)],
    }


class AquaStyleTask(Task):
    """What AquaRat and SyntheticAqua share: items from make_aqua_conversation, graded by the letter
    the completion's answer statement names (extract_letter)."""

    eval_type = "generative"
    # What the RL diagnostics read (nanochat/diagnostics.py takes them from the task, so the library
    # knows no task): the choices and the text that introduces the committed one.
    letters = AQUA_LETTERS
    answer_prefix = ANSWER_PREFIX

    def evaluate(self, conversation: dict, completion: str) -> int:
        return int(self.predicted_letter(conversation, completion) == conversation["answer"])

    def predicted_letter(self, conversation: dict, completion: str) -> str | None:
        return extract_letter(completion, conversation.get("options"))

    def prompt_parts(self, conversation: dict) -> list[tuple[str, str]]:
        """The labelled pieces of the user message, in order, as its text has them: ("question",
        the question), then (letter, that option's line) for each option."""
        lines = [option_line(o[0], o[2:]) for o in conversation["options"]]
        content = conversation["messages"][0]["content"]
        question = content[: content.find(lines[0])].rstrip()
        return [("question", question), *zip(self.letters, lines)]

    def reward(
        self, conversation: dict, completion: str, finished: bool, format_bonus: float = 0.0
    ) -> tuple[float, bool]:
        """(RL reward, correct) of one sampled completion. Correct: graded right, and its answer
        statements do not name two different letters ("Answer: B ... Answer: D" earns nothing:
        hedging must not pay). The reward is that 0/1 plus format_bonus for a well-formed
        completion: one "Answer: X", on its final line, and the model stopped by itself."""
        hedged = len(set(answer_letters(completion))) > 1
        correct = not hedged and bool(self.evaluate(conversation, completion))
        well_formed = (
            finished
            and completion.count(ANSWER_PREFIX) == 1
            and _FINAL_ANSWER.search(completion) is not None
        )
        return float(correct) + (format_bonus if well_formed else 0.0), correct


class AquaRat(AquaStyleTask):
    """AQuA-RAT as a generative chat task (see the module docstring for sources and item format)."""

    name = "aqua"

    def __init__(
        self,
        split: str = "train",
        data_dir=None,
        max_examples: int | None = None,
        on_bad_row: str = "skip",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.split = split
        self.rows, self.source = load_rows(split, data_dir, on_bad_row, max_examples)

    def num_examples(self) -> int:
        return len(self.rows)

    def get_example(self, index: int) -> dict:
        row = self.rows[index]
        return make_aqua_conversation(
            row["question"], row["values"], clean_rationale(row["rationale"]), row["correct"]
        )
