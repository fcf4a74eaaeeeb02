"""Optimizers: Muon for the 2-D block matrices, AdamW for the embeddings and lm_head.

`build_optimizers` (called by `GPT.setup_optimizers`) picks who gets what. Under torchrun it returns
the Dist* variants: do NOT wrap the model in DDP, their step() averages the gradients itself, and
`clip_grad_norm_` replaces torch's. Single-process and N-process training over the same global batch
end with the same weights up to float round-off (tests/test_optim.py runs torchrun + gloo on CPU).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------------------
# Newton-Schulz orthogonalisation


@torch.no_grad()
def zeropower_via_newtonschulz5(
    G: torch.Tensor, steps: int = 5, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Roughly the polar factor U V^T of G = U S V^T: G with every singular value moved near 1."""
    # Each step maps every singular value s of X to a*s + b*s^3 + c*s^5 (an odd polynomial in X acts
    # on the singular values alone). These coefficients make the slope at 0 large (3.4445), so tiny
    # singular values grow fast, at the price of not settling exactly on 1: after 5 steps they lie
    # in about [0.7, 1.2]. Muon does not need more precision than that, and more steps cost matmuls.
    a, b, c = 3.4445, -4.7750, 2.0315
    if dtype is None:
        # The iteration corrects itself (each step pulls the spectrum back into the band), so bf16
        # round-off does not pile up and the GPU gets its fast bf16 matmuls. CPU bf16 matmuls are
        # slow, and the CPU tests want fp32's reproducibility.
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:  # iterate on the wide orientation: X X^T is the smaller Gram matrix
        X = X.mT
    # The polynomial only converges for singular values in (0, ~1.5]; spectral <= Frobenius norm.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices only.

    update = NS5(nesterov_momentum(grad)); p -= lr * max(1, rows/cols)**0.5 * update.
    """

    # Why orthogonalise: the momentum of a weight matrix is dominated by a few large singular
    # directions; replacing it by U V^T moves every direction by the same amount, so the rare ones
    # learn as fast as the common ones, and the step's size no longer depends on the gradient's
    # scale. The momentum itself is warmed up by the training loop (base_train's muon_momentum: 0.85
    # -> 0.95 through group["momentum"]): early gradients change direction fast, and a long average
    # over them would keep pointing where the loss used to go down.

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
        """Update same-shape params: momentum per param, one batched Newton-Schulz for all."""
        directions = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - group["momentum"])
            directions.append(p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
        updates = zeropower_via_newtonschulz5(torch.stack(directions), steps=group["ns_steps"])
        # An orthogonalised (rows x cols) matrix has an RMS per element of 1 / sqrt(max(rows,
        # cols)). The factor makes it 1 / sqrt(cols), i.e. 1 / sqrt(fan_in) for an nn.Linear weight
        # (out, in), whatever the shape: tall matrices such as the MLP's (4d, d) up-projection get a
        # larger step.
        rows, cols = params[0].shape
        lr = group["lr"] * max(1.0, rows / cols) ** 0.5
        for p, update in zip(params, updates):
            if group["weight_decay"]:  # decoupled, and by the unscaled lr
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
    """Plain AdamW (decoupled weight decay, bias correction), written out so that DistAdamW can
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
            lr = group["lr"]
            beta1, beta2 = group["betas"]
            eps = group["eps"]
            wd = group["weight_decay"]
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


# --------------------------------------------------------------------------------------------------
# Distributed variants
#
# Each rank runs forward/backward on its equal share of the global batch, with the loss averaged
# over its own rows, so the mean of the ranks' gradients is the global-batch gradient.


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.no_grad()
def sync_grads(params) -> None:
    """Average p.grad over ranks, so every rank holds the global-batch gradient."""
    world_size = dist.get_world_size()
    handles = []
    for p in params:
        # A missing grad counts as zeros: every rank must join every collective, in the same order.
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        handles.append(dist.all_reduce(p.grad, op=dist.ReduceOp.SUM, async_op=True))
    for p, h in zip(params, handles):
        h.wait()
        p.grad.div_(world_size)  # SUM then divide: gloo has no AVG


def _sync_once(opt) -> None:
    """Average this optimizer's grads unless clip_grad_norm_ already did it for this step."""
    if not getattr(opt, "grads_synced", False):
        sync_grads([p for group in opt.param_groups for p in group["params"]])
    opt.grads_synced = False


