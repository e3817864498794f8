#!/usr/bin/env python3
"""One line from fio's JSON output on stdin: IOPS, MiB/s and mean completion latency of the
job's write side if it wrote, else its read side (the bench scripts' common row).
With --p99 the line also has the 99th percentile latency."""
import json
import sys

text = sys.stdin.read()
job = json.loads(text[text.index("{"):])["jobs"][0]
io = job["write"] if job["write"]["io_bytes"] else job["read"]
line = "%8.0f IOPS %7.1f MiB/s  avg %6.2f ms" % (io["iops"], io["bw"] / 1024, io["clat_ns"]["mean"] / 1e6)
if "--p99" in sys.argv[1:]:
    line += "  p99 %6.2f ms" % (io["clat_ns"]["percentile"]["99.000000"] / 1e6)
print(line)
