"""The DCLM CORE metric of a checkpoint (nanochat/core_eval.py computes it).

    uv run python -m scripts.base_eval                         # newest base checkpoint, full bundle
    uv run torchrun --standalone --nproc_per_node=8 -m scripts.base_eval --tag d20
    uv run python -m scripts.base_eval --max-per-task 100       # quick estimate
    uv run python -m scripts.base_eval --bundle-dir /data/eval_bundle  # a bundle unzipped by hand

The bundle is downloaded once into <base>/eval_bundle. Logs core/core, core/acc/<task> and
core/centered/<task> (stage "<stage>_eval") and writes that report section.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch.distributed as dist

from nanochat.checkpoint import add_load_args, load_model
from nanochat.common import cleanup_distributed, init_distributed, print0
from nanochat.core_eval import BUNDLE_URL, download_bundle, evaluate_core
from nanochat.files import get_base_dir
from nanochat.report import write_section
from nanochat.tracking import add_tracking_args, log_results


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="CORE metric (DCLM in-context tasks) of a checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_load_args(p)
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


def fetch_bundle(args, info, base_dir) -> Path:
    """The eval bundle: --bundle-dir, or <base>/eval_bundle, which rank 0 downloads if missing."""
    if args.bundle_dir:
        return Path(args.bundle_dir)
    bundle = base_dir / "eval_bundle"
    error = None
    if info.is_main and not (bundle / "core.yaml").is_file():
        print0(f"Downloading the CORE eval bundle from {args.bundle_url} ...")
        try:
            download_bundle(bundle, url=args.bundle_url)
        except RuntimeError as exc:
            error = str(exc)
    # every rank must learn whether rank 0 got it: a rank that exited alone would leave the
    # others hanging in their next collective
    if info.is_ddp:
        flag = [error]
        dist.broadcast_object_list(flag, src=0)
        error = flag[0]
    if error:
        raise SystemExit(error)
    return bundle


def section_lines(args, info, stage_name, tag, step, out, elapsed) -> list[str]:
    """The report section: the CORE score, then accuracy and centred accuracy per task."""
    per_task = "all" if args.max_per_task <= 0 else args.max_per_task
    lines = [
        f"## CORE metric ({stage_name})",
        "",
        f"- checkpoint: {args.stage} / {tag} / step {step}",
        f"- **CORE: {out['core']:.4f}** (mean of centred accuracies; 0 = chance, 1 = perfect)",
        f"- examples per task: {per_task}; {info.world_size} process(es); {elapsed:.0f}s",
        "",
        "| task | accuracy | centred |",
        "|---|---|---|",
    ]
    for task, accuracy in out["results"].items():
        lines.append(f"| {task} | {accuracy:.4f} | {out['centered'][task]:+.4f} |")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    info = init_distributed()
    base_dir = get_base_dir()
    bundle = fetch_bundle(args, info, base_dir)
    if args.download_only:
        print0(f"CORE eval bundle ready in {bundle}")
        cleanup_distributed()
        return

    model, tokenizer, meta = load_model(
        args.stage, tag=args.tag, step=args.step, device=info.device
    )
    tag, step = meta.get("tag", args.tag), meta.get("step")
    print0(
        f"CORE of {args.stage} checkpoint {tag or ''} step {step} "
        f"on {info.device} x {info.world_size}"
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
    metrics = {"core/core": out["core"]}
    metrics.update({f"core/acc/{k}": v for k, v in out["results"].items()})
    metrics.update({f"core/centered/{k}": v for k, v in out["centered"].items()})
    config = {**vars(args), "checkpoint_step": step, "checkpoint_tag": tag}
    log_results(args, stage_name, metrics, step=step or 0, config=config)
    if info.is_main:
        lines = section_lines(args, info, stage_name, tag, step, out, elapsed)
        write_section(base_dir, args.run, stage_name, "\n".join(lines))
    cleanup_distributed()


if __name__ == "__main__":
    main()
