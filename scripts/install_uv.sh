# Sourced by run_aquarat_small.sh and .ci/run: puts `uv` on PATH, installing it when missing.
# Ubuntu 24.04 and Debian 12 mark the system Python "externally managed" (PEP 668), so a plain
# `pip install --user uv` is refused there; the fallbacks below work on those systems too.
#
# A script cannot change the PATH of the terminal that started it, so an install into
# ~/.local/bin would leave the README's next command (`uv run pytest`) failing in that terminal
# whenever ~/.local/bin is not on its PATH (a fresh machine's login shell often lacks it). So uv is
# also linked into a directory that the caller's PATH already has and that we may write
# (~/.local/bin, ~/bin or /usr/local/bin); failing that, new shells get ~/.local/bin through their
# startup files, and UV_PATH_NOTE says what to type in this one (run_aquarat_small.sh prints it).
caller_path=$PATH
export PATH="$HOME/.local/bin:$PATH"
UV_PATH_NOTE=""
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
if ! PATH=$caller_path command -v uv >/dev/null 2>&1; then
    uv_bin=$(command -v uv)
    uv_linked=""
    for dir in "$HOME/.local/bin" "$HOME/bin" /usr/local/bin; do
        if [[ ":$caller_path:" == *":$dir:"* ]] && [ -d "$dir" ] && [ -w "$dir" ]; then
            ln -sf "$uv_bin" "$dir/uv" && uv_linked=$dir && break
        fi
    done
    if [ -n "$uv_linked" ]; then
        echo "[setup] uv linked into $uv_linked, which your PATH has: \`uv run ...\` works in" \
             "this terminal"
    else
        # Every new shell, bash or zsh, login or not, gets ~/.local/bin (the official uv
        # installer's approach); the line is added once.
        uv_line='export PATH="$HOME/.local/bin:$PATH"  # uv, added by nanochat-aquarat'
        for rc in "$HOME/.profile" "$HOME/.bashrc" "$HOME/.zshrc"; do
            if [ "$rc" != "$HOME/.zshrc" ] || [ -e "$rc" ] || [[ "${SHELL:-}" == */zsh ]]; then
                grep -qsF "$uv_line" "$rc" || echo "$uv_line" >> "$rc"
            fi
        done
        UV_PATH_NOTE="uv is in $(dirname "$uv_bin"), which this terminal's PATH lacks: new"
        UV_PATH_NOTE+=" terminals have it (added to your shell's startup files); in this one run"
        UV_PATH_NOTE+=" first:  export PATH=\"$(dirname "$uv_bin"):\$PATH\""
        echo "[setup] $UV_PATH_NOTE"
        unset uv_line rc
    fi
    unset uv_bin uv_linked dir
fi
unset caller_path
