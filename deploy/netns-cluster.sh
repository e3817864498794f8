#!/usr/bin/env bash
# A three-host basalt cluster on one machine, one network namespace per host.
#
#   deploy/netns-cluster.sh up     [DIR]   network + daemons (restarts stopped daemons of DIR)
#   deploy/netns-cluster.sh down   [DIR]   stop DIR's daemons, remove namespaces, veths, bridge
#   deploy/netns-cluster.sh cut    HOST    take HOST's link down (h3 or 3): a partitioned host
#   deploy/netns-cluster.sh heal   HOST    bring it back
#   deploy/netns-cluster.sh status [DIR]   daemons, links, and `basalt status`
#
# DIR defaults to ./var/netns-cluster. Needs root (ip netns, veth, bridge).
#
# Network: namespaces ${PREFIX}-h1..h3, each with a veth whose root-namespace end
# (${PREFIX}-v1..3) is a port of bridge ${PREFIX}-br0. Host N is $NET.N/24, the bridge
# (the root namespace, where the CLI runs) is $NET.254/24. No default route, no forwarding:
# nothing leaves the subnet. Each host runs basalt-mon (rank N-1, $NET.N:6789), two
# basalt-osd (--host hN --listen $NET.N:0) and basalt-gw ($NET.N:10809); metrics on
# $NET.N:9280 (mon), 9281-9282 (OSDs), 9283 (gateway).
#
# DIR/cluster.toml is written on first `up` with short test timeouts (beacon 300 ms,
# grace 2 s) so failures are noticed quickly; BASALT_NETNS_TIMEOUTS=default keeps the
# production defaults instead. Data, logs and pid files: DIR/hN/{mon,osd0,osd1}/,
# DIR/hN/*.log, DIR/hN/*.pid.
#
# Environment: BASALT_BIN_DIR (default ~/.cache/basalt-target/release),
# BASALT_NETNS_PREFIX (default basalt; at most 8 characters),
# BASALT_NETNS_NET (first three octets of a private /24, default 10.77.0),
# BASALT_NETNS_OSD_CAPACITY (bytes: each OSD's --capacity-bytes; unset, the OSDs report
# the use of the disk DIR is on, and all six share it, so a crowded disk makes them
# nearfull or full).
set -euo pipefail

PREFIX=${BASALT_NETNS_PREFIX:-basalt}
NET=${BASALT_NETNS_NET:-10.77.0}
BIN=${BASALT_BIN_DIR:-$HOME/.cache/basalt-target/release}
HOSTS=3
OSDS_PER_HOST=2
BR=${PREFIX}-br0

die() { echo "netns-cluster: $*" >&2; exit 1; }
say() { echo "netns-cluster: $*" >&2; }

