# Sourced by the other scripts: make .venv (if missing or stale) with the pinned dev set-up.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
STAMP=.venv/.torchlazy-stamp
WANT=$(cat requirements-dev.txt pyproject.toml setup.py src/torchlazy/_csrc/*.[ch] | sha256sum | cut -c1-16)  # C sources: rebuild the extensions
pip_install() {  # pip's status is kept; only the noise about absent local mirrors is dropped
    .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
if [ ! -x .venv/bin/python ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
    echo "setting up .venv (torch 2.13.0 CPU, dev tools)..." >&2
    [ -x .venv/bin/python ] || "$PY" -m venv .venv
    pip_install --upgrade pip
    # torch first, pinned, so that nothing else can pull a CUDA build
    pip_install "$(grep '^torch==' requirements-dev.txt)"
    pip_install -r requirements-dev.txt -e .
    echo "$WANT" > "$STAMP"
fi
export PATH="$PWD/.venv/bin:$PATH"
