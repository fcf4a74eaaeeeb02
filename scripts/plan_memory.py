"""Plan the GPU memory of every training stage before renting a GPU or downloading anything.

    uv run python -m scripts.plan_memory --depth 8 20 26 --device-batch-size 32 \\
        --max-seq-len 2048 --gpus 8
    uv run python -m scripts.plan_memory --depth 20 --fit-gib 72 --print-batch  # the orchestrator
    uv run python -m scripts.plan_memory --depth 2 --vocab-size 4096 --max-seq-len 256 \\
        --device-batch-size 8 --gpus 1 --dtype fp32 --measure-cpu   # estimated and measured

How: the real GPT and its real optimizers (GPT.setup_optimizers) are built under PyTorch's
FakeTensorMode (tensors with shapes and dtypes but no storage, so a 2.5B-parameter model costs
nothing here), and each stage's real code runs on them inside torch's MemTracker
(torch.distributed._tools.mem_tracker), which records every tensor's bytes by category and the peak.
Fake CPU tensors rather than the `meta` device: on `meta`, scaled_dot_product_attention takes its
math path and keeps (B, H, T, T) attention weights, where the GPU (flash) and the CPU take fused
kernels that keep only the output and a log-sum-exp; CPU autocast gives the bf16 compute dtype.

Stages, each as the training scripts run it, with the optimizer state held from the start (every
step after the first has it; base_train's probe holds it too: optimizer_state_allocated):
  base       base_train's step: forward, backward and optimizer step of --device-batch-size rows
  base eval  base_loss / base_train's val bpb: evaluate_bpb's no-grad per-token losses, same rows
  mid/SFT    chat_sft's step of --sft-batch-size rows (value-embedding tables frozen: no gradient,
             no state)
  RL         chat_rl: the policy (tables frozen), the fp32 reference model, and the larger of the
             rollout (prefill + KV cache for --rl-prompts x --rl-samples rows, one decode step) and
             the training micro-batch (--rl-batch-size rows, per-token log-probs with grad)

Per GPU under --gpus N: activations and gradients are per rank as measured (every rank holds the
whole gradient); the optimizer state is replaced by rank 0's share: DistMuon keeps the momentum of
every N-th matrix of each shape group; AdamW's moments are divided by N, as the sharded
distributed optimizer keeps them (--no-sharded-optimizer: replicated, the layout before it).

What it does not see (a GPU run confirms): the CUDA context and NCCL buffers (~0.5-1 GB), the
caching allocator's fragmentation, torch.compile (fuses elementwise ops: usually fewer saved
activations than this eager count), and CUDA autocast's op lists where they differ from CPU's.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field

import torch

from nanochat.gpt import GPT, config_from_depth

GIB = 2**30
STAGES = ("base", "base eval", "mid/SFT", "RL")


@dataclass
class Peak:
    """Bytes at a stage's peak, by MemTracker category, for one GPU."""

    params: float = 0.0
    grads: float = 0.0
    optim: float = 0.0
    acts: float = 0.0
    other: float = 0.0
    notes: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optim + self.acts + self.other


def fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode()


def build_model(args, depth: int, dtype: torch.dtype) -> GPT:
    config = config_from_depth(
        depth,
        args.vocab_size,
        sequence_len=args.max_seq_len,
        value_embed_every=args.value_embed_every,
    )
    model = GPT(config)
    model.compute_dtype = dtype
    return model


def optimizer_state_bytes(optimizers, gpus: int, sharded: bool) -> tuple[int, int]:
    """(state bytes in one process, rank 0's share of them under `gpus` ranks), from the shapes:
    AdamW two moments per trained parameter, Muon one momentum per matrix (DistMuon: rank r keeps
    the matrices r, r + N, ... of each shape group)."""
    full = share = 0
    for opt in optimizers:
        per_param = 2 if "adam" in type(opt).__name__.lower() else 1
        for group in opt.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            nbytes = [per_param * p.numel() * p.element_size() for p in params]
            full += sum(nbytes)
            if per_param == 1:  # Muon
                share += sum(nbytes[::gpus])
            else:
                share += math.ceil(sum(nbytes) / gpus) if sharded else sum(nbytes)
    return full, share


