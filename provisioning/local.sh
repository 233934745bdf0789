#!/usr/bin/env bash
# The local stack on the embedded default (blob store = a directory), for `make up` / `make down`.
# Everything lives in .kiln/local/; settings for scripts go to .kiln/local/credentials.env.
set -euo pipefail
cd "$(dirname "$0")/.."
# KILN_LOCAL_DIR and KILN_BIN_DIR let a test run a second stack beside the user's.
root=${KILN_LOCAL_DIR:-$PWD/.kiln/local}
bin=${KILN_BIN_DIR:-$PWD/target/release}
git_port=${KILN_GIT_PORT:-7070}
agent_port=${KILN_AGENT_PORT:-7080}
http_port=${KILN_HTTP_PORT:-8080}
creds=$root/credentials.env
mkdir -p "$root"/{store,gitstore-cache,agent,www,logs,run,nginx}
# nginx's workers (an unprivileged user) read www/ and nothing else here.
chmod 711 "$root"
chmod 700 "$root"/{store,gitstore-cache,agent,logs,run}
chmod 755 "$root/www"

running() { [ -f "$root/run/$1.pid" ] && kill -0 "$(cat "$root/run/$1.pid")" 2>/dev/null; }

stop() {
  local pid
  running "$1" || { rm -f "$root/run/$1.pid"; return 0; }
  pid=$(cat "$root/run/$1.pid")
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$root/run/$1.pid"
  echo "stopped $1"
}

wait_healthy() { # name url log
  for _ in $(seq 1 100); do
    curl -fsS "$2" >/dev/null 2>&1 && return 0
    running "$1" || break
    sleep 0.1
  done
  echo "$1 did not become healthy at $2; last log lines:" >&2
  tail -20 "$3" >&2
  exit 1
}

port_free() { # port name
  if curl -s -o /dev/null "http://127.0.0.1:$1/"; then
    echo "port $1 is taken by another program; set $2" >&2; exit 1
  fi
}

