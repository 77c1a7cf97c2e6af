#!/bin/bash
# Runs inside the container `cargo xtask package-systemd` boots (systemd as PID 1, its own
# network namespace): installs the .deb as a user would and drives relay.service through
# systemctl, with traffic between two namespaces made here. Every wait is bounded. The
# container, its namespaces and veths go when the container stops, so nothing here cleans up
# on failure; it prints what went wrong and the relay's journal.
set -euo pipefail

PKG=/mnt/relay
G4=239.7.7.7
G6=ff0e::7   # any-source: ff3e::/96 is SSM, where an any-source join is refused
PORT=5000

step() { printf '\n== %s\n' "$*"; }
fail() {
  echo "FAIL: $*" >&2
  echo "--- journalctl -u relay (last 40 lines)" >&2
  journalctl -u relay --no-pager -n 40 >&2 || true
  systemctl status relay --no-pager >&2 || true
  relay stats >&2 || true
  exit 1
}
# until SECONDS WHAT CMD...: runs CMD every 0.2 s until it succeeds, or fails the run.
until_ok() {
  local secs=$1 what=$2
  shift 2
  local tries=$((secs * 5))
  for ((i = 0; i < tries; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  fail "$what (waited ${secs} s for: $*)"
}
journal_has() { journalctl -u relay --no-pager -o cat | grep -qF -- "$1"; }

step "install the package"
# The container has no network: the package's dependencies are in the rootfs already.
dpkg -i "$PKG"/relay.deb
[ "$(systemctl is-enabled relay || true)" = disabled ] || fail "the package enabled the unit"
systemctl is-active --quiet relay && fail "the package started the unit"

step "topology: snd0 (namespace snd) -> r-in [relay] r-out -> rcv0 (namespace rcv)"
sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0
ip netns add snd
ip netns add rcv
for ns in snd rcv; do
  ip netns exec "$ns" sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0
  ip -n "$ns" link set lo up
done
ip link add r-in type veth peer name snd0 netns snd
ip link add r-out type veth peer name rcv0 netns rcv
ip addr add 198.18.0.1/24 dev r-in
ip addr add 198.18.1.1/24 dev r-out
ip -n snd addr add 198.18.0.2/24 dev snd0
ip -n rcv addr add 198.18.1.2/24 dev rcv0
ip link set r-in up
ip link set r-out up
ip -n snd link set snd0 up
ip -n rcv link set rcv0 up
ip -n snd route add 224.0.0.0/4 dev snd0

# Both families, both on demand: the outputs send only while a host on r-out listens.
good_config() {
  cat <<EOF
allocator: $1
metrics: 127.0.0.1:9469
querier: { query_interval: 10, query_response_interval: 1, last_member_query_interval: 1, robustness: 2 }
rules:
  - name: v4
    input: { interface: r-in, group: $G4, port: $PORT }
    outputs:
      - { interface: r-out, on_demand: true }
  - name: v6
    input: { interface: r-in, group: "$G6", port: $PORT }
    outputs:
      # socat sends IPv6 multicast with hop limit 1 (it has no option for it), which the
      # relay's decrement would end: the output sets its own.
      - { interface: r-out, on_demand: true, ttl: 8 }
EOF
}
good_config lockfree >/etc/relay/rules.yaml
relay --config /etc/relay/rules.yaml --check

step "systemctl enable --now relay"
systemctl enable relay
systemctl start relay || fail "systemctl start relay"
until_ok 15 "the relay answers on its control socket" relay ping
systemctl is-active --quiet relay || fail "relay.service is not active"
until_ok 10 "the journal has the querier's start" journal_has "IGMP/MLD querier for on-demand outputs"

# send FAMILY GROUP TAG: a few datagrams from snd, each payload "TAG".
send() {
  local addr
  if [ "$1" = 4 ]; then addr="UDP4-DATAGRAM:$2:$PORT,ip-multicast-ttl=8"; else addr="UDP6-DATAGRAM:[$2]:$PORT"; fi
  for _ in 1 2 3 4 5; do
    echo "$3" | ip netns exec snd socat -u - "$addr" || true
  done
}
# received FILE TAG: the receiver got a datagram with TAG.
received() { grep -qF -- "$2" "$1"; }

for fam in 4 6; do
  if [ $fam = 4 ]; then group=$G4; else group=$G6; fi
  out=/tmp/rcv$fam.out
  : >"$out"

  step "on demand, IPv$fam: nobody listens, nothing is sent"
  send $fam $group before-join-$fam
  sleep 0.5
  received "$out" before-join-$fam && fail "IPv$fam: delivered before anyone joined"

  step "on demand, IPv$fam: a host on r-out joins $group"
  if [ $fam = 4 ]; then
    recv="UDP4-RECV:$PORT,reuseaddr,ip-add-membership=$group:198.18.1.2"
  else
    recv="UDP6-RECV:$PORT,reuseaddr,ipv6-join-group=[$group]:rcv0"
  fi
  # The receiver is ended below; the container's stop ends it if this script fails first.
  ip netns exec rcv socat -u "$recv" "OPEN:$out,creat,append" &
  pid=$!
  if [ $fam = 4 ]; then proto=IGMP; else proto=MLD; fi
  until_ok 10 "IPv$fam: the relay heard the join (journal: r-out: now has $proto listeners for $group)" \
    journal_has "r-out: now has $proto listeners for $group"
  n=0
  until received "$out" after-join-$fam; do
    n=$((n + 1))
    [ $n -le 40 ] || fail "IPv$fam: nothing reached the host that joined $group (on-demand output)"
    send $fam $group after-join-$fam
    sleep 0.25
  done
  kill "$pid"
  wait "$pid" 2>/dev/null || true
done
relay members || fail "relay members"

step "capture (relay capture) under the unit"
# A host listens again so the on-demand output sends, and the capture sees both directions.
ip netns exec rcv socat -u "UDP4-RECV:$PORT,reuseaddr,ip-add-membership=$G4:198.18.1.2" /dev/null &
listener=$!
timeout 20 relay capture --rule v4 --count 4 -w /tmp/cap.pcapng &
cap=$!
sleep 0.5
n=0
while kill -0 "$cap" 2>/dev/null; do
  n=$((n + 1))
  [ $n -le 40 ] || break
  send 4 $G4 capture
  sleep 0.25
done
wait "$cap" || fail "relay capture failed or timed out"
kill "$listener"
wait "$listener" 2>/dev/null || true
# pcapng's section header block starts with 0x0a0d0d0a.
[ "$(head -c 4 /tmp/cap.pcapng | od -An -tx1 | tr -d ' \n')" = 0a0d0d0a ] ||
  fail "the capture is not pcapng"
grep -qF capture /tmp/cap.pcapng || fail "the capture holds no relayed frame"

step "metrics endpoint under the unit's sandbox"
metrics=$(curl -fsS --max-time 5 http://127.0.0.1:9469/metrics) || fail "GET /metrics"
echo "$metrics" | grep -q '^relay_rule_received_packets_total{.*rule="v4"' ||
  fail "no relay_rule_received_packets_total for rule v4 in /metrics"

step "systemctl reload with a good file (adds rule extra)"
good_config lockfree >/etc/relay/rules.yaml
cat >>/etc/relay/rules.yaml <<EOF
  - name: extra
    input: { interface: r-in, group: 239.7.7.8, port: $PORT }
    outputs:
      - { interface: r-out }
EOF
systemctl reload relay || fail "systemctl reload with a good file"
relay rules | grep -qw extra || fail "the reload did not add rule extra"

step "systemctl reload with a broken file fails and keeps the running rules"
sed -i 's/{ interface: r-out }/{ interface: r-out, ttl: 300 }/' /etc/relay/rules.yaml
if systemctl reload relay; then fail "systemctl reload succeeded with a broken file"; fi
systemctl is-active --quiet relay || fail "the relay stopped after a refused reload"
relay rules | grep -qw extra || fail "the refused reload dropped the running rules"
journalctl -u relay --no-pager -o cat | grep -F ttl | grep -qF 300 ||
  fail "the journal does not say why the reload was refused (ttl: 300)"

step "the relay's log is in the journal"
for line in "IGMP/MLD querier for on-demand outputs" "now has IGMP listeners for $G4" \
  "now has MLD listeners for $G6"; do
  journal_has "$line" || fail "journalctl -u relay lacks: $line"
done

step "systemctl restart with allocator: mutex"
good_config mutex >/etc/relay/rules.yaml
systemctl restart relay || fail "systemctl restart relay"
until_ok 15 "the relay answers after the restart" relay ping
until_ok 5 "the journal has the mutex allocator" journal_has "frame allocator: mutex"
out=/tmp/rcv-mutex.out
: >"$out"
ip netns exec rcv socat -u "UDP4-RECV:$PORT,reuseaddr,ip-add-membership=$G4:198.18.1.2" \
  "OPEN:$out,creat,append" &
pid=$!
n=0
until received "$out" mutex; do
  n=$((n + 1))
  [ $n -le 40 ] || fail "allocator mutex: nothing reached the host that joined $G4"
  send 4 $G4 mutex
  sleep 0.25
done
kill "$pid"
wait "$pid" 2>/dev/null || true

step "systemctl stop"
systemctl stop relay || fail "systemctl stop relay"
[ "$(systemctl is-active relay || true)" = inactive ] || fail "relay.service is not inactive after stop"
ip link show r-in | grep -q xdp && fail "an XDP program is still attached to r-in after stop"
# The relay's own last words (SIGTERM handled, every frame back), then systemd's.
until_ok 5 "the journal has the relay's clean stop" journal_has "all 4096 frames accounted for"
until_ok 5 "the journal has the unit's stop" journal_has "Stopped relay.service"

echo
echo "package-systemd: all checks passed"