class _NoHook:
    def remove(self) -> None:
        pass


def _count_optimizer_state(mt, optimizers):
    """MemTracker learns of optimizer state from torch.optim.Optimizer: its states up front, and
    what a step allocates through torch's global step hooks. nanochat's optimizers are not
    torch.optim.Optimizers (nanochat/optim.py says why), so the same is done here: their states
    now, and each step wrapped as those hooks wrap it. Returns the function that unwraps them."""
    from torch.distributed._tools.mem_tracker import _MemRefType

    def hooked(opt, step):
        def run(*args, **kwargs):
            mt._in_opt = True  # what the step allocates is optimizer state
            try:
                return step(*args, **kwargs)
            finally:
                mt._track_optimizer_states(_MemRefType.OPT, opt)
                mt._in_opt = False

        return run

    for opt in optimizers:
        mt._track_optimizer_states(_MemRefType.OPT, opt)
        opt.step = hooked(opt, opt.step)  # an instance attribute: the class's step stays

    def restore():
        for opt in optimizers:
            del opt.step

    return restore


def track(models, optimizers, fn) -> Peak:
    """Run fn(tracker) under a MemTracker; the bytes at its peak, by category."""
    from torch.distributed._tools.mem_tracker import MemTracker

    mt = MemTracker()
    # MemTracker hooks the gradient of every parameter of a module it sees run, and a frozen one
    # (the value-embedding tables in fine-tuning, the RL reference) refuses a hook: mark those as
    # hooked already. Their bytes are still counted as parameters.
    for model in models:
        for p in model.parameters():
            if not p.requires_grad:
                mt._param_to_grad_hook_handles[p] = (_NoHook(), _NoHook())
    mt.track_external(*models)
    restore = _count_optimizer_state(mt, optimizers)
    try:
        with mt:
            fn(mt)
    finally:
        restore()
    snap = mt.get_tracker_snapshot("peak")
    (device_snap,) = [v for k, v in snap.items() if str(k) != "meta"] or list(snap.values())
    by = {str(k).split(".")[-1]: v for k, v in device_snap.items()}
    return Peak(
        params=by.get("PARAM", 0),
        grads=by.get("GRAD", 0),
        optim=by.get("OPT", 0),
        acts=by.get("ACT", 0) + by.get("TEMP", 0),
        other=by.get("BUFFER", 0) + by.get("OTH", 0),
    )


def train_step(model, optimizers, x, y, reduction: str) -> None:
    """One optimizer step as the training scripts take it, the optimizer state already held."""
    from scripts.base_train import optimizer_state_allocated

    with optimizer_state_allocated(model, optimizers):
        loss = model(x, y, loss_reduction=reduction)
        if reduction == "sum":
            loss = loss / y.numel()
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)


def plan_base(args, depth, dtype, batch) -> Peak:
    model = build_model(args, depth, dtype)
    optimizers = model.setup_optimizers()
    x = torch.zeros(batch, args.max_seq_len, dtype=torch.long)
    peak = track([model], optimizers, lambda mt: train_step(model, optimizers, x, x, "mean"))
    return per_rank(peak, optimizers, args)


def plan_base_eval(args, depth, dtype, batch) -> Peak:
    model = build_model(args, depth, dtype)
    x = torch.zeros(batch, args.max_seq_len, dtype=torch.long)

    def evaluate(mt):
        with torch.no_grad():
            model(x, x, loss_reduction="none")  # what evaluate_bpb runs

    return track([model], [], evaluate)


def plan_sft(args, depth, dtype, batch) -> Peak:
    model = build_model(args, depth, dtype)
    optimizers = model.setup_optimizers(value_embed_lr=0.0)  # the fine-tuning default: frozen
    x = torch.zeros(batch, args.max_seq_len, dtype=torch.long)
    peak = track([model], optimizers, lambda mt: train_step(model, optimizers, x, x, "sum"))
    return per_rank(peak, optimizers, args)


