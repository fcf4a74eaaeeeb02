"""Optimizers: Muon for the 2-D block matrices, AdamW for the embeddings and lm_head.

`build_optimizers` (called by `GPT.setup_optimizers`) picks who gets what. Under torchrun it returns
the Dist* variants, sharded ZeRO-2 style (below): do NOT wrap the model in DDP, their step()
averages the gradients itself, `clip_grad_norm_` replaces torch's, and `overlap_grad_sync` before
the last backward of a step lets that backward send the gradients as they complete. Each rank's
state_dict holds only its shard; `merge_optimizer_states` joins the shards of a checkpoint.
Single-process and N-process training over the same global batch end with the same weights up to
float round-off (tests/test_optim.py runs torchrun + gloo on CPU).
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist

# --------------------------------------------------------------------------------------------------
# The optimizer base


class ParamGroupOptimizer:
    """What these optimizers need of torch.optim.Optimizer, written out: param_groups (dicts with
    the defaults filled in), per-parameter `state`, and state_dict / load_state_dict in torch's
    format (parameters by their index over the groups), so checkpoints load either way.

    Why not subclass torch.optim.Optimizer: its constructor imports torch._dynamo (through the
    @torch._disable_dynamo on add_param_group), 2-3 s at the start of every training process on a
    2-core machine, paid by every stage of every pipeline run; nothing here is compiled."""

    def __init__(self, params, defaults: dict):
        self.defaults = defaults
        self.state: defaultdict = defaultdict(dict)
        groups = list(params)
        if not groups:
            raise ValueError("the optimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.param_groups = []
        seen = set()
        for group in groups:
            group = {**defaults, **group, "params": list(group["params"])}
            if seen & {id(p) for p in group["params"]}:
                raise ValueError("a parameter appears in more than one parameter group")
            seen |= {id(p) for p in group["params"]}
            self.param_groups.append(group)

    def parameters(self) -> list:
        """Every parameter, group after group: the order of the indices in state_dict."""
        return [p for group in self.param_groups for p in group["params"]]

    def state_dict(self) -> dict:
        index = {id(p): i for i, p in enumerate(self.parameters())}
        return {
            "state": {index[id(p)]: entry for p, entry in self.state.items()},
            "param_groups": [
                {**group, "params": [index[id(p)] for p in group["params"]]}
                for group in self.param_groups
            ],
        }

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["param_groups"]
        ours = [len(g["params"]) for g in self.param_groups]
        theirs = [len(g["params"]) for g in saved]
        if ours != theirs:
            raise ValueError(
                f"this optimizer state has parameter groups of sizes {theirs}, the optimizer "
                f"{ours}: it belongs to another model or another optimizer setup"
            )
        params = self.parameters()
        self.state = defaultdict(dict)
        for index, entry in state_dict["state"].items():
            p = params[int(index)]
            # tensors follow the parameter's device (and float dtype), as torch's loader does
            self.state[p] = {
                k: v.to(p.device, p.dtype if v.is_floating_point() else v.dtype)
                if torch.is_tensor(v)
                else v
                for k, v in entry.items()
            }
        for group, loaded in zip(self.param_groups, saved):
            group.update({k: v for k, v in loaded.items() if k != "params"})


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


class Muon(ParamGroupOptimizer):
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

    def _update(self, params: list, grads: list, group: dict) -> None:
        """Update same-shape params from their grads: momentum per param, one batched
        Newton-Schulz for all."""
        directions = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1 - group["momentum"])
            directions.append(g.lerp(buf, group["momentum"]) if group["nesterov"] else buf)
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
                self._update(params, [p.grad for p in params], group)


def _adamw_update(p: torch.Tensor, g: torch.Tensor, state: dict, group: dict) -> None:
    """One AdamW step of the elements p (a parameter, or the slice of one that this rank owns)
    with their gradient g; state holds their step count and moments."""
    lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
    beta1, beta2 = group["betas"]
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


class AdamW(ParamGroupOptimizer):
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
            for p in group["params"]:
                if p.grad is not None:
                    _adamw_update(p, p.grad, self.state[p], group)


# --------------------------------------------------------------------------------------------------
# Distributed variants: ZeRO-2-style sharding
#
# Each rank runs forward/backward on its equal share of the global batch, with the loss averaged
# over its own rows, so the mean of the ranks' gradients is the global-batch gradient. Nobody needs
# all of that mean: each rank updates only its shard of the parameters, so it receives only the
# averaged gradient of that shard (a reduce-scatter: half the bytes of an all-reduce), keeps the
# optimizer state of that shard alone, and an all-gather hands every rank the updated parameters.
#   AdamW (DistAdamW): every parameter is flattened and cut into world_size contiguous slices
#       (the last ones shorter, or empty); rank r updates slice r of each.
#   Muon (DistMuon): Newton-Schulz needs whole matrices, so each matrix has one owner: index i of a
#       same-shape group belongs to rank i % world_size (as before sharding, so older checkpoints
#       still load), and a reduce-scatter over the stack of world_size such matrices hands each
#       owner its averaged gradient.
# GradSync sends the gradients in buckets (one AdamW parameter, or one stack of Muon matrices) in
# a fixed order on every rank; with overlap_grad_sync() before the last backward of a step, a
# bucket is sent from a gradient hook as soon as its gradients are complete, so the transfer
# overlaps the rest of the backward.


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


_reduce_scatter_works: bool | None = None


def _can_reduce_scatter() -> bool:
    """NCCL reduce-scatters; gloo does only in newer torch (2.15 does). Gloo is asked once, on a
    tiny CPU tensor: where it cannot, it refuses before sending anything, on every rank alike."""
    global _reduce_scatter_works
    if _reduce_scatter_works is None:
        _reduce_scatter_works = True
        if dist.get_backend() == "gloo":
            try:
                dist.reduce_scatter_tensor(torch.empty(1), torch.zeros(dist.get_world_size()))
            except (RuntimeError, NotImplementedError, ValueError):
                _reduce_scatter_works = False
    return _reduce_scatter_works


class _Bucket:
    """One collective's worth of gradients. kind "slice": one AdamW parameter, every rank gets
    its slice of the flattened mean; kind "owner": up to world_size same-shape Muon matrices, rank
    r gets the mean of params[r]. `key` orders the buckets: the later in the forward the
    parameters are used, the earlier the backward completes their gradients."""

    def __init__(self, kind: str, params: list, key: float, rank: int, world_size: int):
        self.kind, self.params, self.key = kind, params, key
        self.rank, self.world_size = rank, world_size
        self.handle = self.send = self.recv = None

    def launch(self) -> None:
        """Start the reduce (SUM) of this bucket's gradients; the full gradients are dropped."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.kind == "slice":
            numel = grads[0].numel()
            piece = -(-numel // self.world_size)  # ceil: every rank's slice, the last ones padded
            send = grads[0].reshape(-1)
            if piece * self.world_size != numel:
                send = torch.cat([send, send.new_zeros(piece * self.world_size - numel)])
            self.recv = send.new_empty(piece)
        else:  # a missing matrix in the last stack of a group: zeros nobody owns
            grads += [torch.zeros_like(grads[0])] * (self.world_size - len(grads))
            send = torch.stack(grads).view(-1)  # flat: gloo splits dim 0 only
            self.recv = send.new_empty(grads[0].numel())
        for p in self.params:  # ZeRO-2: nobody keeps the full gradient past this point
            p.grad = None
        if _can_reduce_scatter():
            self.handle = dist.reduce_scatter_tensor(
                self.recv, send, op=dist.ReduceOp.SUM, async_op=True
            )
        else:
            # Old gloo: all-reduce everything and keep one's own part. Twice the bytes, the same
            # result, state and checkpoints (docs/performance.md's bytes are reduce-scatter's).
            self.handle = dist.all_reduce(send, op=dist.ReduceOp.SUM, async_op=True)
        self.send = send  # referenced until the collective finishes

    def finish(self, grads: dict) -> None:
        """Wait, and put this rank's part of the mean in grads (param -> tensor)."""
        self.handle.wait()
        if not _can_reduce_scatter():
            self.recv.copy_(self.send.view(self.world_size, -1)[self.rank])
        mean = self.recv.div_(self.world_size)  # SUM then divide: gloo has no AVG
        if self.kind == "slice":
            p = self.params[0]
            lo, hi = shard_range(p.numel(), self.rank, self.world_size)
            grads[p] = mean[: hi - lo]
        elif self.rank < len(self.params):
            grads[self.params[self.rank]] = mean.view(self.params[0].shape)
        self.handle = self.send = self.recv = None


def shard_range(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of the flattened parameter that `rank` owns in DistAdamW: world_size slices of
    ceil(numel / world_size) elements, the last ones shorter or empty."""
    piece = -(-numel // world_size)
    return min(rank * piece, numel), min((rank + 1) * piece, numel)


class GradSync:
    """Averages the gradients of a set of sharded optimizers over the ranks, each rank receiving
    only what it updates (grads: param -> its averaged slice, or whole matrix if it owns it).

    Buckets go out in one fixed order on every rank (gloo and NCCL match collectives by order):
    bucket i is sent only after bucket i-1. Without overlap_grad_sync() they all go out in
    finish(), called by clip_grad_norm_ or the first optimizer's step(); with it, the gradient
    hooks of the next backward send each bucket once its gradients (and those of every earlier
    bucket) are complete. A rank whose backward never reaches a parameter (an RL rank with nothing
    to train) sends zeros for it in finish(), in the same order."""

    def __init__(self, optimizers: list, order: dict[int, float]):
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.optimizers = optimizers
        buckets = [b for opt in optimizers for b in opt._buckets(order, self.rank, self.world_size)]
        self.buckets = sorted(buckets, key=lambda b: -b.key)  # stable: ties keep build order
        self.bucket_of = {p: b for b in self.buckets for p in b.params}
        self.hooks = [p.register_post_accumulate_grad_hook(self._on_grad) for p in self.bucket_of]
        self._reset()

    def _reset(self) -> None:
        self.armed = False  # set by overlap_grad_sync for the next backward
        self.ready: set = set()  # params whose gradient the armed backward has completed
        self.sent = 0  # buckets[:sent] are on their way
        self.finished = False
        self.stepped: set = set()  # ids of the optimizers that used this round's grads
        self.grads: dict = {}

    def _on_grad(self, p) -> None:
        if not self.armed:
            return
        if self.bucket_of[p] in self.buckets[: self.sent]:
            raise RuntimeError(
                "a gradient arrived after its bucket was sent: call overlap_grad_sync() only "
                "right before the LAST backward of a step"
            )
        self.ready.add(p)
        while self.sent < len(self.buckets) and all(
            q in self.ready for q in self.buckets[self.sent].params
        ):
            self.buckets[self.sent].launch()
            self.sent += 1

    @torch.no_grad()
    def finish(self) -> dict:
        """Send what is left, wait for everything; -> grads. Idempotent within one step."""
        if not self.finished:
            for bucket in self.buckets[self.sent :]:
                bucket.launch()
            for bucket in self.buckets:
                bucket.finish(self.grads)
            self.armed, self.finished = False, True
        return self.grads

    def stepped_by(self, opt) -> None:
        """`opt` has used this step's grads; once every optimizer has, the next step begins."""
        self.stepped.add(id(opt))
        if len(self.stepped) == len(self.optimizers):
            self._reset()


def overlap_grad_sync(optimizers) -> None:
    """Call right before the last backward of a step (the last micro-batch): its gradient hooks
    then send each bucket as soon as it is complete, overlapping communication with the rest of
    the backward. Single process: nothing to do. Without the call, everything is sent after the
    backward: the same result."""
    syncs = {id(s): s for s in (getattr(o, "grad_sync", None) for o in optimizers) if s}
    for sync in syncs.values():
        if sync.sent or sync.finished:
            raise RuntimeError("overlap_grad_sync() after this step's gradients were sent")
        sync.armed = True


@torch.no_grad()
def clip_grad_norm_(optimizers: list, max_norm: float | None) -> torch.Tensor:
    """Global grad norm over every param of `optimizers`, clipped to max_norm when it is set."""
    syncs = {id(s): s for s in (getattr(o, "grad_sync", None) for o in optimizers) if s}
    if not syncs:
        params = [p for opt in optimizers for p in opt.parameters() if p.grad is not None]
        if max_norm is None or max_norm <= 0:
            return torch.linalg.vector_norm(
                torch.stack([torch.linalg.vector_norm(p.grad) for p in params])
            )
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    # Sharded: each rank holds a disjoint part of the averaged gradient. The sum of the parts'
    # squares over ranks is the global batch's squared norm, the same on every rank, so every
    # rank clips by the same factor (as torch's clip_grad_norm_ computes it).
    grads = [g for sync in syncs.values() for g in sync.finish().values()]
    device = next(p for o in optimizers for g in o.param_groups for p in g["params"]).device
    squares = torch.zeros((), device=device, dtype=torch.float32)
    for g in grads:
        squares += torch.linalg.vector_norm(g.float()) ** 2
    dist.all_reduce(squares, op=dist.ReduceOp.SUM)
    total = squares.sqrt()
    if max_norm is not None and max_norm > 0:
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
    return total


class DistAdamW(AdamW):
    """AdamW over flattened slices: rank r keeps the moments of, and updates, slice r of every
    parameter (shard_range), then an all-gather puts the whole parameters back on every rank."""

    def _buckets(self, order, rank, world_size) -> list:
        return [
            _Bucket("slice", [p], order.get(id(p), 0.0), rank, world_size)
            for p in self.parameters()
        ]

    @torch.no_grad()
    def step(self, closure=None):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        grads = self.grad_sync.finish()
        pending = []
        for group in self.param_groups:
            for p in group["params"]:
                flat = p.data.view(-1)  # parameters are contiguous: a view, written in place
                lo, hi = shard_range(p.numel(), rank, world_size)
                mine = flat[lo:hi]
                _adamw_update(mine, grads[p], self.state[p], group)
                # all-gather the slices (padded to one size) back into the whole parameter
                piece = -(-p.numel() // world_size)
                send = torch.cat([mine, mine.new_zeros(piece - (hi - lo))])
                recv = (
                    flat if piece * world_size == p.numel() else flat.new_empty(piece * world_size)
                )
                handle = dist.all_gather_into_tensor(recv, send, async_op=True)
                pending.append((handle, send, recv, flat))
        for handle, _send, recv, flat in pending:
            handle.wait()
            if recv is not flat:
                flat.copy_(recv[: flat.numel()])
        self.grad_sync.stepped_by(self)

    def state_dict(self):
        return _tag_shards(super().state_dict(), self, "slice")

    def load_state_dict(self, state_dict):
        super().load_state_dict(_own_part(state_dict, self, "slice"))


class DistMuon(Muon):
    """Muon whose matrices each have one owner rank (index i of a same-shape group: rank i %
    world_size), which alone receives their averaged gradient, keeps their momentum and runs
    their Newton-Schulz; an all_gather per world_size matrices then hands every rank the new
    weights. Groups hold one shape so that the stacks and gathers match."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        for group in self.param_groups:
            shapes = {tuple(p.shape) for p in group["params"]}
            if len(shapes) > 1:
                raise ValueError(f"DistMuon needs one shape per param group, got {sorted(shapes)}")

    def _buckets(self, order, rank, world_size) -> list:
        out = []
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), world_size):
                chunk = params[base : base + world_size]
                key = min(order.get(id(p), 0.0) for p in chunk)  # complete when the last one is
                out.append(_Bucket("owner", chunk, key, rank, world_size))
        return out

    @torch.no_grad()
    def step(self, closure=None):
        rank, world_size = dist.get_rank(), dist.get_world_size()
        grads = self.grad_sync.finish()
        pending = []
        for group in self.param_groups:
            params = group["params"]
            for base in range(0, len(params), world_size):
                chunk = params[base : base + world_size]
                mine = base + rank
                if mine < len(params):
                    self._update([params[mine]], [grads[params[mine]]], group)
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
        self.grad_sync.stepped_by(self)

    def state_dict(self):
        return _tag_shards(super().state_dict(), self, "owner")

    def load_state_dict(self, state_dict):
        super().load_state_dict(_own_part(state_dict, self, "owner"))


# --------------------------------------------------------------------------------------------------
# Sharded optimizer state in checkpoints
#
# A sharded optimizer's state_dict holds only its rank's part, tagged "sharding": {"layout":
# "slice" | "owner", "world_size", "rank", "shapes"}. merge_optimizer_states turns the parts of
# every rank into one single-process state_dict; a sharded optimizer loads either its own part
# (same world size and rank) or a single-process state_dict, of which it keeps its part. So a
# checkpoint moves between world sizes as: every rank's file -> merge -> each new rank's part.


def _tag_shards(state_dict: dict, opt, layout: str) -> dict:
    params = opt.parameters()
    state_dict["sharding"] = {
        "layout": layout,
        "world_size": dist.get_world_size(),
        "rank": dist.get_rank(),
        "shapes": [list(p.shape) for p in params],
    }
    return state_dict


def _own_part(state_dict: dict, opt, layout: str) -> dict:
    """The part of `state_dict` (this rank's own, or a single-process one) that this rank keeps."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    state_dict = dict(state_dict)
    tag = state_dict.pop("sharding", None)
    if tag is not None:
        if (tag["layout"], tag["world_size"], tag["rank"]) != (layout, world_size, rank):
            raise ValueError(
                f"this optimizer state is rank {tag['rank']}'s part of a {tag['layout']} sharding "
                f"over {tag['world_size']} process(es); this is rank {rank} of {world_size}: merge "
                f"every rank's part first (merge_optimizer_states)"
            )
        return state_dict
    # A single-process state_dict (or one from before sharding: AdamW states whole on every rank,
    # Muon states only on their owners, which are the owners here too)
    params = opt.parameters()
    owned, start = set(), 0  # DistMuon's owners: index i of a group belongs to rank i % world_size
    for group in opt.param_groups:
        owned |= {start + i for i in range(rank, len(group["params"]), world_size)}
        start += len(group["params"])
    kept = {}
    for index, entry in state_dict["state"].items():
        if layout == "owner":
            if index in owned:
                kept[index] = entry
            continue
        lo, hi = shard_range(params[index].numel(), rank, world_size)
        kept[index] = {
            k: v.reshape(-1)[lo:hi].clone() if torch.is_tensor(v) and v.ndim > 0 else v
            for k, v in entry.items()
        }
    state_dict["state"] = kept
    return state_dict


def merge_optimizer_states(parts: list[dict]) -> dict:
    """The state_dicts of one optimizer on every rank, in rank order -> one single-process
    state_dict (loadable by AdamW / Muon, and by the sharded ones at any world size)."""
    tag = parts[0].get("sharding")
    merged = {"param_groups": parts[0]["param_groups"], "state": {}}
    if tag is None or tag["layout"] == "owner":
        # owner layout (and files from before sharding, whose AdamW states were whole on every
        # rank): each parameter's state lies whole on some rank
        for part in parts:
            for index, entry in part["state"].items():
                merged["state"].setdefault(index, entry)
        return merged
    ranks = [part["sharding"]["rank"] for part in parts]
    if ranks != list(range(tag["world_size"])):
        raise ValueError(
            f"need the parts of ranks 0..{tag['world_size'] - 1} in order, got {ranks}"
        )
    for index, shape in enumerate(tag["shapes"]):
        entries = [part["state"].get(index) for part in parts]
        if entries[0] is None:
            continue
        merged["state"][index] = {
            k: (
                torch.cat([e[k] for e in entries]).view(shape)
                if torch.is_tensor(v) and v.ndim > 0
                else v
            )
            for k, v in entries[0].items()
        }
    return merged


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
) -> list[ParamGroupOptimizer]:
    """[AdamW, Muon] for a GPT; DistAdamW and DistMuon, sharing one GradSync, when
    torch.distributed runs with >1 rank.

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
    if distributed:
        # The order the backward completes the gradients in: lm_head first, then the blocks from
        # the last to the first (a layer's value embedding with it), the token embedding last.
        order = {id(model.lm_head.weight): float(model.config.n_layer)}
        for i, block in enumerate(model.transformer.h):
            order.update({id(p): float(i) for p in block.parameters()})
        order.update({id(t.weight): float(i) for i, t in model.value_embeds.items()})
        sync = GradSync(optimizers, order)
        for opt in optimizers:
            opt.grad_sync = sync
    for opt in optimizers:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return optimizers
