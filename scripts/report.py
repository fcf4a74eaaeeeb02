"""Build the markdown report of a run (`<base>/report/<run>/report.md`) from its sections and logs.

uv run python -m scripts.report --run myrun          # assemble the report
uv run python -m scripts.report --run myrun --reset  # old report set aside (kept), start empty
"""

import argparse
import shutil

from nanochat.files import free_space, get_base_dir
from nanochat.report import generate_report, report_dir
from nanochat.tracking import add_tracking_args


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_tracking_args(parser)
    parser.add_argument(
        "--reset",
        action="store_true",
        help="move the run's report directory to <run>.previous/ and start empty",
    )
    parser.add_argument(
        "--hourly-price",
        type=float,
        default=0.0,
        help="USD per hour of the machine, for the cost per stage (0: no cost shown)",
    )
    args = parser.parse_args(argv)
    base = get_base_dir()
    if args.reset:
        rdir = report_dir(base, args.run)
        previous = rdir.with_name(f"{args.run}.previous")
        if previous.exists():
            shutil.rmtree(previous)
        rdir.rename(previous)  # kept, not deleted: a reset never loses the last report
        report_dir(base, args.run)
        print(f"Report reset; the previous one is in {previous}")
        return
    try:
        path = generate_report(base, args.run, hourly_price=args.hourly_price)
    except OSError as exc:  # a full disk: the old report (written atomically) and the logs stay
        where = exc.filename or report_dir(base, args.run)
        raise SystemExit(
            f"could not write the report: {where}: {exc.strerror or exc} ({free_space(where)} "
            f"on that filesystem). The previous report and the stage logs it is built from are "
            f"intact: free some space, then run `uv run python -m scripts.report --run {args.run}` "
            f"(or the same pipeline command)."
        ) from None
    print(f"Report written to {path}")


if __name__ == "__main__":
    main()
