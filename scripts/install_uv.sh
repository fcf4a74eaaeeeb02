# Sourced by run_aquarat_small.sh and .ci/run: puts `uv` on PATH, installing it when missing.
# Ubuntu 24.04 and Debian 12 mark the system Python "externally managed" (PEP 668), so a plain
# `pip install --user uv` is refused there; the fallbacks below work on those systems too.
export PATH="$HOME/.local/bin:$PATH"
if ! command -v uv >/dev/null 2>&1; then
    uv_venv="$HOME/.local/share/nanochat-aquarat/uv-venv"
    echo "[setup] uv is not installed: installing it"
    if python3 -m pip install --user --quiet uv 2>/dev/null; then
        echo "[setup] uv installed with pip --user"
    elif python3 -m venv "$uv_venv" >/dev/null 2>&1 && "$uv_venv/bin/pip" install --quiet uv; then
        # PEP 668: pip refuses the system Python, so uv gets a private venv of its own
        mkdir -p "$HOME/.local/bin"
        ln -sf "$uv_venv/bin/uv" "$HOME/.local/bin/uv"
        echo "[setup] uv installed into its own venv $uv_venv (the system Python is externally managed)"
    elif python3 -m pip install --user --quiet --break-system-packages uv; then
        # no python3-venv either: pip's documented override, into the user site only
        echo "[setup] uv installed with pip --user --break-system-packages"
    elif command -v curl >/dev/null 2>&1 && curl -LsSf https://astral.sh/uv/install.sh | sh; then
        echo "[setup] uv installed with its official installer"
    else
        echo "could not install uv (no working pip, venv or curl): install it as" \
             "https://docs.astral.sh/uv/getting-started/installation/ says, then run this again" >&2
        exit 2
    fi
    unset uv_venv
fi