@torch.no_grad()
def clip_grad_norm_(optimizers: list, max_norm: float | None) -> torch.Tensor:
    """Global grad norm over every param of `optimizers`, clipped to max_norm when it is set."""
    params = [p for opt in optimizers for group in opt.param_groups for p in group["params"]]
    if is_distributed():
        # The norm must be the global batch's, the same on every rank, or ranks would clip
        # differently and drift apart: average first, and spare step() a second all-reduce.
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
    """AdamW whose step() first averages gradients over ranks."""

    # The state is replicated: every rank applies the same deterministic update to the same averaged
    # gradients, so the embeddings stay bitwise identical across ranks without a broadcast.

    @torch.no_grad()
    def step(self, closure=None):
        _sync_once(self)
        super().step()


class DistMuon(Muon):
    """Muon whose step() shards the Newton-Schulz work of each same-shape group over the ranks."""

    # Newton-Schulz is the expensive part, so each rank orthogonalises only the matrices it owns:
    # index i of a group belongs to rank i % world_size, which alone keeps its momentum buffer (the
    # optimizer state is sharded: checkpoint it per rank). An all_gather per world_size matrices
    # then hands every rank the new weights. Groups hold one shape so that the gather's tensors
    # match.

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
                    # a separate send buffer: the gather writes into params[mine] itself
                    src = params[mine].detach().clone()
                else:
                    # the last chunk is short: this rank still joins the gather, with junk
                    src = torch.zeros_like(chunk[0])
                padding = [torch.empty_like(chunk[0]) for _ in range(world_size - len(chunk))]
                outs = [p.data for p in chunk] + padding
                pending.append((dist.all_gather(outs, src, async_op=True), src, outs))
        # src and outs stay referenced until the gathers finish
        for handle, _src, _outs in pending:
            handle.wait()


# --------------------------------------------------------------------------------------------------
# The model's optimizer setup


def build_optimizers(
    model,
    unembedding_lr: float = 0.004,
    embedding_lr: float = 0.2,
    matrix_lr: float = 0.02,
    weight_decay: float = 0.0,
    adam_betas=(0.8, 0.95),
    muon_momentum: float = 0.95,
    value_embed_lr: float | None = None,
) -> list[torch.optim.Optimizer]:
    """[AdamW, Muon] for a GPT; DistAdamW and DistMuon when torch.distributed runs with >1 rank.

    Every param_group carries "initial_lr": the schedule sets lr = initial_lr * factor
    (training.set_lr).
    weight_decay is decoupled (p *= 1 - lr * wd) in both; default 0.
    value_embed_lr: None trains the value-embedding tables with the token embedding; 0 freezes
    them (no gradient, no optimizer state); else their own AdamW lr.
    """
    # Embedding tables are lookups, not matmuls: Muon's orthogonal step means nothing for them.
    # The value embeddings are token embeddings too: the same rule, by default the same lr.
    embedding = [model.transformer.wte.weight]
    value_tables = [t.weight for t in model.value_embeds.values()]
    if value_embed_lr is not None and value_embed_lr < 0:
        raise ValueError(
            f"value_embed_lr must be >= 0 (0 freezes the tables), got {value_embed_lr}"
        )
    for table in value_tables:  # frozen at 0; set either way, in case an earlier call froze them
        table.requires_grad_(value_embed_lr is None or value_embed_lr > 0)
    if value_embed_lr is None:
        embedding, value_tables = embedding + value_tables, []
    unembedding = [model.lm_head.weight]
    matrices = [p for p in model.transformer.h.parameters() if p.ndim == 2]
    ruled = {id(p) for p in embedding + value_tables + unembedding + matrices}
    unruled = [
        f"{name} {tuple(p.shape)}" for name, p in model.named_parameters() if id(p) not in ruled
    ]
    if unruled:
        raise ValueError(
            f"no optimizer rule for parameter(s) {', '.join(unruled)}: build_optimizers knows the "
            "embeddings and lm_head (AdamW) and the 2-D block matrices (Muon); give new ones a rule"
        )

    # Adam's step per element is about lr whatever the gradient's scale, so a row of a wider model
    # moves its dot products more; the lrs are tuned at width 768 and shrink as 1 / sqrt(width).
    scale = (model.config.n_embd / 768) ** -0.5
    adam_groups = [
        dict(params=unembedding, lr=unembedding_lr * scale),
        dict(params=embedding, lr=embedding_lr * scale),
    ]
    if value_tables and value_embed_lr > 0:
        adam_groups.append(dict(params=value_tables, lr=value_embed_lr * scale))
    # One Muon group per shape: Muon batches same-shape matrices into one Newton-Schulz call, and
    # DistMuon hands them out across ranks. Insertion order = model order, identical on every rank.
    by_shape: dict[tuple, list] = {}
    for p in matrices:
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
