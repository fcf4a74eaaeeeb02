"""RL: rewards, advantages, loss weights, diagnostics against hand-computed values, one update on a
crafted batch, and chat_rl end to end (metrics in the JSONL and the offline W&B run, SIGKILL resume,
torchrun x2 == one process). Tiny models, CPU."""

import dataclasses
import glob
import math
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import sigkill_after_checkpoints
from test_chat_stages import make_base, tiny_tokenizer

from nanochat import diagnostics as diag
from nanochat.checkpoint import checkpoint_dir, find_last_step, load_checkpoint
from nanochat.common import DistInfo
from nanochat.diagnostics import Diagnostics
from nanochat.engine import Engine
from nanochat.gpt import GPT, AttentionEntropy, GPTConfig
from nanochat.rl import group_advantages, policy_loss, policy_update, token_weights
from nanochat.rl_config import parse_config
from nanochat.rollouts import Completion, Rollouts, format_bonus, rollout_seed
from nanochat.tracking import Histogram, Image, Tracker, read_jsonl
from tasks.aqua import answer_letters
from tasks.synthetic_aqua import SyntheticAqua

REPO = Path(__file__).resolve().parents[1]
TINY_RL = [
    "--aqua-source",
    "synthetic",
    "--train-examples",
    "40",
    "--eval-problems",
    "4",
    "--examples-per-step",
    "2",
    "--num-samples",
    "4",
    "--max-new-tokens",
    "12",
    "--eval-every",
    "2",
    "--eval-samples",
    "2",
    "--attn-every",
    "2",
    "--attn-heatmap-every",
    "3",
    "--attn-probes",
    "2",
    "--device-batch-size",
    "4",
    "--init-lr-frac",
    "1.0",
    "--kl-sample-frac",
    "1",
]


def tiny_config(tok) -> GPTConfig:
    """2 layers of 32 wide, context 512: the byte-level prompts of synthetic problems fit."""
    return GPTConfig(
        sequence_len=512,
        vocab_size=tok.get_vocab_size(),
        n_layer=2,
        n_head=2,
        n_kv_head=2,
        n_embd=32,
    )


@pytest.fixture(scope="module")
def answering_sft(tmp_path_factory):
    """A base dir holding a tiny SFT checkpoint that answers "Answer: X" (a letter it mostly
    guesses): its groups get mixed rewards, so RL steps have a signal to follow."""
    import json
    from dataclasses import asdict

    from nanochat.checkpoint import save_checkpoint
    from scripts.chat_sft import main as sft_main

    root = tmp_path_factory.mktemp("rl_sft")
    old = os.environ.get("NANOCHAT_BASE_DIR")
    os.environ["NANOCHAT_BASE_DIR"] = str(root)
    try:
        tok = tiny_tokenizer()
        tok.save(root / "tokenizer")
        torch.manual_seed(0)
        cfg = tiny_config(tok)
        save_checkpoint(
            checkpoint_dir("base", "d2"),
            1,
            GPT(cfg).state_dict(),
            None,
            {"model_config": asdict(cfg), "tag": "d2", "stage": "base"},
        )
        data = root / "answers.jsonl"
        with open(data, "w") as f:
            for conv in SyntheticAqua("train", num_examples=64):
                messages = [
                    conv["messages"][0],
                    {"role": "assistant", "content": f"Answer: {conv['answer']}"},
                ]
                f.write(json.dumps({"messages": messages}) + "\n")
        sft_main(
            [
                "--source-stage",
                "base",
                "--aqua-source",
                "none",
                "--custom-json",
                str(data),
                "--val-fraction-custom",
                "0",
                "--max-seq-len",
                "512",
                "--device-batch-size",
                "8",
                "--total-batch-size",
                "8",
                "--num-iterations",
                "40",
                "--init-lr-frac",
                "1.0",
                "--eval-every",
                "0",
                "--no-wandb",
            ],
            stage="sft",
        )
    finally:
        if old is None:
            os.environ.pop("NANOCHAT_BASE_DIR")
        else:
            os.environ["NANOCHAT_BASE_DIR"] = old
    return root


def use_checkpoint(answering_sft, base_dir):
    shutil.copytree(answering_sft, base_dir, dirs_exist_ok=True)


# ------------------------------------------------------------------------------------------ rewards


def test_correctness_reward_refuses_two_letters_and_grades_one():
    task = SyntheticAqua("train", num_examples=3)
    conv = task[0]
    gold = conv["answer"]
    other = "A" if gold != "A" else "B"
    reward = lambda text: task.reward(conv, text, finished=True)  # noqa: E731
    assert reward(f"some work\nAnswer: {gold}") == (1.0, True)
    assert reward(f"Answer: {other}") == (0.0, False)
    # hedging
    assert reward(f"Answer: {other}\nno wait\nAnswer: {gold}") == (0.0, False)
    # same letter twice
    assert reward(f"Answer: {gold}\nso the answer is {gold}") == (1.0, True)
    assert answer_letters(f"the answer is {other}. Answer: {gold}") == [other, gold]


def test_format_reward_and_anneal():
    task = SyntheticAqua("train", num_examples=1)
    conv = task[0]
    wrong = "A" if conv["answer"] != "A" else "B"

    def bonus(text, finished=True):  # the reward minus its correctness part
        reward, correct = task.reward(conv, text, finished, format_bonus=0.1)
        return reward - float(correct)

    assert bonus(f"x = 4\nAnswer: {wrong}") == pytest.approx(0.1)
    assert bonus(f"x = 4\nAnswer: {conv['answer']}") == pytest.approx(0.1)
    assert bonus(f"x = 4\nAnswer: {wrong}", finished=False) == 0.0  # truncated
    assert bonus(f"Answer: B\nAnswer: {wrong}") == 0.0
    assert bonus(f"Answer: {wrong} and more") == 0.0
    assert format_bonus(0.1, 10, 0) == pytest.approx(0.1)
    assert format_bonus(0.1, 10, 5) == pytest.approx(0.05)
    assert format_bonus(0.1, 10, 20) == 0.0
    assert format_bonus(0.1, 0, 1000) == pytest.approx(0.1)


