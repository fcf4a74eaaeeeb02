"""RL speed: two side-by-side measurements in one process, on the same model, prompts and seeds.

1. rollouts: Engine.generate_multi (all P x G rows decoded together) vs generate_batch looped over
   the P prompts (G rows each): new tokens per second of each, the ratio, and whether both
   produced the same tokens;
2. diagnostics overhead: RL step time (rollout + update) with every diagnostic on (reference
   forward, KL, margins, attention entropy and heatmaps amortised over their default cadence) vs
   all off (--no-diagnostics, --kl-coef 0), interleaved step by step on two copies of the model.

    uv run python -m scripts.bench_rl           # the latest sft checkpoint (e.g. the cpu profile's)
    uv run python -m scripts.bench_rl --prompts 8 --samples 8 --max-new-tokens 128 --steps 6
    uv run python -m scripts.bench_rl --random-depth 8  # random weights: speed at d8
"""

from __future__ import annotations

import argparse
import copy
import functools
import time
from types import SimpleNamespace

import torch

from nanochat.checkpoint import load_model
from nanochat.common import DistInfo, autodetect_device, synchronize
from nanochat.engine import Engine
from nanochat.gpt import GPT, config_from_depth
from nanochat.rl import group_advantages, rollout_seed
from nanochat.tokenizer import get_tokenizer
from scripts import chat_rl


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
    p.add_argument("--prompts", type=int, default=8, help="questions per step")
    p.add_argument("--samples", type=int, default=8, help="completions per question")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--steps", type=int, default=6, help="RL steps timed per setting (after one warm-up)"
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


def bench_rollouts(engine, tokenizer, task, args, device):
    prompts = [tokenizer.render_for_completion(task[i]) for i in range(args.prompts)]
    seeds = [rollout_seed(0, 0, i) for i in range(args.prompts)]
    kw = dict(num_samples=args.samples, max_tokens=args.max_new_tokens, temperature=1.0)
    engine.generate_multi(prompts[:2], **{**kw, "max_tokens": 4}, seeds=seeds[:2])  # warm-up
    batched, t_batched = timed(lambda: engine.generate_multi(prompts, seeds=seeds, **kw), device)
    looped, t_looped = timed(
        lambda: [engine.generate_batch(p, seed=s, **kw) for p, s in zip(prompts, seeds)], device
    )
    tokens = sum(len(s) for r in batched for s in r.sequences)
    same = sum(
        a == b for rb, rl in zip(batched, looped) for a, b in zip(rb.sequences, rl.sequences)
    )
    rows = args.prompts * args.samples
    print(
        f"rollouts, {args.prompts} prompts x {args.samples} samples "
        f"x <= {args.max_new_tokens} new tokens "
        f"({tokens} tokens generated; {same}/{rows} rows identical in both):"
    )
    print(f"  looped generate_batch : {t_looped:6.2f} s  {tokens / t_looped:8,.0f} tok/s")
    print(f"  batched generate_multi: {t_batched:6.2f} s  {tokens / t_batched:8,.0f} tok/s")
    print(f"  ratio batched / looped: {t_looped / t_batched:.2f}x")


def rl_step(step: int, run: tuple, ctx: SimpleNamespace) -> None:
    """One chat_rl step of one setting: rollouts of this step's questions, advantages, update."""
    policy, engine, optimizers, run_args = run
    questions = list(range(step * ctx.prompts, (step + 1) * ctx.prompts))
    groups = chat_rl.rollout(
        engine, ctx.tokenizer, ctx.task, questions, step, run_args, ctx.letter_ids
    )
    rewards = torch.tensor([[c.reward for c in g] for g in groups])
    adv, zero = group_advantages(rewards, run_args.adv_std_norm)
    chat_rl.diagnose(policy, ctx.ref, groups, questions, run_args, ctx.letter_ids, ctx.pad)
    chat_rl.train_step(policy, ctx.ref, optimizers, groups, adv, zero, run_args, ctx.info, ctx.pad)


def bench_diagnostics(model, tokenizer, task, probes, args, device):
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
    base = chat_rl.parse_args(flags)
    settings = {
        "on": base,
        "off": argparse.Namespace(**{**vars(base), "diagnostics": False, "kl_coef": 0.0}),
    }
    # what every step of both settings shares
    ctx = SimpleNamespace(
        tokenizer=tokenizer,
        task=task,
        prompts=args.prompts,
        info=DistInfo(False, 0, 0, 1, device),
        letter_ids=chat_rl.diag.letter_token_ids(tokenizer),
        pad=tokenizer.encode_special("<|assistant_end|>"),
        ref=copy.deepcopy(model).eval().requires_grad_(False),
    )
    runs = {}
    for name, run_args in settings.items():
        policy = copy.deepcopy(model).train()
        # as chat_rl does: the value-embedding tables frozen unless its flag says otherwise
        optimizers = policy.setup_optimizers(value_embed_lr=run_args.value_embed_lr)
        runs[name] = (policy, Engine(policy, tokenizer), optimizers, run_args)
    times = {name: [] for name in settings}
    for step in range(args.steps + 1):
        for name, run in runs.items():
            _, dt = timed(functools.partial(rl_step, step, run, ctx), device)
            if step > 0:  # step 0 warms up
                times[name].append(dt)
    # attention entropy every --attn-every steps and heatmaps every --attn-heatmap-every, amortised
    _, t_attn = timed(lambda: chat_rl.diag.attention_entropy(model, probes), device)
    _, t_heat = timed(
        lambda: chat_rl.diag.attention_entropy(model, probes[:1], keep_probs=True), device
    )
    amortised = t_attn / base.attn_every + t_heat / base.attn_heatmap_every
    on = sum(times["on"]) / len(times["on"]) + amortised
    off = sum(times["off"]) / len(times["off"])
    print(
        f"RL step time, {args.steps} steps each, interleaved "
        f"(kl-sample-frac {base.kl_sample_frac}):"
    )
    print(f"  diagnostics off (--no-diagnostics, --kl-coef 0): {off:6.3f} s/step")
    print(
        "  diagnostics on  (reference forward, KL, margins; "
        f"attention entropy every {base.attn_every} "
        f"and heatmaps every {base.attn_heatmap_every} steps, "
        f"{amortised * 1000:.1f} ms/step amortised): "
        f"{on:6.3f} s/step"
    )
    print(f"  ratio on / off: {on / off:.3f}")


def main(argv=None):
    args = parse_args(argv)
    device = autodetect_device()
    if args.random_depth > 0:
        tokenizer = get_tokenizer()
        config = config_from_depth(args.random_depth, tokenizer.get_vocab_size(), sequence_len=2048)
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
    task = chat_rl.load_split(source_args, args.aqua_source, "train", 2000)
    val = chat_rl.load_split(source_args, args.aqua_source, "validation", 8)
    probes = [
        tokenizer.render_conversation(val[i], max_tokens=cfg.sequence_len)[0] for i in range(4)
    ]
    bench_rollouts(Engine(model, tokenizer), tokenizer, task, args, device)
    bench_diagnostics(model, tokenizer, task, probes, args, device)


if __name__ == "__main__":
    main()
