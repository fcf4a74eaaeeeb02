"""Mid-training / SFT / chat_eval / chat_cli end to end on a tiny checkpoint made in the test (CPU).

The fixture writes a real tokenizer (tiktoken files, byte-level plus merges for " A".." E") and a
tiny GPT saved with checkpoint.save_checkpoint, so every script runs its real loading path.
"""

import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from nanochat.chat_loader import ConversationLoader, collate
from nanochat.checkpoint import checkpoint_dir, find_last_step, load_checkpoint, save_checkpoint
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer
from nanochat.tracking import read_jsonl
from tasks.aqua import AQUA_LETTERS

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--no-wandb"]
TINY_DATA = [
    "--aqua-source",
    "synthetic",
    "--synthetic-examples",
    "24",
    "--synthetic-val-examples",
    "6",
    "--device-batch-size",
    "4",
    "--total-batch-size",
    "4",
    "--max-seq-len",
    "256",
]


def tiny_tokenizer() -> Tokenizer:
    ranks = {bytes([i]): i for i in range(256)}
    for j, letter in enumerate("ABCDE"):  # " A" .. " E" as single tokens: the categorical fast path
        ranks[b" " + letter.encode()] = 256 + j
    return Tokenizer(SPLIT_PATTERN, ranks)


def make_base(base_dir: Path, tag: str = "d2", stage: str = "base") -> GPTConfig:
    tok = tiny_tokenizer()
    tok.save(base_dir / "tokenizer")
    torch.manual_seed(0)
    cfg = GPTConfig(
        sequence_len=256,
        vocab_size=tok.get_vocab_size(),
        n_layer=2,
        n_head=2,
        n_kv_head=2,
        n_embd=32,
    )
    model = GPT(cfg)
    save_checkpoint(
        checkpoint_dir(stage, tag),
        5,
        model.state_dict(),
        None,
        {"model_config": asdict(cfg), "tag": tag, "stage": stage},
    )
    return cfg


def sft(args, stage="sft"):
    from scripts.chat_sft import main

    return main(args + QUIET, stage=stage)


# ------------------------------------------------------------------------------------------ units


def test_collate_shifts_and_masks():
    rows = [([1, 2, 3, 4, 5], [0, 0, 1, 1, 1]), ([7, 8, 9], [0, 1, 0])]
    x, y = collate(rows, pad_id=99)
    assert x.tolist() == [[1, 2, 3, 4], [7, 8, 99, 99]]
    assert y.tolist() == [[-1, 3, 4, 5], [8, -1, -1, -1]]
    x, y = collate(rows, pad_id=99, pad_to=6)
    assert x.shape == (2, 6) and (y[:, 4:] == -1).all()


