#!/usr/bin/env bash
# InfiniteTalk web page launcher (Linux / macOS): the first run makes a virtual environment and
# installs the package with its web page; every run starts the page and opens the browser.
# A second run installs nothing unless pyproject.toml changed (the code itself is installed editable).
#
# Environment variables:
#   INFINITETALK_VENV        the environment to use (default: .venv in the repository). One that
#                            already has infinitetalk and gradio is used as it is, nothing installed
#                            (unless this launcher made it: then it is kept up to date as .venv is).
#   INFINITETALK_MODEL       e.g. tiny (small random models, no weights) for a quick look or tests
#   INFINITETALK_PORT        the page's port (default 7860)
#   INFINITETALK_NO_BROWSER  1: do not open the browser
#   INFINITETALK_UI_ARGS     more `infinitetalk ui` options, e.g. "--share --weights /data/weights"
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${INFINITETALK_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"
STAMP="$VENV/.infinitetalk-install"

say() { echo "launch: $*" >&2; }

# an environment this launcher did not make (no stamp) is used as it is when it has what is needed
if [ -n "${INFINITETALK_VENV:-}" ] && [ ! -f "$STAMP" ] && [ -x "$PY" ] && "$PY" -c "import infinitetalk, gradio" 2>/dev/null; then
    say "using $VENV as it is (infinitetalk and gradio are installed there)"
else
    if [ ! -x "$PY" ]; then
        command -v python3 >/dev/null || { say "python3 is needed (3.10 or newer): install it first"; exit 2; }
        python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || { say "python3 is older than 3.10: install a newer one"; exit 2; }
        say "creating the environment $VENV"
        python3 -m venv "$VENV"
    fi
    WANT="$(cksum < "$ROOT/pyproject.toml") ui"
    if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
        say "installing infinitetalk[ui] into $VENV (the first time takes a few minutes)"
        "$PY" -m pip install -q --upgrade pip
        "$PY" -m pip install -q -e "$ROOT[ui]"
        echo "$WANT" > "$STAMP"
    else
        say "$VENV is up to date"
    fi
fi

ARGS=(ui --port "${INFINITETALK_PORT:-7860}")
[ -n "${INFINITETALK_MODEL:-}" ] && ARGS+=(--model "$INFINITETALK_MODEL")
[ "${INFINITETALK_NO_BROWSER:-0}" = "1" ] && ARGS+=(--no-browser)
# shellcheck disable=SC2206  # word splitting of the extra options is wanted
[ -n "${INFINITETALK_UI_ARGS:-}" ] && ARGS+=(${INFINITETALK_UI_ARGS})
say "starting the page on http://127.0.0.1:${INFINITETALK_PORT:-7860} (Ctrl-C stops it)"
exec "$PY" -m infinitetalk.cli "${ARGS[@]}"
