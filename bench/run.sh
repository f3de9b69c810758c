#!/usr/bin/env bash
# The whole benchmark in one command: prepares wrk and bench/.venv, then runs
# bench/bench.py, which writes bench/RESULTS.md and raw JSON under bench/out/.
# Arguments go to bench/bench.py (e.g. --models small --servers tp,lit).
# `bench/run.sh realmodels [ARGS]` runs bench/realmodels.py instead: the text and
# image examples against the one-process recipe and uvicorn --workers 2, torchpool
# with elastic cores on and off alternated (bench/RESULTS-realmodels.md; its
# defaults reproduce the tables of docs/elastic-cores.md in one go).
# `bench/run.sh --models heavy,small --servers recipe2,tp,tpoff --concurrency 1,2,8,32`
# is the MLP side of the same A/B.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v wrk >/dev/null 2>&1; then
    apt-get update
    apt-get install -y wrk
fi

# A venv of its own, so the peers (LitServe) stay out of the project's .venv.
PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x bench/.venv/bin/python ]; then
    "$PYTHON" -m venv bench/.venv
fi
stamp=bench/.venv/.bench-installed
peers=(litserve==0.2.19 'transformers>=5.0' 'tokenizers>=0.22' 'pillow>=10')
want="$(cat constraints.txt pyproject.toml | sha256sum | cut -d' ' -f1) ${peers[*]}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    # torch is pinned by constraints.txt: the local CPU wheel, never a CUDA build.
    bench/.venv/bin/pip install -q -c constraints.txt -e '.[worker]' "${peers[@]}"
    echo "$want" >"$stamp"
fi

if [ "${1:-}" = realmodels ]; then
    shift
    exec bench/.venv/bin/python -m bench.realmodels "$@"
fi
exec bench/.venv/bin/python -m bench.bench "$@"