def test_loader_slots_do_not_depend_on_world_size():
    tok = tiny_tokenizer()
    from tasks.synthetic_aqua import SyntheticAqua

    task = SyntheticAqua("train", num_examples=10)
    one = ConversationLoader(
        task, tok, batch_size=2, seq_len=256, grad_accum=2, rank=0, world_size=1, seed=3
    )
    r0 = ConversationLoader(
        task, tok, batch_size=2, seq_len=256, grad_accum=1, rank=0, world_size=2, seed=3
    )
    r1 = ConversationLoader(
        task, tok, batch_size=2, seq_len=256, grad_accum=1, rank=1, world_size=2, seed=3
    )
    for _ in range(4):  # crosses an epoch boundary (10 conversations, 4 per step)
        a = one.next_step()
        b = r0.next_step() + r1.next_step()
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    resumed = ConversationLoader(
        task, tok, batch_size=2, seq_len=256, grad_accum=2, seed=3, state=one.state_dict()
    )
    nxt = one.next_step()
    for (xa, ya), (xb, yb) in zip(nxt, resumed.next_step()):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_compiled_shapes_are_a_few_buckets_not_the_whole_context(capsys):
    """Under torch.compile every micro-batch has one of a few lengths; AQuA-sized conversations in a
    2048 context then carry a fraction of the padding that padding to the context did."""
    from nanochat.chat_loader import bucket_lengths
    from tasks.synthetic_aqua import SyntheticAqua

    assert bucket_lengths(2048) == [256, 512, 1024, 2048] and bucket_lengths(100) == [64, 100]
    tok = tiny_tokenizer()
    task = SyntheticAqua("train", num_examples=64, difficulty="mixed")
    bucketed = ConversationLoader(task, tok, batch_size=8, seq_len=2048, seed=1, fixed_shapes=True)
    dynamic = ConversationLoader(task, tok, batch_size=8, seq_len=2048, seed=1)
    shapes = set()
    for _ in range(8):
        ((xb, yb),) = bucketed.next_step()
        ((xd, yd),) = dynamic.next_step()
        shapes.add(xb.shape[1])
        assert xb.shape[1] in bucket_lengths(2048) and xb.shape[1] >= xd.shape[1]
        assert (
            torch.equal(xb[:, : xd.shape[1]], xd) and (yb[:, xd.shape[1] :] == -1).all()
        )  # only padding added
    real = bucketed.real_tokens
    assert real == dynamic.real_tokens and bucketed.padded_tokens < 0.5 * 8 * 8 * 2048
    full_pad_frac, bucket_pad_frac = 1 - real / (8 * 8 * 2048), 1 - real / bucketed.padded_tokens
    print(
        "padding tokens per micro-batch of 8 at a 2048 context: full "
        f"{(8 * 8 * 2048 - real) / 8:,.0f} ({full_pad_frac:.1%}), buckets "
        f"{(bucketed.padded_tokens - real) / 8:,.0f} ({bucket_pad_frac:.1%}); "
        f"shapes {sorted(shapes)}"
    )
    assert bucket_pad_frac < full_pad_frac - 0.3


def test_synthetic_option_checks_flag():
    import argparse

    from nanochat.chat_mixture import add_data_args, build_tasks

    parser = argparse.ArgumentParser()
    add_data_args(parser)
    targets = {}
    for flag in ("--synthetic-option-checks", "--no-synthetic-option-checks"):
        args = parser.parse_args(["--aqua-source", "synthetic", "--synthetic-examples", "5", flag])
        ((task, _),) = build_tasks(args, "train", torch.device("cpu"))
        targets[flag] = task[0]["messages"][1]["content"]
    checked, plain = targets["--synthetic-option-checks"], targets["--no-synthetic-option-checks"]
    assert checked.split("\n")[-2].endswith(" yes") and " yes" not in plain and " no\n" not in plain
    assert parser.parse_args([]).synthetic_option_checks is True


def test_probe_answer_format_runs_both_endings(base_dir):
    from scripts import probe_answer_format

    make_base(base_dir)
    for ending in ("checks", "value"):
        curve = probe_answer_format.main(
            [
                "--ending",
                ending,
                "--steps",
                "2",
                "--batch-size",
                "2",
                "--eval-every",
                "1",
                "--eval-problems",
                "3",
                "--max-tokens",
                "4",
            ]
        )
        assert [s for s, _, _ in curve] == [0, 1, 2]
        # 3 problems: every figure is a count out of 3 (an untrained model gets ~none right)
        assert all(
            round(acc * 3, 6) in (0, 1, 2, 3) and round(line * 3, 6) in (0, 1, 2, 3)
            for _, acc, line in curve
        )
    with pytest.raises(SystemExit):
        probe_answer_format.main(["--ending", "letter"])


def test_all_masked_micro_batch_is_finite():
    torch.manual_seed(0)
    model = GPT(
        GPTConfig(sequence_len=16, vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=16)
    )
    x = torch.randint(0, 300, (2, 8))
    y = torch.full((2, 8), -1)
    loss = model(x, y, loss_reduction="sum")
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------ SFT / mid