up() {
  for b in kiln-gitstore kiln-agent kiln; do
    [ -x "$bin/$b" ] || { echo "missing $bin/$b: run make up (it builds)" >&2; exit 1; }
  done
  [ "$(id -u)" = 0 ] || { echo "the agent needs root for its build sandbox (cgroups, namespaces): run sudo make up" >&2; exit 1; }
  # Installs and builds run as this unprivileged user.
  id kiln-build >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin kiln-build
  # shellcheck source=/dev/null
  if [ -f "$creds" ]; then . "$creds"; fi
  : "${KILN_ADMIN_TOKEN:=kiln_admin_$(openssl rand -hex 24)}"
  : "${KILN_WEBHOOK_SECRET:=$(openssl rand -hex 32)}"
  # Restart both so they always run with the settings below.
  stop nginx >/dev/null; stop agent >/dev/null; stop gitstore >/dev/null
  port_free "$agent_port" KILN_AGENT_PORT
  port_free "$git_port" KILN_GIT_PORT
  port_free "$http_port" KILN_HTTP_PORT
  # The same settings the systemd units read from /etc/kiln/kiln.env.
  export KILN_HTTP_LISTEN="127.0.0.1:$http_port"
  export KILN_GITSTORE_LISTEN="127.0.0.1:$git_port"
  export KILN_AGENT_LISTEN="127.0.0.1:$agent_port"
  export KILN_PUBLISH_DIR="$root/www"
  export KILN_PREVIEW_URL="${KILN_PREVIEW_URL:-http://127.0.0.1:$http_port/preview}"
  export KILN_GENERATOR_ORIGINS="${KILN_GENERATOR_ORIGINS:-}"
  local admin_sha
  admin_sha=$("$bin/kiln-gitstore" hash-token "$KILN_ADMIN_TOKEN")
  KILN_STORE_URL="file://$root/store" \
  KILN_AGENT_STATE="$root/agent" \
  KILN_ADMIN_TOKEN_SHA256="$admin_sha" \
  KILN_WEBHOOK_SECRET="$KILN_WEBHOOK_SECRET" \
    setsid "$bin/kiln-agent" serve >>"$root/logs/agent.log" 2>&1 < /dev/null &
  echo $! > "$root/run/agent.pid"
  KILN_STORE_URL="file://$root/store" \
  KILN_GITSTORE_DATA="$root/gitstore-cache" \
  KILN_ADMIN_TOKEN_SHA256="$admin_sha" \
  KILN_WEBHOOK_SECRET="$KILN_WEBHOOK_SECRET" \
  KILN_AGENT_URLS="http://127.0.0.1:$agent_port" \
    setsid "$bin/kiln-gitstore" serve >>"$root/logs/gitstore.log" 2>&1 < /dev/null &
  echo $! > "$root/run/gitstore.pid"
  wait_healthy gitstore "http://127.0.0.1:$git_port/healthz" "$root/logs/gitstore.log"
  wait_healthy agent "http://127.0.0.1:$agent_port/healthz" "$root/logs/agent.log"
  KILN_NGINX_RUNTIME_DIR="$root/nginx" "$bin/kiln" nginx render --out "$root/nginx/nginx.conf"
  setsid nginx -c "$root/nginx/nginx.conf" -g 'daemon off;' >>"$root/logs/nginx.log" 2>&1 < /dev/null &
  echo $! > "$root/run/nginx.pid"
  wait_healthy nginx "http://127.0.0.1:$http_port/healthz" "$root/logs/nginx.log"
  if [ -z "${KILN_TOKEN:-}" ]; then
    KILN_TOKEN=$(curl -fsS -X POST -H "Authorization: Bearer $KILN_ADMIN_TOKEN" \
      -H 'Content-Type: application/json' -d '{"name":"local"}' \
      "http://127.0.0.1:$git_port/api/clients" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  fi
  umask 077
  cat > "$creds" <<ENV
# Written by make up. Source it: set -a; . .kiln/local/credentials.env; set +a
KILN_TOKEN=$KILN_TOKEN
KILN_ADMIN_TOKEN=$KILN_ADMIN_TOKEN
KILN_WEBHOOK_SECRET=$KILN_WEBHOOK_SECRET
# Everything goes through nginx's front door, as in production.
KILN_GIT_URL=http://127.0.0.1:$http_port
KILN_AGENT_URL=http://127.0.0.1:$http_port
KILN_HTTP_URL=http://127.0.0.1:$http_port
KILN_PREVIEW_URL=$KILN_PREVIEW_URL
# The stack's own settings, so \`kiln doctor\` and \`kiln nginx check\` see what it runs with.
KILN_STORE_URL=file://$root/store
KILN_AGENT_STATE=$root/agent
KILN_PUBLISH_DIR=$root/www
KILN_HTTP_LISTEN=$KILN_HTTP_LISTEN
KILN_GITSTORE_LISTEN=$KILN_GITSTORE_LISTEN
KILN_AGENT_LISTEN=$KILN_AGENT_LISTEN
KILN_NGINX_RUNTIME_DIR=$root/nginx
ENV
  demo
}

# Shows a working result: push the bundled Vite + React app as project "hello", wait for its
# build, and check nginx serves it.
demo() {
  local d=$root/demo
  rm -rf "$d" && mkdir -p "$d"
  cp -r tests/fixtures/vite-react-ts "$d/app"
  printf "export const TEXT: string = 'Hello from Kiln (pushed %s)'\n" "$(date -u +%FT%TZ)" > "$d/app/src/text.ts"
  git -C "$d/app" init -q -b main
  git -C "$d/app" add -A
  git -C "$d/app" -c user.email=demo@kiln.local -c user.name=demo commit -qm "demo $(date -u +%FT%TZ)"
  local url="http://kiln:$KILN_TOKEN@127.0.0.1:$git_port/git/hello.git"
  git -C "$d/app" push -q --force "$url" main 2>&1 | sed 's/^/  /'
  local commit state="" shown=""
  commit=$(git -C "$d/app" rev-parse HEAD)
  echo "building the example app (the first build installs its dependencies)..."
  for _ in $(seq 1 3000); do
    state=$(curl -fsS -H "Authorization: Bearer $KILN_TOKEN" "http://127.0.0.1:$agent_port/status/hello" 2>/dev/null \
      | python3 -c "import json,sys; s=json.load(sys.stdin); print(s['state'] if s.get('commit') in (None, '$commit') else 'queued')" 2>/dev/null) || state=
    [ -n "$state" ] && [ "$state" != "$shown" ] && { echo "  $state"; shown=$state; }
    case "$state" in ready|failed|timed_out|cancelled) break ;; esac
    sleep 0.1
  done
  [ "$state" = ready ] || { echo "the example build did not become ready (state: ${state:-none}); see $root/logs/agent.log and: kiln logs hello" >&2; exit 1; }
  local preview=${KILN_PREVIEW_URL%/}/hello/
  curl -fsS "$preview" | grep -q 'id="root"' || { echo "nginx does not serve $preview; see $root/logs/nginx.log" >&2; exit 1; }
  cat <<MSG

Kiln is up (blob store: $root/store).
  preview   $preview   <- open it in a browser
  front     http://127.0.0.1:$http_port   (nginx: previews, /git/, /api/, /status/, /logs/)
  gitstore  http://127.0.0.1:$git_port   log: $root/logs/gitstore.log
  agent     http://127.0.0.1:$agent_port   log: $root/logs/agent.log
  credentials: $creds

Next:
  set -a; . $creds; set +a
  git push "http://kiln:\$KILN_TOKEN@127.0.0.1:$http_port/git/my-app.git" main   # any Vite app
  $bin/kiln status my-app
  $bin/kiln logs my-app -f
  $bin/kiln push ./some-dir my-app --wait     # a directory of files, no git needed
  $bin/kiln doctor
Stop with: make down
MSG
}

case "${1:-}" in
  up) up ;;
  down) stop nginx; stop gitstore; stop agent ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