def plan_rl(args, depth, dtype) -> Peak:
    from scripts.base_train import optimizer_state_allocated

    model = build_model(args, depth, dtype)
    ref = build_model(args, depth, dtype).eval().requires_grad_(False)
    optimizers = model.setup_optimizers(value_embed_lr=0.0)
    prompt, new = args.rl_prompt_tokens, args.rl_new_tokens
    rows = args.rl_prompts * args.rl_samples
    seq = torch.zeros(args.rl_batch_size, prompt + new, dtype=torch.long)
    kv = {}

    def rl_step(mt):
        with optimizer_state_allocated(model, optimizers):
            with torch.no_grad():  # the rollout, as Engine.generate_multi decodes it
                model.eval()
                cache = model.new_kv_cache(args.rl_prompts, prompt + new)
                model(torch.zeros(args.rl_prompts, prompt, dtype=torch.long), kv_cache=cache)
                cache = cache.repeat_batch(args.rl_samples)
                kv["bytes"] = cache.kv.numel() * cache.kv.element_size()
                mt.reset_mod_stats()
                model(torch.zeros(rows, 1, dtype=torch.long), kv_cache=cache)
                del cache
            model.train()
            mt.reset_mod_stats()
            with torch.no_grad():
                ref_logp = -ref(seq, seq, loss_reduction="none")
            logp = -model(seq, seq, loss_reduction="none")
            ((logp - ref_logp) ** 2).mean().backward()  # a stand-in for rl.policy_loss
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)

    peak = track([model, ref], optimizers, rl_step)
    peak = per_rank(peak, optimizers, args)
    peak.notes["kv cache"] = kv["bytes"]
    peak.notes["reference"] = sum(p.numel() * p.element_size() for p in ref.parameters())
    return peak


def per_rank(peak: Peak, optimizers, args) -> Peak:
    """The single-process peak with the optimizer state cut to rank 0's share (and, in notes,
    the total with AdamW sharded too)."""
    full, share = optimizer_state_bytes(optimizers, args.gpus, args.sharded_optimizer)
    _, sharded = optimizer_state_bytes(optimizers, args.gpus, True)
    measured = peak.optim
    peak.optim = max(0.0, measured - full + share)
    peak.notes["total, AdamW sharded"] = (
        peak.total - peak.optim + max(0.0, measured - full + sharded)
    )
    return peak


def plan(args, depth: int, dtype: torch.dtype) -> dict[str, tuple[int, Peak]]:
    """{stage: (rows per micro-batch, its peak)} for one depth."""
    with fake_mode():
        return {
            "base": (args.device_batch_size, plan_base(args, depth, dtype, args.device_batch_size)),
            "base eval": (
                args.device_batch_size,
                plan_base_eval(args, depth, dtype, args.device_batch_size),
            ),
            "mid/SFT": (args.sft_batch_size, plan_sft(args, depth, dtype, args.sft_batch_size)),
            "RL": (args.rl_batch_size, plan_rl(args, depth, dtype)),
        }


