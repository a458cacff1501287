#!/usr/bin/env bash
# Creates .venv (CPython 3.12) with the pinned requirements. Idempotent: a second run with an
# unchanged requirements.txt returns at once. PYTHON=/path/to/python3.12 overrides the search.
set -euo pipefail
cd "$(dirname "$0")"
want=$(sha256sum requirements.txt | cut -d' ' -f1)
if [ -f .venv/.requirements.sha ] && [ "$(cat .venv/.requirements.sha)" = "$want" ]; then
  exit 0
fi
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
echo "$want" > .venv/.requirements.sha
