"""Communication and optimizer memory of distributed training, before and after sharding.

Computed from the real parameter list (the GPT of `--depths` built on the meta device, grouped by
build_optimizers, sliced and owned by the rules of nanochat.optim: shard_range and Muon's
index-i-on-rank-i%N), for `--world-size` ranks; nothing runs on a GPU. Per rank and optimizer step:

  old: every gradient all-reduced (sync_grads), DistMuon all-gathers the matrices; AdamW state whole
       on every rank, and every rank wrote it into its optim_rank<r>.pt.
  new: every gradient reduce-scattered (AdamW: padded flat slices; Muon: stacks of N matrices), the
       updated AdamW slices and Muon matrices all-gathered; AdamW state for one slice per rank.

Bytes communicated are what one rank sends with NCCL's ring algorithms: all-reduce 2(N-1)/N of the
buffer, reduce-scatter and all-gather (N-1)/N each (the received bytes are the same). The grad-norm
all-reduce (one scalar) is left out. On gloo without reduce_scatter (torch < 2.15 or so) the new
code all-reduces instead (the same state and checkpoints, the old bytes). Tensors are counted in
the parameters' dtype (fp32 here: the GPT as built).

    uv run python -m scripts.bench_optim_sharding                        # d8 and d20, 8 ranks
    uv run python -m scripts.bench_optim_sharding --depths 8,12,20,26 --world-size 16
"""

from __future__ import annotations

import argparse

import torch

from nanochat.gpt import GPT, config_from_depth
from nanochat.optim import build_optimizers, shard_range


def figures(depth: int, vocab_size: int, world_size: int) -> dict:
    with torch.device("meta"):
        model = GPT(config_from_depth(depth, vocab_size))
    adamw, muon = build_optimizers(model)  # single process: the plain classes, the same groups
    n = world_size
    adam = adamw.parameters()
    muon_groups = [g["params"] for g in muon.param_groups]

    def nbytes(p, numel=None):
        return (p.numel() if numel is None else numel) * p.element_size()

    ring = (n - 1) / n
    grad_bytes = sum(nbytes(p) for p in adam) + sum(nbytes(p) for g in muon_groups for p in g)
    # Muon: stacks of n same-shape matrices, the last one padded
    muon_stacked = sum(-(-len(g) // n) * n * nbytes(g[0]) for g in muon_groups)
    adam_padded = sum(nbytes(p, -(-p.numel() // n) * n) for p in adam)
    old_comm = 2 * ring * grad_bytes + ring * muon_stacked
    new_comm = ring * (adam_padded + muon_stacked) * 2  # reduce-scatter + all-gather
    # optimizer state on the busiest rank (rank 0 gets the first, fullest slices and matrices)
    adam_full = sum(2 * nbytes(p) for p in adam)
    adam_slice = sum(2 * nbytes(p, -(-p.numel() // n)) for p in adam)

    def muon_rank(r):
        return sum(nbytes(p) for g in muon_groups for p in g[r::n])

    muon_total = sum(nbytes(p) for g in muon_groups for p in g)
    adam_per_rank = [
        sum(
            2 * nbytes(p, shard_range(p.numel(), r, n)[1] - shard_range(p.numel(), r, n)[0])
            for p in adam
        )
        for r in range(n)
    ]
    assert sum(adam_per_rank) == adam_full and max(adam_per_rank) == adam_slice
    return dict(
        depth=depth,
        adam_params=sum(p.numel() for p in adam),
        muon_params=sum(p.numel() for g in muon_groups for p in g),
        old_comm=old_comm,
        new_comm=new_comm,
        old_state=adam_full + muon_rank(0),
        new_state=adam_slice + muon_rank(0),
        old_ckpt=n * adam_full + muon_total,
        new_ckpt=adam_full + muon_total,
        single_ckpt=adam_full + muon_total,
    )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--depths", default="8,20", help="comma-separated model depths")
    parser.add_argument("--world-size", type=int, default=8, help="ranks (GPUs)")
    parser.add_argument("--vocab-size", type=int, default=65536)
    args = parser.parse_args()
    gb = 1e9
    print(
        f"{args.world_size} ranks, vocab {args.vocab_size:,}; GB = 1e9 bytes; per rank and step "
        f"unless said otherwise\n"
    )
    print(
        "| depth | AdamW params | Muon params | sent per step old -> new | optimizer state per "
        "rank old -> new | optimizer files of one checkpoint (all ranks) old -> new |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for depth in [int(d) for d in args.depths.split(",")]:
        f = figures(depth, args.vocab_size, args.world_size)
        print(
            f"| d{f['depth']} | {f['adam_params'] / 1e6:,.0f}M | {f['muon_params'] / 1e6:,.0f}M "
            f"| {f['old_comm'] / gb:.2f} -> {f['new_comm'] / gb:.2f} GB "
            f"| {f['old_state'] / gb:.2f} -> {f['new_state'] / gb:.2f} GB "
            f"| {f['old_ckpt'] / gb:.1f} -> {f['new_ckpt'] / gb:.1f} GB "
            f"(1 process: {f['single_ckpt'] / gb:.1f}) |"
        )


if __name__ == "__main__":
    main()
