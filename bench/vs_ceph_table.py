#!/usr/bin/env python3
"""The table of bench/vs-ceph.sh: Ceph's rows (ceph-baseline.sh's rows.tsv) beside basalt's
(the same fio jobs through basalt-gw), ratios to Ceph's faster path, CPU per op, peak RSS,
load, and basalt's per-stage latency breakdown from its Prometheus histograms."""

import argparse
import collections
import datetime
import os
import re

WORKLOADS = [
    "randwrite-4k-qd1",
    "randwrite-4k-qd32",
    "randread-4k-qd32",
    "seqwrite-1m-qd4",
    "seqread-1m-qd4",
]
# DESIGN §C: basalt ÷ Ceph's faster path.
GOALS = {
    "randwrite-4k-qd1": 5,
    "randwrite-4k-qd32": 10,
    "randread-4k-qd32": 3,
    "seqwrite-1m-qd4": 2,
    "seqread-1m-qd4": 2,
}
NCPU = os.cpu_count() or 1
BUSY_OTHERS_PCT = 10


def rows(path):
    """group -> test -> dict of one rows.tsv line."""
    out = collections.defaultdict(dict)
    with open(path) as f:
        for line in f:
            p = line.rstrip("\n").split("\t")
            if len(p) < 8:
                continue
            out[p[0]][p[1]] = dict(
                iops=p[2], mibs=p[3], avg=p[4], p50=p[5], p99=p[6], note=p[7]
            )
    return out


