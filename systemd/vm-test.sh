#!/usr/bin/env bash
# Runs the three units for real: a Debian 12 VM (systemd 252 as PID 1, cgroup v2) booted with
# qemu (TCG, no KVM needed) from a debootstrap root, with this build's binaries and systemd/*.
# Inside, a push goes through kiln-gitstore, kiln-agent builds it in its sandbox under the unit's
# hardening, kiln-nginx serves it; then journal fields, the watchdog (a frozen gitstore must be
# restarted) and clean stops are checked. Prints the guest's report; exits 1 on any FAIL.
#
#   sudo systemd/vm-test.sh [WORKDIR]        (default /var/tmp/kiln-vm; about 5 min, 2 of them
#                                             debootstrap on the first run; needs the network)
#
# Why a VM: CI hosts run without systemd as PID 1 and often on cgroup v1, where neither
# Type=notify, WatchdogSec= nor Delegate= can be exercised.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-/var/tmp/kiln-vm}
bins=${KILN_BIN_DIR:-$PWD/target/debug}

need() { command -v "$1" >/dev/null || { echo "missing $1; install it with: apt-get install -y $2" >&2; exit 1; }; }
[ "$(id -u)" = 0 ] || { echo "run as root (debootstrap, chroot, mkfs)" >&2; exit 1; }
need debootstrap debootstrap
need qemu-system-x86_64 qemu-system-x86
need mkfs.ext4 e2fsprogs
need node nodejs
need pnpm "nodejs npm && npm install -g pnpm@10"
for b in kiln-gitstore kiln-agent kiln; do
  [ -x "$bins/$b" ] || { echo "missing $bins/$b; build with: cargo build --workspace --bins" >&2; exit 1; }
done

mkdir -p "$work"
if [ ! -f "$work/base/.complete" ]; then
  rm -rf "$work/base"
  debootstrap --variant=minbase \
    --include=systemd-sysv,linux-image-cloud-amd64,udev,dbus,git,nginx-light,kmod,util-linux,procps,ca-certificates,curl,python3 \
    bookworm "$work/base" http://deb.debian.org/debian >"$work/debootstrap.log"
  touch "$work/base/.complete"
fi
R=$work/root
rm -rf "$R" && cp -a "$work/base" "$R"

# Node 20 and pnpm from the host, under /usr where the sandbox shows them (Debian's Node 18 is too
# old for the fast engine).
cp -a "$(readlink -f "$(command -v node)")" "$R/usr/bin/node"
pnpm_dir=$(dirname "$(dirname "$(readlink -f "$(command -v pnpm)")")")
mkdir -p "$R/usr/lib/node_modules" && cp -a "$pnpm_dir" "$R/usr/lib/node_modules/pnpm"
ln -sf ../lib/node_modules/pnpm/bin/pnpm.cjs "$R/usr/bin/pnpm"

install -m 0755 "$bins/kiln-gitstore" "$bins/kiln-agent" "$bins/kiln" "$R/usr/local/bin/"
install -m 0644 systemd/kiln.sysusers "$R/usr/lib/sysusers.d/kiln.conf"
install -m 0644 systemd/kiln-*.service "$R/etc/systemd/system/"
chroot "$R" systemd-sysusers >/dev/null
# A warm pnpm store (the tests' shared volume) saves the guest most downloads; optional.
if [ -d /tmp/kiln-test-volume/store ]; then
  mkdir -p "$R/var/lib/kiln-agent/volume"
  cp -a /tmp/kiln-test-volume/store /tmp/kiln-test-volume/engines "$R/var/lib/kiln-agent/volume/"
  chroot "$R" chown -R kiln-build:kiln-build /var/lib/kiln-agent/volume/store
  chroot "$R" sh -c 'chown -R kiln-build:kiln-build /var/lib/kiln-agent/volume/engines/*'
fi
mkdir -p "$R/root/app" && cp -a tests/fixtures/vite-react-ts/. "$R/root/app/"

admin=kiln_admin_vmtest_$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
mkdir -p "$R/etc/kiln"
cat >"$R/etc/kiln/kiln.env" <<EOF
KILN_STORE_URL=file:///var/lib/kiln-gitstore/store
KILN_WEBHOOK_SECRET=vmtest-webhook-secret-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
KILN_ADMIN_TOKEN_SHA256=$("$bins/kiln-gitstore" hash-token "$admin")
KILN_AGENT_URLS=http://127.0.0.1:7080
KILN_PREVIEW_URL=http://127.0.0.1:8080/preview
EOF
chmod 600 "$R/etc/kiln/kiln.env"
echo "$admin" >"$R/root/admin-token"

mkdir -p "$R/etc/systemd/network"
printf '[Match]\nName=en* eth*\n[Network]\nDHCP=yes\n' >"$R/etc/systemd/network/20-wired.network"
echo "nameserver 10.0.2.3" >"$R/etc/resolv.conf"
echo kilnvm >"$R/etc/hostname"
echo '/dev/vda / ext4 rw 0 1' >"$R/etc/fstab"

cat >"$R/usr/local/sbin/kiln-vmtest" <<'GUEST'
#!/bin/bash
set -u
exec > >(tee /dev/ttyS0) 2>&1
say() { echo "VMTEST: $*"; }
check() { if eval "$2"; then say "PASS $1"; else say "FAIL $1"; fi; }
ADMIN=$(cat /root/admin-token)
say "$(uname -r); $(systemctl --version | head -1); /sys/fs/cgroup: $(stat -fc %T /sys/fs/cgroup)"
for u in kiln-gitstore kiln-agent kiln-nginx; do
  say "$u: $(systemctl show "$u" -p ActiveState -p SubState -p StatusText -p NRestarts | tr '\n' ' ')"
  check "$u is active" "systemctl is-active -q $u"
