"""Talk to a checkpoint in the terminal.

    uv run python -m scripts.chat_cli -i sft              # interactive, the conversation remembered
    uv run python -m scripts.chat_cli -i sft -p "What is 15% of 80?"  # one reply, then exit

Commands in the interactive loop: /clear (forget the conversation), /quit (or Ctrl-D).
The reply is streamed token by token from the KV-cache engine; when the conversation no longer fits
the model's context, the oldest turns are dropped (with a note).
"""

from __future__ import annotations

import argparse
import sys

from nanochat.checkpoint import CHECKPOINT_STAGES, load_model
from nanochat.common import autodetect_device
from nanochat.engine import Engine


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Chat with a checkpoint (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "-i",
        "--source",
        default="sft",
        choices=CHECKPOINT_STAGES,
        help="checkpoint stage",
    )
    p.add_argument("--model-tag", default=None, help="checkpoint tag (default: the stage's latest)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument(
        "-t", "--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)"
    )
    p.add_argument("-k", "--top-k", type=int, default=50, help="top-k sampling (0: off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--max-tokens", type=int, default=256, help="max tokens per reply")
    p.add_argument("--seed", type=int, default=42, help="sampling seed (turn n uses seed + n)")
    return p.parse_args(argv)


def fit_history(tokenizer, messages: list[dict], limit: int) -> tuple[list[int], int]:
    """Prompt ids for the conversation (ending with <|assistant_start|>), dropping the oldest
    user/assistant pairs until it fits in `limit` tokens. Returns (ids, number of dropped turns)."""
    dropped = 0
    while True:
        ids = tokenizer.render_for_completion(
            {"messages": messages + [{"role": "assistant", "content": "."}]}
        )
        if len(ids) <= limit or len(messages) <= 1:
            return ids, dropped
        messages[:] = messages[2:]
        dropped += 2


def reply(engine, tokenizer, messages, args, turn: int, out=sys.stdout) -> str:
    limit = engine.model.config.sequence_len - args.max_tokens
    ids, dropped = fit_history(tokenizer, messages, max(1, limit))
    if dropped:
        print(f"[dropped the {dropped} oldest messages to fit the context]", file=sys.stderr)
    max_tokens = min(args.max_tokens, engine.model.config.sequence_len * 10 - len(ids))
    tokens, printed = [], ""
    for tok in engine.stream(
        ids,
        max_tokens=max_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed + turn,
    ):
        if tok in engine.stop_tokens:
            break
        tokens.append(tok)
        text = tokenizer.decode(tokens)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            out.write(text[len(printed) :])
            out.flush()
            printed = text
    text = tokenizer.decode(tokens)
    out.write(text[len(printed) :] + "\n")
    out.flush()
    return text


def main(argv=None):
    args = parse_args(argv)
    device = autodetect_device()
    model, tokenizer, meta = load_model(
        args.source, tag=args.model_tag, step=args.step, device=device, phase="eval"
    )
    engine = Engine(model, tokenizer)
    messages: list[dict] = []
    if args.prompt is not None:
        if not args.prompt.strip():
            raise SystemExit("-p: the prompt is empty")
        messages.append({"role": "user", "content": args.prompt})
        reply(engine, tokenizer, messages, args, 0)
        return
    print(
        f"nanochat-aquarat: {args.source}/{meta.get('tag', '?')} step {meta.get('step')} "
        f"on {device.type}. /clear forgets the conversation, /quit exits."
    )
    turn = 0
    while True:
        try:
            user = input("\nUser: ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if not user:
            continue
        if user in ("/quit", "/exit"):
            break
        if user == "/clear":
            messages.clear()
            print("[conversation cleared]")
            continue
        messages.append({"role": "user", "content": user})
        print("\nAssistant: ", end="", flush=True)
        text = reply(engine, tokenizer, messages, args, turn)
        messages.append({"role": "assistant", "content": text if text.strip() else "..."})
        turn += 1


if __name__ == "__main__":
    main()
