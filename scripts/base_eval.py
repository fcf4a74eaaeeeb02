"""The DCLM CORE metric of a checkpoint (see nanochat/core_eval.py for how it is computed).

    python -m scripts.base_eval                              # newest base checkpoint, full bundle
    torchrun --standalone --nproc_per_node=8 -m scripts.base_eval --tag d20
    python -m scripts.base_eval --max-per-task 100           # quick estimate
    python -m scripts.base_eval --bundle-dir /data/eval_bundle   # offline: a bundle you unzipped yourself

The bundle is downloaded once into <base>/eval_bundle (atomic: unzip into a temp dir, then rename).
Logs core/core, core/acc/<task> and core/centered/<task> to the tracker (stage "<stage>_eval") and writes
the report section <base>/report/<stage>_eval.md.
"""

from __future__ import annotations

import argparse
import time

import torch.distributed as dist

from nanochat.checkpoint import load_model
from nanochat.common import cleanup_distributed, get_base_dir, init_distributed, print0
from nanochat.core_eval import BUNDLE_URL, download_bundle, evaluate_core
from nanochat.report import write_section
from nanochat.tracking import add_tracking_args, make_tracker


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="CORE metric (DCLM in-context tasks) of a checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "-i",
        "--stage",
        default="base",
        choices=["base", "mid", "sft", "rl"],
        help="checkpoint stage",
    )
    p.add_argument(
        "--tag", default=None, help="checkpoint tag (default: the most recently written one)"
    )
    p.add_argument(
        "--step", type=int, default=None, help="checkpoint step (default: the newest complete one)"
    )
    p.add_argument(
        "--bundle-dir",
        default=None,
        help="an unzipped eval bundle (default <base>/eval_bundle, downloaded)",
    )
    p.add_argument(
        "--bundle-url", default=BUNDLE_URL, help="where to download eval_bundle.zip from"
    )
    p.add_argument("--max-per-task", type=int, default=-1, help="examples per task (-1: all)")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated task labels to run (default: all in core.yaml)",
    )
    p.add_argument(
        "--download-only",
        action="store_true",
        help="only download the bundle into <base>/eval_bundle (the pipeline does this up front)",
    )
    add_tracking_args(p)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    info = init_distributed()
    base_dir = get_base_dir()
    if args.bundle_dir:
        bundle = args.bundle_dir
    else:
        bundle = base_dir / "eval_bundle"
        error = None
        if info.is_main and not (bundle / "core.yaml").is_file():
            print0(f"Downloading the CORE eval bundle from {args.bundle_url} ...")
            try:
                download_bundle(bundle, url=args.bundle_url)
            except RuntimeError as exc:
                error = str(exc)
        if info.is_ddp:  # every rank must learn whether rank 0 got it
            flag = [error]
            dist.broadcast_object_list(flag, src=0)
            error = flag[0]
        if error:
            raise SystemExit(error)
    if args.download_only:
        print0(f"CORE eval bundle ready in {bundle}")
        cleanup_distributed()
        return

    model, tokenizer, meta = load_model(
        args.stage, tag=args.tag, step=args.step, device=info.device
    )
    tag, step = meta.get("tag", args.tag), meta.get("step")
    print0(
        f"CORE of {args.stage} checkpoint {tag or ''} step {step} on {info.device} x {info.world_size}"
    )
    only = [t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None
    t0 = time.time()
    try:
        out = evaluate_core(
            model,
            tokenizer,
            bundle,
            info.device,
            max_per_task=args.max_per_task,
            only=only,
            log=print0,
        )
    except (FileNotFoundError, ValueError) as exc:  # a broken bundle: say which file, no traceback
        raise SystemExit(f"eval bundle problem: {exc}") from None
    elapsed = time.time() - t0
    print0(f"CORE: {out['core']:.4f} ({elapsed:.0f}s)")

    stage_name = f"{args.stage}_eval"
    tracker = make_tracker(
        args, stage_name, {**vars(args), "checkpoint_step": step, "checkpoint_tag": tag}
    )
    metrics = {"core/core": out["core"]}
    metrics.update({f"core/acc/{k}": v for k, v in out["results"].items()})
    metrics.update({f"core/centered/{k}": v for k, v in out["centered"].items()})
    tracker.log(metrics, step=step or 0)
    tracker.summary(metrics)
    tracker.finish()
    if info.is_main:
        lines = [
            f"## CORE metric ({stage_name})",
            "",
            f"- checkpoint: {args.stage} / {tag} / step {step}",
            f"- **CORE: {out['core']:.4f}** (mean of centred accuracies; 0 = chance, 1 = perfect)",
            f"- examples per task: {'all' if args.max_per_task <= 0 else args.max_per_task}; "
            f"{info.world_size} process(es); {elapsed:.0f}s",
            "",
            "| task | accuracy | centred |",
            "|---|---|---|",
        ]
        lines += [
            f"| {k} | {out['results'][k]:.4f} | {out['centered'][k]:+.4f} |" for k in out["results"]
        ]
        write_section(base_dir, args.run, stage_name, "\n".join(lines))
    cleanup_distributed()


if __name__ == "__main__":
    main()
