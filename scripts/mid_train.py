"""Mid-training: the first conversation pass after pretraining (base -> mid).

Same machinery as SFT (scripts/chat_sft.py: task mixture, loss on assistant tokens, eval loss,
resumable checkpoints) with mid-training defaults: starts from the base checkpoint, full
pretraining learning rates (--init-lr-frac 1.0) with a short warmdown. Checkpoints go to
<base>/checkpoints/mid/<tag>/, logs to <base>/runs/<run>/mid.jsonl, the report section to
<base>/report/<run>/mid.md.

    uv run python -m scripts.mid_train --aqua-source synthetic --synthetic-examples 20000  # CPU
    uv run torchrun --standalone --nproc_per_node=8 -m scripts.mid_train --aqua-train-examples 20000
"""

from scripts.chat_sft import main as _stage_main


def main(argv=None) -> dict:
    return _stage_main(argv, stage="mid")


if __name__ == "__main__":
    main()
