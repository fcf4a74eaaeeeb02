"""Optimizers: AdamW == torch.optim.AdamW, Muon's orthogonalisation, grouping, 1 vs 2 processes."""

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanochat.gpt import GPT, GPTConfig
from nanochat.optim import AdamW, Muon, clip_grad_norm_, zeropower_via_newtonschulz5

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_optim_worker  # noqa: E402

TINY = dict(sequence_len=16, vocab_size=256, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)


def test_adamw_matches_torch_adamw():
    torch.manual_seed(0)
    shapes = [(7, 5), (11,), (3, 4, 2)]
    ours = [torch.randn(s, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_(True) for p in ours]

    def groups(ps):
        return [dict(params=ps[:2], lr=3e-2), dict(params=ps[2:], lr=1e-3, weight_decay=0.0)]

    opt = AdamW(groups(ours), betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)
    opt_ref = torch.optim.AdamW(
        groups(ref), betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1, foreach=False
    )
    for step in range(6):
        for a, b in zip(ours, ref):
            g = torch.randn(a.shape) * (10.0 ** (step - 3))  # grads across scales
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        opt_ref.step()
        if step == 3:  # lr changes mid-run (schedulers) are honoured the same way
            for o in (opt, opt_ref):
                o.param_groups[0]["lr"] *= 0.5
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (256, 64), (64, 256), (48, 80)])
def test_newton_schulz_output_is_near_orthogonal(shape):
    torch.manual_seed(0)
    G = torch.randn(shape) * 1e-3  # scale-free: the input is normalised first
    X = zeropower_via_newtonschulz5(G, steps=5)
    assert X.shape == G.shape and X.dtype == torch.float32  # fp32 on CPU
    # NS is an odd matrix polynomial: X = U p(S) V^T with G = U S V^T, so p(sigma_i) = (U^T X V)_ii.
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    p_of_s = torch.diagonal(U.T @ X @ Vh.T)
    torch.testing.assert_close(U @ torch.diag(p_of_s) @ Vh, X, atol=1e-4, rtol=1e-3)
    assert p_of_s.max() < 1.5
    # 5 steps lift every direction not tiny relative to the top one into [0.5, 1.5]; a near-null
    # direction (a square Gaussian has one) is only multiplied by ~3.4^5 and may stay small: Muon
    # accepts that.
    kept = S >= 0.02 * S.max()
    assert kept.sum() >= 0.9 * len(S)
    assert p_of_s[kept].min() > 0.5, p_of_s[kept].min()
    if shape != (
        64,
        64,
    ):  # rectangular Gaussians are well conditioned: the whole spectrum is near 1
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.5 and s.max() < 1.5, (s.min(), s.max())


def test_newton_schulz_in_bf16_as_on_cuda_is_still_near_orthogonal():
    torch.manual_seed(0)
    X = zeropower_via_newtonschulz5(torch.randn(256, 64), dtype=torch.bfloat16)
    assert X.dtype == torch.bfloat16
    s = torch.linalg.svdvals(X.float())
    assert s.min() > 0.5 and s.max() < 1.5, (s.min(), s.max())


def test_muon_step_is_scaled_orthogonal_update():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(128, 32))  # tall: lr scale sqrt(128/32) = 2
    before = p.detach().clone()
    opt = Muon([p], lr=0.01, momentum=0.95, nesterov=True)
    p.grad = torch.randn(128, 32)
    opt.step()
    update = (before - p.detach()) / (0.01 * 2.0)
    s = torch.linalg.svdvals(update)
    assert s.min() > 0.5 and s.max() < 1.5
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.zeros(3))])


def test_setup_optimizers_groups_and_lrs():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    adamw, muon = model.setup_optimizers(unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02)
    assert isinstance(adamw, AdamW) and isinstance(muon, Muon)
    seen = [p for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen}) == len(list(model.parameters()))
    scale = (64 / 768) ** -0.5
    lm, emb = adamw.param_groups
    assert (
        lm["params"][0] is model.lm_head.weight and emb["params"][0] is model.transformer.wte.weight
    )
    assert lm["lr"] == pytest.approx(0.004 * scale) and emb["lr"] == pytest.approx(0.2 * scale)
    for group in muon.param_groups:
        assert len({tuple(p.shape) for p in group["params"]}) == 1 and group["lr"] == 0.02
    for opt in (adamw, muon):
        for group in opt.param_groups:
            assert group["initial_lr"] == group["lr"]


