"""run_aquarat_small.sh: flag checking, and the smoke profile end to end (every stage for a few
steps), then a re-run that skips finished stages and a --from that redoes only the later ones."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "run_aquarat_small.sh"


def run_pipeline(args, base_dir, timeout=900, extra_env=None):
    env = {
        **os.environ,
        "NANOCHAT_BASE_DIR": str(base_dir),
        "WANDB_MODE": "offline",
        **(extra_env or {}),
    }
    env = {k: v for k, v in env.items() if v != ""}  # "" = unset it
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--profile", "laptop"], "--profile must be auto, cpu, gpu or smoke"),
        (["--from", "rl-ish"], "--from must be one of"),
        (["--bogus"], "unknown option '--bogus'"),
        (["--run"], "--run needs a value"),
        (["--seed"], "--seed needs a value"),
        (["--nproc", "two"], "--nproc must be a whole number above 0"),
        (["--seed", "-1"], "--seed must be a whole number"),
        (["--gpu-hourly-price", "$3"], "--gpu-hourly-price must be a number"),
        (["--stage-args", "rl"], "--stage-args wants STAGE=ARGS"),
        (["--stage-args", "sfx=--num-iterations 3"], "--stage-args: unknown stage 'sfx'"),
        (["--cpu-rehearsal"], "--cpu-rehearsal rehearses the gpu profile: add --profile gpu"),
    ],
)
def test_bad_flags_are_refused_before_anything_runs(args, message, base_dir):
    result = run_pipeline(args, base_dir, timeout=60)
    assert result.returncode != 0
    assert message in result.stderr
    assert not (base_dir / "runs").exists()  # refused before any stage (or set-up) started


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again once the socket is: connections are refused


STAGES = [
    "tokenizer",
    "tok_eval",
    "base",
    "base_loss",
    "mid",
    "sft",
    "rl",
    "eval_mid",
    "eval_sft",
    "eval_rl",
]


@pytest.mark.xdist_group("smoke_run")  # the worker that builds the shared run
def test_smoke_profile_runs_every_stage_then_resumes_by_skipping(smoke_run):
    # conftest's smoke_run: interrupted twice, then finished by the same command. Its W&B key has no
    # server behind it: found out once, up front, and the stages logged offline.
    base_dir, tree, env, cmd = (
        smoke_run["base"],
        smoke_run["tree"],
        smoke_run["env"],
        smoke_run["cmd"],
    )

    def run(args, timeout=900):
        return subprocess.run(
            ["bash", str(tree / "run_aquarat_small.sh"), *args],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    first = smoke_run["final"]
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "is unreachable" in first.stdout and "wandb sync" in first.stdout
    run_dir = base_dir / "runs" / "smk"
    assert list((run_dir / "wandb").glob("offline-run-*"))  # offline runs to sync later
    assert all((run_dir / f".done_{s}").is_file() for s in STAGES)
    # CORE needs the downloaded bundle: gpu profile only
    assert not (run_dir / ".done_base_eval").exists()
    for stage in ["base", "mid", "sft", "rl"]:  # tagged with the run; --seed reached every stage
        metas = sorted((base_dir / "checkpoints" / stage / "smk").glob("step_*/meta.json"))
        meta = json.loads(metas[-1].read_text())
        assert meta["args"]["seed"] == 7
        assert meta["tokenizer"]["dir"] == "runs/smk/tokenizer"  # the run's own tokenizer, recorded
    assert not (base_dir / "tokenizer").exists()
    rows = [json.loads(line) for line in (run_dir / "chat_eval.jsonl").read_text().splitlines()]
    assert {(r["source"], r["mode"]) for r in rows} == {
        (s, m) for s in ("mid", "sft", "rl") for m in ("generative", "categorical")
    }
    assert all(r["n"] == 8 and r["task"] == "synthetic_aqua" and r["split"] == "test" for r in rows)
    report_dir = base_dir / "report" / "smk"
    report = (report_dir / "report.md").read_text()
    for heading in [
        "Tokenizer training",
        "pretraining",
        "Mid-training",
        "Supervised fine-tuning",
        "Reinforcement learning",
        "Chat evaluation",
        "## Accuracy",
        "## Time per stage",
    ]:
        assert heading in report, heading
    assert "SFT -> RL on the same 8" in report and "cost (USD)" in report
    assert "- stage base_eval: not run (CORE needs the downloaded eval bundle" in report
    assert (
        "- stage data: not run (the smoke profile pretrains on the offline synthetic corpus)"
        in report
    )
    assert "no log yet" not in report  # every other stage ran and logged
    for png in [
        "rl_reward.png",
        "rl_kl.png",
        "rl_letter_counts.png",
        "attn_entropy_layers.png",
        "heatmap_rl_layer_0.png",
    ]:
        assert (report_dir / png).is_file() and f"({png})" in report, png
    # issue 28's diagnostics reach the stage log and its offline W&B run (the smoke model states
    # no answer letter, so the lens and the answer's attention shares have nothing to read here;
    # tests/test_rl.py checks those on a model that answers)
    rl_rows = [json.loads(line) for line in (run_dir / "rl.jsonl").read_text().splitlines()]
    rl_keys = set().union(*rl_rows)
    diagnostics = {"rl/token_entropy_mean", "rl/token_entropy_p50", "rl/token_entropy_p90"}
    diagnostics |= {"rl/high_entropy_frac", "rl/eval_letter_recall_std", "rl/samples"}
    diagnostics |= {f"rl/weight_drift/{g}" for g in ("layer_0", "layer_1", "embedding", "lm_head")}
    assert diagnostics <= rl_keys, diagnostics - rl_keys
    assert (run_dir / "rl_samples.jsonl").is_file()
    from test_rl import read_wandb_file

    histories = [read_wandb_file(p) for p in run_dir.glob("wandb/offline-run-*/run-*.wandb")]
    (rl_history,) = [h for h in histories if any("rl/mean_reward" in row for row in h)]
    wandb_keys = set().union(*rl_history)
    wandb_keys |= {k.rsplit("/", 1)[0] for k in wandb_keys if k.endswith("/_type")}  # tables
    assert diagnostics <= wandb_keys, diagnostics - wandb_keys
    log = (run_dir / "pipeline.log").read_text()
    assert "[pipeline] rl:" in log and "finished" in log
    # each chat checkpoint is evaluated right after its stage (a failed RL keeps mid and SFT's)
    order = ["mid", "eval_mid", "sft", "eval_sft", "rl", "eval_rl"]
    starts = [log.index(f"[pipeline] {s}: 2") for s in order]  # "[pipeline] sft: 2026-..."
    assert starts == sorted(starts), dict(zip(order, starts))

    # Same command again, with flags that change nothing trained (a troubleshooting row's advice):
    # nothing is retrained, and the run goes on.
    rl_marker = run_dir / ".done_rl"
    stamp = rl_marker.stat().st_mtime_ns
    again = run(cmd[2:] + ["--stage-args", "base=--keep-last 1 --save-every 3"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "--stage-args for base changed" in again.stdout
    assert all(f"[pipeline] {s}: done earlier, skipping" in again.stdout for s in STAGES)
    assert rl_marker.stat().st_mtime_ns == stamp
    # ... but a flag that changes what a finished stage trained is refused, naming it
    changed = run(cmd[2:] + ["--stage-args", "base=--num-iterations 99"], timeout=120)
    assert changed.returncode == 2
    assert "base (finished): --num-iterations" in changed.stderr, changed.stderr
    assert "-> 99" in changed.stderr and "[pipeline] tokenizer" not in changed.stdout

    # The same run with another seed would skip the stages done with the old one: refused, all in
    # one go.
    args = cmd[2:]
    other_seed = run(
        args[: args.index("--seed") + 1] + ["9"] + args[args.index("--seed") + 2 :], timeout=120
    )
    assert other_seed.returncode == 2
    assert "run 'smk' was made with: profile=smoke seed=7" in other_seed.stderr
    assert "another --run NAME" in other_seed.stderr and "--force" in other_seed.stderr
    assert "[pipeline] tokenizer" not in other_seed.stdout and rl_marker.stat().st_mtime_ns == stamp

    # --from eval redoes the three evaluations (and the report) only. (--no-wandb changes no
    # result: the redone evaluations need no W&B, whose start costs seconds a stage.)
    redo = run(cmd[2:] + ["--from", "eval", "--no-wandb"])
    assert redo.returncode == 0, redo.stderr[-3000:]
    assert "[pipeline] rl: done earlier, skipping" in redo.stdout
    assert all(
        f"[pipeline] eval_{s}: done earlier" not in redo.stdout for s in ("mid", "sft", "rl")
    )
    assert (
        len((run_dir / "chat_eval.jsonl").read_text().splitlines()) == 12
    )  # appended by the re-run

    # Another run (another seed) in the same base dir trains its own checkpoints and writes its own
    # report; the first run's state is untouched. (Without W&B: the smk run covers it.)
    sft_meta = sorted((base_dir / "checkpoints" / "sft" / "smk").glob("step_*/meta.json"))[-1]
    sft_stamp = sft_meta.stat().st_mtime_ns
    other = run(["--profile", "smoke", "--no-sync", "--no-wandb", "--run", "smk2", "--seed", "8"])
    assert other.returncode == 0, other.stdout[-3000:] + other.stderr[-3000:]
    assert "done earlier" not in other.stdout
    for stage in ["base", "mid", "sft", "rl"]:
        meta = sorted((base_dir / "checkpoints" / stage / "smk2").glob("step_*/meta.json"))[-1]
        assert json.loads(meta.read_text())["args"]["seed"] == 8
    assert sft_meta.stat().st_mtime_ns == sft_stamp
    assert json.loads(sft_meta.read_text())["tokenizer"]["dir"] == "runs/smk/tokenizer"
    assert (base_dir / "runs" / "smk2" / "tokenizer" / "tokenizer.json").is_file()
    assert "run `smk2`" in (base_dir / "report" / "smk2" / "report.md").read_text()
    assert "run `smk`" in (base_dir / "report" / "smk" / "report.md").read_text()


# ----------------------------------------------------------------------------------------------
# The gpu profile, rehearsed on CPU: its stages and flags, local stand-ins for what it downloads,
# and --stage-args that change sizes only.


def _serve_directory(root: Path):
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _fineweb_stand_in(root: Path, shards: int = 2) -> Path:
    """Parquet shards (column `text`, several row groups) at the Hugging Face URL layout the data
    stage downloads from."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.synthetic_aqua import synthetic_texts

    repo_dir = root / "datasets" / "karpathy" / "fineweb-edu-100b-shuffle" / "resolve" / "main"
    repo_dir.mkdir(parents=True)
    for i in range(shards):
        docs = list(synthetic_texts(240, seed=100 + i))
        pq.write_table(
            pa.table({"text": docs}), repo_dir / f"shard_{i:05d}.parquet", row_group_size=60
        )
    return root


