"""Train a tiny GPT for a few steps with setup_optimizers() and save the weights (test helper).

Run either as a plain process (world size 1) or under `torchrun --nproc_per_node=N`; the GLOBAL
batch is fixed by --batch-size and each rank takes its contiguous 1/N slice. --grad-accum K also
splits each rank's slice into K micro-batches. A run can checkpoint after step --save-at (model and
this rank's optimizer state, nanochat.checkpoint) and can start from such a checkpoint, written by
any number of processes (--resume DIR). Every rank writes <out>/<name>_rank<r>.pt: the final
weights of the fresh run (name "fresh"), of each --resume run (names "resume0", "resume1", ...) and
of the --all-reduce-run ("allreduce").
"""

import argparse
import os
import sys
from pathlib import Path

import torch

# run as a script by torchrun: find nanochat/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat import optim  # noqa: E402
from nanochat.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from nanochat.common import cleanup_distributed, init_distributed  # noqa: E402
from nanochat.gpt import GPT, GPTConfig  # noqa: E402
from nanochat.optim import clip_grad_norm_, overlap_grad_sync  # noqa: E402


def tiny_config(seq_len: int = 16) -> GPTConfig:
    # 3 layers: the MLP shape groups hold 3 matrices, so with 2 ranks DistMuon's padding slot runs.
    # No value embeddings: their tables start at zero, and Adam's m/sqrt(v) on near-zero gradients
    # turns summation-order round-off into lr-sized differences (seen: 3e-3 between one process
    # with and without gradient accumulation): nothing there to compare.
    return GPTConfig(
        sequence_len=seq_len, vocab_size=256, n_layer=3, n_head=4, n_kv_head=2, n_embd=64
    )


def train(
    out_dir: str,
    steps: int = 3,
    batch_size: int = 4,
    seq_len: int = 16,
    grad_accum: int = 1,
    clip: float = 1.0,
    rank: int = 0,
    world_size: int = 1,
    name: str = "fresh",
    save_at: int | None = None,
    ckpt_dir: str | None = None,
    resume: str | None = None,
) -> dict:
    """Train the tiny model; returns (and saves to <out_dir>/<name>_rank<rank>.pt) the final
    state_dict. save_at: checkpoint after that step into ckpt_dir; resume: start from the
    checkpoint in that directory (re-sharded when another world size wrote it)."""
    torch.manual_seed(0)
    config = tiny_config(seq_len)
    model = GPT(config)
    # Non-zero output projections so every matrix gets a gradient from step 0.
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.02)
            block.mlp.c_proj.weight.normal_(std=0.02)
    optimizers = model.setup_optimizers()
    start = 0
    if resume is not None:
        model_state, optim_states, meta = load_checkpoint(
            resume, load_optimizer=True, rank=rank, world_size=world_size
        )
        model.load_state_dict(model_state)
        for opt, state in zip(optimizers, optim_states):
            opt.load_state_dict(state)
        start = meta["step"]

    data = torch.Generator().manual_seed(1234)
    per_rank = batch_size // world_size
    micro = per_rank // grad_accum
    assert per_rank * world_size == batch_size and micro * grad_accum == per_rank, (
        "batch must split evenly"
    )
    for step in range(steps):
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=data)
        if step < start:  # a resumed run: the same batches as the run it continues
            continue
        mine = tokens[rank * per_rank : (rank + 1) * per_rank]
        for k in range(grad_accum):
            rows = mine[k * micro : (k + 1) * micro]
            loss = model(rows[:, :-1], rows[:, 1:]) / grad_accum
            if k == grad_accum - 1:  # the last backward of the step sends gradients as it goes
                overlap_grad_sync(optimizers)
            loss.backward()
        sync = getattr(optimizers[0], "grad_sync", None)
        if sync is not None:  # every parameter had a gradient: the hooks sent every bucket
            assert sync.sent == len(sync.buckets), (sync.sent, len(sync.buckets))
        clip_grad_norm_(optimizers, clip)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        if save_at is not None and step + 1 == save_at:
            states = [opt.state_dict() for opt in optimizers]
            save_checkpoint(ckpt_dir, step + 1, model.state_dict(), states, {}, rank=rank)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(out_dir, f"{name}_rank{rank}.pt"))
    return state


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory for <name>_rank<r>.pt")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="global batch (rows)")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--clip", type=float, default=1.0, help="max grad norm (<=0: off)")
    parser.add_argument("--save-at", type=int, default=None, help="checkpoint after this step")
    parser.add_argument("--ckpt", default=None, help="checkpoint directory for --save-at")
    parser.add_argument(
        "--resume", action="append", default=[], help="also run from this checkpoint (repeatable)"
    )
    parser.add_argument(
        "--all-reduce-run",
        action="store_true",
        help="also run with the all-reduce that stands in for reduce-scatter on old gloo",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = init_distributed()
    common = dict(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        grad_accum=args.grad_accum,
        clip=args.clip,
        rank=info.rank,
        world_size=info.world_size,
    )
    train(args.out, **common, save_at=args.save_at, ckpt_dir=args.ckpt)
    for i, directory in enumerate(args.resume):
        train(args.out, **common, name=f"resume{i}", resume=directory)
    if args.all_reduce_run:
        optim._reduce_scatter_works = False
        train(args.out, **common, name="allreduce")
    cleanup_distributed()


if __name__ == "__main__":
    main()