def test_rollout_seed_depends_on_all_three():
    seeds = {rollout_seed(s, t, q) for s in (1, 2) for t in (0, 1) for q in (0, 1, 2)}
    assert len(seeds) == 12


def test_group_advantages_and_zero_signal():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.1]])
    adv, zero = group_advantages(rewards, std_norm=False)
    assert zero.tolist() == [False, True, False]
    assert adv[0].tolist() == [0.5, -0.5, -0.5, 0.5]
    assert adv[1].tolist() == [0.0] * 4
    assert adv[2].tolist() == pytest.approx([-0.025, -0.025, -0.025, 0.075])
    adv_std, _ = group_advantages(rewards, std_norm=True)
    # the sample std (n - 1), as TRL and verl: sqrt((4 * 0.25) / 3) = 0.5774, not the population's
    # 0.5; the advantage is 0.5 / (0.5774 + 1e-4)
    std = math.sqrt(1.0 / 3.0)
    expected = [x / (std + 1e-4) for x in (0.5, -0.5, -0.5, 0.5)]
    assert adv_std[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert adv_std[2].tolist() == pytest.approx(
        [x / (math.sqrt(0.0075 / 3) + 1e-4) for x in (-0.025, -0.025, -0.025, 0.075)], rel=1e-5
    )


def test_token_weights_each_normaliser():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    # this rank holds 4 tokens of 2 sequences; the global batch has 10 tokens in 4 sequences
    tok = token_weights(mask, "token", global_tokens=10, global_seqs=4, max_new_tokens=8)
    close = lambda a, b: torch.testing.assert_close(a, torch.tensor(b))  # noqa: E731
    close(tok, [[0.1, 0.1, 0.1, 0], [0.1, 0, 0, 0]])
    close(token_weights(mask, "sequence", 10, 4, 8), [[1 / 12, 1 / 12, 1 / 12, 0], [0.25, 0, 0, 0]])
    close(token_weights(mask, "constant", 10, 4, 8), [[1 / 32] * 3 + [0], [1 / 32, 0, 0, 0]])
    with pytest.raises(ValueError, match="normaliser"):
        token_weights(mask, "bogus", 1, 1, 1)


@pytest.mark.parametrize("norm", ["token", "sequence", "constant"])
def test_mask_truncated_counts_every_completion_like_trl(norm):
    """--mask-truncated leaves a truncated completion's tokens out of the loss, but it still counts
    as a completion (contributing zero), as TRL's mask_truncated_completions does: `constant`
    stays sum / (all completions * max_new_tokens) and `sequence` is the mean over all
    completions. The losses below are TRL's dapo / grpo / dr_grpo formulas on the same tensors."""
    from nanochat.rl import batch_tensors, loss_normalisers

    max_new = 6
    # three completions of one prompt [1, 2]: lengths 3, 6 (cut off by max_new_tokens), 2
    rows = [
        Completion([1, 2, 5, 6, 9], 2, [-1.0] * 3, True, "", 1.0, True),
        Completion([1, 2, 5, 6, 7, 8, 5, 6], 2, [-1.0] * 6, False, "", 0.0, False),
        Completion([1, 2, 7, 9], 2, [-1.0] * 2, True, "", 0.0, False),
    ]
    global_tokens, global_seqs = loss_normalisers(rows, mask_truncated=True, info=CPU)
    assert (global_tokens, global_seqs) == (5.0, 3.0)  # kept tokens, every completion
    _, _, comp, train = batch_tensors(rows, 0, "cpu", mask_truncated=True)
    assert train.sum(-1).tolist() == [3, 0, 2]
    torch.manual_seed(0)
    logp = torch.randn(comp.shape) * comp
    adv = torch.tensor([2 / 3, -1 / 3, -1 / 3])
    weights = token_weights(train, norm, global_tokens, global_seqs, max_new)
    loss, _ = policy_loss(logp, logp.detach(), adv, weights, 0.2, 0.2)
    per_token = -adv[:, None] * torch.ones_like(logp)  # ratio 1: -A per token
    mask = train.float()
    trl = {
        "token": (per_token * mask).sum() / mask.sum(),  # dapo
        "sequence": ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean(),  # grpo
        "constant": (per_token * mask).sum() / (mask.size(0) * max_new),  # dr_grpo
    }[norm]
    assert loss.item() == pytest.approx(trl.item(), abs=1e-7)
    by_hand = {"token": -(3 * 2 / 3 - 2 / 3) / 5, "sequence": -(2 / 3 - 1 / 3) / 3}
    by_hand["constant"] = -(3 * 2 / 3 - 2 / 3) / (3 * max_new)
    assert loss.item() == pytest.approx(by_hand[norm], abs=1e-7)


def test_policy_loss_clips_and_kl_penalty():
    logp = torch.log(torch.tensor([[0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5]]))  # ratio 2 on token 0, 1 on token 1
    w = torch.ones(1, 2)
    loss, clipped = policy_loss(logp, old, torch.tensor([1.0]), w, clip_eps=0.2, clip_eps_high=0.3)
    assert loss.item() == pytest.approx(
        -(1.3 + 1.0)
    )  # positive advantage: ratio capped at 1 + eps_high
    assert clipped.tolist() == [[True, False]]
    loss_neg, clipped_neg = policy_loss(logp, old, torch.tensor([-1.0]), w, 0.2, 0.3)
    assert loss_neg.item() == pytest.approx(
        2.0 + 1.0
    )  # negative advantage: the larger ratio is kept
    assert not clipped_neg.any()
    ref = torch.log(torch.tensor([[0.25, 0.5]]))
    with_kl, _ = policy_loss(
        logp, logp.detach(), torch.tensor([0.0]), w, 0.2, 0.2, kl_coef=0.5, ref_logp=ref
    )
    r = math.log(0.5)  # log ref - log pi on token 0; 0 on token 1
    assert with_kl.item() == pytest.approx(0.5 * (math.exp(r) - 1 - r))


# -------------------------------------------------------------------------------------- diagnostics


def test_letter_kl_and_margin_by_hand():
    letter_ids = [3, 4, 5, 6, 7]
    pol = torch.full((1, 10), -5.0)
    ref = torch.full((1, 10), -5.0)
    pol[0, letter_ids] = torch.tensor([2.0, 0.0, 0.0, 0.0, 1.0])
    ref[0, letter_ids] = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])
    p = torch.softmax(torch.tensor([2.0, 0.0, 0.0, 0.0, 1.0]), 0)
    expected = float((p * (p.log() - math.log(0.2))).sum())
    assert diag.letter_kl(pol, ref, letter_ids).item() == pytest.approx(expected)
    assert diag.letter_kl(pol, pol, letter_ids).item() == pytest.approx(0.0, abs=1e-7)
    # correct letter A (index 0): 2 - max(0, 0, 0, 1) = 1; correct E: 1 - 2 = -1
    margins = diag.letter_margin(pol.repeat(2, 1), letter_ids, torch.tensor([0, 4]))
    assert margins.tolist() == pytest.approx([1.0, -1.0])


