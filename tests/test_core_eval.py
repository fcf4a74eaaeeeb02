"""CORE metric: scoring from logits, centring, bundle loading and downloading, and
scripts.base_eval end to end.

The bundle here is made in the test, in the real eval_bundle.zip layout (core.yaml,
eval_data/*.jsonl, eval_meta_data.csv), with a few items of each task type.
"""

import functools
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from nanochat import core_eval
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer

REPO = Path(__file__).resolve().parents[1]

CORE_YAML = """icl_tasks:
-
  label: tiny_mc
  dataset_uri: tiny/mc.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
-
  label: tiny_schema
  dataset_uri: tiny/schema.jsonl
  num_fewshot: [1]
  icl_task_type: schema
-
  label: tiny_lm
  dataset_uri: tiny/lm.jsonl
  num_fewshot: [2]
  icl_task_type: language_modeling
  continuation_delimiter: "\\nAnswer: "
"""
BASELINES = {"tiny_mc": 25.0, "tiny_schema": 50.0, "tiny_lm": 0.0}


def make_data():
    animals = ["cat", "dog", "cow", "owl", "fox", "bee"]
    mc = [
        {
            "query": f"Which animal says {a}-sound?",
            "choices": [f"the {b}" for b in animals[i : i + 4] + animals[: max(0, i + 4 - 6)]][:4],
            "gold": i % 4,
        }
        for i, a in enumerate(animals)
    ]
    schema = [
        {
            "context_options": [f"{a} went home", f"{a} went out", f"{a} slept"],
            "continuation": "and then it rained.",
            "gold": i % 3,
        }
        for i, a in enumerate(animals[:5])
    ]
    lm = [
        {"context": f"The {a} is an animal number {i}.", "continuation": f"{a}{i}"}
        for i, a in enumerate(animals[:5])
    ]
    return {"multiple_choice": mc, "schema": schema, "language_modeling": lm}


