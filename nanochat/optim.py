"""Optimizers: Muon for the 2-D block matrices, AdamW for everything else; single-process and distributed.

Who gets what (`build_optimizers`, called by `GPT.setup_optimizers`):
- Muon: every 2-D weight inside the transformer blocks (q, k, v, attention out, MLP in/out). One
  param group per shape (so the distributed version can hand out same-shape work), lr = matrix_lr.
  Per-shape scaling inside the update: lr * max(1, rows / cols) ** 0.5 (tall matrices, e.g. the MLP
  up-projection stored as (4d, d), get a larger step so the update's RMS per element stays comparable).
- AdamW: lm_head (unembedding_lr), token embedding (embedding_lr) and any <2-D parameter (scalar_lr,
  none in the current model). These lrs are tuned at width 768 and scaled by (n_embd / 768) ** -0.5,
  like nanochat: wider models take proportionally smaller Adam steps. betas (0.8, 0.95), eps 1e-10.
- weight_decay is decoupled (p *= 1 - lr * wd) in both optimizers; default 0.
- Every param_group carries "initial_lr"; schedulers set group["lr"] = group["initial_lr"] * factor.
  Muon groups also carry "momentum" (a momentum warmup may change it per step).

Distributed (automatic when torch.distributed is initialised with world_size > 1): do NOT wrap the
model in DDP. Each rank runs forward/backward on its share of the batch (loss = mean over the local
batch; equal shares make the average of rank grads the global-batch gradient), then `step()`:
- all-reduces (SUM, then / world_size; gloo has no AVG) every gradient, so after step() p.grad holds
  the global average on every rank;
- DistAdamW: every rank applies the same AdamW update to the same averaged grads (replicated state;
  deterministic, so the weights stay bitwise identical across ranks);
- DistMuon: within each same-shape group, parameter i is owned by rank i % world_size; the owner
  alone keeps its momentum buffer and runs Newton-Schulz, then an all_gather hands every rank the
  new weights. Optimizer state is therefore sharded: checkpoint it per rank.
Gradient clipping: call `clip_grad_norm_(optimizers, max_norm)` instead of torch's; under torchrun it
first averages the gradients (so the norm is the global-batch norm, identical on every rank) and tells
the Dist* optimizers to skip their own sync in the next step().
Single-process and N-process training over the same global batch give the same weights up to float
round-off (tested with torchrun + gloo on CPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# ---------------------------------------------------------------------------------------------------------
# Newton-Schulz orthogonalisation


@torch.no_grad()
def zeropower_via_newtonschulz5(
    G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Approximate the polar factor U V^T of G = U S V^T with a quintic Newton-Schulz iteration.

    The coefficients (3.4445, -4.7750, 2.0315) push singular values towards ~[0.7, 1.2] quickly rather
    than converging exactly to 1: Muon only needs "roughly orthogonal". bf16 on CUDA (fast, and the
    iteration is robust to it), fp32 on CPU (CPU bf16 matmuls are slow and tests want determinism).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-schulz, for 2-D weight matrices only.

    update = NS5(nesterov_momentum(grad)); p -= lr * max(1, rows/cols)**0.5 * update.
    """

    def __init__(
        self,
        params,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
    ):
        defaults = dict(
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon only takes 2-D parameters, got shape {tuple(p.shape)}")

    def _update(self, params: list, group: dict) -> None:
        """Update same-shape params together: momentum per param, one batched Newton-Schulz for all."""
        directions = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - group["momentum"])
            directions.append(p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
        updates = zeropower_via_newtonschulz5(torch.stack(directions), steps=group["ns_steps"])
        rows, cols = params[0].shape
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5  # per-shape scaling
        for p, update in zip(params, updates):
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update.to(p.dtype), alpha=-lr)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            by_shape: dict[tuple, list] = {}
            for p in group["params"]:
                if p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(p)
            for params in by_shape.values():
                self._update(params, group)


class AdamW(torch.optim.Optimizer):
    """Plain AdamW (decoupled weight decay, bias correction), written out so the distributed version can
    reuse it; numerically the same as torch.optim.AdamW(amsgrad=False) (tested)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = (
                group["lr"],
                group["betas"],
                group["eps"],
                group["weight_decay"],
            )
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if wd:
                    p.mul_(1 - lr * wd)
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                bias1 = 1 - beta1**t
                bias2_sqrt = (1 - beta2**t) ** 0.5
                denom = (v.sqrt() / bias2_sqrt).add_(eps)
                p.addcdiv_(m, denom, value=-lr / bias1)


# ---------------------------------------------------------------------------------------------------------
# Distributed variants


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sync_grads(params) -> None:
    """Average p.grad over ranks (SUM then divide: gloo has no AVG). A missing grad counts as zeros so
    every rank joins every collective in the same order."""
    world_size = dist.get_world_size()
    handles = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        handles.append(dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True))
    for p, h in zip(params, handles):
        h.wait()
        p.grad.div_(world_size)


def _sync_once(opt) -> None:
    """Average this optimizer's grads unless clip_grad_norm_ already did it for this step."""
    if not getattr(opt, "grads_synced", False):
        sync_grads([p for group in opt.param_groups for p in group["params"]])
    opt.grads_synced = False