def test_value_embedding_tables_train_with_the_embedding_or_alone_or_not_at_all():
    def step(value_embed_lr):
        torch.manual_seed(0)
        model = GPT(GPTConfig(**TINY, value_embed_every=1))
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        opts = model.setup_optimizers(value_embed_lr=value_embed_lr)
        ids = torch.randint(0, TINY["vocab_size"], (2, 16))
        for _ in range(2):  # the zero-initialised output projections pass no gradient at step 1
            model(ids, ids).backward()
            for opt in opts:
                opt.step()
            model.zero_grad(set_to_none=True)
        moved = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
        return model, opts, moved

    scale = (64 / 768) ** -0.5
    model, (adamw, _), moved = step(None)  # pretraining: one embedding group holds every table
    tables = [t.weight for t in model.value_embeds.values()]
    assert [id(p) for p in adamw.param_groups[1]["params"]] == [
        id(p) for p in [model.transformer.wte.weight] + tables
    ]
    assert {f"value_embeds.{i}.weight" for i in model.value_embeds} <= moved
    model, (adamw, _), moved = step(0.05)  # an lr of their own
    assert len(adamw.param_groups) == 3 and adamw.param_groups[2]["lr"] == pytest.approx(
        0.05 * scale
    )
    assert {f"value_embeds.{i}.weight" for i in model.value_embeds} <= moved
    model, (adamw, muon), moved = step(0.0)  # frozen: no gradient, no state, not moved
    assert not any(k.startswith("value_embeds.") for k in moved)
    assert "transformer.wte.weight" in moved and "lm_head.weight" in moved
    frozen = {id(t.weight) for t in model.value_embeds.values()}
    optimized = {id(p) for opt in (adamw, muon) for g in opt.param_groups for p in g["params"]}
    assert frozen and not frozen & optimized
    assert not any(t.weight.requires_grad for t in model.value_embeds.values())


def test_a_negative_value_embedding_lr_is_refused():
    model = GPT(GPTConfig(**TINY, value_embed_every=1))
    with pytest.raises(ValueError, match="value_embed_lr must be >= 0"):
        model.setup_optimizers(value_embed_lr=-0.1)


def test_a_resume_whose_optimizer_groups_differ_is_refused_in_one_line(tmp_path):
    from dataclasses import asdict

    from nanochat.common import DistInfo
    from nanochat.training import save, start_or_resume

    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY, value_embed_every=1))
    # a fine-tuning checkpoint from before --value-embed-lr: tables in the embedding group
    old = model.setup_optimizers()
    save(tmp_path, 1, model, old, {"model_config": asdict(model.config)}, 0, 2, {})
    info = DistInfo(False, 0, 0, 1, torch.device("cpu"))
    new = model.setup_optimizers(value_embed_lr=0.05)
    with pytest.raises(SystemExit, match=r"step 1: its optimizer state does not fit .*--fresh"):
        start_or_resume(tmp_path, info, model, new, fresh=False, resume="auto")
    assert start_or_resume(tmp_path, info, model, old, fresh=False, resume="auto")[0] == 1


def test_a_parameter_without_an_optimizer_rule_is_refused():
    # The model has no 1-D or 0-D parameters; one added later needs a rule, not a silent default.
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    model.transformer.h[0].attn.scale = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(
        ValueError, match=r"no optimizer rule .*transformer\.h\.0\.attn\.scale \(4,\)"
    ):
        model.setup_optimizers()
    with pytest.raises(TypeError, match="scalar_lr"):  # the group for such parameters is gone
        model.setup_optimizers(scalar_lr=0.5)


