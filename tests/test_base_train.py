"""Pretraining end to end on CPU with real subprocesses: a tiny run, torchrun x2 == grad
accumulation, SIGKILL + resume == uninterrupted, truncated-checkpoint fallback, and
base_loss/base_eval on the result.

Everything is tiny (depth 1, n_embd 64, vocab 512 trained here with rustbpe on the offline synthetic
corpus, 64-token rows) and single-threaded per process, so the file runs in about a minute on two
cores.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import sigkill_after_checkpoints

from nanochat.checkpoint import find_last_step
from nanochat.tracking import read_jsonl

REPO = Path(__file__).resolve().parents[1]
# a one-layer model on 64-token rows: the flags every run here starts from
TINY = (
    "--depth 1 --aspect-ratio 64 --head-dim 32 --max-seq-len 64 --device-batch-size 2"
    " --source synthetic --eval-tokens 512 --sample-every -1 --run t --tag tiny --no-wandb"
).split()


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory):
    """A 512-token BPE tokenizer, trained once per module with rustbpe on the synthetic corpus."""
    from nanochat.tokenizer import Tokenizer
    from tasks.synthetic_aqua import synthetic_texts

    out = tmp_path_factory.mktemp("tok")
    tok = Tokenizer.train_from_iterator(synthetic_texts(400, seed=7), 512)
    tok.save(out)
    return out


@pytest.fixture
def base(base_dir, trained_tokenizer):
    import shutil

    shutil.copytree(trained_tokenizer, base_dir / "tokenizer")
    return base_dir


def env_for(base: Path) -> dict:
    # one thread per process (two processes on two cores, no oversubscription), the same for
    # every run compared
    return {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base),
        "WANDB_MODE": "disabled",
        "NANOCHAT_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "NANOCHAT_COMPILE": "0",
        "PYTHONUNBUFFERED": "1",
    }


def run(args, base, timeout=300, module="scripts.base_train", check=True):
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env_for(base),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, (
            f"{module} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return proc


@pytest.fixture
def inproc(monkeypatch, one_thread):
    """Run a script's main(argv) inside pytest (no 5-10 s torch import), single-threaded like
    the subprocesses."""
    monkeypatch.setenv("NANOCHAT_DEVICE", "cpu")
    monkeypatch.setenv("WANDB_MODE", "disabled")

    def call(args, module="scripts.base_train"):
        import importlib

        importlib.import_module(module).main(list(args))

    return call


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ckpt(base: Path, tag="tiny") -> Path:
    return base / "checkpoints" / "base" / tag


def final_weights(base: Path, tag="tiny") -> dict:
    d = ckpt(base, tag)
    step = find_last_step(d)
    return torch.load(d / f"step_{step:06d}" / "model.pt", weights_only=True)


def test_tiny_cpu_run_learns_logs_checkpoints_and_evaluates(base, tmp_path, inproc, capsys):
    args = TINY + [
        "--num-iterations",
        "30",
        "--total-batch-size",
        "256",
        "--eval-every",
        "15",
        "--sample-every",
        "30",
        "--save-every",
        "10",
        "--keep-last",
        "2",
        "--warmdown-ratio",
        "0.3",
    ]
    proc = run(args, base)  # the real CLI once
    assert "1 proc x 2 micro x 2 rows x 64" in proc.stdout

    rows = read_jsonl(base / "runs" / "t" / "base.jsonl")
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 31))
    for key in (
        "train/loss",
        "train/loss_smooth",
        "train/lrm",
        "train/grad_norm",
        "train/tok_per_sec",
        "train/mem_mb",
        "train/muon_momentum",
        "train/tokens",
    ):
        assert key in train[-1], key
    assert "train/mfu" not in train[-1]  # CPU: peak FLOPs unknown, so no made-up MFU
    assert train[0]["train/loss"] > train[-1]["train/loss"] + 1.0, "loss did not go down"
    assert (
        train[0]["train/lrm"] == 1.0 and train[-1]["train/lrm"] < 0.2
    )  # warmdown over the last 30%
    vals = [r for r in rows if "val/bpb" in r]
    assert [r["step"] for r in vals] == [0, 15, 30] and vals[-1]["val/bpb"] < vals[0]["val/bpb"]
    assert any("samples/0" in r for r in rows)
    summary = [r for r in rows if r.get("event") == "summary"][-1]
    assert summary["final/steps"] == 30 and summary["final/tok_per_sec"] > 0

    steps = sorted(p.name for p in ckpt(base).iterdir())
    assert steps == ["step_000020", "step_000030"]  # keep-last 2
    meta = json.loads((ckpt(base) / "step_000030" / "meta.json").read_text())
    assert meta["num_iterations"] == 30 and meta["rank_state"][0]["loaders"][0]["batches"] == 30
    report = (base / "report" / "t" / "base_train.md").read_text()
    assert "validation bits per byte" in report and "tok/s" in report

    # Same command again: the run is complete, nothing is retrained or rewritten.
    before = (ckpt(base) / "step_000030" / "model.pt").stat().st_mtime_ns
    capsys.readouterr()
    inproc(args)
    assert "already complete at step 30" in capsys.readouterr().out
    assert (ckpt(base) / "step_000030" / "model.pt").stat().st_mtime_ns == before
    assert (
        "throughput: n/a" not in (base / "report" / "t" / "base_train.md").read_text()
    )  # figures kept in meta
    # A different model under the same tag is refused (use --fresh or another --tag) ...
    wider = list(args)
    wider[wider.index("--aspect-ratio") + 1] = "128"
    with pytest.raises(SystemExit, match="--fresh"):
        inproc(wider)
    # ... and a total batch that does not split into micro-steps is a clear error.
    with pytest.raises(SystemExit, match="must be a multiple of .* = 128"):
        inproc(TINY + ["--num-iterations", "2", "--total-batch-size", "200"])

    # base_loss (the CLI): train/val bits per byte of that checkpoint, plus samples
    run(
        [
            "--tag",
            "tiny",
            "--source",
            "synthetic",
            "--device-batch-size",
            "2",
            "--split-tokens",
            "512",
            "--sample-tokens",
            "8",
            "--run",
            "t",
            "--no-wandb",
        ],
        base,
        module="scripts.base_loss",
    )
    loss_rows = [
        r for r in read_jsonl(base / "runs" / "t" / "base_loss.jsonl") if "loss/val_bpb" in r
    ]
    assert 0 < loss_rows[-1]["loss/val_bpb"] < vals[0]["val/bpb"]
    # same val data and model as base_train's last evaluation (which used 2 rows x 64 x 4 steps too)
    assert loss_rows[-1]["loss/val_bpb"] == pytest.approx(vals[-1]["val/bpb"], rel=1e-4)
    assert loss_rows[-1]["loss/train_bpb"] < vals[0]["val/bpb"]
    assert "train bpb" in (base / "report" / "t" / "base_loss.md").read_text()

    # base_eval: CORE on a tiny local bundle, through the BPE tokenizer
    from tests.test_core_eval import write_bundle

    bundle = write_bundle(tmp_path / "eval_bundle")
    inproc(
        ["--tag", "tiny", "--bundle-dir", str(bundle), "--run", "t", "--no-wandb"],
        module="scripts.base_eval",
    )
    core_rows = [
        r
        for r in read_jsonl(base / "runs" / "t" / "base_eval.jsonl")
        if "core/core" in r and "step" in r
    ]
    assert -2.0 < core_rows[-1]["core/core"] < 1.0 and core_rows[-1]["step"] == 30


def test_torchrun_two_processes_equals_grad_accumulation(base, tmp_path, inproc):
    # No clipping: 2 ranks sum the squares of their gradient shards for the norm, 1 process takes
    # torch's norm of whole gradients; the clip factors differ in their last bits, which Adam
    # blows up to ~1e-2 on the zero-initialised value-embedding tables (elements whose gradient is
    # round-off). Unclipped, the two runs compute the same bits (test_optim covers clipping).
    common = TINY + [
        "--grad-clip",
        "0",
        "--num-iterations",
        "6",
        "--total-batch-size",
        "256",
        "--eval-every",
        "0",
        "--save-every",
        "0",
    ]
    inproc(common)  # reference: 1 process x 2 micro-steps
    base2 = tmp_path / "base2"
    base2.mkdir()
    (base2 / "tokenizer").symlink_to(base / "tokenizer")
    cmd = [
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port",
        str(free_port()),
        "-m",
        "scripts.base_train",
        *common,
    ]
    # NANOCHAT_RUN, not --run: torchrun's own parser rejects "--run" anywhere on its command line as
    # an ambiguous abbreviation of its --run-path
    cmd.remove("--run"), cmd.remove("t")
    proc = subprocess.run(
        [sys.executable, *cmd],
        cwd=REPO,
        env={**env_for(base2), "NANOCHAT_RUN": "t"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 proc x 1 micro" in proc.stdout
    d2 = ckpt(base2) / "step_000006"
    # the optimizer state is sharded
    assert (d2 / "optim_rank0.pt").is_file() and (d2 / "optim_rank1.pt").is_file()

    w1, w2 = final_weights(base), final_weights(base2)
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=0, atol=2e-5), (k, (w1[k] - w2[k]).abs().max())
    # training moved the weights: the output projections start at exactly zero
    assert w1["transformer.h.0.mlp.c_proj.weight"].abs().max() > 1e-3
    l1 = [
        r["train/loss"] for r in read_jsonl(base / "runs" / "t" / "base.jsonl") if "train/loss" in r
    ]
    l2 = [
        r["train/loss"]
        for r in read_jsonl(base2 / "runs" / "t" / "base.jsonl")
        if "train/loss" in r
    ]
    assert len(l1) == 6 and l1 == pytest.approx(l2, abs=1e-4)


def test_sigkill_resume_equals_uninterrupted_and_skips_truncated_checkpoint(base, tmp_path, inproc):
    args = TINY + [
        "--num-iterations",
        "100",
        "--total-batch-size",
        "128",
        "--eval-every",
        "0",
        "--save-every",
        "4",
        "--keep-last",
        "3",
    ]
    cmd = [sys.executable, "-m", "scripts.base_train", *args]
    sigkill_after_checkpoints(cmd, env_for(base), ckpt(base), 2)
    killed_at = find_last_step(ckpt(base))
    assert killed_at is not None and 8 <= killed_at < 100

    # Truncate the newest checkpoint's weights: the restart must notice and use the one before.
    newest = ckpt(base) / f"step_{killed_at:06d}" / "model.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    proc2 = run(args, base)
    assert f"from step {killed_at - 4}" in proc2.stdout, proc2.stdout[-2000:]
    assert "skipping checkpoint" in proc2.stderr and "truncated" in proc2.stderr

    # Reference: the same run uninterrupted, in its own base dir (in-process, also single-threaded).
    assert_equals_an_uninterrupted_run(base, tmp_path, inproc, args)
    steps = [r["step"] for r in read_jsonl(base / "runs" / "t" / "base.jsonl") if "train/loss" in r]
    assert steps[-1] == 100


def assert_equals_an_uninterrupted_run(base, tmp_path, inproc, args):
    """The final weights in `base` equal, bit for bit, those of the same run done uninterrupted in
    its own base dir (in-process, on one thread like the subprocesses)."""
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "tokenizer").symlink_to(base / "tokenizer")
    os.environ["NANOCHAT_BASE_DIR"] = str(ref)  # restored by the base_dir fixture's monkeypatch
    inproc(args)
    w_ref, w_resumed = final_weights(ref), final_weights(base)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_resumed[k]), (k, (w_ref[k] - w_resumed[k]).abs().max())


def test_sigkill_during_prefetch_resumes_exactly(base, tmp_path, inproc):
    """Two loaders (gradient accumulation 2), each with a producer thread up to 8 batches ahead of
    training, when the run is SIGKILLed: the checkpoints hold each loader's position after the
    last batch trained on, not the producer's, and the resumed run ends with the weights of an
    uninterrupted one."""
    args = (
        TINY
        + (
            "--num-iterations 12 --total-batch-size 256 --eval-every 0 --save-every 3 --prefetch 8"
        ).split()
    )
    cmd = [sys.executable, "-m", "scripts.base_train", *args]
    sigkill_after_checkpoints(cmd, env_for(base), ckpt(base), 2)
    killed_at = find_last_step(ckpt(base))
    assert killed_at is not None and 6 <= killed_at < 12
    meta = json.loads((ckpt(base) / f"step_{killed_at:06d}" / "meta.json").read_text())
    loader_states = meta["rank_state"][0]["loaders"]
    assert [s["batches"] for s in loader_states] == [killed_at, killed_at]
    run(args, base)

    assert_equals_an_uninterrupted_run(base, tmp_path, inproc, args)
    logged = read_jsonl(base / "runs" / "t" / "base.jsonl")
    kept = [r["train/kept_frac"] for r in logged if "train/kept_frac" in r]
    assert kept and all(0 < k <= 1 for k in kept)  # the default packing: some tails cropped


def test_fresh_deletes_only_when_asked(base, inproc):
    args = TINY + [
        "--num-iterations",
        "2",
        "--total-batch-size",
        "128",
        "--eval-every",
        "0",
        "--save-every",
        "1",
    ]
    inproc(args)
    assert find_last_step(ckpt(base)) == 2
    with pytest.raises(SystemExit, match="--num-iterations 2 -> 3"):  # another budget, same tag
        inproc(args + ["--num-iterations", "3"])
    assert find_last_step(ckpt(base)) == 2
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        inproc(args + ["--tag", "other", "--resume", "require"])
    inproc(args + ["--num-iterations", "3", "--fresh"])
    assert find_last_step(ckpt(base)) == 3


def test_schedule_and_budget_rules():
    from types import SimpleNamespace

    from scripts.base_train import lr_multiplier, muon_momentum, resolve_num_iterations

    # 10% warmup, flat, 20% linear warmdown to final_lr_frac
    lrm = [lr_multiplier(s, 100, 0.1, 0.2, 0.1) for s in range(100)]
    assert lrm[0] == pytest.approx(0.1) and lrm[9] == 1.0 and lrm[50] == 1.0 and lrm[80] == 1.0
    assert lrm[90] == pytest.approx(0.5 + 0.5 * 0.1) and lrm[99] == pytest.approx(0.05 + 0.95 * 0.1)
    assert all(a >= b for a, b in zip(lrm[80:], lrm[81:]))
    assert muon_momentum(0, 300) == pytest.approx(0.85) and muon_momentum(
        150, 300
    ) == pytest.approx(0.90)
    assert muon_momentum(10_000, 300) == pytest.approx(0.95) and muon_momentum(
        0, 0
    ) == pytest.approx(0.95)

    def budget(**kw):
        args = SimpleNamespace(num_iterations=-1, target_flops=-1.0, target_param_data_ratio=20.0)
        args.__dict__.update(kw)
        return resolve_num_iterations(
            args, budget_params=1_000_000, flops_per_token=6e6, total_batch_size=4096
        )[0]

    assert budget(num_iterations=7) == 7  # explicit wins
    assert budget(target_flops=6e6 * 4096 * 50) == 50  # FLOPs / (FLOPs per token * tokens per step)
    assert budget() == 20 * 1_000_000 // 4096  # Chinchilla: 20 tokens per parameter
    with pytest.raises(SystemExit, match="no token budget"):
        budget(target_param_data_ratio=0)


def test_running_out_of_data_is_logged_and_said(base, tmp_path, inproc, capsys):
    """A small corpus is looped over; the log, the console and the report say documents
    repeated."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = [f"Document {i}: {i} plus {i} makes {2 * i}." for i in range(60)]
    (corpus / "a.txt").write_text("\n\n".join(docs[:50]))
    (corpus / "b.txt").write_text("\n\n".join(docs[50:]))  # the val split: the last file
    args = [a if a != "synthetic" else "dir" for a in TINY] + [
        "--data-dir",
        str(corpus),
        "--num-iterations",
        "12",
        "--total-batch-size",
        "128",
        "--eval-every",
        "-1",
    ]
    inproc(args)
    out = capsys.readouterr().out
    assert (
        "note: the training data ran out by step" in out
        and out.count("the documents now repeat") == 1
    )
    train = [r for r in read_jsonl(base / "runs" / "t" / "base.jsonl") if "train/data_passes" in r]
    assert (
        train[0]["train/data_passes"] < train[-1]["train/data_passes"]
        and train[-1]["train/data_passes"] > 1
    )
    assert (
        "passes over the training documents (they repeated"
        in (base / "report" / "t" / "base_train.md").read_text()
    )