def test_sequence_kl_by_hand():
    logp = torch.tensor([[-1.0, -2.0, -3.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0]])
    mask = torch.tensor([[1, 1, 0]])
    kl, k3 = diag.sequence_kl(logp, ref, mask)
    assert kl.item() == pytest.approx(0.5 + -1.0)
    r = [-0.5, 1.0]
    assert k3.item() == pytest.approx(sum(math.exp(x) - 1 - x for x in r))


def test_letter_counts_sum_to_completions():
    counts = diag.letter_counts(["A", "C", None, "C", "Z"])
    assert counts == {"A": 1, "B": 0, "C": 2, "D": 0, "E": 0, "none": 2}
    assert sum(counts.values()) == 5


def test_answer_letter_position_finds_the_last_answer():
    tok = tiny_tokenizer()
    letter_ids = diag.letter_token_ids(tok)
    assert letter_ids == [tok.encode(" " + c)[0] for c in "ABCDE"]
    ids = tok.encode("Answer: B\nno.\nAnswer: D")
    pos = diag.answer_letter_position(ids, tok, letter_ids)
    assert pos == len(ids) - 1 and ids[pos] == letter_ids[3]
    assert diag.answer_letter_position(tok.encode("no answer here"), tok, letter_ids) is None
    assert diag.answer_letter_position(tok.encode("Answer: 42"), tok, letter_ids) is None


def test_locate_finds_prompt_parts_and_heatmap_spans():
    tok = tiny_tokenizer()
    task = SyntheticAqua("validation", num_examples=1)
    conv = task[0]
    ids = tok.render_conversation(conv, max_tokens=512)[0]
    parts = task.prompt_parts(conv)
    found = diag.locate(ids, tok, [text for _, text in parts])
    for (label, text), (start, end) in zip(parts, found):
        decoded = tok.decode(ids[start:end])
        assert text in decoded and len(decoded) < len(text) + 8, (label, decoded)
    assert [span[0] for span in found] == sorted(span[0] for span in found)
    assert diag.locate(ids, tok, ["not in there"]) == [None]
    cfg = _rl_args(attn_probes=1)
    spans = diag.Diagnostics(cfg, None, tok, task, task, 512, 0).probe_spans(conv, ids)
    labels = [label for label, _, _ in spans]
    assert labels == ["question", "A", "B", "C", "D", "E", "answer", "letter"]
    letter = spans[-1][1]
    assert tok.decode([ids[letter]]).strip() == conv["answer"]


def test_logit_lens_by_hand_and_at_the_last_layer():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT(tiny_config(tok))
    with torch.no_grad():
        model.lm_head.weight.normal_(0.0, 0.5)
        for block in model.transformer.h:
            block.mlp.c_proj.weight.normal_(0.0, 0.2)
    x = torch.randint(0, tok.get_vocab_size(), (1, 7))
    residuals = []
    with torch.no_grad():
        logits = model(x, residual_capture=residuals)
    assert len(residuals) == 2
    ids = [5, 9, 11]
    # by hand: RMS norm, the three rows of lm_head, the soft cap
    r = residuals[0][0, 3]
    normed = r / r.pow(2).mean().add(torch.finfo(r.dtype).eps).sqrt()
    raw = model.lm_head.weight[ids] @ normed
    cap = model.config.softcap
    expected = cap * torch.tanh(raw / cap) if cap else raw
    lens = model.lens_logits(residuals[0][0, 3], ids)
    assert lens.tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    # the last layer's lens is the model's own logits
    last = model.lens_logits(residuals[-1][0], ids)
    torch.testing.assert_close(last, logits[0][:, ids], atol=1e-5, rtol=0)


