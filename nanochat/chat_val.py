"""Held-out scores of mid-training and SFT: the loss per assistant token, and the teacher-forced
answer-letter accuracy of multiple-choice conversations."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanochat.chat_loader import collate
from nanochat.diagnostics import letter_token_ids
from tasks.aqua import AQUA_LETTERS


def iter_eval_batches(
    task,
    tokenizer,
    batch_size: int,
    seq_len: int,
    rank: int = 0,
    world_size: int = 1,
    max_examples: int | None = None,
    device="cpu",
):
    """(inputs, targets, letter_positions) micro-batches over this rank's share (rank::world_size)
    of the first max_examples conversations of `task`. letter_positions: [(row, t, task name)]
    where targets[row, t] is the answer letter of a multiple-choice conversation."""
    n = len(task) if max_examples is None or max_examples < 0 else min(len(task), max_examples)
    mine = list(range(rank, n, world_size))
    pad_id = tokenizer.encode_special("<|assistant_end|>")
    letter_ids = letter_token_ids(tokenizer)
    letter_of = dict(zip(letter_ids, AQUA_LETTERS)) if letter_ids else {}
    for i in range(0, len(mine), batch_size):
        rows, letter_pos = [], []
        for j in mine[i : i + batch_size]:
            conv = task[j]
            ids, mask = tokenizer.render_conversation(conv, max_tokens=seq_len + 1)
            # a multiple-choice answer ends "... Answer: C<|assistant_end|>": the letter is the
            # second-to-last token, i.e. the target at input position len - 3
            ends_in_letter = len(ids) >= 3 and ids[-1] == pad_id
            if conv.get("answer") and ends_in_letter and letter_of.get(ids[-2]) == conv["answer"]:
                letter_pos.append((len(rows), len(ids) - 3, conv.get("task", task.name)))
            rows.append((ids, mask))
        x, y = collate(rows, pad_id, device)
        yield x, y, letter_pos


def letter_hits(logits, targets, letter_pos, letter_vocab: torch.Tensor) -> torch.Tensor:
    """For each (row, t, _) of letter_pos: is the gold letter targets[row, t] the most likely of
    the letter tokens `letter_vocab` at logits[row, t]?"""
    rows = torch.tensor([r for r, _, _ in letter_pos], dtype=torch.long, device=logits.device)
    cols = torch.tensor([t for _, t, _ in letter_pos], dtype=torch.long, device=logits.device)
    return letter_vocab[logits[rows, cols][:, letter_vocab].argmax(-1)] == targets[rows, cols]


@torch.no_grad()
def evaluate_val(model, val_task, tokenizer, batch_size, seq_len, info, max_examples):
    """(mean loss per trained token, {task: teacher-forced answer-letter accuracy}) over held-out
    conversations, summed over ranks.

    The letter accuracy asks: given the gold rationale, is the gold letter the likeliest of
    " A".." E"? On AQuA-RAT it separates finding the option from computing the value. On synthetic
    problems whose rationale checks the options in order, the gold checks already name the option,
    so it only says that the checks are followed: chat_eval's generative accuracy is the real one.
    """
    if val_task is None:
        return None, {}
    device = info.device
    letter_ids = letter_token_ids(tokenizer)
    letter_vocab = torch.tensor(sorted(letter_ids), device=device) if letter_ids else None
    task_names = sorted({t.name for t in val_task.tasks})
    totals = torch.zeros(2, device=device, dtype=torch.float64)  # loss sum, trained tokens
    letters = torch.zeros(len(task_names), 2, device=device, dtype=torch.float64)  # hits, count
    batches = iter_eval_batches(
        val_task, tokenizer, batch_size, seq_len, info.rank, info.world_size, max_examples, device
    )
    model.eval()
    for x, y, letter_pos in batches:
        logits = model(x)
        flat_logits, flat_targets = logits.view(-1, logits.size(-1)), y.view(-1)
        loss = F.cross_entropy(flat_logits, flat_targets, ignore_index=-1, reduction="sum")
        totals += torch.stack([loss.double(), (y != -1).sum().double()])
        if letter_pos and letter_vocab is not None:
            hits = letter_hits(logits, y, letter_pos, letter_vocab)
            for (_, _, name), hit in zip(letter_pos, hits.tolist()):
                letters[task_names.index(name)] += torch.tensor([float(hit), 1.0], device=device)
    if info.is_ddp:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        dist.all_reduce(letters, op=dist.ReduceOp.SUM)
    model.train()
    accuracy = {
        name: (letters[i, 0] / letters[i, 1]).item()
        for i, name in enumerate(task_names)
        if letters[i, 1] > 0
    }
    return (totals[0] / totals[1].clamp(min=1)).item(), accuracy