def test_packing_flag_and_kept_fraction_are_logged_and_reported(base, inproc):
    """The default packing (legacy) crops synthetic documents longer than a 64-token row:
    train/kept_frac says how much of the tokenised text was trained on, and the report repeats it;
    --packing continue trains on all of it."""
    short = "--num-iterations 3 --total-batch-size 128 --eval-every -1".split()
    inproc(TINY + short + "--packing continue".split())
    inproc(TINY + short + "--tag leg".split())
    logged = read_jsonl(base / "runs" / "t" / "base.jsonl")
    kept = [r["train/kept_frac"] for r in logged if "train/kept_frac" in r]
    assert kept[:3] == [1.0, 1.0, 1.0] and all(0 < k < 1 for k in kept[3:]) and len(kept) == 6
    report = (base / "report" / "t" / "base_train.md").read_text()
    assert f"{kept[-1]:.1%} of the tokenised text trained on" in report


def test_out_of_memory_halves_the_micro_batch_and_keeps_the_total(
    base, inproc, capsys, monkeypatch
):
    """A simulated GPU that holds at most 2 rows: the micro-batch backs off 8 -> 4 -> 2 at the
    start, gradient accumulation grows 2 -> 8, and a later run of the same command keeps that
    layout."""
    from nanochat.gpt import GPT

    forward = GPT.forward

    def small_gpu(self, idx, targets=None, **kw):
        if targets is not None and idx.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, idx, targets, **kw)

    monkeypatch.setattr(GPT, "forward", small_gpu)
    args = TINY + [
        "--device-batch-size",
        "8",
        "--total-batch-size",
        "1024",
        "--num-iterations",
        "4",
        "--save-every",
        "2",
        "--eval-every",
        "-1",
    ]
    inproc(args)
    out = capsys.readouterr().out
    assert "a micro-batch of 8 x 64 tokens does not fit in memory: trying 4" in out
    assert "a micro-batch of 4 x 64 tokens does not fit in memory: trying 2" in out
    assert "1 proc x 8 micro x 2 rows x 64" in out
    meta = json.loads((ckpt(base) / "step_000004" / "meta.json").read_text())
    assert (
        meta["device_batch_size"] == 2
        and meta["grad_accum"] == 8
        and meta["total_batch_size"] == 1024
    )
    inproc(args)  # the same command again: resumes with the fitted layout instead of refusing it
    assert "already complete at step 4" in capsys.readouterr().out


