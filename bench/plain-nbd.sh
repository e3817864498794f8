# Sourced by the bench scripts. `plain_nbd BIN`: the `basalt cluster up` arguments that make
# its gateways serve plain `nbd://` too (`--nbd-tls optional`), for builds that have the flag
# (older ones always did). The benches drive fio's nbd engine with plain URIs, as Ceph's NBD
# path in `vs-ceph.sh` is plain; `tls.sh` measures what encryption costs.
plain_nbd() {
  if "$1/basalt" cluster up --help 2>/dev/null | grep -q -- '--nbd-tls'; then
    echo --nbd-tls optional
  fi
}
