#!/usr/bin/env bash
# Installs what Kiln needs on Debian/Ubuntu, skipping what is already there.
#   deps.sh        what `make up` needs: git, curl, openssl, util-linux (unshare), Node.js, pnpm, nginx
#   deps.sh test   also what the tests need: Azurite, the JavaScript git clients, Chromium,
#                  debootstrap (install.sh runs in a fresh Debian root), qemu (systemd/vm-test.sh)
#                  and shellcheck
set -euo pipefail
cd "$(dirname "$0")/.."
PNPM_VERSION=10.34.9
need_apt=()
for tool in git curl openssl unshare python3; do
  command -v "$tool" >/dev/null || case $tool in
    unshare) need_apt+=(util-linux) ;;
    *) need_apt+=("$tool") ;;
  esac
done
command -v node >/dev/null || need_apt+=(nodejs)
command -v npm >/dev/null || need_apt+=(npm)
# nginx serves the previews (in /usr/sbin, which a user's PATH may lack).
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || need_apt+=(nginx)
# The browser tests drive Debian's Chromium through playwright-core.
if [ "${1:-}" = test ]; then
  [ -x /usr/bin/chromium ] || need_apt+=(chromium)
  command -v debootstrap >/dev/null || [ -x /usr/sbin/debootstrap ] || need_apt+=(debootstrap)
  command -v shellcheck >/dev/null || need_apt+=(shellcheck)
  # systemd/vm-test.sh boots the production platform in a VM (software emulation).
  command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
fi
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "installing ${need_apt[*]}" >&2
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need_apt[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust from https://rustup.rs" >&2; exit 1; }
# The agent runs pnpm inside its sandbox, which sees only /usr: install it globally there.
if [ "$(pnpm --version 2>/dev/null)" != "$PNPM_VERSION" ]; then
  npm install -g --silent --no-fund --no-audit "pnpm@$PNPM_VERSION"
fi
if [ "${1:-}" = test ]; then
  # 3.35 is the last Azurite that runs on Node 20.
  command -v azurite-blob >/dev/null || npm install -g --silent azurite@3.35.0
  # Real JavaScript git clients for the client-compatibility tests and playwright-core for the
  # browser test, pinned by the lockfile.
  if [ ! -d tests/js/node_modules/isomorphic-git ] || [ ! -d tests/js/node_modules/playwright-core ]; then
    (cd tests/js && npm ci --silent --no-audit --no-fund)
  fi
fi