[[ ${#PREFIX} -le 8 && $PREFIX =~ ^[a-z][a-z0-9]*$ ]] ||
    die "BASALT_NETNS_PREFIX must be 1-8 lower-case letters/digits (interface names are limited to 15 characters)"
# Only private 10/8 or 192.168/16 /24s: nothing this script sets up can reach another network.
[[ $NET =~ ^10\.[0-9]{1,3}\.[0-9]{1,3}$ || $NET =~ ^192\.168\.[0-9]{1,3}$ ]] ||
    die "BASALT_NETNS_NET must be the first three octets of a private /24 (10.x.y or 192.168.y)"

ns() { echo "${PREFIX}-h$1"; }
veth_root() { echo "${PREFIX}-v$1"; }
veth_ns() { echo "${PREFIX}-p$1"; }

host_num() {
    local h=${1#h}
    [[ $h =~ ^[1-3]$ ]] || die "HOST must be h1, h2 or h3 (or 1..3), got '$1'"
    echo "$h"
}

abs_dir() {
    local d=${1:-var/netns-cluster}
    mkdir -p "$d"
    (cd "$d" && pwd)
}

need_root() { [[ $(id -u) -eq 0 ]] || die "needs root (ip netns, veth, bridge)"; }

ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }
link_exists() { ip link show dev "$1" >/dev/null 2>&1; }

# The OSD id of host N's K-th OSD: its key (osd.ID) exists before it first boots.
osd_id() { echo $((($1 - 1) * OSDS_PER_HOST + $2)); }

# Writes DIR's keyrings on first `up` (as `basalt cluster up` does): DIR/keyring
# (client.admin, read by the CLI beside the config), DIR/osd.ID.keyring and
# DIR/gw-hN.keyring (each daemon's own key), and DIR/mon.keyring (the monitors' shared
# `mon.` key plus every key above: the first leader seeds the auth database from it).
write_keyrings() {
    local dir=$1 n k id
    [[ -f $dir/mon.keyring ]] && return 0
    [[ -x $BIN/basalt ]] || die "$BIN/basalt is missing (set BASALT_BIN_DIR)"
    gen() { "$BIN/basalt" keyring gen "$@" 2>/dev/null || die "cannot write keyring $1"; }
    rm -f "$dir/keyring" "$dir/mon.keyring.tmp" "$dir"/osd.*.keyring "$dir"/gw-h*.keyring
    gen "$dir/keyring" client.admin mon 'allow *' osd 'allow *'
    cp "$dir/keyring" "$dir/mon.keyring.tmp"
    gen "$dir/mon.keyring.tmp" mon. mon 'allow *'
    for ((n = 1; n <= HOSTS; n++)); do
        for ((k = 0; k < OSDS_PER_HOST; k++)); do
            id=$(osd_id "$n" "$k")
            gen "$dir/osd.$id.keyring" "osd.$id" mon 'allow profile osd' osd 'allow *'
            cat "$dir/osd.$id.keyring" >>"$dir/mon.keyring.tmp"
        done
        gen "$dir/gw-h$n.keyring" "client.gw-h$n" mon 'allow profile rbd' osd 'allow profile rbd'
        cat "$dir/gw-h$n.keyring" >>"$dir/mon.keyring.tmp"
    done
    chmod 600 "$dir/mon.keyring.tmp"
    mv "$dir/mon.keyring.tmp" "$dir/mon.keyring"
}

# Daemons of host N: "name binary args..." lines.
daemons() {
    local n=$1 dir=$2 conf=$2/cluster.toml ip=$NET.$1
    # The host's certificate (write_certificates), served by its monitor and OSDs.
    local tls="--tls-cert $dir/tls/h$n-cert.pem --tls-key $dir/tls/h$n-key.pem"
    echo "mon basalt-mon --config $conf --id $((n - 1)) --metrics $ip:9280 $tls"
    local k
    for ((k = 0; k < OSDS_PER_HOST; k++)); do
        echo "osd$k basalt-osd --config $conf --data $dir/h$n/osd$k --host h$n --listen $ip:0 --keyring $dir/osd.$(osd_id "$n" "$k").keyring --metrics $ip:$((9281 + k))${BASALT_NETNS_OSD_CAPACITY:+ --capacity-bytes $BASALT_NETNS_OSD_CAPACITY} $tls"
    done
    echo "gw basalt-gw --config $conf --listen $ip:10809 --name client.gw-h$n --keyring $dir/gw-h$n.keyring --metrics $ip:9283"
}

# The pid in DIR/hN/NAME.pid if that process is alive and is a basalt daemon of DIR.
live_pid() {
    local dir=$1 n=$2 name=$3 pid
    pid=$(cat "$dir/h$n/$name.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    local cmd
    cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
    [[ $cmd == */basalt-*" --config $dir/cluster.toml "* ]] || return 1
    echo "$pid"
}

net_up() {
    # Refuse a subnet some other interface already uses.
    local other
    other=$(ip -4 -o addr show | awk -v net="$NET." -v br="$BR" 'index($4, net) == 1 && $2 != br {print $2}')
    [[ -z $other ]] || die "$NET.0/24 is already used by interface(s) $other; set BASALT_NETNS_NET"
    if ! link_exists "$BR"; then
        ip link add "$BR" type bridge
        ip addr add "$NET.254/24" dev "$BR"
    fi
    ip link set "$BR" up
    local n
    for ((n = 1; n <= HOSTS; n++)); do
        local name vr vn
        name=$(ns "$n") vr=$(veth_root "$n") vn=$(veth_ns "$n")
        ns_exists "$name" || ip netns add "$name"
        ip -n "$name" link set lo up
        if ! link_exists "$vr"; then
            ip link add "$vr" type veth peer name "$vn"
            ip link set "$vn" netns "$name"
            ip -n "$name" addr add "$NET.$n/24" dev "$vn"
        fi
        ip link set "$vr" master "$BR"
        ip link set "$vr" up
        ip -n "$name" link set "$vn" up
    done
}

write_config() {
    local dir=$1 conf=$1/cluster.toml
    [[ -f $conf ]] && return 0
    local fsid n
    fsid=$(cat /proc/sys/kernel/random/uuid)
    {
        echo "# Written by deploy/netns-cluster.sh: three hosts in network namespaces."
        echo "[cluster]"
        echo "name = \"basalt\""
        echo "fsid = \"$fsid\""
        for ((n = 1; n <= HOSTS; n++)); do
            echo
            echo "[[mon]]"
            echo "rank = $((n - 1))"
            echo "addr = \"$NET.$n:6789\""
            echo "data = \"$dir/h$n/mon\""
        done
        if [[ ${BASALT_NETNS_TIMEOUTS:-short} != default ]]; then
            cat <<'EOF'

# Short timeouts (the test harness's test_timeouts()): a cut host's OSDs are marked
# down about two seconds after its link goes down.
[timeouts]
election_timeout_ms = 1000
lease_ms = 1000
propose_interval_ms = 20
osd_beacon_interval_ms = 300
osd_beacon_grace_ms = 2000
osd_heartbeat_interval_ms = 300
osd_heartbeat_grace_ms = 2000
min_down_reporters = 2
down_out_interval_secs = 600
client_op_timeout_ms = 20000
osd_op_timeout_ms = 20000
EOF
        fi
    } >"$conf.tmp"
    mv "$conf.tmp" "$conf"
}

# TLS is on by default ([tls] in cluster.toml): a cluster CA in DIR/tls (its certificate at
# tls/ca-cert.pem beside cluster.toml, where clients look by default) and one certificate
# per host for its address, made once with the CLI (`basalt tls ca|issue`).
write_certificates() {
    local dir=$1 n
    [[ -f $dir/tls/ca-cert.pem ]] || "$BIN/basalt" tls ca --dir "$dir/tls" >/dev/null
    for ((n = 1; n <= HOSTS; n++)); do
        [[ -f $dir/tls/h$n-cert.pem ]] && continue
        "$BIN/basalt" tls issue "h$n" --ca-dir "$dir/tls" --addr "$NET.$n" \
            --cert "$dir/tls/h$n-cert.pem" --key "$dir/tls/h$n-key.pem" >/dev/null
    done
}

start_daemons() {
    local dir=$1 n
    for ((n = 1; n <= HOSTS; n++)); do
        mkdir -p "$dir/h$n"
        local name bin args
        while read -r name bin args; do
            if pid=$(live_pid "$dir" "$n" "$name"); then
                continue
            fi
            [[ -x $BIN/$bin ]] || die "$BIN/$bin is missing (set BASALT_BIN_DIR)"
            # `ip netns exec` and `setsid` both exec (no fork) here, so $! is the daemon's
            # pid; setsid detaches it from this terminal's session.
            # shellcheck disable=SC2086
            RUST_LOG=${RUST_LOG:-info} NO_COLOR=1 \
                ip netns exec "$(ns "$n")" setsid "$BIN/$bin" $args \
                </dev/null >>"$dir/h$n/$name.log" 2>&1 &
            echo $! >"$dir/h$n/$name.pid"
            say "started h$n/$name (pid $!)"
        done < <(daemons "$n" "$dir")
    done
}

# Runs the CLI from the root namespace against DIR's cluster.
cli() {
    local dir=$1
    shift
    "$BIN/basalt" --config "$dir/cluster.toml" "$@"
}

wait_serving() {
    local dir=$1 want=$((HOSTS * OSDS_PER_HOST)) deadline=$((SECONDS + 180)) up=""
    say "waiting for monitor quorum and $want OSDs up..."
    while ((SECONDS < deadline)); do
        up=$(cli "$dir" --timeout 5 status --format json 2>/dev/null |
            sed -n 's/.*"num_up_osds": *\([0-9]*\).*/\1/p' | head -1) || true
        if [[ -n $up && $up -ge $want ]]; then
            say "cluster is up: $want OSDs, client config $dir/cluster.toml"
            return 0
        fi
        sleep 1
    done
    die "gave up after 180 s waiting for quorum and OSDs (${up:-no answer}); logs in $dir/h*/"
}

cmd_up() {
    need_root
    local dir
    dir=$(abs_dir "${1:-}")
    for b in basalt basalt-mon basalt-osd basalt-gw; do
        [[ -x $BIN/$b ]] || die "$BIN/$b is missing (build the workspace or set BASALT_BIN_DIR)"
    done
    net_up
    write_config "$dir"
    write_keyrings "$dir"
    write_certificates "$dir"
    start_daemons "$dir"
    wait_serving "$dir"
    cat <<EOF
  client config: export BASALT_CONFIG=$dir/cluster.toml
  gateways:      nbd://$NET.1:10809/POOL/IMAGE (also .2, .3)
  partition:     $0 cut h3   /   $0 heal h3
  stop:          $0 down $dir
EOF
}

# Waits until 15 s after the group was sent SIGTERM for each pid to exit, then SIGKILLs it.
stop_pid() {
    local pid=$1 what=$2 deadline=$3
    while [[ -d /proc/$pid ]] && ((SECONDS < deadline)); do sleep 0.1; done
    if [[ -d /proc/$pid ]]; then
        kill -KILL "$pid" 2>/dev/null || true
        say "$what (pid $pid) ignored SIGTERM for 15 s; killed"
    else
        say "stopped $what"
    fi
}

cmd_down() {
    need_root
    local dir n
    dir=$(abs_dir "${1:-}")
    # Gateways first, monitors last (OSDs still find a quorum while they mark themselves down).
    local order=(gw) k
    for ((k = OSDS_PER_HOST - 1; k >= 0; k--)); do order+=("osd$k"); done
    order+=(mon)
    for name in "${order[@]}"; do
        local pids=()
        for ((n = 1; n <= HOSTS; n++)); do
            if pid=$(live_pid "$dir" "$n" "$name"); then
                kill -TERM "$pid" 2>/dev/null || true
                pids+=("$pid:h$n/$name")
            fi
            rm -f "$dir/h$n/$name.pid"
        done
        local deadline=$((SECONDS + 15))
        for p in "${pids[@]}"; do stop_pid "${p%%:*}" "${p#*:}" "$deadline"; done
    done
    for ((n = 1; n <= HOSTS; n++)); do
        local name
        name=$(ns "$n")
        if ns_exists "$name"; then
            # Anything still running in our namespace was started in it by this script.
            for pid in $(ip netns pids "$name" 2>/dev/null); do
                say "killing leftover pid $pid in $name"
                kill -KILL "$pid" 2>/dev/null || true
            done
            ip netns del "$name" || true
        fi
        # Deleting the namespace deletes its veth end and so the pair; be sure.
        if link_exists "$(veth_root "$n")"; then ip link del "$(veth_root "$n")" 2>/dev/null || true; fi
    done
    if link_exists "$BR"; then ip link del "$BR"; fi
    say "down: namespaces, veths and bridge removed (data kept in $dir)"
}

cmd_cut() {
    need_root
    local n
    n=$(host_num "${1:-}")
    ip link set "$(veth_root "$n")" down
    say "h$n cut off (link $(veth_root "$n") down)"
}

cmd_heal() {
    need_root
    local n
    n=$(host_num "${1:-}")
    ip link set "$(veth_root "$n")" up
    say "h$n reconnected (link $(veth_root "$n") up)"
}

cmd_status() {
    local dir n
    dir=$(abs_dir "${1:-}")
    for ((n = 1; n <= HOSTS; n++)); do
        local state=absent
        link_exists "$(veth_root "$n")" &&
            state=$(ip -o link show dev "$(veth_root "$n")" | grep -q '[<,]UP[,>]' && echo up || echo cut)
        echo "h$n ($(ns "$n"), $NET.$n): link $state"
        local name bin args
        while read -r name bin args; do
            if pid=$(live_pid "$dir" "$n" "$name"); then
                echo "  $name running (pid $pid)"
            else
                echo "  $name stopped"
            fi
        done < <(daemons "$n" "$dir")
    done
    [[ -f $dir/cluster.toml ]] && { cli "$dir" --timeout 10 status || true; }
}

case ${1:-} in
up) cmd_up "${2:-}" ;;
down) cmd_down "${2:-}" ;;
cut) cmd_cut "${2:-}" ;;
heal) cmd_heal "${2:-}" ;;
status) cmd_status "${2:-}" ;;
*)
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