def test_sft_all_masked_step_gives_finite_loss(base_dir, tmp_path):
    """A conversation cut (by --max-seq-len) before the assistant speaks: every target of the
    step is masked."""
    make_base(base_dir)
    conv = {
        "messages": [
            {"role": "user", "content": "long question " * 20},
            {"role": "assistant", "content": "ok"},
        ]
    }
    path = tmp_path / "masked.jsonl"
    path.write_text("\n".join(json.dumps(conv) for _ in range(4)) + "\n")
    out = sft(
        [
            "--source-stage",
            "base",
            "--aqua-source",
            "none",
            "--custom-json",
            str(path),
            "--max-seq-len",
            "16",
            "--device-batch-size",
            "2",
            "--total-batch-size",
            "2",
            "--num-iterations",
            "2",
            "--eval-every",
            "0",
            "--log-every",
            "1",
            "--val-fraction-custom",
            "0.25",
        ]
    )
    rows = [r for r in read_jsonl(base_dir / "runs" / "local" / "sft.jsonl") if "train/loss" in r]
    assert len(rows) == 2 and all(
        r["train/loss"] == 0.0 and r["train/trained_tokens"] == 0 for r in rows
    )
    state, _, _ = load_checkpoint(out["ckpt_dir"])
    assert all(torch.isfinite(t).all() for t in state.values())


def test_mid_then_sft_end_to_end(base_dir, capsys):
    make_base(base_dir)
    # sft with no mid checkpoint: falls back to base with a note
    out = sft(TINY_DATA + ["--num-iterations", "2", "--eval-every", "0", "--tag", "fallback"])
    assert "no mid checkpoint found" in capsys.readouterr().out
    assert find_last_step(out["ckpt_dir"]) == 2

    mid = sft(
        TINY_DATA + ["--num-iterations", "3", "--eval-every", "2", "--log-every", "1"], stage="mid"
    )
    assert Path(mid["ckpt_dir"]) == checkpoint_dir("mid", "d2")
    assert mid["val_loss"] is not None and mid["val_loss"] == mid["val_loss"]  # not NaN
    assert (
        0.0 <= mid["letter_acc"]["synthetic_aqua"] <= 1.0
    )  # " A".." E" are single tokens in the fixture tokenizer
    out = sft(TINY_DATA + ["--num-iterations", "2", "--eval-every", "1", "--log-every", "1"])
    assert find_last_step(out["ckpt_dir"]) == 2
    _, _, meta = load_checkpoint(out["ckpt_dir"])
    assert meta["source_stage"] == "mid" and meta["stage"] == "sft" and meta["tag"] == "d2"
    rows = read_jsonl(base_dir / "runs" / "local" / "sft.jsonl")
    assert any("train/loss" in r and "train/tok_per_sec" in r and "train/lr" in r for r in rows)
    assert any("val/loss" in r for r in rows)
    assert (base_dir / "report" / "local" / "mid.md").is_file() and (
        base_dir / "report" / "local" / "sft.md"
    ).is_file()
    assert "Supervised fine-tuning" in (base_dir / "report" / "local" / "sft.md").read_text()


def test_both_spellings_of_aqua_flags():
    from scripts.chat_sft import build_parser

    p = build_parser("sft")
    a = p.parse_args(["--aqua_train_examples=20000", "--aqua_val_examples=254"])
    b = p.parse_args(["--aqua-train-examples", "20000", "--aqua-val-examples=254"])
    assert a.aqua_train_examples == b.aqua_train_examples == 20000
    assert a.aqua_val_examples == b.aqua_val_examples == 254


def test_resume_is_exact(base_dir):
    make_base(base_dir)
    flags = TINY_DATA + [
        "--source-stage",
        "base",
        "--num-iterations",
        "4",
        "--save-every",
        "2",
        "--eval-every",
        "0",
        "--keep-last",
        "0",
    ]
    out = sft(flags, stage="mid")
    ckpt = Path(out["ckpt_dir"])
    full, _, _ = load_checkpoint(ckpt, step=4)
    shutil.rmtree(ckpt / "step_000004")  # "killed" after step 2's checkpoint
    assert find_last_step(ckpt) == 2
    sft(flags, stage="mid")
    resumed, _, _ = load_checkpoint(ckpt, step=4)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    # changing the budget mid-run is refused rather than silently changing the schedule
    with pytest.raises(SystemExit, match="resume"):
        sft(TINY_DATA + ["--source-stage", "base", "--num-iterations", "6"], stage="mid")