def num(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def cpu_shares(note):
    """(ours %, others %) from the harness's 'cpu: ours N%, others N%, steal N%' note."""
    m = re.search(r"ours (\d+)%, others (\d+)%", note or "")
    return (int(m.group(1)), int(m.group(2))) if m else (None, None)


def cpu_us_per_op(row):
    """CPU time of the whole stack (daemons, NBD server, fio) per I/O, in µs: the share of
    the machine it used while the job ran, times the cores, over the ops per second."""
    ours, _ = cpu_shares(row.get("note"))
    iops = num(row.get("iops"))
    if ours is None or not iops:
        return None
    return ours / 100 * NCPU / iops * 1e6


def figure(test, row):
    if row is None or num(row["iops"]) is None:
        return None
    return num(row["mibs"]) if test.startswith("seq") else num(row["iops"])


def fmt(v, unit=""):
    if v is None:
        return "–"
    if v >= 100:
        return f"{v:,.0f}{unit}"
    return f"{v:.1f}{unit}" if v >= 10 else f"{v:.2f}{unit}"


def samples(path):
    """[(t, comm, pid, rss_kib, load1)] from the sampler."""
    out = []
    with open(path) as f:
        for line in f:
            p = line.split("\t")
            if len(p) == 5 and p[1] != "-":
                out.append((int(p[0]), p[1], p[2], int(p[3]), float(p[4])))
            elif len(p) == 5:
                out.append((int(p[0]), None, None, 0, float(p[4])))
    return out


def peak_rss(smp, comms):
    """comm -> highest RSS (MiB) any one process of it reached, and the highest sum."""
    per = collections.defaultdict(int)
    total_at = collections.defaultdict(int)
    for t, comm, pid, rss, _ in smp:
        if comm in comms:
            per[comm] = max(per[comm], rss)
            total_at[t] += rss
    return {c: v / 1024 for c, v in per.items()}, max(total_at.values(), default=0) / 1024


def memory_table(smp, a):
    """Per daemon: basalt's peak RSS (VmHWM at the end of its run) and Ceph's RSS at teardown
    (what its harness records), plus the highest RSS the 1 s sampler saw for each kind."""
    basalt = []
    p = os.path.join(a.basalt, "peak-rss.tsv")
    if os.path.exists(p):
        for line in open(p):
            n, pid, kib = line.split()
            basalt.append((f"{n} (pid {pid})", int(kib) / 1024))
    ceph = []
    p = os.path.join(a.ceph, "raw", "resources.txt")
    if os.path.exists(p):
        for line in open(p):
            f = line.split()
            if len(f) == 4 and f[0].startswith(("ceph-", "qemu-")) and f[3].isdigit():
                ceph.append((f"{f[0]} (pid {f[1]})", float(f[3])))
    print("Memory (MiB): basalt's peak RSS per daemon (VmHWM), Ceph's RSS at teardown per daemon "
          "(recorded by its harness), and the peak per kind of daemon seen by a 1 s sampler:\n")
    print("| Ceph daemon | RSS at teardown | basalt daemon | peak RSS |")
    print("|---|---:|---|---:|")
    for i in range(max(len(ceph), len(basalt))):
        c = ceph[i] if i < len(ceph) else ("", None)
        b = basalt[i] if i < len(basalt) else ("", None)
        print(f"| {c[0]} | {fmt(c[1]) if c[1] else ''} | {b[0]} | {fmt(b[1]) if b[1] else ''} |")
    cp, ct = peak_rss(smp, {"ceph-mon", "ceph-mgr", "ceph-osd", "qemu-nbd"})
    bp, bt = peak_rss(smp, {"basalt-mon", "basalt-osd", "basalt-gw"})
    if cp or bp:
        kinds = ", ".join(f"{k} {fmt(v)}" for k, v in sorted({**cp, **bp}.items()))
        print(f"\nSampled peaks per kind: {kinds}; all daemons together: Ceph {fmt(ct)}, basalt {fmt(bt)}.")
    else:
        print("\n(The 1 s sampler recorded nothing in this run.)")
    print()


def ceph_job_windows(results):
    """test name (group/test) -> (start epoch, end epoch) from the harness's run.log."""
    path = os.path.join(results, "run.log")
    starts = []
    if not os.path.exists(path):
        return {}
    today = datetime.datetime.fromtimestamp(os.path.getmtime(path)).date()
    with open(path) as f:
        for line in f:
            m = re.match(r"\[(\d\d):(\d\d):(\d\d) \+\s*\d+s\] (.*)", line)
            if not m:
                continue
            hh, mm, ss, what = int(m[1]), int(m[2]), int(m[3]), m[4]
            t = datetime.datetime.combine(today, datetime.time(hh, mm, ss)).timestamp()
            starts.append((t, what))
    # A line stamped later than the log's last write belongs to the previous day.
    fixed = []
    last = os.path.getmtime(path)
    for t, what in starts:
        fixed.append((t - 86400 if t > last + 60 else t, what))
    out = {}
    for i, (t, what) in enumerate(fixed):
        m = re.match(r"fio (\S+)", what)
        if m:
            end = fixed[i + 1][0] if i + 1 < len(fixed) else t
            out[m[1]] = (t, end)
    return out


def load_in(smp, window):
    if not window:
        return None
    vals = [l for t, _, _, _, l in smp if window[0] <= t <= window[1]]
    return max(vals) if vals else None


METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([-+0-9.eEinfNa]+)$")


def scrape(path):
    """(metric, labels without export) -> summed value over every daemon."""
    out = collections.defaultdict(float)
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            m = METRIC.match(line.strip())
            if not m or not (m[1].endswith("_sum") or m[1].endswith("_count")):
                continue
            labels = tuple(
                sorted(
                    (k, v)
                    for k, v in re.findall(r'(\w+)="([^"]*)"', m[2] or "")
                    if k != "export"
                )
            )
            out[(m[1], labels)] += float(m[3])
    return out


STAGES = [
    ("basalt_nbd_request_seconds", ("op", "write"), "gateway: NBD write request (receive → reply queued)"),
    ("basalt_nbd_request_seconds", ("op", "read"), "gateway: NBD read request"),
    ("basalt_rbd_stage_seconds", ("stage", "admit"), "gateway: exclusive-lock admission"),
    ("basalt_rbd_stage_seconds", ("stage", "write_objects"), "gateway: object writes of one request"),
    ("basalt_client_op_stage_seconds", ("stage", "encode"), "client: encode"),
    ("basalt_client_op_stage_seconds", ("stage", "op"), "client: whole op (route, resend)"),
    ("basalt_client_op_stage_seconds", ("stage", "rpc"), "client: one RPC (sent → reply)"),
    ("basalt_osd_client_op_seconds", ("kind", "write"), "primary: write op (handler)"),
    ("basalt_osd_client_op_seconds", ("kind", "read"), "primary: read op (handler)"),
    ("basalt_osd_op_stage_seconds", ("stage", "queue"), "primary: queue (to object lock, PG active)"),
    ("basalt_osd_op_stage_seconds", ("stage", "dup_check"), "primary: dup check"),
    ("basalt_osd_op_stage_seconds", ("stage", "execute"), "primary: execute"),
    ("basalt_osd_op_stage_seconds", ("stage", "local_apply"), "primary: local apply (visible)"),
    ("basalt_osd_op_stage_seconds", ("stage", "local_sync"), "primary: local journal sync"),
    ("basalt_osd_op_stage_seconds", ("stage", "replica_wait"), "primary: slowest replica after local sync"),
    ("basalt_osd_sub_op_seconds", None, "replica: sub-op (handler)"),
    ("basalt_osd_op_stage_seconds", ("stage", "sub_op_decode"), "replica: decode"),
    ("basalt_osd_op_stage_seconds", ("stage", "sub_op_apply"), "replica: apply (after ordering wait)"),
    ("basalt_osd_op_stage_seconds", ("stage", "sub_op_sync"), "replica: journal sync"),
    ("basalt_osd_commit_seconds", None, "primary or replica: apply + sync of one write"),
    ("basalt_store_stage_seconds", ("stage", "build"), "store: build (blocks, extents; whole chunks written)"),
    ("basalt_store_stage_seconds", ("stage", "queue"), "store: wait for the committer thread"),
    ("basalt_store_stage_seconds", ("stage", "append"), "store: committer's group append + apply"),
    ("basalt_store_stage_seconds", ("stage", "journal_write"), "store: journal pwrite of a group"),
    ("basalt_store_stage_seconds", ("stage", "journal_sync"), "store: syncer's journal fdatasync"),
    ("basalt_store_stage_seconds", ("stage", "checkpoint"), "store: checkpoint (stalls the committer)"),
    ("basalt_store_group_commit_transactions", None, "store: transactions per group commit (mean, not µs)"),
]


def stage_means(raw, test):
    before = scrape(os.path.join(raw, f"metrics-before-{test}.txt"))
    after = scrape(os.path.join(raw, f"metrics-after-{test}.txt"))

    def delta(name, suffix, want):
        total = 0.0
        for (m, labels), v in after.items():
            if m != name + suffix:
                continue
            if want and want not in labels:
                continue
            total += v - before.get((m, labels), 0.0)
        return total

    out = {}
    for name, want, label in STAGES:
        n = delta(name, "_count", want)
        s = delta(name, "_sum", want)
        if n > 0:
            scale = 1 if name == "basalt_store_group_commit_transactions" else 1e6
            out[label] = (s / n * scale, n)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ceph", required=True)
    ap.add_argument("--basalt", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--before", help="results of an earlier basalt build, measured in the same run")
    ap.add_argument("--ceph-reused", default="0")
    ap.add_argument("--runtime", default="20")
    a = ap.parse_args()
    ceph = rows(os.path.join(a.ceph, "raw", "rows.tsv"))
    bas = rows(os.path.join(a.basalt, "rows.tsv"))["basalt"]
    before = rows(os.path.join(a.before, "rows.tsv"))["basalt"] if a.before else None
    smp = samples(a.samples)
    windows = ceph_job_windows(a.ceph)
    bas_load = {}
    lp = os.path.join(a.basalt, "loadavg.tsv")
    if os.path.exists(lp):
        for line in open(lp):
            p = line.rstrip("\n").split("\t")
            bas_load[p[0]] = p[1].split()[0]

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# basalt vs Ceph 16, side by side ({now})\n")
    print(
        f"Machine: {NCPU} cores, {os.uname().release}; everything (daemons, NBD server, fio) on it. "
        f"fio {a.runtime} s per job (+2 s ramp), `--randrepeat=0 --norandommap`, total latency `lat_ns`. "
        "Ceph: 1 mon + 1 mgr + 3 BlueStore OSDs, pool rbd size 3 / min_size 2, 32 PGs, cephx on, rbd_cache off "
        "(`../shared/bench/ceph-baseline.sh`). basalt: 1 monitor, 3 OSDs on 3 hosts, pool rbd size 3 / "
        "min_size 2, 32 PGs, one basalt-gw (fio `ioengine=nbd`). Both 2 GiB images filled sequentially first. "
        "Disk: fio on a plain file on the same disk, O_DIRECT, writes O_DSYNC.\n"
    )
    if a.ceph_reused == "1":
        print(f"**The Ceph figures were reused from an earlier run ({a.ceph}), not measured in this run.**\n")

    bcol = "basalt before (÷ Ceph) | " if before else ""
    print(f"| workload | Ceph via NBD | Ceph via librbd | disk | {bcol}basalt | basalt ÷ Ceph's faster | goal | CPU µs/op Ceph (faster path) | CPU µs/op basalt | load avg Ceph / basalt |")
    print("|---|---:|---:|---:|" + ("---:|" if before else "") + "---:|---:|---:|---:|---:|---|")
    busy = []
    for w in WORKLOADS:
        unit = " MiB/s" if w.startswith("seq") else ""
        nbd, rbd, disk, b = (ceph.get("nbd", {}).get(w), ceph.get("rbd", {}).get(w),
                             ceph.get("file", {}).get(w), bas.get(w))
        fn, fr, fd, fb = figure(w, nbd), figure(w, rbd), figure(w, disk), figure(w, b)
        faster_row, faster = max(((nbd, fn), (rbd, fr)), key=lambda x: x[1] or -1)
        ratio = fb / faster if fb and faster else None
        lc = load_in(smp, windows.get(f"{'rbd' if faster_row is rbd else 'nbd'}/{w}"))
        lb = bas_load.get(w)
        for who, row in (("Ceph nbd", nbd), ("Ceph librbd", rbd), ("basalt", b)):
            _, others = cpu_shares(row.get("note") if row else None)
            if others is not None and others > BUSY_OTHERS_PCT:
                busy.append(f"{who} {w} (other processes used {others}% of the machine)")
        bcell = ""
        if before:
            fbb = figure(w, before.get(w))
            bcell = f"{fmt(fbb, unit)} ({'%.2f×' % (fbb / faster) if fbb and faster else '–'}) | "
        print(
            f"| {w} | {fmt(fn, unit)} | {fmt(fr, unit)} | {fmt(fd, unit)} | {bcell}{fmt(fb, unit)} | "
            f"{'%.2f×' % ratio if ratio else '–'} | ≥ {GOALS[w]}× | {fmt(cpu_us_per_op(faster_row or {}))} | "
            f"{fmt(cpu_us_per_op(b or {}))} | {fmt(lc) if lc is not None else '–'} / {lb or '–'} |"
        )
    print()
    print("Latency (ms, fio total `lat_ns`): avg / p99")
    print()
    print("| workload | Ceph via NBD | Ceph via librbd | disk | basalt |")
    print("|---|---|---|---|---|")
    for w in WORKLOADS:
        cells = []
        for row in (ceph.get("nbd", {}).get(w), ceph.get("rbd", {}).get(w),
                    ceph.get("file", {}).get(w), bas.get(w)):
            cells.append(f"{row['avg']} / {row['p99']}" if row else "–")
        print(f"| {w} | " + " | ".join(cells) + " |")
    print()
    if busy:
        print("**Busy machine** (another process used > 10 % of the CPU) during: " + "; ".join(busy) + ".\n")
    else:
        print("No job ran beside another process using more than 10 % of the machine.\n")

    memory_table(smp, a)
    print(
        "CPU µs/op: the harness's `cpu: ours N%` (share of the whole machine used by the system's "
        f"daemons, its NBD server and fio while the job ran) × {NCPU} cores ÷ IOPS.\n"
    )

    print("## basalt: where the time goes (mean µs per event, from the daemons' Prometheus histograms)\n")
    means = {w: stage_means(a.basalt, w) for w in WORKLOADS}
    labels = [l for _, _, l in STAGES if any(l in means[w] for w in WORKLOADS)]
    print("| stage | " + " | ".join(WORKLOADS) + " |")
    print("|---|" + "---:|" * len(WORKLOADS))
    for l in labels:
        cells = []
        for w in WORKLOADS:
            v = means[w].get(l)
            cells.append(fmt(v[0]) if v else "–")
        print(f"| {l} | " + " | ".join(cells) + " |")
    print()
    print(
        "Stages overlap (a primary's write op contains its local commit and the replica wait; "
        "a replica's sub-op contains its commit; store stages are inside commits). Means are over "
        "every event in the job's window, counted on all daemons together.\n"
    )
    profile(a.basalt)


def profile(raw):
    """The top of the CPU profile, if one was taken."""
    top = os.path.join(raw, "perf-top.txt")
    comm = os.path.join(raw, "perf-comm.txt")
    if not os.path.exists(top) or os.path.getsize(top) == 0:
        return
    print("## basalt: CPU profile of 4k randwrite QD32 (`perf record -a -e cpu-clock`, whole machine)\n")
    if os.path.exists(comm):
        print("By process:\n")
        print("```")
        print(open(comm).read().rstrip())
        print("```\n")
    print("Top symbols (share of all samples; process, object, symbol):\n")
    print("```")
    print("\n".join(open(top).read().splitlines()[:25]))
    print("```\n")


if __name__ == "__main__":
    main()