def test_tiny_model_learns_with_setup_optimizers():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    optimizers = model.setup_optimizers()
    x = torch.randint(0, 256, (4, 17))
    losses = []
    for _ in range(15):
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for opt in optimizers:
            opt.step()
        model.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_clip_grad_norm_single_process_matches_torch():
    torch.manual_seed(0)
    model = GPT(GPTConfig(**TINY))
    x = torch.randint(0, 256, (2, 17))
    model(x[:, :-1], x[:, 1:]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    expected = torch.nn.utils.clip_grad_norm_(list(model.parameters()), 0.1)
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    norm = clip_grad_norm_(model.setup_optimizers(), 0.1)
    torch.testing.assert_close(norm, expected)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(
            p.grad, g * min(1.0, 0.1 / expected.item()), atol=1e-7, rtol=1e-5
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: dict, b: dict, what: str) -> None:
    for name, w in b.items():
        # Muon matrices agree to ~1e-7. The embeddings are the loosest: Adam's m/sqrt(v) on
        # elements whose gradient nearly cancels amplifies summation-order round-off (seen: 1.6e-5
        # on values ~0.2, lr 0.7).
        tol = dict(atol=1e-6, rtol=1e-5) if "transformer.h." in name else dict(atol=5e-5, rtol=1e-4)
        torch.testing.assert_close(
            a[name], w, **tol, msg=lambda m, name=name: f"{name}: {what}: {m}"
        )


def test_two_process_sharded_training_matches_single_process(tmp_path, one_thread):
    """Same global batch of 4 rows, 3 steps with clipping, a checkpoint after step 2. One process
    (full batch, and with 2-step gradient accumulation) and torchrun with 2 gloo ranks (2 rows each,
    2 micro-steps, gradients sent from the hooks of the last backward; or all-reduced, as on old
    gloo) end with the same weights.
    The 2 ranks' optimizer files together are no bigger than the one process's, and hold each
    parameter's state once. Resuming at step 2 from the 2-rank checkpoint on 2 ranks is bit-exact;
    from the 1-process checkpoint on 2 ranks, and from the 2-rank one in 1 process, the optimizer
    state is re-sharded and training ends where the uninterrupted runs do."""
    ckpt1, ckpt2 = tmp_path / "ckpt1", tmp_path / "ckpt2"
    single = dist_optim_worker.train(
        str(tmp_path), steps=3, batch_size=4, save_at=2, ckpt_dir=str(ckpt1)
    )
    accum = dist_optim_worker.train(str(tmp_path), steps=3, batch_size=4, grad_accum=2, name="acc")
    env = {
        **os.environ,
        "NANOCHAT_DEVICE": "cpu",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO_ROOT),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    cmd += ["--master_port", str(free_port()), str(REPO_ROOT / "tests" / "dist_optim_worker.py")]
    cmd += ["--out", str(tmp_path), "--steps", "3", "--batch-size", "4", "--grad-accum", "2"]
    cmd += ["--save-at", "2", "--ckpt", str(ckpt2), "--resume", str(ckpt2), "--resume", str(ckpt1)]
    cmd += ["--all-reduce-run"]
    proc = subprocess.run(cmd, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def weights(name):
        ranks = [torch.load(tmp_path / f"{name}_rank{r}.pt", weights_only=True) for r in (0, 1)]
        for key in ranks[0]:
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{name}: {key} differs across ranks"
        return ranks[0]

    two = weights("fresh")
    _close(two, single, "2-proc vs 1-proc")
    _close(accum, single, "grad-accum vs 1-proc")
    resumed_same = weights("resume0")  # 2 ranks from the 2-rank checkpoint
    for key, w in two.items():
        assert torch.equal(resumed_same[key], w), f"2 -> 2 resume is not exact: {key}"
    _close(weights("resume1"), single, "1 -> 2 resume vs 1-proc")  # 2 ranks from 1 process
    for key, w in weights("allreduce").items():  # old gloo's stand-in: the same sums
        assert torch.equal(w, two[key]), f"all-reduce instead of reduce-scatter: {key}"
    one_from_two = dist_optim_worker.train(
        str(tmp_path), steps=3, batch_size=4, name="from2", resume=str(ckpt2)
    )
    _close(one_from_two, single, "2 -> 1 resume vs 1-proc")
    torch.manual_seed(0)  # the worker's initial weights: training must have moved them
    initial = GPT(dist_optim_worker.tiny_config()).state_dict()
    moved = single["transformer.h.0.attn.c_q.weight"] - initial["transformer.h.0.attn.c_q.weight"]
    assert moved.abs().max() > 1e-3

    # Each rank's file holds its shard only: together no more than 1.1x the one process's file.
    one_file = (ckpt1 / "step_000002" / "optim_rank0.pt").stat().st_size
    shards = [ckpt2 / "step_000002" / f"optim_rank{r}.pt" for r in (0, 1)]
    total = sum(f.stat().st_size for f in shards)
    assert total <= 1.1 * one_file, (total, one_file)
    # ... and no parameter's state (no element of it) is on both ranks
    full = torch.load(ckpt1 / "step_000002" / "optim_rank0.pt", weights_only=True)
    parts = [torch.load(f, weights_only=True) for f in shards]
    adam_full, muon_full = full
    for index, entry in adam_full["state"].items():
        pieces = [part[0]["state"][index]["exp_avg"] for part in parts]
        assert sum(p.numel() for p in pieces) == entry["exp_avg"].numel(), index
        assert all(p.numel() < entry["exp_avg"].numel() for p in pieces), index
    owners = [set(part[1]["state"]) for part in parts]
    assert not owners[0] & owners[1] and owners[0] | owners[1] == set(muon_full["state"])

    # A training stage refuses the other process count: its data and RNG state are per rank.
    from nanochat.common import DistInfo
    from nanochat.training import start_or_resume

    info = DistInfo(False, 0, 0, 1, torch.device("cpu"))
    model = GPT(dist_optim_worker.tiny_config())
    with pytest.raises(SystemExit, match="written by 2 process.es., this run has 1"):
        start_or_resume(ckpt2, info, model, model.setup_optimizers(), fresh=False, resume="auto")


def test_merged_shards_are_the_state_and_reshard_exactly(monkeypatch):
    """Slicing a single-process state_dict into every rank's part (what a sharded optimizer keeps
    when it loads one) and merging the parts (merge_optimizer_states) gives it back bit for bit,
    for several world sizes and sizes that do not divide; Muon's parts are its owners' states."""
    import types

    import nanochat.optim as optim

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(7, 5), (3,), (2, 2), (64, 8)]]
    full = {
        "state": {
            i: {"step": 3, "exp_avg": torch.randn(p.shape), "exp_avg_sq": torch.rand(p.shape)}
            for i, p in enumerate(params)
            if i != 2  # a parameter that never had a gradient has no state
        },
        "param_groups": [{"params": [0, 1], "lr": 0.1}, {"params": [2, 3], "lr": 0.2}],
    }
    opt = optim.ParamGroupOptimizer([{"params": params[:2]}, {"params": params[2:]}], {})
    shapes = [list(p.shape) for p in params]
    for world in (1, 2, 3, 8):
        parts = []
        for rank in range(world):
            fake = types.SimpleNamespace(
                get_rank=lambda r=rank: r, get_world_size=lambda w=world: w
            )
            monkeypatch.setattr(optim, "dist", fake)
            part = optim._own_part(full, opt, "slice")
            owner = optim._own_part(full, opt, "owner")
            for i, entry in part["state"].items():
                lo, hi = optim.shard_range(params[i].numel(), rank, world)
                assert entry["exp_avg"].shape == (hi - lo,) and entry["step"] == 3
            # Muon's owners: index i of a group (counted within the group) is on rank i % world
            assert set(owner["state"]) == {
                i for i in full["state"] if (i if i < 2 else i - 2) % world == rank
            }
            part["sharding"] = dict(layout="slice", world_size=world, rank=rank, shapes=shapes)
            parts.append(part)
        merged = optim.merge_optimizer_states(parts)
        assert merged["state"].keys() == full["state"].keys()
        for i, entry in full["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(merged["state"][i][key], entry[key]), (world, i, key)
    with pytest.raises(ValueError, match=r"ranks 0\.\.7 in order"):
        optim.merge_optimizer_states(parts[::-1])


def test_optimizer_state_dict_resume_is_exact():
    """Save after 2 steps, rebuild everything, load, 2 more steps == 4 steps in one go (bitwise)."""

    def fresh():
        torch.manual_seed(0)
        model = GPT(GPTConfig(**TINY))
        return model, model.setup_optimizers()

    def run(model, optimizers, batches):
        for x in batches:
            model(x[:, :-1], x[:, 1:]).backward()
            for opt in optimizers:
                opt.step()
            model.zero_grad(set_to_none=True)

    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 256, (2, 17), generator=g) for _ in range(4)]
    model, optimizers = fresh()
    run(model, optimizers, batches)
    half, half_opts = fresh()
    run(half, half_opts, batches[:2])
    buffer = io.BytesIO()  # through torch.save / torch.load(weights_only=True), as checkpoints do
    torch.save({"model": half.state_dict(), "optim": [o.state_dict() for o in half_opts]}, buffer)
    buffer.seek(0)
    blob = torch.load(buffer, weights_only=True)
    for group in half_opts[
        1
    ].param_groups:  # schedulers may have changed lr; initial_lr must survive
        assert "initial_lr" in group
    resumed, resumed_opts = fresh()
    resumed.load_state_dict(blob["model"])
    for opt, state in zip(resumed_opts, blob["optim"]):
        opt.load_state_dict(state)
    run(resumed, resumed_opts, batches[2:])
    for (name, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_state_saved_by_a_torch_optimizer_loads_and_resumes_the_same():
    """Checkpoints written before these optimizers left torch.optim.Optimizer hold its state_dict
    format: such a state loads into ours and the next steps are those of the torch-based one."""
    from nanochat.optim import _adamw_update

    class TorchBasedAdamW(torch.optim.Optimizer):  # the AdamW of those checkpoints
        def __init__(self, params, lr, betas, eps, weight_decay):
            super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

        @torch.no_grad()
        def step(self):
            for group in self.param_groups:
                for p in group["params"]:
                    _adamw_update(p, p.grad, self.state[p], group)

    torch.manual_seed(0)
    params = [torch.randn(5, 3, requires_grad=True), torch.randn(4, requires_grad=True)]
    grads = [[torch.randn(p.shape) for p in params] for _ in range(4)]
    settings = dict(lr=0.01, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.1)

    def groups(ps):
        return [dict(params=ps[:1], initial_lr=0.01), dict(params=ps[1:], lr=0.002)]

    old_params = [p.detach().clone().requires_grad_(True) for p in params]
    old = TorchBasedAdamW(groups(old_params), **settings)
    ours = AdamW(groups(params), **settings)
    for k, step_grads in enumerate(grads):
        for p, q, g in zip(old_params, params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        old.step()
        if k == 1:  # ours takes over from the torch-based one's saved state
            buffer = io.BytesIO()
            torch.save(old.state_dict(), buffer)
            buffer.seek(0)
            with torch.no_grad():
                for p, q in zip(old_params, params):
                    q.copy_(p)
            ours.load_state_dict(torch.load(buffer, weights_only=True))
        elif k > 1:
            ours.step()
    for p, q in zip(old_params, params):
        assert torch.equal(p, q)
    assert ours.param_groups[0]["initial_lr"] == 0.01 and ours.param_groups[1]["lr"] == 0.002
    assert ours.state_dict().keys() == old.state_dict().keys()
    with pytest.raises(
        ValueError, match=r"parameter groups of sizes \[1, 1\], the optimizer \[2\]"
    ):
        AdamW(params, **settings).load_state_dict(old.state_dict())


def test_building_and_stepping_the_optimizers_does_not_import_dynamo():
    """torch.optim.Optimizer imports torch._dynamo when built (2-3 s of every training process's
    start on 2 cores); ours do not, and nothing else of a training step does."""
    probe = (
        "import sys, torch\n"
        "from nanochat.gpt import GPT, GPTConfig\n"
        f"model = GPT(GPTConfig(**{TINY!r}))\n"
        "optimizers = model.setup_optimizers()\n"
        "x = torch.randint(0, 256, (2, 16))\n"
        "model(x, x).backward()\n"
        "[opt.step() for opt in optimizers]\n"
        "[opt.load_state_dict(opt.state_dict()) for opt in optimizers]\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False", out.stdout + out.stderr[-2000:]


def test_bench_optim_sharding_figures_add_up():
    from scripts.bench_optim_sharding import figures

    f = figures(depth=2, vocab_size=256, world_size=4)
    # the sharded files of one checkpoint hold each state once: a single process's bytes
    assert f["new_ckpt"] == f["single_ckpt"] < f["old_ckpt"]
    assert f["new_state"] < f["old_state"] and 0 < f["new_comm"] < f["old_comm"]
