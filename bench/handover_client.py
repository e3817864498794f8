#!/usr/bin/python3
"""The client of bench/handover.sh: one image, two gateways, REPS exclusive-lock hand-overs.

Usage: handover_client.py URI_A URI_B REPS OUT.tsv [disconnect|stay]

Both gateways are connected before the first repetition, as QEMU's destination connects before
the switch-over. Each repetition, the client on the gateway that holds the lock (the source)
writes a few records, then is timed: FLUSH (`flush`), NBD_CMD_DISC and close (`disconnect`),
and the destination's first write at once (`first_write`, its lock acquisition included);
`gap` is the whole span from the FLUSH being sent to that write's reply. The source then
reconnects, outside the timed span, and becomes the next repetition's destination, so the
lock crosses back and forth. At the end every record written is read back through one
gateway and compared byte for byte; a mismatch exits 1.

Mode `stay` (QEMU's way: a migrated-away VM's QEMU keeps its connection until it quits)
keeps the source connected through the destination's first write (`disconnect` is then 0);
the source's gateway must be asked for the lock.

Timing is libnbd's own (time.perf_counter around synchronous libnbd calls on connected
handles): no tool start-up is inside any figure.
"""
import sys
import time

import nbd

RECORD = 64 * 1024
RECORDS_PER_REP = 4


def connect(uri):
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def record(rep, k):
    tag = f"rep {rep:06d} record {k} ".encode()
    return (tag * (RECORD // len(tag) + 1))[:RECORD]


def main():
    uris = [sys.argv[1], sys.argv[2]]
    reps = int(sys.argv[3])
    out = open(sys.argv[4], "w")
    mode = sys.argv[5] if len(sys.argv) > 5 else "disconnect"
    if mode not in ("disconnect", "stay"):
        sys.exit(f"mode must be disconnect or stay, not {mode!r}")
    handles = [connect(u) for u in uris]
    size = handles[0].get_size()
    slots = size // RECORD
    if slots < 2 * RECORDS_PER_REP:
        sys.exit(f"image of {size} bytes is too small for {RECORDS_PER_REP} {RECORD}-byte records")
    expected = {}  # slot -> bytes

    def write(h, slot, data):
        h.pwrite(data, slot * RECORD)
        expected[slot] = data

    # Warm-up: gateway A takes the lock.
    src = 0
    write(handles[src], 0, record(0, 0))
    out.write("rep\tsource\tflush_ms\tdisconnect_ms\tfirst_write_ms\tgap_ms\n")
    next_slot = 1
    for rep in range(reps):
        dst = 1 - src
        for k in range(RECORDS_PER_REP):
            write(handles[src], next_slot % slots, record(rep, k))
            next_slot += 1
        first = record(rep, RECORDS_PER_REP)
        first_slot = next_slot % slots
        next_slot += 1
        t0 = time.perf_counter()
        handles[src].flush()
        t1 = time.perf_counter()
        if mode == "disconnect":
            handles[src].shutdown()
            handles[src] = None  # the last reference: libnbd closes the handle
        t2 = time.perf_counter()
        handles[dst].pwrite(first, first_slot * RECORD)
        t3 = time.perf_counter()
        if mode == "stay":
            handles[src].shutdown()
            handles[src] = None
        expected[first_slot] = first
        ms = lambda a, b: f"{(b - a) * 1e3:.3f}"
        out.write(f"{rep}\t{'AB'[src]}\t{ms(t0, t1)}\t{ms(t1, t2)}\t{ms(t2, t3)}\t{ms(t0, t3)}\n")
        out.flush()
        handles[src] = connect(uris[src])
        src = dst
    bad = [s for s, data in expected.items() if handles[src].pread(RECORD, s * RECORD) != data]
    for h in handles:
        h.shutdown()
    if bad:
        sys.exit(f"{len(bad)} of {len(expected)} records read back wrong (first at slot {bad[0]})")
    print(f"{reps} hand-overs ({mode}), {len(expected)} records verified", file=sys.stderr)


if __name__ == "__main__":
    main()