done
check "gitstore is READY with its status line" "systemctl show -p StatusText --value kiln-gitstore | grep -q '^serving on'"
check "agent is READY with its status line" "systemctl show -p StatusText --value kiln-agent | grep -q '^serving on'"
check "gitstore healthz" "curl -fs 127.0.0.1:7070/healthz >/dev/null"
check "agent healthz" "curl -fs 127.0.0.1:7080/healthz >/dev/null"
check "modprobe overlay ran" "grep -qw overlay /proc/filesystems"

TOKEN=$(curl -s -X POST -H "Authorization: Bearer $ADMIN" -H 'Content-Type: application/json' \
  -d '{"name":"vm"}' 127.0.0.1:7070/api/clients | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
cd /root/app && git init -q -b main && git add -A &&
  git -c user.name=vm -c user.email=vm@example.com commit -qm app
check "push through the hardened gitstore" "git push -q http://kiln:$TOKEN@127.0.0.1:7070/git/shop.git main"
state=""
for _ in $(seq 1 900); do
  st=$(curl -s -H "Authorization: Bearer $TOKEN" 127.0.0.1:7080/status/shop)
  state=$(echo "$st" | python3 -c 'import json,sys; print(json.load(sys.stdin).get("state",""))' 2>/dev/null)
  if [ "$state" = building ] && [ -z "${cg:-}" ]; then
    cg=$(find /sys/fs/cgroup -type d -name 'shop-*' | head -1)
    say "build cgroup: $cg"
  fi
  case "$state" in ready|failed|cancelled) break ;; esac
  sleep 1
done
check "build in the agent's sandbox under the unit's hardening (state $state)" "[ '$state' = ready ]"
check "the build's cgroup is inside the agent's unit ($cg)" "echo '$cg' | grep -q 'kiln-agent.service/builds/'"
check "the agent runs in its own leaf cgroup" "grep -q 'kiln-agent.service/agent' /proc/\$(systemctl show -p MainPID --value kiln-agent)/cgroup"
[ "$state" = ready ] || curl -s -H "Authorization: Bearer $TOKEN" 127.0.0.1:7080/logs/shop | tail -30
check "nginx serves the preview" "curl -fs 127.0.0.1:8080/preview/shop/ | grep -qi '<!doctype html>'"
check "journal field PROJECT=shop" "journalctl -u kiln-agent PROJECT=shop -o cat --no-pager | grep -q ."
check "journal field PATH=/healthz" "journalctl -u kiln-gitstore PATH=/healthz -o cat --no-pager | grep -q ."
for u in kiln-gitstore kiln-agent kiln-nginx; do say "$(systemd-analyze security "$u" --no-pager | grep Overall)"; done
check "nginx reload re-renders and stays up" "systemctl reload kiln-nginx && systemctl is-active -q kiln-nginx"

old=$(systemctl show -p MainPID --value kiln-gitstore)
kill -STOP "$old"
for _ in $(seq 1 60); do
  new=$(systemctl show -p MainPID --value kiln-gitstore)
  [ "$new" != "$old" ] && [ "$new" != 0 ] && systemctl is-active -q kiln-gitstore && break
  sleep 1
done
check "a frozen gitstore is restarted by the watchdog" \
  "journalctl -u kiln-gitstore -o cat --no-pager | grep -q \"Failed with result 'watchdog'\" && systemctl is-active -q kiln-gitstore"

for u in kiln-gitstore kiln-agent kiln-nginx; do
  systemctl stop "$u"
  check "$u stops cleanly" "[ \"\$(systemctl show $u -p Result --value)\" = success ] && [ \"\$(systemctl show $u -p ExecMainStatus --value)\" = 0 ]"
done
say "unit journal at warning and above (the watchdog lines are expected):"
journalctl -u kiln-gitstore -u kiln-agent -u kiln-nginx -p warning --no-pager -o cat | tail -20
say DONE
systemctl poweroff
GUEST
chmod 755 "$R/usr/local/sbin/kiln-vmtest"
cat >"$R/etc/systemd/system/kiln-vmtest.service" <<'EOF'
[Unit]
After=kiln-gitstore.service kiln-agent.service kiln-nginx.service network-online.target
Wants=network-online.target
[Service]
Type=oneshot
ExecStart=/usr/local/sbin/kiln-vmtest
[Install]
WantedBy=multi-user.target
EOF
chroot "$R" systemctl enable -q systemd-networkd systemd-networkd-wait-online \
  kiln-gitstore kiln-agent kiln-nginx kiln-vmtest
chroot "$R" passwd -d root >/dev/null

rm -f "$work/disk.img" && truncate -s 5G "$work/disk.img" && mkfs.ext4 -q -d "$R" "$work/disk.img"
kernel=$(find "$R/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | head -1)
initrd=$(find "$R/boot" -maxdepth 1 -name 'initrd.img-*' | sort | head -1)
timeout 1800 qemu-system-x86_64 -accel tcg -m 4096 -smp 2 -nographic -no-reboot \
  -kernel "$kernel" -initrd "$initrd" -drive "file=$work/disk.img,format=raw,if=virtio" \
  -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
  -append "console=ttyS0 root=/dev/vda rw quiet systemd.show_status=0" >"$work/console.log" 2>&1 || true
grep -a 'VMTEST' "$work/console.log" || true
grep -aq 'VMTEST: DONE' "$work/console.log" || { echo "the guest did not finish; see $work/console.log" >&2; exit 1; }
! grep -aq 'VMTEST: FAIL' "$work/console.log"
