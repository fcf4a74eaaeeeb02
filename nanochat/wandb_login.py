"""The W&B key that `wandb login` stored, for code that looks for WANDB_API_KEY.

`wandb login` writes the key to ~/.netrc (or $NETRC) under the W&B server's host name, and never
sets WANDB_API_KEY. Standard library only: the laptop-side launcher uses it too, to forward the
key to a node.
"""

from __future__ import annotations

import netrc
import os
from urllib.parse import urlparse

DEFAULT_BASE_URL = "https://api.wandb.ai"


def stored_api_key(base_url: str | None = None) -> str | None:
    """The key `wandb login` stored for the W&B server at base_url (default: WANDB_BASE_URL,
    else W&B's cloud), or None."""
    url = base_url or os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL
    host = urlparse(url).hostname
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    if not host or not os.path.isfile(path):
        return None
    try:
        entry = netrc.netrc(path).authenticators(host)
    except (netrc.NetrcParseError, OSError):
        return None
    return entry[2] if entry and entry[2] else None