def test_out_of_memory_probe_holds_the_optimizer_state_and_changes_nothing(
    base, inproc, capsys, monkeypatch
):
    """A simulated GPU that holds 4 rows next to the parameters alone, but only 2 once AdamW and
    Muon have their state (from the first step on): the probe must hold that state and settle on
    2, not on 4 (whose first step would run out of memory), and the run must end with the same
    weights as one given 2 rows from the start: the probe's step moved nothing and left no state."""
    from nanochat.gpt import GPT

    forward, setup = GPT.forward, GPT.setup_optimizers
    optimizers = []

    def small_gpu(self, idx, targets=None, **kw):
        state = any(opt.state for opt in optimizers)
        if targets is not None and idx.shape[0] > (2 if state else 4):
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, idx, targets, **kw)

    def keep_optimizers(self, **kw):
        optimizers[:] = setup(self, **kw)
        return optimizers

    args = TINY + ["--total-batch-size", "512", "--num-iterations", "3", "--eval-every", "-1"]
    args += ["--save-every", "3"]
    with monkeypatch.context() as m:
        m.setattr(GPT, "forward", small_gpu)
        m.setattr(GPT, "setup_optimizers", keep_optimizers)
        inproc(args + ["--device-batch-size", "8"])
    out = capsys.readouterr().out
    assert "a micro-batch of 4 x 64 tokens does not fit in memory: trying 2" in out
    assert "1 proc x 4 micro x 2 rows x 64" in out
    inproc(args + ["--device-batch-size", "2", "--tag", "direct"])
    probed, direct = final_weights(base), final_weights(base, "direct")
    assert probed.keys() == direct.keys()
    assert all(torch.equal(probed[k], direct[k]) for k in probed)


