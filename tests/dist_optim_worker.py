"""Train a tiny GPT for a few steps with setup_optimizers() and save the weights (test helper).

Run either as a plain process (world size 1) or under `torchrun --nproc_per_node=N`; the GLOBAL
batch is fixed by --batch-size and each rank takes its contiguous 1/N slice. --grad-accum K also
splits each rank's slice into K micro-batches. Every rank writes <out>/rank<r>.pt.
"""

import argparse
import os
import sys
from pathlib import Path

import torch

# run as a script by torchrun: find nanochat/
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanochat.common import cleanup_distributed, init_distributed
from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import clip_grad_norm_


def tiny_config(seq_len: int = 16) -> GPTConfig:
    # 3 layers: the MLP shape groups hold 3 matrices, so with 2 ranks DistMuon's padding slot runs.
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
) -> dict:
    """Train the tiny model; returns (and saves to <out_dir>/rank<rank>.pt) the final state_dict."""
    torch.manual_seed(0)
    config = tiny_config(seq_len)
    model = GPT(config)
    # Non-zero output projections so every matrix gets a gradient from step 0.
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight.normal_(std=0.02)
            block.mlp.c_proj.weight.normal_(std=0.02)
    optimizers = model.setup_optimizers()

    data = torch.Generator().manual_seed(1234)
    per_rank = batch_size // world_size
    micro = per_rank // grad_accum
    assert per_rank * world_size == batch_size and micro * grad_accum == per_rank, (
        "batch must split evenly"
    )
    for _ in range(steps):
        tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), generator=data)
        mine = tokens[rank * per_rank : (rank + 1) * per_rank]
        for k in range(grad_accum):
            rows = mine[k * micro : (k + 1) * micro]
            loss = model(rows[:, :-1], rows[:, 1:]) / grad_accum
            loss.backward()
        clip_grad_norm_(optimizers, clip)
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    return state


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", required=True, help="directory for rank<r>.pt")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="global batch (rows)")
    parser.add_argument("--seq-len", type=int, default=16)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--clip", type=float, default=1.0, help="max grad norm (<=0: off)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = init_distributed()
    train(
        args.out,
        args.steps,
        args.batch_size,
        args.seq_len,
        args.grad_accum,
        args.clip,
        info.rank,
        info.world_size,
    )
    cleanup_distributed()


if __name__ == "__main__":
    main()
