#!/usr/bin/env python3
"""Multi-host test on one machine: two gateway hosts and three backend hosts, each a network
namespace of its own, on one LAN (a bridge in a namespace of its own). Backend host be2 sits
behind a link with added delay from the start; backend host be3 is partitioned mid-test
(its packets vanish both ways: no RST, no FIN). Clients on each gateway host send the sample
request for the whole run. It checks that:

- no client request fails (the route retries idempotent requests on another endpoint and has
  a fallback target);
- the delayed host gets clearly less of the traffic than each of the others before the
  partition (`least_request` balancing);
- each gateway takes the partitioned host out of rotation within the detection bound
  (`limits.upstream_ping_interval` + the 5 s PING timeout + 2 s), and sends it no call after.

Usage: tests/netns/run.py [--seconds N] [--partition-at N] [--deadline 15s] [--keep]
Needs root: it creates namespaces, veth pairs and a bridge. Only the test's own namespaces
(named `syns<pid>-*`, addresses 10.213.0.0/24 that exist only inside them) and their
loopbacks are ever addressed; nothing is added to or changed in the host's own network
namespace. Everything is torn down at the end, on failure, and on SIGINT/SIGTERM; the
children die with the test (PR_SET_PDEATHSIG), and namespaces left by a test that was
killed outright are removed by the next run. SWITCHYARD_BIN overrides the binary
(default target/debug/switchyard).

The delay: the CI machine's kernel has no `sch_netem` (`tc qdisc add ... netem` says
"Specified qdisc kind is unknown"; of the qdiscs only fifo, tbf and htb are built, and no
classifier), so the delay is a small user-space link of our own (`delay-link`, below), the
same on every kernel: be2's veth ends in a namespace `dly` where a process holding an
AF_PACKET socket on each of two veths forwards every Ethernet frame to the other side
DELAY_MS later, both ways. The partition is `tc qdisc ... pfifo limit 0` (a queue that holds
nothing: every packet is dropped) on both ends of be3's link, which needs only `sch_fifo`.

Clients and scrapers are threads of this process that entered a gateway host's namespace
(setns(2) moves only the calling thread), so they address that namespace's 127.0.0.1.
"""

import argparse
import atexit
import collections
import ctypes
import fcntl
import http.client
import json
import os
import pathlib
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
REQUEST = ROOT / "backends" / "sample_data" / "request.json"
REPOSITORY = ROOT / "backends" / "model_repository"
ROUTE = "digits-netns"

PREFIX = f"syns{os.getpid()}-"
STALE = re.compile(r"^syns(\d+)-[a-z0-9]+$")
SUBNET = "10.213.0"
GATEWAYS = {"gw1": f"{SUBNET}.1", "gw2": f"{SUBNET}.2"}
BACKENDS = {"be1": f"{SUBNET}.11", "be2": f"{SUBNET}.12", "be3": f"{SUBNET}.13"}
DELAYED, PARTITIONED = "be2", "be3"
DELAY_MS = 20  # each way: 40 ms more per round trip
CLIENTS = 4  # concurrent clients on each gateway host
PING_INTERVAL_S = 1
PING_TIMEOUT_S = 5  # the gateway's PING_TIMEOUT (gateway/src/upstream/client.rs)
DETECTION_BOUND_S = PING_INTERVAL_S + PING_TIMEOUT_S + 2
SCRAPE_EVERY_S = 0.2
LIMIT_S = 110  # the whole run, set-up and teardown included

GATEWAY_YAML = f"""\
listen: {{ http: 127.0.0.1:8000, grpc: 127.0.0.1:8001, admin: 127.0.0.1:8002 }}
policies: policies
backends:
  hosts:
    endpoints: [{", ".join(f'"{a}:8001"' for a in BACKENDS.values())}]
    balance: least_request
limits:
  upstream_ping_interval: {PING_INTERVAL_S}s
health_check: {{ interval: 1s, timeout: 500ms, unhealthy_after: 2 }}
workers: 2
reload: {{ watch: false }}
"""

# The deadline (default 15s) outlasts a call caught on the partitioned host: it fails when
# the PING on its connection goes unanswered (ping interval + 5 s), then runs again on
# another endpoint. A deadline shorter than that fails those calls (504) instead.
POLICY_YAML = """\
version: 1
route: {route}
targets:
  mlp: {{ backend: hosts, model: digits_mlp, version: 1 }}
  linear: {{ backend: hosts, model: digits_linear, version: 1 }}
default: mlp
fallback: [linear]
retry: {{ attempts: 2, idempotent: true }}
deadline: {deadline}
"""

libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000
PR_SET_PDEATHSIG = 1
SIOCETHTOOL = 0x8946
ETHTOOL_STXCSUM = 0x17
ETH_P_ALL = 3


class Failed(Exception):
    """The test cannot go on: the message says why."""


def log(msg):
    print(f"[netns {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def ns(name):
    return PREFIX + name


def sh(*cmd, check=True, timeout=10):
    """Runs a command (`ip`, `tc`) from the host side and returns its stdout."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise Failed(f"`{' '.join(cmd)}` failed ({r.returncode}): {r.stderr.strip()}")
    return r.stdout


def enter_netns(name):
    """Moves the calling thread (only it) into namespace `name`."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(name, fn, *args, timeout=60):
    """`fn(*args)` on a thread inside namespace `name`; its result, or its exception."""
    out = {}

    def run():
        try:
            enter_netns(name)
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if "error" in out:
        raise out["error"]
    if t.is_alive():
        raise Failed(f"{fn.__name__} in {name} did not finish in {timeout} s")
    return out.get("value")


def tx_checksum_off(dev):
    """Software checksums (and so no TSO) on `dev`: frames that cross the delay link's
    AF_PACKET sockets must be complete, not left for a NIC to finish."""
    value = ctypes.create_string_buffer(struct.pack("II", ETHTOOL_STXCSUM, 0), 8)
    ifreq = struct.pack("16sP", dev.encode(), ctypes.addressof(value)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)


def die_with_parent():
    """preexec_fn: the child gets SIGKILL if this test dies, even by SIGKILL."""
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


# === the network ===


class Network:
    """The namespaces, their links, and every process started in them."""

    def __init__(self, logs):
        self.logs = logs
        self.names = []
        self.procs = {}  # name -> (Popen, log path)
        self.torn_down = False

    def add_ns(self, name):
        sh("ip", "netns", "add", ns(name))
        self.names.append(ns(name))
        sh("ip", "-n", ns(name), "link", "set", "lo", "up")

    def build(self):
        for name in ["lan", *GATEWAYS, *BACKENDS, "dly"]:
            self.add_ns(name)
        lan = ns("lan")
        sh("ip", "-n", lan, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", lan, "link", "set", "br0", "up")
        hosts = {**GATEWAYS, **BACKENDS}
        for host, addr in hosts.items():
            if host == DELAYED:
                # be2 eth0 <-> dly `in` ... delay link ... dly `out` <-> lan be2 (bridge port)
                sh("ip", "-n", ns("dly"), "link", "add", "in", "type", "veth", "peer", "name", "eth0", "netns", ns(host))
                sh("ip", "-n", lan, "link", "add", host, "type", "veth", "peer", "name", "out", "netns", ns("dly"))
                sh("ip", "-n", ns("dly"), "link", "set", "in", "up")
                sh("ip", "-n", ns("dly"), "link", "set", "out", "up")
            else:
                sh("ip", "-n", lan, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", ns(host))
            sh("ip", "-n", lan, "link", "set", host, "master", "br0", "up")
            sh("ip", "-n", ns(host), "addr", "add", f"{addr}/24", "dev", "eth0")
            sh("ip", "-n", ns(host), "link", "set", "eth0", "up")
            in_netns(ns(host), tx_checksum_off, "eth0")

    def start(self, name, host, *cmd, ready, timeout=30):
        """Starts `cmd` in `host`'s namespace and waits for its `ready` line on stdout."""
        path = self.logs / f"{name}.log"
        out = open(path, "w")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns(host), *map(str, cmd)],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
            start_new_session=True, preexec_fn=die_with_parent,
        )
        out.close()
        self.procs[name] = (proc, path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = path.read_text(errors="replace")
            if ready in text:
                return
            if proc.poll() is not None:
                raise Failed(f"{name} exited ({proc.returncode}) before it served:\n{tail(path)}")
            time.sleep(0.05)
        raise Failed(f"{name} did not print '{ready}' within {timeout} s:\n{tail(path)}")

    def partition(self, host):
        """Every packet to and from `host` vanishes: a queue of length 0 on both ends."""
        sh("tc", "-n", ns("lan"), "qdisc", "add", "dev", host, "root", "pfifo", "limit", "0")
        sh("tc", "-n", ns(host), "qdisc", "add", "dev", "eth0", "root", "pfifo", "limit", "0")

    def teardown(self):
        if self.torn_down:
            return
        self.torn_down = True
        # Nothing may cut the teardown short: not the time limit, not a second signal.
        signal.alarm(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for proc, _ in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=5)
        for name in reversed(self.names):
            r = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, timeout=10)
            if r.returncode != 0:
                print(f"netns: could not delete namespace {name}: {r.stderr.strip()}", file=sys.stderr)


def tail(path, lines=20):
    return "\n".join(pathlib.Path(path).read_text(errors="replace").splitlines()[-lines:])


def remove_stale():
    """Namespaces of earlier runs that were killed outright (their pid is gone)."""
    out = sh("ip", "netns", "list", check=False)
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = STALE.match(name)
        if m and not pathlib.Path(f"/proc/{m.group(1)}").exists():
            log(f"removing namespace {name} left by an earlier run")
            sh("ip", "netns", "del", name, check=False)


# === the delay link (`run.py delay-link IN OUT MS`, in namespace dly) ===


def delay_link(a, b, delay_ms):
    """Forwards every frame between interfaces `a` and `b`, `delay_ms` later, both ways."""
    delay = delay_ms / 1000
    socks = []
    for dev in (a, b):
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.bind((dev, ETH_P_ALL))
        s.setblocking(False)
        socks.append(s)
    peer = {socks[0]: socks[1], socks[1]: socks[0]}
    queues = {s: collections.deque() for s in socks}  # frames due out of s, in order
    print(f"delay link up: {a} <-> {b}, {delay_ms} ms each way", flush=True)
    while True:
        now = time.monotonic()
        due = [q[0][0] for q in queues.values() if q]
        wait = max(0.0, min(due) - now) if due else 1.0
        readable, _, _ = select.select(socks, [], [], wait)
        now = time.monotonic()
        for s in readable:
            while True:
                try:
                    frame, addr = s.recvfrom(65536)
                except BlockingIOError:
                    break
                if addr[2] != socket.PACKET_OUTGOING:  # not our own sends
                    queues[peer[s]].append((now + delay, frame))
        now = time.monotonic()
        for s, q in queues.items():
            while q and q[0][0] <= now:
                _, frame = q.popleft()
                try:
                    s.send(frame)
                except OSError as e:
                    print(f"delay link: a {len(frame)}-byte frame was lost: {e}", flush=True)


# === load and observation (threads inside a gateway host) ===


class Observed:
    """What the clients and scrapers of one gateway host saw."""

    def __init__(self, gateway):
        self.gateway = gateway
        self.requests = []  # (start, latency, error or None, target header)
        self.scrapes = []  # (time, {endpoint: calls}, {endpoint: healthy}, {reason: retries})


def infer_once(conn, body):
    conn.request("POST", f"/v2/models/{ROUTE}/infer", body, {"content-type": "application/json"})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        return f"HTTP {r.status}: {data[:300].decode(errors='replace')}", None
    outputs = json.loads(data).get("outputs") or []
    if not outputs:
        return f"HTTP 200 without outputs: {data[:300]!r}", None
    return None, r.getheader("x-switchyard-target")


def client(obs, body, stop):
    conn = None
    while not stop.is_set():
        start = time.monotonic()
        try:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=30)
            error, target = infer_once(conn, body)
        except Exception as e:  # noqa: BLE001 - every exception is a failed request
            error, target = f"{type(e).__name__}: {e}", None
            if conn is not None:
                conn.close()
            conn = None
        obs.requests.append((start, time.monotonic() - start, error, target))
    if conn is not None:
        conn.close()


