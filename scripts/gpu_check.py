"""What only a GPU shows, part 1 (scripts/gpu_check.sh runs the rest): the versions, and whether
bf16 + torch.compile training follows fp32 training.

The check trains the same tiny model from the same weights on the same fixed batches twice, once in
fp32 eager and once in the device's compute dtype (bf16 on SM >= 80) compiled, and compares the
losses: bf16 rounds every matmul, so the curves differ a little; a broken compiled or
mixed-precision path (NaNs, a graph that drops the softcap, wrong casts) shows as a large gap or a
loss that does not fall.

    uv run python -m scripts.gpu_check --out gpu_check.md      # appends its markdown to that file
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from nanochat.common import autodetect_device, autodetect_dtype, synchronize
from nanochat.compile import maybe_compile
from nanochat.driver_check import local_driver_version
from nanochat.gpt import GPT, config_from_depth


def versions(device: torch.device) -> list[tuple[str, str]]:
    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("torch built for CUDA", str(torch.version.cuda)),
    ]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        memory = f"{props.total_memory / 2**30:.0f} GiB"
        rows += [
            ("card", f"{props.name}, {memory}, SM {props.major}.{props.minor}"),
            ("cards visible", str(torch.cuda.device_count())),
        ]
        driver = local_driver_version() or "unknown (nvidia-smi did not answer)"
        rows.append(("driver", driver))
    else:
        rows.append(
            ("card", "none: CPU only (the bf16/compile path is CUDA's; this run checks fp32 twice)")
        )
    return rows


def train_losses(
    device, dtype, compiled: bool, steps: int, seed: int = 0
) -> tuple[list[float], float]:
    """Per-step losses of a d2 model on 4 fixed batches, and the seconds it took."""
    torch.manual_seed(seed)
    config = config_from_depth(2, 4096, sequence_len=256, aspect_ratio=64, head_dim=64)
    model = GPT(config).to(device)
    model.init_weights()
    model.compute_dtype = dtype
    optimizers = model.setup_optimizers()
    run = maybe_compile(model, device, enabled=compiled)
    gen = torch.Generator().manual_seed(seed + 1)
    # each row repeats a random 32-token segment: learnable by copying (what small transformers
    # learn first), so the loss falls within a few dozen steps
    segments = torch.randint(0, 4096, (4, 8, 32), generator=gen)
    batches = [seg.repeat(1, 9)[:, :257].to(device) for seg in segments]
    losses = []
    synchronize(device)
    t0 = time.time()
    for step in range(steps):
        batch = batches[step % len(batches)]
        loss = run(batch[:, :-1], batch[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    synchronize(device)
    return losses, time.time() - t0


def tail_mean(losses: list[float]) -> float:
    """The mean of the last 8 losses: less noisy than the last one alone."""
    return sum(losses[-8:]) / len(losses[-8:])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        description="versions, and bf16 + compile training vs fp32 (see the docstring)"
    )
    p.add_argument("--out", default="gpu_check.md", help="markdown file to append to")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps of each run (default 60 on "
        "CUDA, 20 on CPU, where both runs are fp32 and only the comparison itself is checked)",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=0.15,
        help="largest allowed gap between the two final losses (mean of the last 8 steps), nats",
    )
    args = p.parse_args(argv)
    device = autodetect_device()
    dtype = autodetect_dtype(device)
    compiled = device.type == "cuda"
    args.steps = args.steps or (60 if compiled else 20)

    ref, t_ref = train_losses(device, torch.float32, False, args.steps)
    test, t_test = train_losses(device, dtype, compiled, args.steps)
    gap = abs(tail_mean(test) - tail_mean(ref))
    learned = tail_mean(test) < test[0] - 1.0
    finite = all(x == x and abs(x) != float("inf") for x in test)
    ok = finite and learned and gap <= args.tolerance
    label = f"{str(dtype).replace('torch.', '')}{' + torch.compile' if compiled else ' eager'}"

    lines = ["## Versions", "", "| what | value |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in versions(device)]
    lines += [
        "",
        f"## {label} training vs fp32 eager "
        f"({args.steps} steps, d2 model, same weights and batches)",
        "",
        "| run | first loss | final loss (mean of last 8) | time |",
        "| --- | --- | --- | --- |",
        f"| fp32 eager | {ref[0]:.4f} | {tail_mean(ref):.4f} | {t_ref:.1f} s |",
        f"| {label} | {test[0]:.4f} | {tail_mean(test):.4f} | {t_test:.1f} s (incl. compile) |",
        "",
        f"**{'PASS' if ok else 'FAIL'}**: gap {gap:.4f} nats (tolerance {args.tolerance}), "
        f"{'finite' if finite else 'NOT FINITE'}, {'learned' if learned else 'DID NOT LEARN'}.",
        "",
    ]
    with open(args.out, "a", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not ok:
        raise SystemExit(f"gpu_check: {label} training does not follow fp32 (see {args.out})")


if __name__ == "__main__":
    main()
