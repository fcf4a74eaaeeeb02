"""Download (or normalise local copies of) AQuA-RAT into validated JSON-lines splits.

    uv run python -m scripts.prepare_aqua               # deepmind/aqua_rat -> <base>/data/aqua_rat/
    uv run python -m scripts.prepare_aqua --source-dir ~/AQuA   # the original train/dev/test.json
    uv run python -m scripts.prepare_aqua --max-train 20000 --out-dir /data/aqua

Writes <out>/train.jsonl, validation.jsonl, test.jsonl and manifest.json (counts, source). Every
row is validated as tasks.aqua.AquaRat does; bad rows are reported by split and index and skipped
(default) or abort the run (--on-bad-row error). AquaRat(data_dir=None) then reads these files
instead of the Hub, so later stages run offline.
"""

import argparse
import json
from pathlib import Path

from nanochat.files import write_text_atomic
from tasks.aqua import ORIGINAL_FILES, SPLITS, BadRow, default_data_dir, load_rows


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    """One validated row per line, options as "A)value" in the source's order; written whole or
    not at all (a killed run leaves the old split)."""
    keys = ("question", "options", "rationale", "correct")
    lines = [json.dumps({k: r[k] for k in keys}, ensure_ascii=False) + "\n" for r in rows]
    write_text_atomic(path, "".join(lines))


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--source-dir",
        default=None,
        help=f"folder with the original AQuA-RAT files ({', '.join(ORIGINAL_FILES.values())}); "
        "default: download from Hugging Face",
    )
    parser.add_argument(
        "--out-dir", default=None, help="output folder (default: <base>/data/aqua_rat)"
    )
    parser.add_argument(
        "--splits", default=",".join(SPLITS), help="comma-separated subset of train,validation,test"
    )
    parser.add_argument(
        "--max-train", type=int, default=None, help="keep at most this many train rows"
    )
    parser.add_argument(
        "--max-validation", type=int, default=None, help="keep at most this many validation rows"
    )
    parser.add_argument(
        "--max-test", type=int, default=None, help="keep at most this many test rows"
    )
    parser.add_argument(
        "--on-bad-row",
        choices=["skip", "error"],
        default="skip",
        help="skip (and report) rows that break the format, or stop at the first one",
    )
    args = parser.parse_args(argv)

    splits = [s.strip() for s in args.splits.split(",") if s.strip()]
    for s in splits:
        if s not in SPLITS:
            parser.error(f"--splits: {s!r} is not one of {', '.join(SPLITS)}")
    caps = {"train": args.max_train, "validation": args.max_validation, "test": args.max_test}
    for s, cap in caps.items():
        if cap is not None and cap < 0:
            parser.error(f"--max-{s} must be >= 0")
    if args.source_dir is not None and not Path(args.source_dir).is_dir():
        parser.error(f"--source-dir {args.source_dir} is not a directory")
    out_dir = Path(args.out_dir) if args.out_dir else default_data_dir()
    out_dir.mkdir(parents=True, exist_ok=True)

    # read and validate everything first, so that a failure (the network, a bad row with
    # --on-bad-row error) writes nothing
    prepared = {}
    for split in splits:
        try:
            rows, source = load_rows(
                split,
                data_dir=args.source_dir,
                on_bad_row=args.on_bad_row,
                max_examples=caps[split],
                use_prepared=False,
            )
        except FileNotFoundError as e:
            raise SystemExit(
                f"prepare_aqua: {e}. Use --splits to prepare only the splits you have. "
                "Nothing written."
            ) from None
        except (BadRow, RuntimeError) as e:  # the message names the row, no traceback needed
            raise SystemExit(f"prepare_aqua: {e}. Nothing written.") from None
        prepared[split] = (rows, source)
    manifest_path = out_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for split, (rows, source) in prepared.items():
        write_jsonl_atomic(out_dir / f"{split}.jsonl", rows)
        manifest[split] = {"rows": len(rows), "source": source, "max": caps[split]}
        print(f"{split}: {len(rows)} rows from {source} -> {out_dir / f'{split}.jsonl'}")
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")


if __name__ == "__main__":
    main()