def test_answer_attention_shares_by_hand(monkeypatch):
    """The shares of the answer position's attention over the gold option, the other options, the
    completion and the rest of the prompt, against a plain forward's attention probabilities;
    the policy-minus-reference lens margins and the KLs are exactly 0 at step 0."""
    tok = tiny_tokenizer()
    model, ref = _tiny_policy(tok)
    with torch.no_grad():
        for m in (model, ref):
            for block in m.transformer.h:
                block.attn.c_q.weight.mul_(4)  # not the near-uniform attention of the init
    task = SyntheticAqua("train", num_examples=1)
    conv = task[0]
    prompt = tok.render_for_completion(conv)
    end = tok.encode_special("<|assistant_end|>")
    group = []
    for text in ("so Answer: B", "Answer: " + conv["answer"]):
        ids = prompt + tok.encode(text) + [end]
        group.append(
            Completion(ids, len(prompt), [0.0] * (len(ids) - len(prompt)), True, text, 0, 0)
        )
    diagnostics = Diagnostics(_rl_args(num_samples=2), ref, tok, task, task, 512, end)
    positions = [diagnostics._letter_position(c) for c in group]
    out = diagnostics.score_group(model, group, positions, conv, attention=True)
    for key in ("kl_seq", "kl_letter"):
        assert max(abs(v) for v in out[key]) <= 1e-6
    for i in (0, 1):
        assert out[f"lens/layer_{i}"] == out[f"lens_ref/layer_{i}"]
    assert out["lens/layer_1"] == pytest.approx(out["margin"], abs=1e-4)  # the last layer
    parts = task.prompt_parts(conv)
    spans = dict(
        zip([label for label, _ in parts], diag.locate(prompt, tok, [t for _, t in parts]))
    )
    for r, c in enumerate(group):
        probs = []
        with torch.no_grad():
            model(torch.tensor([c.ids]), attn_capture=probs)
        query = c.prompt_len + positions[r] - 1  # the position that emits the letter
        for i, layer in enumerate(probs):
            p = layer[0, :, query].mean(0)
            gold = sum(p[slice(*spans[conv["answer"]])].tolist())
            others = sum(sum(p[slice(*spans[k])].tolist()) for k in "ABCDE" if k != conv["answer"])
            completion = sum(p[c.prompt_len :].tolist())
            by_hand = [gold, others, completion, 1.0 - gold - others - completion]
            got = [out[f"answer_to/{s}/layer_{i}"][r] for s in diag.SPANS]
            assert got == pytest.approx(by_hand, abs=1e-5)
            assert sum(got) == pytest.approx(1.0, abs=1e-5)


def test_samples_table_shows_groups_with_a_signal_first_and_distinct_texts():
    tok = tiny_tokenizer()
    task = SyntheticAqua("train", num_examples=2)
    gold = [task[i]["answer"] for i in (0, 1)]
    wrong = "A" if gold[1] != "A" else "B"

    def completion(text, reward):
        return Completion([1, 2, 3], 2, [0.0], True, text, reward, reward > 0)

    solved = [completion(f"Answer: {gold[0]}", 1.0) for _ in range(3)]  # no signal
    mixed = [completion(f"Answer: {gold[1]}", 1.0), completion(f"Answer: {wrong}", 0.0)] * 2
    rollouts = Rollouts([10, 11], [task[0], task[1]], [solved + [solved[0]], mixed])
    adv, _ = group_advantages(rollouts.rewards(), std_norm=False)
    diagnostics = Diagnostics(_rl_args(), None, tok, task, task, 512, 0)
    table = diagnostics.samples(rollouts, adv, step=7, rows=3)["rl/samples"]
    assert table.file == "rl_samples.jsonl"
    assert table.rows == [
        [7, 11, f"Answer: {gold[1]}", gold[1], 1.0, 0.5],
        [7, 11, f"Answer: {wrong}", wrong, 0.0, -0.5],
        [7, 10, f"Answer: {gold[0]}", gold[0], 1.0, 0.0],
    ]


def test_token_entropy_summary_and_weight_drift_by_hand():
    summary = diag.entropy_summary([0.0, 0.5, 1.0, 2.0, 4.0])
    assert summary["rl/token_entropy_mean"] == pytest.approx(1.5)
    assert summary["rl/token_entropy_p50"] == pytest.approx(1.0)
    assert summary["rl/token_entropy_p90"] == pytest.approx(3.2)  # linear between 2 and 4
    assert summary["rl/high_entropy_frac"] == pytest.approx(0.4)  # 2 and 4 nats are above 1
    tok = tiny_tokenizer()
    model, ref = _tiny_policy(tok)
    drift = diag.weight_drift(model, ref)
    assert set(drift) == {
        f"rl/weight_drift/{g}" for g in ("layer_0", "layer_1", "embedding", "lm_head")
    }
    assert all(v == 0.0 for v in drift.values())  # step 0: the policy is the reference
    block = model.transformer.h[1]
    with torch.no_grad():
        block.mlp.c_fc.weight.add_(0.01)
    layer = [p for n, p in ref.named_parameters() if n.startswith("transformer.h.1.")]
    base = math.sqrt(sum(p.pow(2).sum().item() for p in layer))
    change = 0.01 * math.sqrt(block.mlp.c_fc.weight.numel())
    drift = diag.weight_drift(model, ref)
    assert drift["rl/weight_drift/layer_1"] == pytest.approx(change / base, rel=1e-4)
    assert drift["rl/weight_drift/layer_0"] == 0.0 == drift["rl/weight_drift/lm_head"]