def fit_batch(args, depth: int, dtype: torch.dtype, budget: float) -> int:
    """The largest divisor of --device-batch-size whose base step fits in `budget` bytes (0: none),
    tried from the top, halving like base_train's probe."""
    batch = args.device_batch_size
    while batch >= 1:
        with fake_mode():
            peak = plan_base(args, depth, dtype, batch)
        print(
            f"d{depth}: a base step of {batch} rows peaks at {peak.total / GIB:.1f} GiB",
            file=sys.stderr,
        )
        if peak.total <= budget:
            return batch
        batch = max((d for d in range(1, batch // 2 + 1) if batch % d == 0), default=0)
    return 0


def measure_cpu(args, depth: int) -> int:
    """Bytes: the base step run for real on CPU tensors (fp32) in a fresh process, as the peak of
    its anonymous resident memory (RssAnon, sampled every half millisecond by a thread while the
    step runs) above its level just before the model was built. glibc is told to mmap every
    allocation over 64 KiB, so a freed tensor leaves the resident set at once. Anonymous memory
    only: file-backed pages (the shared libraries) come and go with the machine's other work, and
    made the whole resident set's high-water mark swing by 2x in a loaded test suite."""
    code = (
        "import sys, threading, time, torch\n"
        "from scripts.plan_memory import build_model, parse_args, train_step\n"
        "def anon():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('RssAnon:'))\n"
        "args = parse_args(sys.argv[1:])\n"
        "torch.manual_seed(0)\n"
        "x = torch.randint(0, args.vocab_size, (args.device_batch_size, args.max_seq_len))\n"
        "# a first step warms up what the kernels keep for good (thread pools, scratch buffers)\n"
        f"warm = build_model(args, {depth}, torch.float32)\n"
        "train_step(warm, warm.setup_optimizers(), x, x, 'mean')\n"
        "del warm\n"
        "before, peak, done = anon(), [0], threading.Event()\n"
        "def watch():\n"
        "    while not done.is_set():\n"
        "        peak[0] = max(peak[0], anon())\n"
        "        time.sleep(0.0005)\n"
        "watcher = threading.Thread(target=watch)\n"
        "watcher.start()\n"
        f"model = build_model(args, {depth}, torch.float32)\n"
        "optimizers = model.setup_optimizers()\n"
        "train_step(model, optimizers, x, x, 'mean')\n"
        "done.set()\n"
        "watcher.join()\n"
        "print(peak[0] - before)\n"
    )
    flags = [
        f"--vocab-size={args.vocab_size}",
        f"--max-seq-len={args.max_seq_len}",
        f"--value-embed-every={args.value_embed_every}",
        f"--device-batch-size={args.device_batch_size}",
    ]
    # a clean environment: variables a caller left set (compile, device, threads) must not change
    # what is measured; one thread, as kernels' per-thread scratch space is no tensor of the step
    keep = ("PATH", "HOME", "PYTHONPATH", "LANG", "TMPDIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(MALLOC_MMAP_THRESHOLD_="65536", NANOCHAT_DTYPE="fp32", OMP_NUM_THREADS="1")
    out = subprocess.run(
        [sys.executable, "-c", code, *flags], env=env, capture_output=True, text=True, check=True
    )
    return int(out.stdout.split()[-1])


def usable_gib(gpu_gib: float) -> float:
    """What a card of gpu_gib GiB leaves for tensors: 90% of it less 1 GiB for what the planner
    cannot see (CUDA context, NCCL buffers, the caching allocator's fragmentation)."""
    return 0.9 * gpu_gib - 1.0


def fmt_table(rows: list[tuple[int, str, int, Peak]], gpu_gib: float) -> str:
    usable = usable_gib(gpu_gib)
    head = (
        f"| depth | stage | rows x seq | params | grads | optimizer | activations | other "
        f"| peak GiB | fits {usable:.1f} GiB | peak, AdamW sharded |"
    )
    lines = [head, "|" + "---|" * 11]
    digits = 1 if max(p.total for *_, p in rows) > 4 * GIB else 3
    for depth, stage, rows_, p in rows:
        cells = [p.params, p.grads, p.optim, p.acts, p.other]
        fits = "yes" if p.total <= usable * GIB else "**no**"
        sharded = p.notes.get("total, AdamW sharded")
        lines.append(
            f"| d{depth} | {stage} | {rows_} | "
            + " | ".join(f"{c / GIB:.{digits}f}" for c in cells)
            + f" | {p.total / GIB:.{digits}f} | {fits} | "
            + (f"{sharded / GIB:.{digits}f} |" if sharded is not None else "- |")
        )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Peak GPU memory per stage, from the real model and optimizers on fake "
        "tensors (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--depth", type=int, nargs="+", default=[8, 20, 26], help="model depth(s)")
    p.add_argument("--vocab-size", type=int, default=65536, help="tokenizer vocabulary")
    p.add_argument("--max-seq-len", type=int, default=2048, help="context of base, mid and SFT")
    p.add_argument("--value-embed-every", type=int, default=2, help="as base_train's flag")
    p.add_argument(
        "--device-batch-size", type=int, default=32, help="base_train / base_loss rows per GPU"
    )
    p.add_argument("--sft-batch-size", type=int, default=8, help="mid/SFT rows per GPU")
    p.add_argument("--gpus", type=int, default=8, help="GPUs (ranks) the run is spread over")
    p.add_argument(
        "--sharded-optimizer",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="AdamW moments sharded over the GPUs, as nanochat/optim.py does under torchrun "
        "(--no-sharded-optimizer: replicated, as before the sharding)",
    )
    p.add_argument(
        "--dtype", choices=["bf16", "fp32"], default="bf16", help="compute dtype (GPU: bf16)"
    )
    g = p.add_argument_group("RL (chat_rl, the gpu profile's settings per GPU)")
    g.add_argument("--rl-prompts", type=int, default=4, help="prompts decoded together per GPU")
    g.add_argument("--rl-samples", type=int, default=8, help="samples per prompt")
    g.add_argument("--rl-prompt-tokens", type=int, default=512, help="longest prompt")
    g.add_argument("--rl-new-tokens", type=int, default=512, help="--max-new-tokens")
    g.add_argument("--rl-batch-size", type=int, default=16, help="training micro-batch rows")
    g = p.add_argument_group("modes")
    p.add_argument(
        "--gpu-gib",
        type=float,
        default=79.6,
        help="the card's memory (an 80 GB H100: 81,559 MiB); 'fits' means within 90%% of it less "
        "1 GiB, the orchestrator's rule",
    )
    g.add_argument(
        "--fit-gib",
        type=float,
        default=None,
        help="find the largest divisor of --device-batch-size whose base step fits in this many "
        "GiB (one --depth)",
    )
    g.add_argument("--print-batch", action="store_true", help="with --fit-gib: print it alone")
    g.add_argument(
        "--measure-cpu",
        action="store_true",
        help="also run the base step for real on CPU and print estimate vs measured",
    )
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.fit_gib is not None:
        if len(args.depth) != 1:
            raise SystemExit("--fit-gib plans one --depth")
        batch = fit_batch(args, args.depth[0], dtype, args.fit_gib * GIB)
        if batch == 0:
            raise SystemExit(
                f"d{args.depth[0]}: not even one row of {args.max_seq_len} tokens fits in "
                f"{args.fit_gib:g} GiB"
            )
        print(batch if args.print_batch else f"d{args.depth[0]}: --device-batch-size {batch}")
        return
    rows = []
    for depth in args.depth:
        for stage, (batch, peak) in plan(args, depth, dtype).items():
            seq = args.rl_prompt_tokens + args.rl_new_tokens if stage == "RL" else args.max_seq_len
            rows.append((depth, stage, f"{batch} x {seq}", peak))
    sharding = "sharded" if args.sharded_optimizer else "replicated"
    print(
        f"Peak memory per GPU ({args.gpus} GPUs, {args.dtype}, vocab {args.vocab_size}, AdamW "
        f"state {sharding}, DistMuon state 1/{args.gpus}); GiB = 2^30 bytes; a "
        f"{args.gpu_gib:g} GiB card leaves {usable_gib(args.gpu_gib):.1f} GiB"
    )
    print(fmt_table(rows, args.gpu_gib))
    rl = [(d, p) for d, s, _, p in rows if s == "RL"]
    for depth, p in rl:
        print(
            f"d{depth} RL: KV cache {p.notes['kv cache'] / GIB:.2f} GiB ({args.rl_prompts} x "
            f"{args.rl_samples} rows), reference model {p.notes['reference'] / GIB:.2f} GiB "
            "(in params)"
        )
    if args.measure_cpu:
        for depth in args.depth:
            est = [p for d, s, _, p in rows if d == depth and s == "base"][0].total
            got = measure_cpu(args, depth)
            print(
                f"d{depth} base step on CPU: estimated {est / 2**20:.0f} MiB, measured "
                f"{got / 2**20:.0f} MiB (peak RSS above the baseline): "
                f"{100 * (est - got) / got:+.1f}%"
            )


if __name__ == "__main__":
    main()
