"""Benchmark: batched sampling with the KV cache vs recomputing the full forward every step.

Same model, same prompts, same sampling settings and seeds, one run of each; prints tokens/s for
both and the ratio. By default it uses a freshly initialised model of --depth (no checkpoint
needed); `-i sft` (etc.) benchmarks a trained checkpoint instead.

    uv run python -m scripts.bench_engine --depth 4 --num-samples 8 --max-tokens 128
"""

from __future__ import annotations

import argparse
import time

import torch

from nanochat.checkpoint import CHECKPOINT_STAGES, load_model
from nanochat.common import autodetect_device, print0, synchronize
from nanochat.engine import Engine, generate_nocache


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "-i",
        "--source",
        default=None,
        choices=CHECKPOINT_STAGES,
        help="benchmark this checkpoint stage (default: a random model of --depth)",
    )
    parser.add_argument(
        "--model-tag", default=None, help="checkpoint tag (default: latest of the stage)"
    )
    parser.add_argument(
        "--depth", type=int, default=4, help="random-model depth when no -i is given"
    )
    parser.add_argument("--vocab-size", type=int, default=4096, help="random-model vocabulary size")
    parser.add_argument("--num-prompts", type=int, default=2, help="prompts to sample from")
    parser.add_argument(
        "--prompt-len", type=int, default=64, help="prompt length in tokens (random model)"
    )
    parser.add_argument(
        "--num-samples", type=int, default=8, help="samples per prompt (batch rows)"
    )
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens generated per sample")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = autodetect_device()
    torch.manual_seed(args.seed)
    if args.source:
        model, tokenizer, _ = load_model(
            args.source, tag=args.model_tag, device=device, phase="eval"
        )
        prompts = []
        for i in range(args.num_prompts):
            question = f"Question {i}: a train covers 120 km in 2 hours. What is its speed?"
            messages = [
                {"role": "user", "content": question},
                {"role": "assistant", "content": "."},
            ]
            prompts.append(tokenizer.render_for_completion({"messages": messages}))
    else:
        from nanochat.gpt import GPT, config_from_depth
        from nanochat.tokenizer import SPLIT_PATTERN, Tokenizer

        # a byte-level tokenizer padded with dummy merges up to --vocab-size, so that the model's
        # vocabulary (embedding and lm_head) has a realistic size
        ranks = {bytes([i]): i for i in range(256)}
        n = 256
        while n < args.vocab_size - 9:
            ranks[b"\xff\xfe" + n.to_bytes(4, "big")] = n
            n += 1
        tokenizer = Tokenizer(SPLIT_PATTERN, ranks)
        config = config_from_depth(
            args.depth,
            tokenizer.get_vocab_size(),
            sequence_len=max(256, args.prompt_len + args.max_tokens),
        )
        with torch.device(device):
            model = GPT(config)
        bos = tokenizer.get_bos_token_id()
        prompts = [
            [bos] + torch.randint(0, 256, (args.prompt_len - 1,)).tolist()
            for _ in range(args.num_prompts)
        ]
    model.eval()
    # Stop tokens are ignored in the benchmark so both sides generate exactly max_tokens per row.
    engine = Engine(model, tokenizer)
    engine.stop_tokens = set()
    print0(
        f"device {device}, {model.num_params() / 1e6:.1f}M params, {len(prompts)} prompts x "
        f"{args.num_samples} samples x {args.max_tokens} tokens, prompt {len(prompts[0])} tokens"
    )

    def run_cached():
        n = 0
        for i, p in enumerate(prompts):
            res = engine.generate_batch(
                p,
                num_samples=args.num_samples,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                seed=args.seed + i,
            )
            n += sum(len(s) for s in res.sequences)
        return n

    def run_nocache():
        n = 0
        for i, p in enumerate(prompts):
            out = generate_nocache(
                model,
                p,
                num_samples=args.num_samples,
                max_tokens=args.max_tokens,
                temperature=args.temperature,
                top_k=args.top_k,
                seed=args.seed + i,
            )
            n += sum(len(s) for s in out)
        return n

    # one short warm-up each (allocator, kernels), not timed
    engine.generate_batch(prompts[0], num_samples=2, max_tokens=4, temperature=args.temperature)
    generate_nocache(model, prompts[0], num_samples=2, max_tokens=4, temperature=args.temperature)

    results = {}
    for name, fn in (("kv_cache", run_cached), ("no_cache", run_nocache)):
        synchronize(device)
        t0 = time.perf_counter()
        ntok = fn()
        synchronize(device)
        dt = time.perf_counter() - t0
        results[name] = ntok / dt
        print0(f"{name:>9}: {ntok} tokens in {dt:.2f}s = {ntok / dt:,.1f} tok/s")
    print0(f"speed-up with the KV cache: {results['kv_cache'] / results['no_cache']:.2f}x")
    return results


if __name__ == "__main__":
    main()
