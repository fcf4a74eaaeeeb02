"""Build the markdown report (`<base>/report/report.md`) from stage sections and logs.

    python -m scripts.report --run myrun          # assemble the report
    python -m scripts.report --reset              # clear old sections before a new pipeline run
"""

import argparse
import shutil

from nanochat.common import get_base_dir
from nanochat.report import generate_report, report_dir
from nanochat.tracking import add_tracking_args


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tracking_args(parser)
    parser.add_argument("--reset", action="store_true",
                        help="move the current report directory to report.previous/ and start empty")
    args = parser.parse_args(argv)
    base = get_base_dir()
    if args.reset:
        rdir = report_dir(base)
        previous = base / "report.previous"
        if previous.exists():
            shutil.rmtree(previous)
        rdir.rename(previous)  # kept, not deleted: a reset never loses the last report
        report_dir(base)
        print(f"Report reset; the previous one is in {previous}")
        return
    path = generate_report(base, args.run)
    print(f"Report written to {path}")


if __name__ == "__main__":
    main()
