#!/usr/bin/env bash
# Creates .venv (CPython 3.12) with the pinned requirements, and .venv-ref (CPython 3.11, CPU
# torch + transformers) for the reference-comparison tests, the two side by side. Idempotent: a
# second run with unchanged requirement files returns at once. PYTHON=/path/to/python3.12
# overrides the search. Packages are byte-compiled at install (where PYTHONDONTWRITEBYTECODE is
# set, as on this machine, nothing would be compiled later: imports 3.4 s -> 10.4 s).
set -euo pipefail
cd "$(dirname "$0")"
# The reference environment for comparison tests (CPython 3.11 + CPU torch + transformers).
# Optional: without python3.11 or the torch CPU wheel those tests are skipped and say why.
build_ref() {
ref_want=$(sha256sum requirements-reference.txt | cut -d' ' -f1)
if [ ! -f .venv-ref/.requirements.sha ] || [ "$(cat .venv-ref/.requirements.sha)" != "$ref_want" ]; then
  PY311=""
  for c in python3.11 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.11*/bin/python3.11 /usr/bin/python3.11; do
    if [ -n "$c" ] && "$c" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      PY311=$c; break
    fi
  done
  if [ -n "$PY311" ] && rm -rf .venv-ref && "$PY311" -m venv .venv-ref \
      && .venv-ref/bin/python -m pip install -q -r requirements-reference.txt; then
    echo "$ref_want" > .venv-ref/.requirements.sha
  else
    rm -rf .venv-ref
    echo "setup.sh: no reference environment (needs python3.11 and the torch 2.13.0 CPU wheel);" \
         "the comparison tests will be skipped" >&2
  fi
fi
}

build_ref &  # beside .venv: downloads and installs overlap
ref_pid=$!

want=$(cat requirements.txt requirements-nodeps.txt | sha256sum | cut -d' ' -f1)
if [ ! -f .venv/.requirements.sha ] || [ "$(cat .venv/.requirements.sha)" != "$want" ]; then
  is312() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; }
  PY=""
  for c in ${PYTHON:-} python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 \
           /usr/local/bin/python3.12 /usr/bin/python3.12 python3; do
    if [ -n "$c" ] && is312 "$c"; then PY=$c; break; fi
  done
  if [ -z "$PY" ]; then
    echo "setup.sh: no CPython 3.12 found (jax 0.11 needs it); set PYTHON=/path/to/python3.12" >&2
    exit 1
  fi
  echo "setup.sh: creating .venv with $PY ($($PY --version))"
  "$PY" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -r requirements-nodeps.txt
  echo "$want" > .venv/.requirements.sha
fi

# The linter (CI runs it beside the tests): its own pin, so changing it rebuilds nothing else.
lint_want=$(cat requirements-lint.txt | grep -v '^#' | tr -d '[:space:]')
if [ "$(.venv/bin/ruff --version 2>/dev/null | sed 's/ /==/')" != "$lint_want" ]; then
  .venv/bin/python -m pip install -q -r requirements-lint.txt
fi

wait "$ref_pid"