def _aqua_stand_in(out: Path) -> Path:
    """train.json / dev.json / test.json in AQuA-RAT's original JSON-lines format, cut from the
    254 real dev problems in ../shared, or (where ../shared is absent) 254 sums in that format."""
    from conftest import SHARED_DIR

    real = SHARED_DIR / "data" / "aqua_rat" / "dev.json"
    if real.is_file():
        rows = real.read_text().splitlines()
    else:
        rows = []
        for i in range(254):
            a, b, letter = 10 + i, 3 + i % 7, "ABCDE"[i % 5]
            values = [a + b + d - i % 5 for d in range(5)]
            rows.append(
                json.dumps(
                    {
                        "question": f"What is {a} + {b}?",
                        "correct": letter,
                        "options": [f"{letter}){v}" for letter, v in zip("ABCDE", values)],
                        "rationale": f"{a} + {b} = {a + b}",
                    }
                )
            )
    out.mkdir()
    for name, part in (
        ("train.json", rows[:200]),
        ("dev.json", rows[200:228]),
        ("test.json", rows[228:]),
    ):
        (out / name).write_text("\n".join(part) + "\n")
    return out


def test_threads_per_process_divide_the_cores(base_dir, tmp_path):
    """8 ranks each using all cores would oversubscribe the CPU 8 times: each gets its share."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "nproc").write_text(
        "#!/bin/sh\necho 16\n"
    )  # a 16-core machine, as far as bash can tell
    (fake_bin / "nproc").chmod(0o755)
    run_dir = base_dir / "runs" / "thr"
    run_dir.mkdir(parents=True)
    (run_dir / "settings").write_text(
        "profile=gpu seed=1\n"
    )  # another run's settings: stops after the header
    env = {"OMP_NUM_THREADS": "", "PATH": f"{fake_bin}:{os.environ['PATH']}"}
    for nproc, threads in (("2", 8), ("8", 2)):
        res = run_pipeline(
            [
                "--profile",
                "gpu",
                "--cpu-rehearsal",
                "--nproc",
                nproc,
                "--run",
                "thr",
                "--shards",
                "2",
            ],
            base_dir,
            timeout=120,
            extra_env=env,
        )
        assert res.returncode == 2 and "run 'thr' was made with" in res.stderr, res.stderr[-2000:]
        assert f"processes={nproc} threads/process={threads} " in res.stdout


def test_gpu_profile_plans_the_micro_batch_for_the_cards_memory(base_dir, tmp_path):
    """Before any download, scripts.plan_memory cuts --device-batch-size to what fits the memory
    nvidia-smi reports (here a fake one); when it cannot say, the flag stays as given."""
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    smi = fake_bin / "nvidia-smi"
    run_dir = base_dir / "runs" / "mem"
    run_dir.mkdir(parents=True)
    (run_dir / "settings").write_text("profile=gpu seed=1\n")  # another run's: stops after the plan
    env = {"PATH": f"{fake_bin}:{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    args = ["--profile", "gpu", "--cpu-rehearsal", "--no-sync", "--run", "mem", "--shards", "2"]
    args += ["--depth", "2", "--max-seq-len", "128", "--device-batch-size", "8"]
    # d2, 128 tokens a row: 8 rows peak at about 1.6 GiB, 2 rows at 0.6; the card leaves 1.1 GiB
    for mib, expected in (
        ("2389", r"--device-batch-size [24] of 8 fits 1\.1 GiB"),
        ("[N/A]", None),
    ):
        smi.write_text(f"#!/bin/sh\necho '{mib}'\n")
        smi.chmod(0o755)
        res = run_pipeline(args, base_dir, timeout=300, extra_env=env)
        assert res.returncode == 2 and "run 'mem' was made with" in res.stderr, res.stderr[-2000:]
        # the settings record the requested micro-batch, whatever the card
        assert "device-batch-size=8 max-seq-len=128" in res.stderr
        if expected:
            assert re.search(expected, res.stdout), res.stdout[-2000:]
        else:
            assert "warning: no memory plan (GPU memory '[N/A]' MiB" in res.stderr
            assert "--device-batch-size 8 as given" in res.stderr


GPU_SIZES = {  # sizes only: every other flag is the gpu profile's own
    "tokenizer": "--vocab-size 512 --max-chars 200000",
    "base": "--aspect-ratio 32 --head-dim 32 --total-batch-size 512"
    " --num-iterations 4 --eval-every 2 --eval-tokens 1024 --sample-every -1 --save-every 2",
    "base_loss": "--split-tokens 1024 --sample-tokens 8",
    "base_eval": "--max-per-task 4",
    "mid": "--aqua-train-examples 64 --aqua-val-examples 8 --synthetic-examples 64"
    " --synthetic-val-examples 8 --max-seq-len 256"
    " --device-batch-size 2 --total-batch-size 4 --num-iterations 4 --eval-every 2"
    " --eval-examples 4 --save-every 2",
    "sft": "--aqua-train-examples 64 --aqua-val-examples 8 --max-seq-len 256 --device-batch-size 2"
    " --total-batch-size 4 --num-iterations 4 --eval-every 2 --eval-examples 4 --save-every 2",
    "rl": "--train-examples 16 --examples-per-step 2 --num-samples 2 --max-new-tokens 16"
    " --num-steps 2 --eval-every 2 --eval-problems 4 --eval-samples 2 --save-every 1",
    "eval": "--max-problems 4 --synthetic-examples 4 --num-samples 2 --max-tokens 16",
}
GPU_STAGES = [
    "data",
    "tokenizer",
    "tok_eval",
    "base",
    "base_loss",
    "base_eval",
    "mid",
    "sft",
    "rl",
    "eval_mid",
    "eval_sft",
    "eval_rl",
]


def test_gpu_profile_rehearsed_on_cpu_under_torchrun(base_dir, tmp_path):
    from test_core_eval import write_bundle

    hub = _serve_directory(_fineweb_stand_in(tmp_path / "hub"))
    aqua = _aqua_stand_in(tmp_path / "aqua_rat")
    write_bundle(base_dir / "eval_bundle")  # where base_eval looks before downloading the bundle
    sizes = [a for stage, flags in GPU_SIZES.items() for a in ("--stage-args", f"{stage}={flags}")]
    try:
        result = run_pipeline(
            [
                "--profile",
                "gpu",
                "--cpu-rehearsal",
                "--nproc",
                "2",
                "--run",
                "rehearsal",
                "--depth",
                "2",
                "--shards",
                "2",
                "--aqua-data-dir",
                str(aqua),
                "--gpu-hourly-price",
                "3.0",
                "--device-batch-size",
                "2",
                "--max-seq-len",
                "128",
                *sizes,
            ],
            base_dir,
            # no W&B: this test asserts none of it (the smoke run covers it), and each stage's
            # start of it costs seconds while the other rank waits
            extra_env={
                "NANOCHAT_DATASET_BASE_URL": f"http://127.0.0.1:{hub.server_port}",
                "OMP_NUM_THREADS": "",
                "WANDB_MODE": "disabled",
            },
        )
    finally:
        hub.shutdown()
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
    run_dir = base_dir / "runs" / "rehearsal"
    assert all((run_dir / f".done_{s}").is_file() for s in GPU_STAGES)
    assert sorted(p.name for p in (base_dir / "base_data").iterdir()) == [
        "shard_00000.parquet",
        "shard_00001.parquet",
    ]
    stages = [json.loads(line) for line in (run_dir / "stages.jsonl").read_text().splitlines()]
    by_name = {s["stage"]: s for s in stages}
    assert {by_name[s]["processes"] for s in ("base", "mid", "sft", "rl", "eval_rl")} == {2}
    assert by_name["tokenizer"]["processes"] == 1  # single-process stages are not billed as two
    assert all(s["device"] == "cpu" for s in stages)
    # the gpu profile's own flags reached the stages; only the sizes were overridden
    base_meta = json.loads(
        sorted((base_dir / "checkpoints" / "base" / "rehearsal").glob("step_*/meta.json"))[
            -1
        ].read_text()
    )
    assert base_meta["args"]["source"] == "fineweb" and base_meta["args"]["depth"] == 2
    assert base_meta["args"]["max_seq_len"] == 128 and base_meta["device_batch_size"] == 2
    start = next(
        json.loads(line)
        for line in (run_dir / "base.jsonl").read_text().splitlines()
        if '"event": "start"' in line
    )
    cores = len(os.sched_getaffinity(0))
    assert start["config"]["cpu_threads"] == max(1, cores // 2)  # the cores divided among the ranks
    rl_meta = json.loads(
        sorted((base_dir / "checkpoints" / "rl" / "rehearsal").glob("step_*/meta.json"))[
            -1
        ].read_text()
    )
    assert rl_meta["args"]["aqua_source"] == "dir" and rl_meta["args"]["num_steps"] == 2
    rows = [json.loads(line) for line in (run_dir / "chat_eval.jsonl").read_text().splitlines()]
    assert {(r["source"], r["task"]) for r in rows} == {
        (s, t) for s in ("mid", "sft", "rl") for t in ("aqua", "synthetic_aqua")
    }
    core = [json.loads(line) for line in (run_dir / "base_eval.jsonl").read_text().splitlines()]
    assert any("core/core" in row for row in core)
    report_dir = base_dir / "report" / "rehearsal"
    report = (report_dir / "report.md").read_text()
    for heading in [
        "Tokenizer training",
        "pretraining",
        "CORE",
        "Mid-training",
        "Supervised fine-tuning",
        "Reinforcement learning",
        "## Accuracy",
        "## Time per stage",
        "cost (USD)",
    ]:
        assert heading in report, heading
    for png in ["rl_reward.png", "rl_kl.png", "rl_letter_counts.png", "attn_entropy_layers.png"]:
        assert (report_dir / png).is_file() and f"({png})" in report, png
