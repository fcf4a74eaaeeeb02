"""Keys and settings from the environment or a .env file, and the .env the instance gets.

Secrets never go into argv, request bodies, user_data, temp files or printed output: the Lambda
key stays on this machine, and the instance's .env travels only on ssh's stdin (see deploy.py).
"""

import os
from pathlib import Path

from dotenv import dotenv_values

from nanochat.launcher.errors import EXIT_CONFIG, LaunchError
from nanochat.wandb_login import stored_api_key

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout that holds launch_lambda.py
# Settings forwarded into the instance's .env when set locally (W&B, Hugging Face).
FORWARDED_ENV = (
    "WANDB_API_KEY",
    "WANDB_PROJECT",
    "WANDB_ENTITY",
    "WANDB_MODE",
    "WANDB_BASE_URL",
    "HF_TOKEN",
)


def load_settings(env_file):
    """The environment wins over .env. The .env is --env-file, else ./.env, else the one beside
    launch_lambda.py."""
    if env_file:
        candidates = [Path(env_file)]
    else:
        candidates = [Path.cwd() / ".env", REPO_ROOT / ".env"]
    settings = {}
    for path in candidates:
        if path.exists() and not path.is_dir():
            settings = {k: v for k, v in dotenv_values(path).items() if v is not None}
            break
        if env_file:
            raise LaunchError(f"--env-file {path} does not exist", EXIT_CONFIG)
    settings.update({k: v for k, v in os.environ.items() if v != ""})
    if not settings.get("WANDB_API_KEY"):
        # `wandb login` keeps the key in ~/.netrc and sets no variable: forward that one
        key = stored_api_key(settings.get("WANDB_BASE_URL"))
        if key:
            settings["WANDB_API_KEY"] = key
            print("note: using the W&B key that `wandb login` stored in ~/.netrc")
    return settings


def require_api_key(settings):
    key = settings.get("LAMBDA_API_KEY", "").strip()
    if not key:
        raise LaunchError(
            "LAMBDA_API_KEY is not set. Create one at https://cloud.lambda.ai/api-keys and put it "
            "in the environment or in .env (see .env.template).",
            EXIT_CONFIG,
        )
    return key


def remote_env_text(settings, extra_keys=()):
    """The instance's .env: forwarded settings, one KEY='value' per line (valid for bash and
    dotenv)."""
    if "LAMBDA_API_KEY" in extra_keys:
        # Whoever can read the node's disk could then launch instances on the account.
        raise LaunchError(
            "--forward-env LAMBDA_API_KEY refused: the account key stays on this machine",
            EXIT_CONFIG,
        )
    lines = []
    for key in list(FORWARDED_ENV) + [k for k in extra_keys if k not in FORWARDED_ENV]:
        value = settings.get(key)
        if not value:
            continue
        # Single quotes make any other character literal for both bash and dotenv; these three
        # would need escaping that the two parse differently, so refuse rather than guess.
        if "'" in value or "\n" in value or "\\" in value:
            raise LaunchError(
                f"{key} contains a quote, backslash or newline; the launcher will not "
                "forward it (fix the value in your environment/.env)",
                EXIT_CONFIG,
            )
        lines.append(f"{key}='{value}'")
    return "".join(line + "\n" for line in lines)