@torch.no_grad()
def clip_grad_norm_(optimizers: list, max_norm: float | None) -> torch.Tensor:
    """Global grad-norm (and clipping when max_norm is set) over every param of `optimizers`.
    Distributed: averages the gradients first and marks the optimizers so step() does not re-sync."""
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    if is_distributed():
        sync_grads(params)
        for opt in optimizers:
            opt.grads_synced = True
    params = [p for p in params if p.grad is not None]
    if max_norm is None or max_norm <= 0:
        return torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
        )
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


class DistAdamW(AdamW):
    """AdamW whose step() first averages gradients over ranks; state replicated on every rank."""

    @torch.no_grad()
    def step(self, closure=None):
        _sync_once(self)
        super().step()


class DistMuon(Muon):
    """Muon whose step() averages gradients, lets each rank orthogonalise only the params it owns
    (index i % world_size within each same-shape group), then all-gathers the new weights."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            shapes = {tuple(p.shape) for p in group["params"]}
            if len(shapes) > 1:
                raise ValueError(f"DistMuon needs one shape per param group, got {sorted(shapes)}")

    @torch.no_grad()
    def step(self, closure=None):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        _sync_once(self)
        pending = []
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), world_size):
                chunk = params[base : base + world_size]
                mine = base + rank
                if mine < len(params):
                    self._update([params[mine]], group)
                    src = (
                        params[mine].detach().clone()
                    )  # a separate send buffer: never alias the output
                else:
                    src = torch.zeros_like(chunk[0])  # padding rank: sends junk nobody keeps
                outs = [p.data for p in chunk] + [
                    torch.empty_like(chunk[0]) for _ in range(world_size - len(chunk))
                ]
                pending.append((dist.all_gather(outs, src, async_op=True), src, outs))
        for handle, _src, _outs in pending:
            handle.wait()


# ---------------------------------------------------------------------------------------------------------
# The model's optimizer setup


def build_optimizers(
    model,
    unembedding_lr: float = 0.004,
    embedding_lr: float = 0.2,
    matrix_lr: float = 0.02,
    weight_decay: float = 0.0,
    scalar_lr: float = 0.5,
    adam_betas=(0.8, 0.95),
    muon_momentum: float = 0.95,
) -> list[torch.optim.Optimizer]:
    """[AdamW-like, Muon-like] for a GPT; the Dist* variants when torch.distributed runs with >1 rank."""
    # value embeddings are token embeddings too: same rule, same lr
    embedding = [model.transformer.wte.weight] + [t.weight for t in model.value_embeds.values()]
    unembedding = [model.lm_head.weight]
    matrices = [p for p in model.transformer.h.parameters() if p.ndim == 2]
    special = {id(p) for p in embedding + unembedding + matrices}
    scalars = [p for p in model.parameters() if id(p) not in special]
    for p in scalars:
        if p.ndim >= 2:
            raise ValueError(
                f"parameter of shape {tuple(p.shape)} has no optimizer rule (Muon takes block matrices)"
            )
    assert len(embedding) + len(unembedding) + len(matrices) + len(scalars) == len(
        list(model.parameters())
    )

    scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [
        dict(params=unembedding, lr=unembedding_lr * scale),
        dict(params=embedding, lr=embedding_lr * scale),
    ]
    if scalars:
        adam_groups.append(dict(params=scalars, lr=scalar_lr * scale))
    by_shape: dict[tuple, list] = {}
    for p in matrices:  # insertion order = model order, identical on every rank
        by_shape.setdefault(tuple(p.shape), []).append(p)
    muon_groups = [dict(params=ps, lr=matrix_lr) for ps in by_shape.values()]

    distributed = is_distributed()
    adam_cls, muon_cls = (DistAdamW, DistMuon) if distributed else (AdamW, Muon)
    optimizers = [
        adam_cls(adam_groups, betas=adam_betas, eps=1e-10, weight_decay=weight_decay),
        muon_cls(muon_groups, lr=matrix_lr, momentum=muon_momentum, weight_decay=weight_decay),
    ]
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