def write_bundle(root: Path, baselines=BASELINES) -> Path:
    (root / "eval_data" / "tiny").mkdir(parents=True)
    (root / "core.yaml").write_text(CORE_YAML)
    data = make_data()
    for name, key in (("mc", "multiple_choice"), ("schema", "schema"), ("lm", "language_modeling")):
        with open(root / "eval_data" / "tiny" / f"{name}.jsonl", "w") as fh:
            for item in data[key]:
                fh.write(json.dumps(item) + "\n")
    rows = ["Eval Task,Task Category,Random baseline"] + [
        f"{k},tiny,{v}" for k, v in baselines.items()
    ]
    (root / "eval_meta_data.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def byte_tok():
    # no merges: one token per byte, so hand computations know exactly where each string starts
    return Tokenizer(SPLIT_PATTERN, {bytes([i]): i for i in range(256)})


def random_gpt(vocab: int, seq_len: int = 256, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(
        GPTConfig(
            sequence_len=seq_len, vocab_size=vocab, n_layer=1, n_head=2, n_kv_head=2, n_embd=32
        )
    )
    with (
        torch.no_grad()
    ):  # the real init zeroes output projections: add noise so options really differ
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


class OracleLM(torch.nn.Module):
    """Logits that favour (good=True) or disfavour the next token of whichever gold token sequence a
    row follows: a model that 'knows' the answers, which CORE must reward fully (and punish its
    opposite)."""

    def __init__(self, gold_seqs, vocab, seq_len=512, good=True):
        super().__init__()
        self.gold, self.vocab, self.sign = gold_seqs, vocab, 1.0 if good else -1.0
        self.config = SimpleNamespace(sequence_len=seq_len)

    def forward(self, ids):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            row = ids[b].tolist()
            for g in self.gold:
                for t in range(min(T, len(g)) - 1):
                    if row[t] != g[t]:
                        break
                    logits[b, t, g[t + 1]] = 8.0 * self.sign
        return logits


def gold_sequences(tok, task, data):
    render = {
        "multiple_choice": core_eval.render_prompts_mc,
        "schema": core_eval.render_prompts_schema,
        "language_modeling": core_eval.render_prompts_lm,
    }[task["task_type"]]
    seqs = []
    for idx, item in enumerate(data):
        shots = core_eval.fewshot_examples(data, idx, task["num_fewshot"])
        prompts = render(item, task["continuation_delimiter"], shots)
        gold = prompts[-1] if task["task_type"] == "language_modeling" else prompts[item["gold"]]
        seqs.append(tok.encode(gold, prepend=tok.get_bos_token_id()))
    return seqs


@pytest.mark.parametrize(
    "task_type,delim,shots",
    [("multiple_choice", " ", 2), ("schema", " ", 1), ("language_modeling", "\nAnswer: ", 2)],
)
def test_oracle_scores_perfect_and_anti_oracle_zero(byte_tok, task_type, delim, shots):
    data = make_data()[task_type]
    task = {
        "label": "t",
        "task_type": task_type,
        "num_fewshot": shots,
        "continuation_delimiter": delim,
    }
    gold = gold_sequences(byte_tok, task, data)
    vocab = byte_tok.get_vocab_size()
    assert core_eval.evaluate_task(OracleLM(gold, vocab), byte_tok, data, task, "cpu") == 1.0
    assert (
        core_eval.evaluate_task(OracleLM(gold, vocab, good=False), byte_tok, data, task, "cpu")
        == 0.0
    )


def test_mc_and_lm_match_hand_computation(byte_tok):
    model = random_gpt(byte_tok.get_vocab_size())
    bos = byte_tok.get_bos_token_id()

    def nats(text_before, text_scored):  # per-token losses of text_scored after bos + text_before
        before = [bos] + list(text_before.encode())
        ids = torch.tensor([before + list(text_scored.encode())])
        with torch.no_grad():
            logits = model(ids)[0]
        n = len(before)
        return (
            F.cross_entropy(logits[n - 1 : -1], ids[0, n:], reduction="none"),
            logits[n - 1 : -1].argmax(-1),
            ids[0, n:],
        )

    mc = make_data()["multiple_choice"]
    task = {
        "label": "mc",
        "task_type": "multiple_choice",
        "num_fewshot": 0,
        "continuation_delimiter": " ",
    }
    hand_correct = 0
    for item in mc:
        # the choices share "the ", so the common token prefix includes it and the scored part
        # starts after it
        means = [
            nats(item["query"] + " the ", c[len("the ") :])[0].mean().item()
            for c in item["choices"]
        ]
        hand_correct += int(min(range(len(means)), key=means.__getitem__) == item["gold"])
    assert core_eval.evaluate_task(model, byte_tok, mc, task, "cpu") == pytest.approx(
        hand_correct / len(mc)
    )

    lm = make_data()["language_modeling"]
    task = {
        "label": "lm",
        "task_type": "language_modeling",
        "num_fewshot": 0,
        "continuation_delimiter": " => ",
    }
    for item in lm:
        # the "without" prompt is right-stripped, so the delimiter's trailing space is scored too
        _, pred, target = nats(item["context"] + " =>", " " + item["continuation"])
        expected = bool(torch.equal(pred, target))
        assert core_eval.score_example(model, byte_tok, item, task, [], "cpu") == expected


def test_long_prompts_are_cropped_from_the_left(byte_tok):
    data = make_data()["multiple_choice"]
    task = {
        "label": "mc",
        "task_type": "multiple_choice",
        "num_fewshot": 5,
        "continuation_delimiter": " ",
    }
    gold = gold_sequences(byte_tok, task, data)
    assert max(len(g) for g in gold) > 100
    oracle = OracleLM(gold, byte_tok.get_vocab_size(), seq_len=64)
    seen = []
    forward = oracle.forward
    oracle.forward = lambda ids: (seen.append(ids.shape[1]), forward(ids))[1]
    acc = core_eval.evaluate_task(oracle, byte_tok, data, task, "cpu")
    assert max(seen) <= 64
    assert 0.0 <= acc <= 1.0


def test_evaluate_core_centres_and_averages(tmp_path, byte_tok):
    bundle = write_bundle(tmp_path / "eval_bundle")
    model = random_gpt(byte_tok.get_vocab_size())
    out = core_eval.evaluate_core(model, byte_tok, bundle, "cpu", log=lambda *a: None)
    assert set(out["results"]) == set(BASELINES)
    for label, acc in out["results"].items():
        b = BASELINES[label] / 100
        assert out["centered"][label] == pytest.approx((acc - b) / (1 - b))
    assert out["core"] == pytest.approx(sum(out["centered"].values()) / 3)
    # max_per_task takes the same (seeded) subset every time
    a = core_eval.evaluate_core(model, byte_tok, bundle, "cpu", max_per_task=3, log=lambda *a: None)
    b = core_eval.evaluate_core(model, byte_tok, bundle, "cpu", max_per_task=3, log=lambda *a: None)
    assert a == b
    assert core_eval.centered(0.25, 25.0) == 0.0 and core_eval.centered(1.0, 25.0) == 1.0


def test_bad_bundles_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="core.yaml"):
        core_eval.load_bundle(tmp_path)
    bundle = write_bundle(tmp_path / "b1", baselines={"tiny_mc": 25.0, "tiny_schema": 50.0})
    with pytest.raises(ValueError, match="no random baseline.*tiny_lm"):
        core_eval.load_bundle(bundle)
    bundle = write_bundle(tmp_path / "b2")
    (bundle / "core.yaml").write_text(
        CORE_YAML.replace("icl_task_type: schema", "icl_task_type: ranking")
    )
    with pytest.raises(ValueError, match="ranking"):
        core_eval.load_bundle(bundle)
    bundle = write_bundle(tmp_path / "b3")
    with open(bundle / "eval_data" / "tiny" / "mc.jsonl", "a") as fh:
        fh.write('{"query": "no choices here"}\n')
    tasks, _ = core_eval.load_bundle(bundle)
    with pytest.raises(ValueError, match=r"mc.jsonl line 7: missing \['choices', 'gold'\]"):
        core_eval.load_task_data(bundle, tasks[0])


def _serve(directory: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_download_bundle_from_http_and_offline_error(tmp_path):
    src = write_bundle(tmp_path / "src" / "eval_bundle")
    serve_dir = tmp_path / "www"
    serve_dir.mkdir()
    with zipfile.ZipFile(serve_dir / "eval_bundle.zip", "w") as zf:
        for f in src.rglob("*"):
            zf.write(
                f, f.relative_to(src.parent)
            )  # top-level eval_bundle/ folder, like the real zip
    server = _serve(serve_dir)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/eval_bundle.zip"
        dest = core_eval.download_bundle(tmp_path / "base" / "eval_bundle", url=url)
        assert (dest / "core.yaml").is_file() and (
            dest / "eval_data" / "tiny" / "lm.jsonl"
        ).is_file()
        assert [p.name for p in dest.parent.iterdir()] == ["eval_bundle"]  # no temp leftovers
        core_eval.load_bundle(dest)
        with pytest.raises(RuntimeError, match="no core.yaml"):  # a zip that is not the bundle
            with zipfile.ZipFile(serve_dir / "other.zip", "w") as zf:
                zf.writestr("readme.txt", "hi")
            core_eval.download_bundle(
                tmp_path / "x" / "eval_bundle", url=url.replace("eval_bundle.zip", "other.zip")
            )
        assert not (tmp_path / "x" / "eval_bundle").exists()
    finally:
        server.shutdown()
    with pytest.raises(RuntimeError, match="offline.*--bundle-dir"):
        core_eval.download_bundle(
            tmp_path / "y" / "eval_bundle", url="http://127.0.0.1:9/eval_bundle.zip", timeout=5
        )


def test_base_eval_script_on_tiny_checkpoint(tmp_path, base_dir, byte_tok):
    from nanochat.checkpoint import checkpoint_dir, save_checkpoint
    from nanochat.tracking import read_jsonl

    byte_tok.save(base_dir / "tokenizer")
    model = random_gpt(byte_tok.get_vocab_size(), seq_len=128)
    save_checkpoint(
        checkpoint_dir("base", "d1"),
        5,
        model.state_dict(),
        None,
        {"model_config": asdict(model.config)},
    )
    bundle = write_bundle(tmp_path / "eval_bundle")
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base_dir),
        "WANDB_MODE": "disabled",
        "NANOCHAT_DEVICE": "cpu",
    }
    # under torchrun with 2 ranks (gloo): each scores every other example, the flags are
    # all-reduced, so the result must equal the single-process computation exactly
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(port),
        "-m",
        "scripts.base_eval",
        "--bundle-dir",
        str(bundle),
    ]
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**env, "NANOCHAT_RUN": "t", "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on cpu x 2" in proc.stdout
    expected = core_eval.evaluate_core(model, byte_tok, bundle, "cpu", log=lambda *a: None)
    rows = read_jsonl(base_dir / "runs" / "t" / "base_eval.jsonl")
    logged = [r for r in rows if "core/core" in r]
    assert logged and logged[-1]["core/core"] == pytest.approx(expected["core"], abs=1e-6)
    assert logged[-1]["core/acc/tiny_mc"] == pytest.approx(expected["results"]["tiny_mc"])
    section = (base_dir / "report" / "t" / "base_eval.md").read_text()
    assert "CORE" in section and "tiny_schema" in section
    # offline with no bundle: one clear message (SystemExit, so no traceback), nothing left behind
    from scripts import base_eval

    with pytest.raises(SystemExit, match="could not download .*--bundle-dir"):
        base_eval.main(["--bundle-url", "http://127.0.0.1:9/x.zip", "--no-wandb"])
    assert not (base_dir / "eval_bundle").exists()