def test_bench_pretrain_quality_runs_variants_on_the_same_batches(capsys):
    from scripts.bench_pretrain_quality import main

    main(
        (
            "--variants none:value_embed_every=0 ve:value_embed_every=1 --seeds 1 3"
            " --depth 1 --aspect-ratio 64 --head-dim 32 --max-seq-len 32 --batch-size 2"
            " --steps 2 --eval-every 1 --val-batches 1 --vocab-size 300 --tokenizer-chars 50000"
        ).split()
    )
    out = capsys.readouterr().out
    rows = {
        line.split("|")[0].strip(): line.split("|")
        for line in out.splitlines()
        if line.count("|") > 8
    }
    assert set(rows) == {"variant", "none", "ve"}
    assert float(rows["none"][5]) == 0.0 and float(rows["none"][6]) == 0.0  # paired with itself
    assert int(rows["ve"][1].replace(",", "")) > int(rows["none"][1].replace(",", ""))  # the tables
    assert rows["ve"][2] == rows["none"][2]  # ...at equal matmul FLOPs
    assert "seed spread of none" in out

    # the data loader's packings: each trained on its own batches, scored on both val packings
    main(
        (
            "--variants base: --packings legacy continue --seeds 1 --depth 1 --aspect-ratio 64"
            " --head-dim 32 --max-seq-len 32 --batch-size 2 --steps 2 --eval-every 2"
            " --val-batches 1 --vocab-size 300 --tokenizer-chars 50000"
        ).split()
    )
    out = capsys.readouterr().out
    assert out.count("on validation batches packed") == 2
    assert out.count("base/legacy |") == 2 and out.count("base/continue |") == 2
    assert "train batches packed 'legacy'" in out and "of the tokenised text kept" in out