METRIC = re.compile(r'^(switchyard_upstream_requests_total|switchyard_endpoint_healthy|switchyard_retries_total)\{([^}]*)\} (\S+)$')


def scrape():
    conn = http.client.HTTPConnection("127.0.0.1", 8002, timeout=3)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    calls, healthy, retries = {}, {}, {}
    for line in text.splitlines():
        m = METRIC.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        value = float(m.group(3))
        if m.group(1) == "switchyard_retries_total":
            if labels.get("route") == ROUTE:
                retries[labels["reason"]] = value
        elif labels.get("backend") == "hosts":
            (calls if m.group(1).endswith("_total") else healthy)[labels["endpoint"]] = value
    return time.monotonic(), calls, healthy, retries


def scraper(obs, stop):
    while not stop.is_set():
        try:
            obs.scrapes.append(scrape())
        except Exception as e:  # noqa: BLE001 - a missed scrape is reported, not fatal
            print(f"netns: {obs.gateway}: /metrics scrape failed: {e}", file=sys.stderr)
        stop.wait(SCRAPE_EVERY_S)


def threads_in(name, target, *args):
    def run():
        enter_netns(name)
        target(*args)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def warm_up(body, timeout=30):
    """Inside a gateway host: until every endpoint is in rotation and requests succeed."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    while time.monotonic() < deadline:
        try:
            _, _, healthy, _ = scrape()
            if len(healthy) == len(BACKENDS) and all(v == 1 for v in healthy.values()):
                conn = http.client.HTTPConnection("127.0.0.1", 8000, timeout=10)
                errors = [e for e in (infer_once(conn, body)[0] for _ in range(20)) if e]
                conn.close()
                if not errors:
                    return
                last = errors[0]
            else:
                last = f"endpoints in rotation: {healthy}"
        except Exception as e:  # noqa: BLE001 - retried until the deadline
            last = f"{type(e).__name__}: {e}"
        time.sleep(0.2)
    raise Failed(f"the gateway did not get ready within {timeout} s: {last}")


def connect_rtt(addr, port=8001, tries=5):
    """Median TCP connect time (one round trip) to addr:port, in ms."""
    times = []
    for _ in range(tries):
        t = time.monotonic()
        socket.create_connection((addr, port), timeout=3).close()
        times.append((time.monotonic() - t) * 1000)
    return sorted(times)[len(times) // 2]


# === the analysis ===


def at(scrapes, t):
    """The last scrape at or before `t` (the first one if none is)."""
    before = [s for s in scrapes if s[0] <= t]
    return before[-1] if before else scrapes[0]


def pct(values, p):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def analyse(observed, t0, t_part, t_end, rtts):
    problems = []
    for obs in observed:
        obs.scrapes.sort(key=lambda s: s[0])
    eps = {h: f"{a}:8001" for h, a in BACKENDS.items()}
    delayed, cut = eps[DELAYED], eps[PARTITIONED]

    # Clients.
    print("\nclients (every request counted; a failure is any non-200 or exception)")
    print(f"  {'gateway':8} {'requests':>8} {'failed':>6} {'fallback':>8} {'over 1 s':>8} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    all_failures = []
    for obs in observed:
        lat = [r[1] * 1000 for r in obs.requests]
        failures = [r for r in obs.requests if r[2]]
        fallback = sum(1 for r in obs.requests if r[3] and "digits_linear" in r[3])
        all_failures += [(obs.gateway, r) for r in failures]
        slow = sum(1 for v in lat if v >= 1000)
        print(f"  {obs.gateway:8} {len(lat):8} {len(failures):6} {fallback:8} {slow:8} {pct(lat, 50):8.1f} {pct(lat, 99):8.1f} {max(lat, default=0):8.1f}")
    print("  (fallback: answered by the fallback target; over 1 s: caught on the partitioned host until its connection's PING went unanswered, then answered by another)")
    for obs in observed:
        if len(obs.requests) < 100:
            problems.append(f"{obs.gateway}: only {len(obs.requests)} client requests were made: no load to judge by")
    if all_failures:
        problems.append(f"{len(all_failures)} client request(s) failed")
        for gw, (start, latency, error, _) in all_failures[:20]:
            print(f"  FAILED {gw} at +{start - t0:.2f} s after {latency * 1000:.0f} ms: {error}")

    # Per host, before the partition and after it.
    def window(obs, a, b):
        return {e: at(obs.scrapes, b)[1].get(e, 0) - at(obs.scrapes, a)[1].get(e, 0) for e in eps.values()}

    pre = {e: sum(window(o, t0, t_part)[e] for o in observed) for e in eps.values()}
    post = {e: sum(window(o, t_part, t_end + 60)[e] for o in observed) for e in eps.values()}
    total_pre = sum(pre.values()) or 1
    total_post = sum(post.values()) or 1
    print(f"\nbackend hosts: calls from both gateways (switchyard_upstream_requests_total); partition at +{t_part - t0:.1f} s of {t_end - t0:.1f} s")
    print(f"  {'host':5} {'address':16} {'link':20} {'connect rtt':>11} {'before':>7} {'share':>6} {'after':>7} {'share':>6}")
    for host, e in eps.items():
        link = {DELAYED: f"+{2 * DELAY_MS} ms round trip", PARTITIONED: "partitioned"}.get(host, "plain")
        print(f"  {host:5} {e:16} {link:20} {rtts[host]:8.1f} ms {int(pre[e]):7} {pre[e] / total_pre:6.1%} {int(post[e]):7} {post[e] / total_post:6.1%}")
    undelayed = [e for h, e in eps.items() if h != DELAYED]
    if not all(pre[delayed] < 0.5 * pre[e] for e in undelayed):
        problems.append(
            f"the delayed host {DELAYED} got {int(pre[delayed])} calls before the partition, not under half of each other host's "
            f"({', '.join(str(int(pre[e])) for e in undelayed)})"
        )

    # Detection of the partition, per gateway.
    print(f"\npartition of {PARTITIONED} ({cut}), per gateway (bound: {DETECTION_BOUND_S} s)")
    for obs in observed:
        after = [s for s in obs.scrapes if s[0] >= t_part]
        out = next((s for s in after if s[2].get(cut) == 0), None)
        changes = [s for prev, s in zip(obs.scrapes, obs.scrapes[1:]) if s[1].get(cut, 0) != prev[1].get(cut, 0)]
        last_growth = changes[-1][0] - t_part if changes else float("nan")
        final = obs.scrapes[-1]
        if out is None:
            problems.append(f"{obs.gateway}: {PARTITIONED} was never taken out of rotation")
            print(f"  {obs.gateway}: never taken out of rotation; calls to it: {int(final[1].get(cut, 0))}")
            continue
        detected = out[0] - t_part
        grew = final[1].get(cut, 0) - out[1].get(cut, 0)
        print(
            f"  {obs.gateway}: out of rotation after {detected:.1f} s; its counter last grew {last_growth:+.1f} s after the partition; "
            f"calls to it after detection: {int(grew)}; retries: {json.dumps(final[3])}"
        )
        if detected > DETECTION_BOUND_S:
            problems.append(f"{obs.gateway}: {PARTITIONED} taken out of rotation only {detected:.1f} s after the partition")
        if grew:
            problems.append(f"{obs.gateway}: {int(grew)} call(s) went to the partitioned host after it was taken out of rotation")
        if any(s[2].get(cut) == 1 for s in obs.scrapes if s[0] > out[0]):
            problems.append(f"{obs.gateway}: the partitioned host came back into rotation")
    return problems


# === the test ===


def run(args):
    if os.geteuid() != 0:
        raise Failed("needs root: it creates network namespaces, veth pairs and a bridge (ip netns); run it as root")
    binary = pathlib.Path(os.environ.get("SWITCHYARD_BIN", ROOT / "target/debug/switchyard"))
    if not os.access(binary, os.X_OK):
        raise Failed(f"no switchyard binary at {binary}: run cargo build first")
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            raise Failed(f"`{tool}` is not on PATH (package iproute2)")
    remove_stale()
    logs = pathlib.Path(tempfile.mkdtemp(prefix="switchyard-netns-"))
    net = Network(logs)
    atexit.register(net.teardown)
    stop_clients, stop_scrapes = threading.Event(), threading.Event()
    ok = False
    try:
        log(f"namespaces {PREFIX}{{lan,gw1,gw2,be1,be2,be3,dly}}; logs in {logs}")
        try:
            net.build()
        except Failed as e:
            raise Failed(f"cannot build the test network (is `ip netns` permitted here?): {e}") from None
        net.start("delay-link", "dly", sys.executable, __file__, "delay-link", "in", "out", DELAY_MS, ready="delay link up")
        for host, addr in BACKENDS.items():
            net.start(host, host, binary, "backend", "--model-repository", REPOSITORY, "--listen", f"{addr}:8001", "--metrics", f"{addr}:8002",
                      ready="switchyard backend listening")
        rtts = {h: in_netns(ns("gw1"), connect_rtt, a) for h, a in BACKENDS.items()}
        log("connect round trip from gw1: " + ", ".join(f"{h} {v:.1f} ms" for h, v in rtts.items()))
        if rtts[DELAYED] < 2 * DELAY_MS * 0.8:
            raise Failed(f"the delay link adds too little: {rtts[DELAYED]:.1f} ms round trip to {DELAYED}")
        conf = logs / "gateway"
        (conf / "policies").mkdir(parents=True)
        (conf / "gateway.yaml").write_text(GATEWAY_YAML)
        (conf / "policies" / f"{ROUTE}.yaml").write_text(POLICY_YAML.format(route=ROUTE, deadline=args.deadline))
        for gw in GATEWAYS:
            net.start(gw, gw, binary, "gateway", "--config", conf / "gateway.yaml", ready="switchyard gateway listening")
        body = REQUEST.read_bytes()
        for gw in GATEWAYS:
            in_netns(ns(gw), warm_up, body)
        log(f"load: {CLIENTS} clients on each gateway host for {args.seconds} s; {PARTITIONED} partitioned at +{args.partition_at} s")

        observed = [Observed(gw) for gw in GATEWAYS]
        for obs in observed:
            obs.scrapes.append(in_netns(ns(obs.gateway), scrape))
        t0 = time.monotonic()
        scrapers = [threads_in(ns(o.gateway), scraper, o, stop_scrapes) for o in observed]
        clients = [threads_in(ns(o.gateway), client, o, body, stop_clients) for o in observed for _ in range(CLIENTS)]
        time.sleep(max(0, t0 + args.partition_at - time.monotonic()))
        for obs in observed:  # the counters at the partition itself
            obs.scrapes.append(in_netns(ns(obs.gateway), scrape))
        t_part = time.monotonic()
        net.partition(PARTITIONED)
        log(f"partitioned {PARTITIONED} at +{t_part - t0:.2f} s")
        time.sleep(max(0, t0 + args.seconds - time.monotonic()))
        t_end = time.monotonic()
        stop_clients.set()
        for t in clients:  # a request may wait out a dead connection: at most the route deadline
            t.join(timeout=max(0.1, t_end + 20 - time.monotonic()))
        if any(t.is_alive() for t in clients):
            raise Failed("a client request did not finish within 20 s of the end of the load")
        stop_scrapes.set()
        for t in scrapers:
            t.join(timeout=5)
        for obs in observed:
            obs.scrapes.append(in_netns(ns(obs.gateway), scrape))
        log(f"load done in {time.monotonic() - t0:.1f} s")

        problems = analyse(observed, t0, t_part, t_end, rtts)
        warnings = [
            f"  {name}: {line}"
            for name in GATEWAYS
            for line in (logs / f"{name}.log").read_text(errors="replace").splitlines()
            if " WARN " in line or " ERROR " in line
        ]
        if warnings:
            print("\ngateway warnings and errors")
            print("\n".join(warnings[:40]))
        if problems:
            print("\nFAILED")
            for p in problems:
                print(f"  - {p}")
            print(f"logs kept in {logs}")
            return 1
        print("\nPASSED: no client request failed; the delayed host got under half of each other's calls; "
              "the partitioned host got none after detection")
        ok = True
        return 0
    finally:
        stop_clients.set()
        stop_scrapes.set()
        net.teardown()
        if ok and not args.keep:
            shutil.rmtree(logs, ignore_errors=True)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "delay-link":
        delay_link(sys.argv[2], sys.argv[3], float(sys.argv[4]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=36, help="length of the load (default 36)")
    p.add_argument("--partition-at", type=float, default=12, help="when be3 is partitioned (default 12)")
    p.add_argument("--deadline", default="15s", help="the route's deadline (default 15s)")
    p.add_argument("--keep", action="store_true", help="keep the logs of a passing run")
    args = p.parse_args()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def on_alarm(_signum, _frame):
        raise Failed(f"the test ran past its {LIMIT_S} s limit")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(LIMIT_S)
    start = time.monotonic()
    try:
        rc = run(args)
    except Failed as e:
        print(f"\nFAILED: {e}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt as e:
        print(f"\ninterrupted ({e or 'SIGINT'}); torn down", file=sys.stderr)
        rc = 130
    log(f"done in {time.monotonic() - start:.1f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