def test_attention_entropy_reduces_inside_attention():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=16)
    )
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_q.weight.mul_(8)  # sharper attention than the init's near-uniform
    x = torch.randint(0, 64, (1, 10))
    full = []
    model(x, attn_capture=full)
    probs = full[0]
    by_hand = -(probs * probs.clamp(min=1e-30).log()).sum(-1).mean().item()
    capture = AttentionEntropy(keep_probs=True)
    model(x, attn_capture=capture)
    assert capture.per_layer()[0] == pytest.approx(by_hand, rel=1e-5)
    assert capture.entropy[0].shape == (1, 2, 10) and capture.probs[0].shape == (2, 10, 10)
    per_layer, kept = diag.attention_entropy(model, [x[0].tolist()], keep_probs=True)
    assert per_layer == pytest.approx(capture.per_layer()) and len(kept) == 2
    # position 0 sees only itself (entropy 0); the last sees 10 keys (entropy <= log 10)
    assert capture.entropy[0][0, :, 0].abs().max() < 1e-6
    assert (capture.entropy[0] <= math.log(10) + 1e-5).all()


# --------------------------------------------------------------------------------------- one update


def _crafted(tok, model):
    """One question, two completions by hand: the right answer (reward 1), a wrong one (0)."""
    conv = SyntheticAqua("train", num_examples=1)[0]
    prompt = tok.render_for_completion(conv)
    end = tok.encode_special("<|assistant_end|>")
    gold = conv["answer"]
    wrong = "A" if gold != "A" else "B"
    letter_ids = diag.letter_token_ids(tok)
    rows = []
    for letter, reward in [(gold, 1.0), (wrong, 0.0)]:
        body = tok.encode(f"Answer: {letter}")
        ids = prompt + body + [end]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]]))[0]
        logp = F.log_softmax(logits, -1)
        lps = [float(logp[len(prompt) - 1 + t, ids[len(prompt) + t]]) for t in range(len(body) + 1)]
        rows.append(
            Completion(ids, len(prompt), lps, True, f"Answer: {letter}", reward, reward > 0)
        )
    return Rollouts([0], [conv], [rows]), letter_ids


def _seq_logp(model, c):
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([c.ids[:-1]]))[0], -1)
    return sum(float(logp[t - 1, c.ids[t]]) for t in range(c.prompt_len, len(c.ids)))


def _rl_args(**overrides):
    return dataclasses.replace(parse_config(["--num-samples", "2"]), **overrides)


CPU = DistInfo(False, 0, 0, 1, torch.device("cpu"))