def test_missing_source_and_bad_custom_json(base_dir, tmp_path):
    with pytest.raises(SystemExit, match="no base checkpoint"):
        sft(TINY_DATA + ["--source-stage", "base"], stage="mid")
    make_base(base_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    with pytest.raises(SystemExit, match="bad.jsonl"):
        sft(["--aqua-source", "none", "--custom-json", str(bad)], stage="mid")


def test_bad_data_gets_one_line_errors(base_dir, tmp_path):
    make_base(base_dir)
    good = {
        "question": "1+1?",
        "options": ["A)1", "B)2", "C)3", "D)4", "E)5"],
        "rationale": "1+1=2",
        "correct": "B",
    }
    aqua = tmp_path / "aqua"
    aqua.mkdir()
    bad_rows = [{**good, "options": good["options"][:4]}, {**good, "correct": "F"}]
    (aqua / "train.json").write_text("".join(json.dumps(r) + "\n" for r in bad_rows))
    (aqua / "dev.json").write_text(json.dumps(good) + "\n")
    batch = ["--device-batch-size", "2", "--total-batch-size", "2"]
    dir_data = ["--aqua-source", "dir", "--aqua-data-dir", str(aqua), *batch]
    with pytest.raises(
        SystemExit,
        match=r"train split in .*train.json has no usable rows.*"
        r"--aqua-train-examples 0",
    ):
        sft(dir_data)
    (aqua / "train.json").write_text(json.dumps(good) + "\n")
    (aqua / "dev.json").write_text("")  # an empty split
    with pytest.raises(
        SystemExit,
        match=r"validation split in .*dev.json has no usable rows.*"
        r"--aqua-val-examples 0",
    ):
        sft(dir_data)
    with pytest.raises(SystemExit, match="the training mixture is empty"):
        sft(["--aqua-source", "none"])
    assert not (base_dir / "checkpoints" / "sft").exists()  # refused before anything was written


def test_missing_checkpoint_is_one_line_not_a_traceback(base_dir):
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base_dir),
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
    }
    res = subprocess.run(
        [sys.executable, "-m", "scripts.chat_eval", "-i", "rl", "--max-problems", "2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert f"no checkpoints under {base_dir / 'checkpoints' / 'rl'}" in res.stderr


# ------------------------------------------------------------------------------------- eval and CLI


def test_chat_eval_writes_jsonl_and_report(base_dir):
    make_base(base_dir, stage="sft")
    from scripts.chat_eval import main

    rows = main(
        [
            "-i",
            "sft",
            "-a",
            "SYNTH",
            "--max-problems",
            "5",
            "--num-samples",
            "2",
            "--max-tokens",
            "12",
            "--show",
            "0",
        ]
        + QUIET
    )
    lines = read_jsonl(base_dir / "runs" / "local" / "chat_eval.jsonl")
    assert len(lines) == 2 and {r["mode"] for r in lines} == {"generative", "categorical"}
    for r in lines:
        assert (
            r["source"] == "sft"
            and r["task"] == "synthetic_aqua"
            and r["split"] == "test"
            and r["n"] == 5
        )
        assert 0.0 <= r["acc"] <= 1.0 and r["chance"] == 0.2
        assert r["most_frequent_letter"] in "ABCDE" and 0.2 <= r["most_frequent_acc"] <= 1.0
        assert sum(r["pred_counts"].values()) == 5 and sum(r["gold_counts"].values()) == 5
        assert sum(sum(v.values()) for v in r["confusion"].values()) == 5
        assert r["correct"] == sum(r["confusion"][letter][letter] for letter in "ABCDE")
    gen = next(r for r in lines if r["mode"] == "generative")
    cat = next(r for r in lines if r["mode"] == "categorical")
    assert gen["k"] == 2 and 0.0 <= gen["pass@2"] <= 1.0
    assert cat["scoring"] == "single-token logits" and cat["pred_counts"]["none"] == 0
    assert rows == lines or len(rows) == 2
    assert "synthetic_aqua" in (base_dir / "report" / "local" / "chat_eval_sft.md").read_text()
    for r in lines:  # recall per gold letter present, from the same gold and predicted letters
        assert set(r["letter_recall"]) == {g for g, n in r["gold_counts"].items() if n}
        assert r["letter_recall"] == {
            g: r["confusion"][g][g] / r["gold_counts"][g] for g in r["letter_recall"]
        }


def test_letter_recall_by_hand():
    from nanochat.mc_eval import GenerativeResult

    # gold A A B C C C, greedy A none B C A B: A 1/2, B 1/1, C 1/3; D and E have no problems
    res = GenerativeResult(
        gold=[0, 0, 1, 2, 2, 2],
        greedy=[0, 5, 1, 2, 0, 1],
        greedy_tokens=[1] * 6,
        sample_hits=[0] * 6,
        k=1,
        texts={},
    )
    assert res.letter_recall == pytest.approx({"A": 0.5, "B": 1.0, "C": 1 / 3})
    mean = (0.5 + 1.0 + 1 / 3) / 3
    std = (((0.5 - mean) ** 2 + (1.0 - mean) ** 2 + (1 / 3 - mean) ** 2) / 3) ** 0.5
    assert res.letter_recall_std == pytest.approx(std) and std == pytest.approx(0.2832, abs=1e-4)


def tiny_gpt(vocab_size: int, seed: int, sequence_len: int = 64) -> GPT:
    """One layer of 16, in eval mode, with a wide lm_head so that the letters' logits differ."""
    torch.manual_seed(seed)
    config = GPTConfig(
        sequence_len=sequence_len,
        vocab_size=vocab_size,
        n_layer=1,
        n_head=2,
        n_kv_head=2,
        n_embd=16,
    )
    model = GPT(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(std=1.0)
    return model


def test_letter_scorer_matches_logits(base_dir):
    from nanochat.mc_eval import LetterScorer

    tok = tiny_tokenizer()
    scorer = LetterScorer(tok)
    assert scorer.single and scorer.letter_ids == [256, 257, 258, 259, 260]
    model = tiny_gpt(tok.get_vocab_size(), seed=1)
    prompt = tok.encode("Q?", prepend="<|bos|>")
    choice, scores = scorer(model, prompt)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tok.encode("Answer:")]))[0, -1]
    assert choice == int(torch.argmax(logits[256:261]))
    # the multi-token path (bytes-only tokenizer: " A" is two tokens) agrees with summed log-probs
    plain = Tokenizer(SPLIT_PATTERN, {bytes([i]): i for i in range(256)})
    s2 = LetterScorer(plain)
    assert not s2.single
    model2 = tiny_gpt(plain.get_vocab_size(), seed=1)
    choice2, scores2 = s2(model2, prompt)
    ids = prompt + plain.encode("Answer: C")
    with torch.no_grad():
        logp = torch.log_softmax(model2(torch.tensor([ids]))[0], -1)
    n = len(prompt) + len(plain.encode("Answer:"))
    expected = float(logp[n - 1, ids[n]] + logp[n, ids[n + 1]])
    assert scores2[2] == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("single_token", [True, False])
