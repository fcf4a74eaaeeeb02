#!/usr/bin/env -S uv run --script
# /// script
# requires-python = ">=3.10"
# dependencies = ["requests>=2.31", "python-dotenv>=1.0"]
# ///
"""
Rent a Lambda Cloud GPU node, run the nanochat-aquarat pipeline on it, bring the results home,
and never leave a billed instance behind by accident.

Runs on a laptop: needs only `requests` and `python-dotenv` (no torch) plus the OpenSSH client
(`ssh`; `rsync` is used for fetching when present, else tar over ssh).

    uv run launch_lambda.py types
    uv run launch_lambda.py --instance-type gpu_8x_h100_sxm5 --region us-west-1      # = launch
    uv run launch_lambda.py launch --instance-type gpu_1x_a10 --region auto --auto-terminate
    uv run launch_lambda.py status | logs ID [--follow] | fetch ID | ssh ID | terminate ID

Keys come from the environment or a .env file: LAMBDA_API_KEY (required for the API),
WANDB_API_KEY (forwarded to the instance's .env; the run logs to W&B offline without it).

The code lives in nanochat/launcher/ (see its __init__.py for what each module does).
"""

import sys

from nanochat.launcher.cli import main

if __name__ == "__main__":
    sys.exit(main())