def _diagnose_and_train(model, ref, optimizers, rollouts, adv, zero, cfg, tok) -> dict:
    """What one step of chat_rl's loop does with a rollout: diagnose it, then train on it."""
    pad = tok.encode_special("<|assistant_end|>")
    task = SyntheticAqua("train", num_examples=1)
    _, moved = Diagnostics(cfg, ref, tok, task, task, 512, pad).measure(model, rollouts, 1)
    groups = rollouts.groups
    return {**moved, **policy_update(model, ref, optimizers, groups, adv, zero, cfg, CPU, pad)}


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_one_update_raises_the_better_completion_and_kl_starts_at_zero(dtype, monkeypatch):
    # bf16: CPU autocast, as a GPU runs it (the model reads NANOCHAT_DTYPE at each forward)
    monkeypatch.setenv("NANOCHAT_DTYPE", dtype)
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = tiny_config(tok)
    model = GPT(cfg)
    ref = GPT(cfg)
    ref.load_state_dict(model.state_dict())
    ref.requires_grad_(False)
    groups, letter_ids = _crafted(tok, model)
    good, bad = groups.groups[0]
    before = (_seq_logp(model, good), _seq_logp(model, bad))
    rewards = torch.tensor([[good.reward, bad.reward]])
    adv, zero = group_advantages(rewards, std_norm=False)
    optimizers = model.setup_optimizers(matrix_lr=0.02, embedding_lr=0.2, unembedding_lr=0.004)
    args = _rl_args(device_batch_size=2)
    stats = _diagnose_and_train(model, ref, optimizers, groups, adv, zero, args, tok)
    # The policy equals the reference before the first update, and both sides are scored through
    # the same forward: every KL is 0 up to fp32 round-off (engine rollouts in bf16: below).
    assert stats["kl_seq"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert stats["kl_seq_k3"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert stats["kl_letter"] == pytest.approx([0.0, 0.0], abs=1e-6)
    assert len(stats["margin"]) == 2 and stats["grad_norm"] > 0
    # rollout log-probs vs the training forward: the sampler/trainer mismatch, which bf16 shows
    gap = stats["logprob_gap"] / stats["gap_tokens"]
    assert gap < (1e-4 if dtype == "fp32" else 3e-2)
    after = (_seq_logp(model, good), _seq_logp(model, bad))
    assert after[0] > before[0] and after[1] < before[1]
    groups2, _ = _crafted(tok, model)  # sampled again by the updated policy
    stats2 = _diagnose_and_train(model, ref, optimizers, groups2, adv, zero, args, tok)
    # the policy has moved
    assert all(v > 1e-4 for v in stats2["kl_letter"]) and stats2["kl_seq"][0] > 1e-3
    assert stats2["kl_seq_k3"][0] > 1e-4


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_kl_is_zero_at_step_zero_on_engine_rollouts(dtype, monkeypatch):
    """The real rollout path: the engine decodes one token at a time through its KV cache, which in
    bf16 rounds differently from a prefill forward (~1e-3 per token). The diagnostics score the
    policy's side with the reference's forward, so at step 0 both KLs are 0 in bf16 too."""
    monkeypatch.setenv("NANOCHAT_DTYPE", dtype)
    tok = tiny_tokenizer()
    model, ref = _tiny_policy(tok)
    with torch.no_grad():  # blocks that are not the identity (zero init), peaky logits
        for m in (model, ref):
            torch.manual_seed(1)
            m.lm_head.weight.normal_(0.0, 0.5)
            for block in m.transformer.h:
                block.attn.c_proj.weight.normal_(0.0, 0.1)
                block.mlp.c_proj.weight.normal_(0.0, 0.1)
    task = SyntheticAqua("train", num_examples=1)
    prompt = tok.render_for_completion(task[0])
    res = Engine(model, tok).generate_batch(prompt, num_samples=4, max_tokens=24, seed=3)
    group = [
        Completion(prompt + seq, len(prompt), lps, fin, "", 0.0, False)
        for seq, lps, fin in zip(res.sequences, res.logprobs, res.finished)
    ]
    pad = tok.encode_special("<|assistant_end|>")
    diagnostics = Diagnostics(_rl_args(num_samples=4), ref, tok, task, task, 512, pad)
    positions = [len(seq) // 2 for seq in res.sequences]  # any position: the letter KL reads it
    moved = diagnostics.score_group(model, group, positions, task[0], attention=True)
    assert len(moved["kl_seq"]) == 4 and len(moved["kl_letter"]) == 4
    for key in ("kl_seq", "kl_seq_k3", "kl_letter"):
        assert max(abs(v) for v in moved[key]) <= 1e-6, (key, moved[key])


def _tiny_policy(tok):
    torch.manual_seed(0)
    cfg = tiny_config(tok)
    model, ref = GPT(cfg), GPT(cfg)
    ref.load_state_dict(model.state_dict())
    return model, ref.requires_grad_(False)


@pytest.mark.parametrize(
    "overrides",
    [
        {
            "ppo_epochs": 3,
            "kl_coef": 0.1,
            "loss_norm": "sequence",
            "clip_eps": 0.1,
            "clip_eps_high": 0.3,
        },
        {"loss_norm": "constant", "mask_truncated": True, "adv_std_norm": True},
    ],
)
def test_train_step_variants_update_and_stay_finite(overrides):
    tok = tiny_tokenizer()
    model, ref = _tiny_policy(tok)
    groups, letter_ids = _crafted(tok, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adv, zero = group_advantages(
        torch.tensor([[1.0, 0.0]]), std_norm=overrides.get("adv_std_norm", False)
    )
    args = _rl_args(device_batch_size=1, init_lr_frac=1.0, **overrides)
    optimizers = model.setup_optimizers()
    stats = _diagnose_and_train(model, ref, optimizers, groups, adv, zero, args, tok)
    assert not stats["skipped"] and math.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    if overrides.get("ppo_epochs", 1) > 1:  # later passes see ratios != 1 and clip some tokens
        assert stats["clip_tokens"] > 0 and stats["clipped"] > 0


def test_all_zero_signal_step_leaves_the_weights_alone():
    tok = tiny_tokenizer()
    model, ref = _tiny_policy(tok)
    groups, letter_ids = _crafted(tok, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adv, zero = group_advantages(torch.tensor([[1.0, 1.0]]), std_norm=False)
    args = _rl_args(
        device_batch_size=2, grad_clip=0.0
    )  # no clipping: nothing may divide by no grads
    optimizers = model.setup_optimizers()
    stats = _diagnose_and_train(model, ref, optimizers, groups, adv, zero, args, tok)
    assert stats["skipped"] and len(stats["kl_seq"]) == 2  # still diagnosed, not trained
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------------- tracking media


def read_offline_wandb(run_dir: Path) -> list[dict]:
    """History rows of an offline W&B run, parsed from its run-*.wandb file (W&B's record log:
    7-byte header, 32 KiB blocks of records with a 7-byte crc/length/type header, payloads are
    protobufs)."""
    import wandb

    # run.finish() returns once the run's exit is acknowledged; the service process writes the
    # file out when it closes the run's stream, which can come later on a loaded machine (one CI
    # run read no history at all). Teardown waits for the service to close every stream.
    wandb.teardown()
    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    rows = read_wandb_file(Path(path))
    assert rows, f"no history records in {path}"
    return rows


def read_wandb_file(path: Path) -> list[dict]:
    """History rows of one run-*.wandb record log (see read_offline_wandb)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    pos, block, buf, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            continue
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        item.key or "/".join(item.nested_key): item.value_json
                        for item in record.history.item
                    }
                )
    return rows


def test_tracker_logs_images_and_histograms(base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    png = tmp_path / "x.png"
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(1, 1))
    plt.savefig(png)
    plt.close()
    tracker = Tracker("rl", run="media", config={})
    tracker.log(
        {
            "rl/acc": 0.5,
            "img": Image(png),
            "hist": Histogram([1.0, 2.0, 2.0, float("nan")], bins=2),
        },
        step=3,
    )
    tracker.finish()
    row = [r for r in read_jsonl(base_dir / "runs" / "media" / "rl.jsonl") if "step" in r][0]
    assert row["img"] == str(png)
    assert (
        row["hist"]["count"] == 3
        and row["hist"]["counts"] == [1, 2]
        and row["hist"]["mean"] == pytest.approx(5 / 3)
    )
    history = read_offline_wandb(base_dir / "runs" / "media")
    keys = set().union(*history)
    assert "rl/acc" in keys and any(k.startswith("img") for k in keys) and "hist/_type" in keys


# ------------------------------------------------------------------------------- chat_rl end to end


def rl(args):
    from scripts.chat_rl import main

    return main(args)


def test_chat_rl_logs_every_metric_to_jsonl_and_wandb(answering_sft, base_dir, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    use_checkpoint(answering_sft, base_dir)
    flags = ["--num-steps", "4", "--save-every", "2", "--run", "e2e", "--log-samples-every", "2"]
    out = rl(TINY_RL + flags)
    assert 0.0 <= out["acc"] <= 1.0
    rows = read_jsonl(base_dir / "runs" / "e2e" / "rl.jsonl")
    logged = [r for r in rows if "step" in r]
    keys = set().union(*logged)
    required = (
        {
            "rl/acc",
            "rl/mean_reward",
            "rl/kl_letter_mean",
            "rl/kl_sequence_mean",
            "rl/letter_margin_mean",
            "attn/entropy_mean",
            "attn/entropy/layer_0",
            "attn/entropy/layer_1",
            "rl/reward_std",
            "rl/completion_len_mean",
            "rl/completion_len_max",
            "rl/truncation_rate",
            "rl/zero_signal_groups",
            "rl/clip_frac",
            "rl/grad_norm",
            "rl/lr",
            "rl/step_time_s",
            "rl/rollout_tok_per_s",
            "rl/pass@2",
            "rl/kl_sequence_k3_mean",
        }
        | {f"rl/letter_pred_counts/{k}" for k in "ABCDE"}
        | {"rl/letter_pred_counts/none"}
        | {f"rl/lens_margin/layer_{i}" for i in (0, 1)}
        | {f"rl/lens_margin_ref/layer_{i}" for i in (0, 1)}
        | {f"attn/answer_to/{s}/layer_{i}" for s in diag.SPANS for i in (0, 1)}
        | {f"attn/answer_to/{s}" for s in diag.SPANS}
        | {"rl/token_entropy_mean", "rl/token_entropy_p50", "rl/token_entropy_p90"}
        | {"rl/high_entropy_frac", "rl/eval_letter_recall_std", "rl/samples"}
        | {f"rl/weight_drift/{g}" for g in ("layer_0", "layer_1", "embedding", "lm_head")}
    )
    assert required <= keys, required - keys
    assert any(k.startswith("rl/eval_letter_recall/") for k in keys)
    samples = read_jsonl(base_dir / "runs" / "e2e" / "rl_samples.jsonl")
    assert {r["step"] for r in samples} == {2, 4} and {"text", "advantage"} <= set(samples[0])
    drift = [r for r in logged if "rl/weight_drift/layer_0" in r]
    assert drift[0]["step"] == 0 and drift[0]["rl/weight_drift/layer_0"] == 0.0
    assert drift[-1]["rl/weight_drift/layer_0"] > 0.0  # it moved
    steps = [r for r in logged if "rl/mean_reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:  # the counts cover every completion of the step
        assert sum(r[f"rl/letter_pred_counts/{k}"] for k in list("ABCDE") + ["none"]) == 2 * 4
    assert steps[0]["rl/kl_sequence_mean"] == pytest.approx(
        0.0, abs=1e-6
    )  # step 0: policy == reference
    assert steps[0]["rl/kl_letter_mean"] == pytest.approx(0.0, abs=1e-6)
    for i in (0, 1):  # the same weights read through the same forward: the lens agrees exactly
        lens = steps[0][f"rl/lens_margin/layer_{i}"]
        assert lens == steps[0][f"rl/lens_margin_ref/layer_{i}"]
    # it moved
    assert steps[-1]["rl/kl_sequence_k3_mean"] > 0 and steps[-1]["rl/kl_letter_mean"] > 0
    assert any(
        r["rl/zero_signal_groups"] < r["rl/groups"] for r in steps
    )  # some groups had a signal
    assert (base_dir / "report" / "e2e" / "heatmap_rl_layer_0.png").exists() and (
        base_dir / "report" / "e2e" / "rl.md"
    ).exists()
    history = read_offline_wandb(base_dir / "runs" / "e2e")
    wandb_keys = set().union(*history)
    # every dashboard name reached W&B too (a table as rl/samples/_type, /path, ...)
    wandb_keys |= {k.rsplit("/", 1)[0] for k in wandb_keys if k.endswith("/_type")}
    assert required <= wandb_keys, required - wandb_keys
    assert any(k.startswith("rl/letter_margin_hist") for k in wandb_keys)
    assert any(k.startswith("attn/heatmap/layer_0") for k in wandb_keys)
    assert find_last_step(checkpoint_dir("rl", "d2")) == 4


def test_chat_rl_refuses_bad_flags_before_work(base_dir, capsys):
    make_base(base_dir, stage="sft")
    for bad, msg in [
        (["--num-samples", "1"], "num-samples"),
        (["--temperature", "0"], "temperature"),
        (["--kl-sample-frac", "0"], "kl-sample-frac"),
        (["--ppo-epochs", "0"], "ppo-epochs"),
    ]:
        with pytest.raises(SystemExit):
            rl(TINY_RL + bad)
        assert msg in capsys.readouterr().err
    rl(TINY_RL + ["--num-steps", "2", "--no-wandb"])
    with pytest.raises(SystemExit, match="other settings"):  # resuming with changed training flags
        rl(TINY_RL + ["--num-steps", "2", "--seed", "7", "--no-wandb"])


def _env(base):
    return {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base),
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "NANOCHAT_RUN": "local",
    }


def _same_weights(a_dir, b_dir, step, atol=0.0):
    wa, _, _ = load_checkpoint(a_dir, step=step)
    wb, _, _ = load_checkpoint(b_dir, step=step)
    for k in wa:
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=atol), (
            k,
            (wa[k] - wb[k]).abs().max().item(),
            (wa[k] != wb[k]).sum().item(),
        )


def test_chat_rl_sigkill_resume_equals_uninterrupted(answering_sft, base_dir, tmp_path, one_thread):
    use_checkpoint(answering_sft, base_dir)
    flags = TINY_RL + ["--num-steps", "8", "--save-every", "1", "--keep-last", "0", "--no-wandb"]
    killed = tmp_path / "killed"
    shutil.copytree(base_dir, killed)
    cmd = [sys.executable, "-m", "scripts.chat_rl", *flags]
    ckpt = killed / "checkpoints" / "rl" / "d2"
    sigkill_after_checkpoints(cmd, _env(killed), ckpt, 3)
    killed_at = find_last_step(ckpt)
    assert killed_at is not None and 3 <= killed_at < 8
    again = subprocess.run(
        cmd, cwd=REPO, env=_env(killed), capture_output=True, text=True, timeout=300
    )
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert f"from step {killed_at}" in again.stdout
    rl(flags)  # uninterrupted, in this process's base dir
    _same_weights(checkpoint_dir("rl", "d2"), ckpt, 8)


def test_torchrun_rl_step_equals_single_process(answering_sft, base_dir, tmp_path, one_thread):
    from test_chat_stages import _free_port

    use_checkpoint(answering_sft, base_dir)
    # the default lr: Adam's first step divides by |grad|, so round-off in a near-zero gradient is
    # amplified to ~1e-4 of the lr; the grad norm (not scale-free) is compared separately below
    flags = TINY_RL + [
        "--examples-per-step",
        "4",
        "--num-steps",
        "1",
        "--eval-every",
        "0",
        "--no-wandb",
        "--device-batch-size",
        "3",
        "--init-lr-frac",
        "0.05",
    ]
    two = tmp_path / "two"
    shutil.copytree(base_dir, two)
    rl(flags)
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(_free_port()),
        "-m",
        "scripts.chat_rl",
        *flags,
    ]
    res = subprocess.run(
        launcher, cwd=REPO, env=_env(two), capture_output=True, text=True, timeout=300
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    _same_weights(checkpoint_dir("rl", "d2"), two / "checkpoints" / "rl" / "d2", 1, atol=2e-5)
    one_rows = [
        r for r in read_jsonl(base_dir / "runs" / "local" / "rl.jsonl") if "rl/mean_reward" in r
    ]
    two_rows = [r for r in read_jsonl(two / "runs" / "local" / "rl.jsonl") if "rl/mean_reward" in r]
    # a real update
    assert one_rows[0]["rl/zero_signal_groups"] < 4 and one_rows[0]["rl/grad_norm"] > 0
    for key in (
        "rl/mean_reward",
        "rl/completion_len_mean",
        "rl/kl_sequence_mean",
        "rl/grad_norm",
        "rl/letter_margin_mean",
        "rl/zero_signal_groups",
        "rl/letter_pred_counts/none",
    ):
        assert one_rows[0][key] == pytest.approx(two_rows[0][key], rel=1e-4, abs=1e-6), key
    res = subprocess.run(
        launcher[:5] + [str(_free_port())] + launcher[6:] + ["--examples-per-step", "3"],
        cwd=REPO,
        env=_env(two),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode != 0 and "divisible" in res.stdout + res.stderr


# -------------------------------------------------------------------------------- paired comparison


def test_sign_test_and_paired_counts(tmp_path, capsys):
    from nanochat.report import paired_counts, sign_test
    from scripts.compare_evals import main as compare

    assert sign_test(0, 10) == pytest.approx(2 / 1024)
    assert sign_test(5, 5) == 1.0 and sign_test(0, 0) == 1.0
    assert sign_test(2, 9) == pytest.approx(2 * sum(math.comb(11, i) for i in range(3)) / 2**11)
    c = paired_counts([1, 1, 0, 0, 1], [1, 0, 1, 0, 1])
    assert (c["both"], c["a_only"], c["b_only"], c["neither"]) == (2, 1, 1, 1)
    import json

    lines = [
        {
            "source": "sft",
            "task": "synthetic_aqua",
            "split": "test",
            "mode": "generative",
            "per_problem": [1, 0, 0, 0],
        },
        {
            "source": "rl",
            "task": "synthetic_aqua",
            "split": "test",
            "mode": "generative",
            "per_problem": [1, 1, 1, 0],
        },
    ]
    files = []
    for k in range(2):
        f = tmp_path / f"eval{k}.jsonl"
        f.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
        files.append(str(f))
    out = compare(["sft", "rl", *files])
    assert (out["a_only"], out["b_only"], out["n"]) == (0, 4, 8)
    assert out["p"] == pytest.approx(2 / 16)
    with pytest.raises(SystemExit, match="no generative"):
        compare(["sft", "mid", files[0]])
    # two runs' checkpoints, file by file: A = rl of the first files, B = sft of the --b-files
    out = compare(["rl", "sft", files[0], "--b-files", files[1]])
    assert (out["a_only"], out["b_only"], out["n"]) == (2, 0, 4)
    with pytest.raises(SystemExit, match="2 files for A but 1 --b-files"):
        compare(["rl", "sft", *files, "--b-files", files[1]])


def test_bench_rl_times_both_settings_on_a_random_model(base_dir):
    # gpu_check.sh runs this benchmark on a lent GPU: its step calls must follow chat_rl's
    tiny_tokenizer().save(base_dir / "tokenizer")
    cmd = [sys.executable, "-m", "scripts.bench_rl", "--random-depth", "2", "--prompts", "2"]
    cmd += ["--samples", "2", "--max-new-tokens", "8", "--steps", "1"]
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "diagnostics off" in out.stdout and "diagnostics on" in out.stdout
    assert re.search(r"ratio on / off: \d+\.\d+", out.stdout)