def test_categorical_eval_batched_equals_one_at_a_time(single_token, monkeypatch):
    """Prompts of different lengths, right-padded into one forward, score as they do alone."""
    from nanochat import mc_eval
    from nanochat.mc_eval import LetterScorer, categorical_eval
    from tasks.synthetic_aqua import SyntheticAqua

    tok = tiny_tokenizer()
    if not single_token:  # bytes only: every letter continuation is two tokens, one row each
        tok = Tokenizer(SPLIT_PATTERN, {bytes([i]): i for i in range(256)})
    model = tiny_gpt(tok.get_vocab_size(), seed=3, sequence_len=512)
    with torch.no_grad():  # the init zeroes the output projections: attention would add nothing
        for param in model.parameters():
            param.normal_(std=0.3)
    task = SyntheticAqua("test", num_examples=8, difficulty="mixed")
    prompts = [tok.render_for_completion(conv) for conv in task]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    scorer = LetterScorer(tok)
    assert scorer.single == single_token
    batched = scorer.scores(model, prompts)
    alone = torch.cat([scorer.scores(model, [p]) for p in prompts])
    torch.testing.assert_close(batched, alone, rtol=1e-4, atol=1e-4)
    assert batched.argmax(-1).tolist() == alone.argmax(-1).tolist()
    # a logits budget of 3 rows' worth: the same scores from forwards of at most 3 rows
    longest = max(len(p) for p in prompts) + len(scorer.prefix_ids) + 2
    monkeypatch.setattr(mc_eval, "LOGITS_BUDGET_BYTES", 3 * 4 * longest * tok.get_vocab_size())
    sizes = []
    forward = mc_eval.forward_right_padded
    monkeypatch.setattr(
        mc_eval, "forward_right_padded", lambda m, rows: sizes.append(len(rows)) or forward(m, rows)
    )
    torch.testing.assert_close(scorer.scores(model, prompts), batched, rtol=1e-4, atol=1e-4)
    assert sizes and max(sizes) <= 3 and sum(sizes) == len(prompts) * (1 if single_token else 5)
    monkeypatch.undo()
    gold, one_by_one = categorical_eval(model, tok, task, len(task), batch_prompts=1)
    gold_b, in_batches = categorical_eval(model, tok, task, len(task), batch_prompts=5)
    assert gold == gold_b == [AQUA_LETTERS.index(conv["answer"]) for conv in task]
    assert one_by_one == in_batches == alone.argmax(-1).tolist()
    # the scores depend on the prompt (a pad mistake would show), not one row repeated
    assert (batched - batched[0]).abs().max() > 1e-3
    right = sum(g == c for g, c in zip(gold, in_batches))
    assert right == sum(g == c for g, c in zip(gold, one_by_one))


