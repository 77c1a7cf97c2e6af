#!/usr/bin/env bash
# The relay's system calls per 1,000 forwarded frames (strace -c -f over the whole process),
# 1->1 on a throw-away veth topology: at 50 kpps and flat out, with relay-gen's AF_XDP
# sender pinned to CPU 0. Needs root, strace, and a release build (cargo xtask build, and
# cargo build --release -p relay-tests --bin relay-gen). Numbers go to docs/PERFORMANCE.md
# by hand: strace slows the relay, so the counts per frame are what it shows, not the rates.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${CARGO_TARGET_DIR:-target}/release
tag=sc$$
work=$(mktemp -d)
cleanup() {
    for n in s r x; do ip netns del "$tag$n" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT
for n in s r x; do
    ip netns add "$tag$n"
    ip -n "$tag$n" link set lo up
done
ip link add snd0 netns "${tag}s" type veth peer name rin netns "${tag}r"
ip link add rout0 netns "${tag}r" type veth peer name rcv0 netns "${tag}x"
ip -n "${tag}s" addr add 198.18.1.1/24 dev snd0
ip -n "${tag}r" addr add 198.18.1.2/24 dev rin
ip -n "${tag}r" addr add 198.18.2.1/24 dev rout0
ip -n "${tag}x" addr add 198.18.2.2/24 dev rcv0
for l in "s snd0" "r rin" "r rout0" "x rcv0"; do
    set -- $l
    ip -n "$tag$1" link set "$2" up
done
# A frame redirected into a veth is dropped unless its peer has GRO on.
ip netns exec "${tag}x" ethtool -K rcv0 gro on >/dev/null
ip netns exec "${tag}s" ethtool -K snd0 gro on >/dev/null
cat > "$work/rules.yaml" <<YAML
control: $work/relay.sock
rules:
  - name: b
    input: { interface: rin, group: 239.1.1.1, port: 5000 }
    outputs: [ { interface: rout0 } ]
YAML
for rate in 50000 0; do
    ip netns exec "${tag}r" strace -f -c -o "$work/strace" "$bin/relay" --config "$work/rules.yaml" \
        >"$work/report" 2>"$work/log" &
    pid=$!
    for _ in $(seq 50); do [ -S "$work/relay.sock" ] && break; sleep 0.1; done
    ip netns exec "${tag}s" "$bin/relay-gen" send --group 239.1.1.1 --port 5000 \
        --source 198.18.1.1 --rate "$rate" --duration 3 --afxdp snd0 --cpu 0 >/dev/null
    sleep 0.5
    pkill -TERM -f "relay --config $work/rules.yaml"
    wait "$pid" || true
    sent=$(grep -o 'output=rout0 .* sent=[0-9]*' "$work/report" | grep -o 'sent=[0-9]*$' | cut -d= -f2)
    echo "rate $([ "$rate" = 0 ] && echo 'flat out' || echo "$rate pps"): $sent frames forwarded"
    awk -v sent="$sent" 'NR > 2 && $NF != "total" && $4 ~ /^[0-9]+$/ {
        printf "  %-12s %9d  %8.2f per 1000 frames\n", $NF, $4, $4 * 1000 / sent }' \
        "$work/strace" | sort -k2 -n -r | head -8
done
# The floor forwarder (tests/src/bin/relay-floor.rs, built with `cargo xtask build-gen` or
# the bench) the same way: what AF_XDP itself asks of a forwarder on this setup.
[ -x "$bin/relay-floor" ] || { echo "no $bin/relay-floor: run cargo xtask bench once"; exit 0; }
for rate in 50000 0; do
    ip netns exec "${tag}r" strace -f -c -o "$work/strace" "$bin/relay-floor" rin rout0 \
        239.1.1.1 5000 >"$work/report" 2>"$work/log" &
    pid=$!
    for _ in $(seq 50); do grep -q forwarding "$work/report" 2>/dev/null && break; sleep 0.1; done
    ip netns exec "${tag}s" "$bin/relay-gen" send --group 239.1.1.1 --port 5000 \
        --source 198.18.1.1 --rate "$rate" --duration 3 --afxdp snd0 --cpu 0 >/dev/null
    sleep 0.5
    pkill -TERM -f "relay-floor rin rout0" || true
    wait "$pid" || true
    sent=$(grep -o 'sent=[0-9]*' "$work/report" | cut -d= -f2)
    echo "floor, rate $([ "$rate" = 0 ] && echo 'flat out' || echo "$rate pps"): $sent frames forwarded"
    awk -v sent="$sent" 'NR > 2 && $NF != "total" && $4 ~ /^[0-9]+$/ {
        printf "  %-12s %9d  %8.2f per 1000 frames\n", $NF, $4, $4 * 1000 / sent }' \
        "$work/strace" | sort -k2 -n -r | head -8
done
