#!/usr/bin/env bash
# Installs the .deb into a copy of a Debian root (made by debootstrap) and
# checks what an operator gets: files and modes, the unit (`systemd-analyze
# verify`), the `iotedge config` flow (`verge config mp` / `apply`), verged
# starting its agent from Microsoft's image name, removal and purge.
#   check-install.sh DEB ROOT   (ROOT is changed; run in its own mount namespace)
set -euo pipefail
deb=$1 root=$2
fail() { echo "FAIL: $*" >&2; exit 1; }
in_root() { chroot "$root" "$@"; }

cp "$deb" "$root/tmp/verge.deb"
in_root dpkg -i /tmp/verge.deb
for f in /usr/bin/verge /usr/libexec/verge/verge-edge; do
  [ -x "$root$f" ] || fail "$f missing or not executable"
done
for l in verged verge-agent verge-hub; do
  [ "$(readlink "$root/usr/libexec/verge/$l")" = verge-edge ] || fail "/usr/libexec/verge/$l is not a link to verge-edge"
done
[ "$(stat -c %a "$root/var/lib/verge")" = 700 ] || fail "/var/lib/verge is not 0700"
[ -f "$root/etc/verge/config.toml.template" ] || fail "no config template"
[ -L "$root/etc/systemd/system/multi-user.target.wants/verged.service" ] || fail "verged.service not enabled"
in_root systemd-analyze verify /lib/systemd/system/verged.service || fail "systemd-analyze verify"
echo "installed: files, modes and unit ok"

# The config flow, as `iotedge config mp` / `apply`.
mount -t proc proc "$root/proc"
mount --bind /dev "$root/dev"
key=$(head -c 32 /dev/urandom | base64)
in_root verge config mp -c "HostName=hub.example.net;DeviceId=edge1;SharedAccessKey=$key"
[ "$(stat -c %a "$root/etc/verge/config.toml")" = 600 ] || fail "config.toml is not 0600"
grep -q "^hostname = \"$(cat /proc/sys/kernel/hostname)\"" "$root/etc/verge/config.toml" || fail "hostname is not the machine's"
if in_root verge config mp -c "HostName=h;DeviceId=d;SharedAccessKey=$key" 2>/dev/null; then
  fail "config mp replaced an existing file without --force"
fi
applied=$(in_root verge config apply) || fail "config apply: $applied"
grep -q "is valid and installed at /etc/verge/config.toml" <<<"$applied" || fail "config apply: $applied"
grep -q "sudo systemctl restart verged" <<<"$applied" || fail "config apply names no restart: $applied"
echo "config flow ok"

# verged as the unit would start it; the agent is Microsoft's image name in the config.
# chroot itself (not a function: that would background a subshell) execs verged.
chroot "$root" /usr/libexec/verge/verged --config /etc/verge/config.toml >"$root/tmp/verged.log" 2>&1 &
verged=$!
running=""
for _ in $(seq 1 150); do
  list=$(in_root verge list 2>/dev/null || true)
  if grep -q '^edgeAgent *running' <<<"$list"; then running=yes; break; fi
  sleep 0.2
done
in_root verge list || true
[ -n "$running" ] || { cat "$root/tmp/verged.log" >&2; fail "the agent is not running under verged"; }
grep -q "Verge's agent runs in its place" "$root/tmp/verged.log" || fail "no image mapping logged"
[ -d "$root/var/lib/verge/edgeAgent" ] || fail "the agent's storage is not {storageFolder}/edgeAgent"
kill -TERM "$verged"
for _ in $(seq 1 150); do kill -0 "$verged" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$verged" 2>/dev/null; then kill -KILL "$verged"; fail "verged did not stop on SIGTERM"; fi
code=0; wait "$verged" || code=$?
[ "$code" = 0 ] || { tail -5 "$root/tmp/verged.log" >&2; fail "verged exited with $code on SIGTERM"; }
pkill -KILL -f "^/usr/libexec/verge/verge-edge agent" 2>/dev/null || true
echo "verged ran the agent ok"
umount "$root/dev" "$root/proc"

in_root dpkg -r verge
[ ! -e "$root/usr/bin/verge" ] || fail "dpkg -r left /usr/bin/verge"
[ -f "$root/etc/verge/config.toml" ] || fail "dpkg -r removed the operator's config"
in_root dpkg -P verge
[ ! -e "$root/etc/verge" ] && [ ! -e "$root/var/lib/verge" ] || fail "dpkg -P left /etc/verge or /var/lib/verge"
echo "remove and purge ok"
