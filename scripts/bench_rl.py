"""RL speed: two side-by-side measurements in one process, on the same model, prompts and seeds.

1. rollouts: Engine.generate_multi (all P x G rows decoded together) vs generate_batch looped over
   the P prompts (G rows each): new tokens per second of each, the ratio, and whether both
   produced the same tokens; decode steps per second and host syncs per decode step; each for the
   current decode loop ("new") and for the one before issue 27 ("old", kept below as
   `legacy_generate_multi`: a torch.Generator and a uniform vector per row and step, ~3 host syncs
   per step, fp32 logits at every prompt position in the prefill);
2. diagnostics overhead: RL step time (rollout + update) with every diagnostic on (reference
   forward, KL, margins, attention entropy and heatmaps amortised over their default cadence) vs
   all off (--no-diagnostics, --kl-coef 0), interleaved step by step on two copies of the model.

    uv run python -m scripts.bench_rl           # the latest sft checkpoint (e.g. the cpu profile's)
    uv run python -m scripts.bench_rl --prompts 8 --samples 8 --max-new-tokens 128 --steps 6
    uv run python -m scripts.bench_rl --random-depth 8  # random weights: speed at d8
    uv run python -m scripts.bench_rl --random-depth 4 --random-shape 32,64,0  # the cpu profile's
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import functools
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from nanochat.checkpoint import load_model
from nanochat.common import DistInfo, autodetect_device, synchronize
from nanochat.diagnostics import Diagnostics
from nanochat.engine import Engine, GenerationResult, filter_logits, row_seed
from nanochat.gpt import GPT, config_from_depth
from nanochat.rl import group_advantages, policy_update
from nanochat.rl_config import parse_config
from nanochat.rollouts import rollout_seed, sample_rollouts
from nanochat.tokenizer import get_tokenizer
from scripts.chat_rl import load_split


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="RL rollout and diagnostics speed (see the module docstring).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("-i", "--source-stage", default="sft", choices=["mid", "sft", "rl"])
    p.add_argument("--source-tag", default=None)
    p.add_argument(
        "--random-depth",
        type=int,
        default=0,
        help="instead of a checkpoint, random weights at this depth with the current tokenizer "
        "(speed only: nothing it samples makes sense)",
    )
    p.add_argument(
        "--random-shape",
        default="64,128,2",
        help="with --random-depth: aspect ratio, head dim, value-embed-every (the cpu profile's "
        "model: --random-depth 4 --random-shape 32,64,0)",
    )
    p.add_argument("--prompts", type=int, default=8, help="questions per step")
    p.add_argument("--samples", type=int, default=8, help="completions per question")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--steps", type=int, default=6, help="RL steps timed per setting (after one warm-up)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="rollout timings: best of this many runs each"
    )
    p.add_argument(
        "--only", choices=["rollouts", "diagnostics"], default=None, help="run one of the two"
    )
    p.add_argument("--device-batch-size", type=int, default=16)
    p.add_argument(
        "--kl-sample-frac",
        type=float,
        default=None,
        help="chat_rl's flag, for the 'on' setting (default: chat_rl's default)",
    )
    p.add_argument("--aqua-source", default="synthetic", choices=["synthetic", "hf", "dir"])
    p.add_argument("--aqua-data-dir", default=None)
    return p.parse_args(argv)


def timed(fn, device):
    synchronize(device)
    t0 = time.time()
    out = fn()
    synchronize(device)
    return out, time.time() - t0


def trimmed_mean(values: list[float], cut: float = 0.1) -> float:
    """The mean without the `cut` share of the largest and of the smallest values."""
    values = sorted(values)
    k = int(len(values) * cut)
    return statistics.mean(values[k : len(values) - k])


def best_of(fn, device, repeats: int = 3) -> float:
    """The fastest of `repeats` timed calls after one untimed warm-up call."""
    fn()
    return min(timed(fn, device)[1] for _ in range(repeats))


# ------------------------------------------------------------------------------------------------
# the decode loop before issue 27, as the "old" contender (same model calls, same cache)


@torch.inference_mode()
def legacy_generate_multi(engine, prompts, num_samples, max_tokens, temperature, seeds, stats):
    """Engine.generate_multi as it was: per-row torch.Generators drawing a uniform vector per step
    (Gumbel-max), the stop checks, log-probs and tokens brought to the host every step, the prefill
    computing logits at every prompt position."""
    model, device = engine.model, next(engine.model.parameters()).device
    gens = []
    for seed in seeds:
        for i in range(num_samples):
            gens.append(torch.Generator(device=device))
            gens[-1].manual_seed(row_seed(seed, i))
    longest = max(len(t) for t in prompts)
    pads = [longest - len(t) for t in prompts]
    pad_id = engine.tokenizer.get_bos_token_id()
    ids = torch.tensor([[pad_id] * p + t for p, t in zip(pads, prompts)], device=device)
    cache = model.new_kv_cache(len(prompts), longest + max_tokens)
    if any(pads):
        cache.pad = torch.tensor(pads, dtype=torch.long, device=device)
    logits = model(ids, kv_cache=cache)[:, -1, :].repeat_interleave(num_samples, dim=0)
    cache = cache.repeat_batch(num_samples)
    n = len(prompts) * num_samples
    rows, stopped = list(range(n)), [False] * n
    seqs, lps = [[] for _ in range(n)], [[] for _ in range(n)]
    for step in range(max_tokens):
        stats["steps"] = stats.get("steps", 0) + 1
        logits = logits.float()
        noise = torch.stack([torch.rand(logits.size(-1), generator=g, device=device) for g in gens])
        scaled = filter_logits(logits, temperature, None, None)
        gumbel = -torch.log(-torch.log(noise.clamp_(min=1e-20, max=1.0 - 1e-7)))
        next_ids = torch.argmax(scaled + gumbel, dim=-1)
        logprobs = F.log_softmax(logits, dim=-1).gather(1, next_ids[:, None]).squeeze(1)
        ids_list, lp_list = next_ids.tolist(), logprobs.tolist()
        live = [b for b in range(len(rows)) if not stopped[b]]
        for b in live:
            seqs[rows[b]].append(ids_list[b])
            lps[rows[b]].append(lp_list[b])
            stopped[b] = ids_list[b] in engine.stop_tokens
        running = [b for b in range(len(rows)) if not stopped[b]]
        if not running or step + 1 == max_tokens:
            break
        if len(running) <= len(rows) // 2:
            keep = torch.tensor(running, device=device)
            next_ids = next_ids.index_select(0, keep)
            cache = cache.keep_rows(keep)
            rows, gens = [rows[b] for b in running], [gens[b] for b in running]
            stopped = [False] * len(rows)
        logits = model(next_ids[:, None], kv_cache=cache)[:, -1, :]
    return [
        GenerationResult(
            sequences=seqs[p * num_samples : (p + 1) * num_samples],
            masks=[],
            logprobs=lps[p * num_samples : (p + 1) * num_samples],
        )
        for p in range(len(prompts))
    ]


# Host syncs: every way Python can read a tensor's value (the device must finish first), counted
# by wrapping those Tensor methods. On CPU that is what a sync would be on a GPU; on CUDA the
# driver's view is torch.cuda.set_sync_debug_mode, whose warnings are counted too.
_SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_host_syncs(device):
    counts = {"syncs": 0}
    saved = {name: getattr(torch.Tensor, name) for name in _SYNC_METHODS}

    def wrap(name):
        method = saved[name]

        def counted(self, *args, **kwargs):
            counts["syncs"] += 1
            return method(self, *args, **kwargs)

        return counted

    for name in _SYNC_METHODS:
        setattr(torch.Tensor, name, wrap(name))
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            import warnings

            caught = stack.enter_context(warnings.catch_warnings(record=True))
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
                counts["cuda_sync_warnings"] = len(caught)


def bench_rollouts(engine, tokenizer, task, args, device):
    prompts = [tokenizer.render_for_completion(task[i]) for i in range(args.prompts)]
    seeds = [rollout_seed(0, 0, i) for i in range(args.prompts)]
    kw = dict(num_samples=args.samples, max_tokens=args.max_new_tokens, temperature=1.0)

    def new_multi(ps, ss, stats):
        engine.stats = stats
        try:
            return engine.generate_multi(ps, seeds=ss, **kw)
        finally:
            engine.stats = None

    def old_multi(ps, ss, stats):
        return legacy_generate_multi(engine, ps, seeds=ss, stats=stats, **kw)

    rows = args.prompts * args.samples
    print(
        f"rollouts, {args.prompts} prompts x {args.samples} samples "
        f"x <= {args.max_new_tokens} new tokens, {torch.get_num_threads()} threads:"
    )
    print(
        "  decode loop | looped tok/s | batched tok/s | batched/looped | "
        "decode steps/s (batched) | host syncs/decode step (batched) | rows same as looped"
    )
    contenders = {"old": old_multi, "new": new_multi}
    for multi in contenders.values():
        multi(prompts[:2], seeds[:2], {})  # warm-up
    # best of --repeats, old and new interleaved (the machine's load drifts)
    best = {name: [float("inf"), float("inf")] for name in contenders}
    out = {}
    for _ in range(args.repeats):
        for name, multi in contenders.items():
            stats = {}
            with count_host_syncs(device) as syncs:
                batched, t_batched = timed(functools.partial(multi, prompts, seeds, stats), device)
            looped, t_looped = timed(
                functools.partial(
                    lambda m: [m([p], [s], {})[0] for p, s in zip(prompts, seeds)], multi
                ),
                device,
            )
            best[name] = [min(best[name][0], t_looped), min(best[name][1], t_batched)]
            out[name] = (batched, looped, stats["steps"], syncs)
    figures = {}
    for name, (batched, looped, steps, syncs) in out.items():
        t_looped, t_batched = best[name]
        tokens = sum(len(s) for r in batched for s in r.sequences)
        same = sum(
            a == b for rb, rl in zip(batched, looped) for a, b in zip(rb.sequences, rl.sequences)
        )
        cuda = syncs.get("cuda_sync_warnings")
        cuda = "" if cuda is None else f" (CUDA sync warnings {cuda})"
        figures[name] = (tokens / t_looped, tokens / t_batched, t_looped / t_batched)
        print(
            f"  {name:11s} | {tokens / t_looped:12,.0f} | {tokens / t_batched:13,.0f} | "
            f"{t_looped / t_batched:13.2f}x | {steps / t_batched:24,.1f} | "
            f"{syncs['syncs'] / max(steps, 1):32.2f}{cuda} | {same}/{rows}"
        )
    print(
        f"  new / old: looped {figures['new'][0] / figures['old'][0]:.2f}x, "
        f"batched {figures['new'][1] / figures['old'][1]:.2f}x"
    )
    return figures


def rl_step(step: int, ctx: SimpleNamespace, device) -> dict:
    """One chat_rl step, each diagnostics-dependent phase run in both settings on the same policy
    (alternating which goes first) -> seconds per (setting, phase). The rollouts of the two
    settings are the same tokens (the same seeds; only the entropies differ), so the update, run
    once, is the same work in both."""
    timings = {}
    order = ["on", "off"] if step % 2 else ["off", "on"]
    for name in order:
        cfg = ctx.settings[name]
        rollout = functools.partial(sample_rollouts, ctx.engine, ctx.task, step, cfg, 0, 1)
        timings[name, "rollout"] = timed(rollout, device)
    rollouts = timings["on", "rollout"][0]
    for name in order:
        measure = functools.partial(ctx.diagnostics[name].measure, ctx.policy, rollouts, step)
        timings[name, "measure"] = timed(measure, device)
    adv, zero = group_advantages(rollouts.rewards(), ctx.settings["on"].adv_std_norm)
    cfg, info, pad = ctx.settings["off"], ctx.info, ctx.pad
    groups = rollouts.groups
    _, t_update = timed(
        lambda: policy_update(
            ctx.policy, ctx.ref, ctx.optimizers, groups, adv, zero, cfg, info, pad
        ),
        device,
    )
    seconds = {key: t for key, (_, t) in timings.items()}
    seconds["on", "update"] = seconds["off", "update"] = t_update
    return seconds


def bench_diagnostics(model, tokenizer, task, args, device):
    flags = [
        "--num-samples",
        str(args.samples),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--examples-per-step",
        str(args.prompts),
        "--device-batch-size",
        str(args.device_batch_size),
    ]
    if args.kl_sample_frac is not None:
        flags += ["--kl-sample-frac", str(args.kl_sample_frac)]
    base = parse_config(flags)
    settings = {"on": base, "off": dataclasses.replace(base, diagnostics=False, kl_coef=0.0)}
    pad = tokenizer.encode_special("<|assistant_end|>")
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    policy = copy.deepcopy(model).train()
    length = model.config.sequence_len
    ctx = SimpleNamespace(
        task=task,
        info=DistInfo(False, 0, 0, 1, device),
        pad=pad,
        ref=ref,
        policy=policy,
        engine=Engine(policy, tokenizer),
        # as chat_rl does: the value-embedding tables frozen unless its flag says otherwise
        optimizers=policy.setup_optimizers(value_embed_lr=base.value_embed_lr),
        settings=settings,
        diagnostics={
            n: Diagnostics(c, ref, tokenizer, task, task, length, pad) for n, c in settings.items()
        },
    )
    steps = [rl_step(step, ctx, device) for step in range(args.steps + 1)][1:]  # step 0 warms up
    # What runs at a cadence, timed once and amortised over it: attention entropy on the probes
    # (--attn-every), heatmaps (--attn-heatmap-every), the answer position's attention shares
    # (the explicit attention path in the diagnostic forwards, --attn-every), weight drift
    # (--eval-every) and the samples table (--log-samples-every).
    diagnostics = ctx.diagnostics["on"]
    rollouts = sample_rollouts(ctx.engine, task, args.steps + 1, base, rank=0, world=1)
    adv, _ = group_advantages(rollouts.rewards(), base.adv_std_norm)
    with tempfile.TemporaryDirectory() as tmp:
        step = base.attn_every  # entropy due, heatmaps not (unless the cadences coincide)
        t_entropy = best_of(lambda: diagnostics.attention(policy, step, False, Path(tmp)), device)
        # (matplotlib's import and font cache, once per run, are left out by best_of's warm-up)
        t_heat = best_of(lambda: diagnostics.attention(policy, 0, True, Path(tmp)), device)
    t_plain = best_of(lambda: diagnostics.measure(policy, rollouts, 1), device)
    t_look = best_of(lambda: diagnostics.measure(policy, rollouts, 0), device)  # shares too
    t_drift = best_of(lambda: diagnostics.weight_drift(policy), device)
    t_samples = best_of(lambda: diagnostics.samples(rollouts, adv, 1), device)
    parts = {
        "attention entropy": t_entropy / base.attn_every,
        "heatmaps": max(t_heat - t_entropy, 0.0) / base.attn_heatmap_every,
        "answer attention shares": max(t_look - t_plain, 0.0) / base.attn_every,
        "weight drift": t_drift / base.eval_every,
        "samples table": t_samples / base.log_samples_every,
    }
    amortised = sum(parts.values())
    # Step times swing by several percent on a shared machine, about what the diagnostics cost;
    # the pairs above share the model, the step and the moment, so the mean of their per-step
    # differences is the steadier figure (the 10% largest and smallest left out: a spike in one of
    # a pair is not the diagnostics).
    extra = {
        phase: trimmed_mean([s["on", phase] - s["off", phase] for s in steps])
        for phase in ("rollout", "measure", "update")
    }
    off = statistics.mean(sum(t for (name, _), t in s.items() if name == "off") for s in steps)
    on = off + sum(extra.values()) + amortised
    print(f"RL step time, {args.steps} steps (kl-sample-frac {base.kl_sample_frac}):")
    print(f"  diagnostics off (--no-diagnostics, --kl-coef 0): {off:6.3f} s/step")
    print(
        "  diagnostics on  (every step: reference forward, KLs, margins, logit lens, token "
        f"entropy; at their cadences, {amortised * 1000:.1f} ms/step amortised): {on:6.3f} s/step"
    )
    for name, seconds in extra.items():
        print(f"    {name:24s} {seconds * 1000:8.2f} ms/step more, paired on the same policy")
    for name, seconds in parts.items():
        print(f"    {name:24s} {seconds * 1000:8.2f} ms/step amortised")
    print(f"  ratio on / off: {on / off:.3f}")


def main(argv=None):
    args = parse_args(argv)
    device = autodetect_device()
    if args.random_depth > 0:
        tokenizer = get_tokenizer()
        aspect, head_dim, every = (int(v) for v in args.random_shape.split(","))
        config = config_from_depth(
            args.random_depth,
            tokenizer.get_vocab_size(),
            sequence_len=2048,
            aspect_ratio=aspect,
            head_dim=head_dim,
            value_embed_every=every,
        )
        with torch.device(device):
            model = GPT(config)
        model.init_weights()
        model.eval()
        meta = {"tag": f"random d{args.random_depth}", "step": 0}
    else:
        model, tokenizer, meta = load_model(
            args.source_stage, tag=args.source_tag, device=device, phase="eval"
        )
    cfg = model.config
    print(
        f"model: {args.source_stage}/{meta.get('tag')} step {meta.get('step')}, "
        f"depth {cfg.n_layer}, n_embd {cfg.n_embd}, {model.num_params():,} params "
        f"on {device.type}, {torch.get_num_threads()} threads"
    )
    source_args = argparse.Namespace(
        synthetic_difficulty="easy", synthetic_seed=1, aqua_data_dir=args.aqua_data_dir
    )
    task = load_split(source_args, args.aqua_source, "train", 2000)
    if args.only in (None, "rollouts"):
        bench_rollouts(Engine(model, tokenizer), tokenizer, task, args, device)
    if args.only in (None, "diagnostics"):
        bench_diagnostics(model, tokenizer, task, args, device)


if __name__ == "__main__":
    main()
