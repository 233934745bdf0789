#!/usr/bin/env bash
# Installs what Kiln needs on Debian/Ubuntu, skipping what is already there.
#   deps.sh        what `make up` needs (git, curl, openssl)
#   deps.sh test   also what the tests need (Node.js + npm, Azurite)
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
for tool in git curl openssl; do command -v "$tool" >/dev/null || need_apt+=("$tool"); done
if [ "${1:-}" = test ]; then
  command -v node >/dev/null || need_apt+=(nodejs)
  command -v npm >/dev/null || need_apt+=(npm)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
if [ "${1:-}" = test ]; then
  # 3.35 is the last Azurite that runs on Node 20.
  command -v azurite-blob >/dev/null || npm install -g --silent azurite@3.35.0
  # Real JavaScript git clients for the client-compatibility tests, pinned by the lockfile.
  [ -d tests/js/node_modules/isomorphic-git ] || (cd tests/js && npm ci --silent --no-audit --no-fund)
fi