def test_chat_eval_real_aqua_dev(base_dir, shared_dir):
    make_base(base_dir, stage="sft")
    from scripts.chat_eval import main

    rows = main(
        [
            "-i",
            "sft",
            "-a",
            "AQUA",
            "--split",
            "dev",
            "--aqua-data-dir",
            str(shared_dir / "data" / "aqua_rat"),
            "--max-problems",
            "3",
            "--max-tokens",
            "8",
            "--modes",
            "categorical",
        ]
        + QUIET
    )
    assert rows[0]["task"] == "aqua" and rows[0]["split"] == "validation" and rows[0]["n"] == 3


def test_chat_cli_one_prompt_subprocess(base_dir):
    make_base(base_dir, stage="sft")
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base_dir),
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
    }
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.chat_cli",
            "-i",
            "sft",
            "-p",
            "What is 2+2?",
            "--max-tokens",
            "8",
            "-t",
            "0",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() != ""
    res = subprocess.run(
        [sys.executable, "-m", "scripts.sft_train", "--help"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        res.returncode == 0
        and "--aqua-train-examples" in res.stdout
        and "--aqua_train_examples" in res.stdout
    )


# ------------------------------------------------------------------------------ torchrun (gloo)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_sft_and_eval_match_single_process(base_dir, tmp_path):
    """The same flags on 2 gloo ranks and on 1 process make the same run: a step is
    --total-batch-size conversations either way (2 ranks x 1 micro-batch, or 1 process x 2), with
    the same step count from --num-epochs and the same weights; chat_eval split over 2 ranks gives
    the same counts as one process."""
    make_base(base_dir)
    flags = [
        "--source-stage",
        "base",
        "--aqua-source",
        "synthetic",
        "--synthetic-examples",
        "16",
        "--synthetic-val-examples",
        "4",
        "--total-batch-size",
        "4",
        "--device-batch-size",
        "2",
        "--max-seq-len",
        "256",
        "--num-epochs",
        "0.75",  # 12 of the 16 conversations: 3 steps of 4, whatever the number of processes
        "--eval-every",
        "0",
        "--log-every",
        "1",
    ]
    sft(flags)  # 4 conversations a step: 2 micro-batches of 2
    base2 = tmp_path / "base2"
    base2.mkdir()
    shutil.copytree(base_dir / "tokenizer", base2 / "tokenizer")
    shutil.copytree(base_dir / "checkpoints" / "base", base2 / "checkpoints" / "base")
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base2),
        "WANDB_MODE": "disabled",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        "NANOCHAT_RUN": "local",
    }  # not --run: torchrun's parser eats it
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(_free_port()),
    ]
    res = subprocess.run(
        launcher + ["-m", "scripts.chat_sft", *flags, "--no-wandb"],  # 2 ranks x 1 micro-batch
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "3 steps x 4 conversations (2 proc x 1 micro x 2)" in res.stdout
    w1, _, _ = load_checkpoint(checkpoint_dir("sft", "d2"), step=3)
    w2, _, meta2 = load_checkpoint(base2 / "checkpoints" / "sft" / "d2", step=3)
    assert meta2["world_size"] == 2
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=2e-5), k
    l1 = [
        r["train/loss"]
        for r in read_jsonl(base_dir / "runs" / "local" / "sft.jsonl")
        if "train/loss" in r
    ]
    l2 = [
        r["train/loss"]
        for r in read_jsonl(base2 / "runs" / "local" / "sft.jsonl")
        if "train/loss" in r
    ]
    assert len(l1) == 3 and l1 == pytest.approx(l2, abs=1e-4)

    from scripts.chat_eval import main as eval_main

    ev = ["-i", "sft", "-a", "SYNTH", "--max-problems", "5", "--max-tokens", "6", "--show", "0"]
    single = eval_main(ev + QUIET)
    res = subprocess.run(
        launcher[:-1] + [str(_free_port()), "-m", "scripts.chat_eval", *ev, "--no-wandb"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    multi = read_jsonl(base2 / "runs" / "local" / "chat_eval.jsonl")
    assert [(r["mode"], r["n"], r["confusion"]) for r in multi] == [
        (r["mode"], r["n"], r["confusion"]) for r in single
    ]


def test_resume_with_changed_training_flags_is_refused(base_dir):
    make_base(base_dir)
    flags = ["--source-stage", "base", *TINY_DATA, "--num-iterations", "2", "--eval-every", "0"]
    sft(flags)
    sft(flags + ["--log-every", "5", "--eval-every", "1"])  # harmless: logging and eval cadence
    with pytest.raises(SystemExit, match=r"--seed 42 -> 7.*--fresh"):
        sft(flags + ["--seed", "7"])
    with pytest.raises(SystemExit, match="--init-lr-frac"):
        sft(flags + ["--init-lr-frac", "0.5"])


def test_batch_layout_fixes_the_global_batch():
    """The conversations per step do not depend on the number of processes: the device batch
    and the micro-batches per process follow from them, and a layout that cannot make them is
    refused, naming the numbers."""
    from nanochat.training import batch_layout

    assert batch_layout(32, None, 1) == (8, 4)
    assert batch_layout(32, None, 8) == (4, 1)
    assert batch_layout(32, 2, 8) == (2, 2)
    assert batch_layout(16, 16, 1) == (16, 1)
    with pytest.raises(SystemExit, match="cannot be split evenly over 3 processes"):
        batch_layout(32, None, 3)
    with pytest.raises(SystemExit, match="--device-batch-size 8 does not divide"):
        batch_layout(32, 8, 8)


def test_sft_resumes_with_another_micro_batch(base_dir):
    """--device-batch-size only splits a step's conversations (the loader's state is one cursor):
    a resume may change it, e.g. after running out of memory, and ends where an unchanged run ends
    (up to float round-off: the loss sums the same tokens in other groups)."""
    from nanochat.checkpoint import load_checkpoint

    make_base(base_dir)
    flags = ["--source-stage", "base", *TINY_DATA, "--eval-every", "0", "--save-every", "2"]
    sft([*flags, "--num-iterations", "4"])  # 4 conversations a step, one micro-batch of 4
    ckpt = checkpoint_dir("sft", "d2")
    straight, _, _ = load_checkpoint(ckpt, step=4)
    shutil.rmtree(ckpt / "step_000004")  # as if killed after step 2's checkpoint
    sft([*flags, "--num-iterations", "4", "--device-batch-size", "2"])  # 2 micro-batches of 2
    resumed, _, _ = load_checkpoint(ckpt, step=4)
    for k in straight:
        assert torch.allclose(resumed[k], straight[k], rtol=0, atol=1e-5), k
