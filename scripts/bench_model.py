"""Model throughput benchmark: training and inference-forward tokens/s (and MFU on CUDA).

Always (CPU, fp32, eager): the fixed tiny config
    config_from_depth(--cpu-depth=4, vocab_size=--cpu-vocab=8192, sequence_len=--cpu-seq-len=256)
    = 4 layers, n_embd 256, 2 heads of 128, vocab 8192 (~6.9M params),
    batch --cpu-batch-size=8 x 256 tokens;
  training = forward + backward + Muon/AdamW step; inference = no-grad forward of the same batch.
On CUDA additionally, for each --gpu-depths (default d8 and d20, vocab 65536, sequence 2048): the
  same two measurements in the model's compute dtype (bf16 on SM >= 80) with torch.compile (switch
  with NANOCHAT_COMPILE=0/1), and MFU = estimate_flops() * tok/s / peak_flops(device)
  (inference MFU uses 2N + the forward attention term, a third of the training FLOPs per token).

    uv run python -m scripts.bench_model              # CPU figures (+ GPU ones when CUDA is there)
    uv run python -m scripts.bench_model --gpu-depths 8,12,20 --gpu-batch-size 16
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from nanochat.common import autodetect_device, peak_flops, print0, synchronize
from nanochat.compile import maybe_compile
from nanochat.gpt import GPT, config_from_depth


def time_steps(fn, steps: int, warmup: int, device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call of fn(), after warmup calls (compile, caches).
    CPU seconds barely move when other jobs share the machine; wall seconds do."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        fn()
    synchronize(device)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def bench(
    config, device, batch_size: int, steps: int, warmup: int, compile_model: bool | None
) -> dict:
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(config)
    train_model = maybe_compile(model, device, enabled=compile_model)
    optimizers = model.setup_optimizers()
    x = torch.randint(0, config.vocab_size, (batch_size, config.sequence_len + 1), device=device)
    inputs, targets = x[:, :-1], x[:, 1:]

    def train_step():
        loss = train_model(inputs, targets)
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)

    @torch.no_grad()
    def infer_step():
        train_model(inputs)

    tokens = batch_size * config.sequence_len
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    train_s, train_cpu_s = time_steps(train_step, steps, warmup, device)
    model.eval()
    infer_s, infer_cpu_s = time_steps(infer_step, steps, warmup, device)
    flops = model.estimate_flops()
    out = dict(
        params=model.num_params(),
        dtype=str(model.get_compute_dtype(device)).replace("torch.", ""),
        compiled=train_model is not model,
        train_tok_s=tokens / train_s,
        infer_tok_s=tokens / infer_s,
        train_flops_per_tok=flops,
    )
    if device.type == "cpu":
        out["train_tok_per_cpu_s"], out["infer_tok_per_cpu_s"] = (
            tokens / train_cpu_s,
            tokens / infer_cpu_s,
        )
    peak = peak_flops(device)
    if peak:
        out["train_mfu"] = flops * out["train_tok_s"] / peak
        out["infer_mfu"] = flops / 3 * out["infer_tok_s"] / peak
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def report(name: str, batch_size: int, config, r: dict) -> None:
    print0(
        f"[{name}] {r['params'] / 1e6:.1f}M params, "
        f"n_layer={config.n_layer} n_embd={config.n_embd} n_head={config.n_head} "
        f"vocab={config.vocab_size}, batch {batch_size} x {config.sequence_len}, "
        f"dtype={r['dtype']} compiled={r['compiled']}"
    )
    for key, label, note in (
        ("train", "train", ""),
        ("infer", "inference", "  (forward only, no grad)"),
    ):
        line = f"    {label:<10}: {r[f'{key}_tok_s']:>12,.0f} tok/s{note}"
        if f"{key}_mfu" in r:
            line += f"   MFU {100 * r[f'{key}_mfu']:.1f}%"
        if f"{key}_tok_per_cpu_s" in r:
            line += f"   ({r[f'{key}_tok_per_cpu_s']:,.0f} tok per CPU-second)"
        print0(line)
    if "peak_mem_gib" in r:
        print0(f"    peak memory: {r['peak_mem_gib']:.1f} GiB")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--cpu-depth", type=int, default=4, help="depth of the fixed tiny CPU config"
    )
    parser.add_argument("--cpu-vocab", type=int, default=8192)
    parser.add_argument("--cpu-seq-len", type=int, default=256)
    parser.add_argument("--cpu-batch-size", type=int, default=8)
    parser.add_argument(
        "--cpu-threads", type=int, default=0, help="torch threads on CPU (0 = torch default)"
    )
    parser.add_argument("--skip-cpu", action="store_true", help="only the CUDA figures")
    parser.add_argument(
        "--gpu-depths", default="8,20", help="comma-separated depths for the CUDA figures"
    )
    parser.add_argument("--gpu-vocab", type=int, default=65536)
    parser.add_argument("--gpu-seq-len", type=int, default=2048)
    parser.add_argument("--gpu-batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument(
        "--warmup", type=int, default=2, help="untimed steps first (compile, caches)"
    )
    parser.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="torch.compile: auto = on for CUDA, off for CPU (NANOCHAT_COMPILE also applies)",
    )
    args = parser.parse_args()
    compile_model = {"auto": None, "on": True, "off": False}[args.compile]
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1 and --warmup >= 0")

    print0(f"torch {torch.__version__}")
    if not args.skip_cpu:
        if args.cpu_threads > 0:
            torch.set_num_threads(args.cpu_threads)
        cpu = torch.device("cpu")
        config = config_from_depth(args.cpu_depth, args.cpu_vocab, args.cpu_seq_len)
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
        print0(
            f"CPU: {torch.get_num_threads()} threads, fp32, load average {load:.1f} "
            f"(other work on the machine lowers these figures)"
        )
        report(
            f"cpu d{args.cpu_depth}",
            args.cpu_batch_size,
            config,
            bench(config, cpu, args.cpu_batch_size, args.steps, args.warmup, compile_model),
        )

    device = autodetect_device()
    if device.type != "cuda":
        print0("no CUDA device: skipping the bf16 / MFU figures (they need a GPU)")
        return
    name = torch.cuda.get_device_name(device)
    peak = peak_flops(device)
    print0(
        f"CUDA: {name}, peak bf16 {peak / 1e12:.0f} TFLOP/s"
        if peak
        else f"CUDA: {name} (peak FLOPs unknown: no MFU)"
    )
    for depth in [int(d) for d in args.gpu_depths.split(",") if d.strip()]:
        config = config_from_depth(depth, args.gpu_vocab, args.gpu_seq_len)
        try:
            r = bench(config, device, args.gpu_batch_size, args.steps, args.warmup, compile_model)
        except torch.OutOfMemoryError:
            print0(
                f"[cuda d{depth}] out of memory at batch {args.gpu_batch_size}: "
                "lower --gpu-batch-size"
            )
            torch.cuda.empty_cache()
            continue
        report(f"cuda d{depth}", args.gpu_batch_size, config, r)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
