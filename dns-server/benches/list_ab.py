#!/usr/bin/env python3
"""A/B of the v1 list answer: two dns-server binaries side by side, each filled with N
membranes in one namespace (16 writers), then 3 rounds x 10 lists alternating; prints each
round's median/min latency and the server's CPU ticks so far (ticks per round = CPU per 10 lists).

Run: python3 dns-server/benches/list_ab.py OLD_BINARY NEW_BINARY [N=20000]
"""
import http.client, json, os, subprocess, sys, tempfile, time, re
def start(binary):
    d = tempfile.mkdtemp()
    p = subprocess.Popen([binary, "--data-dir", d + "/data", "--http-listen", "127.0.0.1:0", "--dns-listen", "127.0.0.1:0"],
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "MEMBRANE_LOG": "info"})
    addr = None
    for line in p.stderr:
        m = re.search(r"listening http (\S+)", line)
        if m: addr = m.group(1)
        if " ready" in line: break
    import threading
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    return p, addr
def fill(addr, n):
    import threading
    ts = [threading.Thread(target=fill_part, args=(addr, range(k, n, 16))) for k in range(16)]
    [t.start() for t in ts]; [t.join() for t in ts]
def fill_part(addr, part):
    h, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(h, int(port))
    for i in part:
        body = json.dumps({"addresses": ["10.%d.%d.%d" % (i >> 16 & 255, i >> 8 & 255, i & 255)],
                           "services": [{"name": "perception", "port": 7000}], "capabilities": ["vision"],
                           "metadata": {"zone": "a"}, "ttl_seconds": 3600})
        c.request("PUT", "/v1/namespaces/big/membranes/m%d" % i, body, {"content-type": "application/json"})
        r = c.getresponse(); r.read()
        assert r.status in (200, 201), r.status
def lists(addr, k):
    h, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(h, int(port))
    ts = []
    for _ in range(k):
        t = time.perf_counter()
        c.request("GET", "/v1/namespaces/big/membranes"); r = c.getresponse(); b = r.read()
        ts.append(time.perf_counter() - t)
    return sorted(ts), len(b)
n = int(sys.argv[3]) if len(sys.argv) > 3 else 20000
procs = {}
for name, binary in (("old", sys.argv[1]), ("new", sys.argv[2])):
    p, addr = start(binary)
    fill(addr, n)
    procs[name] = (p, addr)
for rnd in range(3):
    for name in ("old", "new"):
        p, addr = procs[name]
        ts, size = lists(addr, 10)
        cpu = sum(int(x) for x in open("/proc/%d/stat" % p.pid).read().split(")")[1].split()[11:13])
        print("round %d %s: list of %d membranes (%d bytes): median %.1f ms, min %.1f ms; server cpu ticks so far %d"
              % (rnd, name, n, size, ts[len(ts)//2]*1000, ts[0]*1000, cpu), flush=True)
for p, _ in procs.values(): p.terminate()
