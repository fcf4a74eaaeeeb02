"""Alias of scripts/chat_sft.py (the seed's name for the SFT stage): same flags, same behaviour.

uv run python -m scripts.sft_train --aqua_train_examples=20000 --aqua_val_examples=254
"""

from scripts.chat_sft import main as _stage_main


def main(argv=None) -> dict:
    return _stage_main(argv, stage="sft")


if __name__ == "__main__":
    main()
