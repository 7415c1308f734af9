#!/usr/bin/env python3
"""ferry against QEMU's own live migration, on the same memory, in one run.

Writes a RAM image of the realistic mix with `ferry image` (or takes yours with
--image), then migrates it over loopback, or with --link tbf (root) between
two network namespaces joined by a veth pair whose source side a `tc` tbf
qdisc shapes to --bandwidth (the sweep's link: a 4 ms bucket, a 50 ms queue):

  * QEMU (qemu-system-x86_64, KVM): the source guest's RAM is a
    memory-backend-file over the image (share=off: the guest gets a private
    copy, read in before the migration with --qemu-prealloc on, as ferry's
    source loads the image first), the destination's is anonymous RAM;
    multifd on, max-bandwidth lifted, every --qemu-channels x
    --qemu-compression x --qemu-dirty-tracking combination. With KVM's dirty
    bitmap, QEMU 7.2 on Linux 6.18 sent the whole guest twice in every run of
    2026-12-07 (every page counted dirty again after the first pass); with the
    dirty ring
    (`-accel kvm,dirty-ring-size=4096`) it sends it once;
  * ferry: `ferry send --image` to a `ferry receive` in a second process,
    idle guest, for each --ferry-codecs.

Each configuration runs --repeats times; the table gives the median total
time (ferry's `total_ms`; for QEMU the time from `migrate` until
query-migrate says `completed`, polled every 5 ms), min-max,
downtime, wire bytes (each tool's own count) and, on a tbf link, the bytes
the link carried, and the ratio of ferry's best to QEMU's best.

Needs: qemu-system-x86 (Debian: apt-get install qemu-system-x86), /dev/kvm,
and a release build of ferry (cargo build --release).

    scripts/qemu-compare.py --memory 1GiB --repeats 3
    sudo scripts/qemu-compare.py --memory 1GiB --link tbf --bandwidth 1Gbit
"""

import argparse
import json
import random
import signal
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SOURCE_IP, DEST_IP = "10.214.0.1", "10.214.0.2"


def parse_rate(text):
    """Bytes per second of "1Gbit", "500Mbit" or "125MB/s"."""
    t = text.strip().lower().replace("/s", "")
    for unit, scale in (("gbit", 1e9 / 8), ("mbit", 1e6 / 8), ("gb", 1e9), ("mb", 1e6)):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * scale)
    return int(t)


class TbfLink:
    """Two network namespaces joined by a veth pair, the source's side shaped
    by a tbf qdisc; torn down by close()."""

    def __init__(self, bps):
        tag = f"{os.getpid() % 1000}{random.randrange(1000):03d}"
        self.src, self.dst = f"fqc{tag}s", f"fqc{tag}d"
        src_dev, dst_dev = f"fqc{tag}a", f"fqc{tag}b"
        self.src_dev = src_dev
        try:
            for ns in (self.src, self.dst):
                sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", src_dev, "netns", self.src, "type", "veth",
               "peer", "name", dst_dev, "netns", self.dst)
            for ns, dev, ip in ((self.src, src_dev, SOURCE_IP), (self.dst, dst_dev, DEST_IP)):
                sh("ip", "-n", ns, "addr", "add", f"{ip}/30", "dev", dev)
                sh("ip", "-n", ns, "link", "set", dev, "up")
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            burst = max(bps // 250, 128 << 10)
            limit = max(bps // 20, 2 * burst)
            sh("ip", "netns", "exec", self.src, "tc", "qdisc", "replace", "dev", src_dev,
               "root", "tbf", "rate", f"{bps * 8}bit", "burst", str(burst), "limit", str(limit))
        except Exception:
            self.close()
            raise

    def tx_bytes(self):
        """Bytes the source's side of the link has sent so far."""
        out = subprocess.run(self.run_in("src") + ["cat", f"/sys/class/net/{self.src_dev}/statistics/tx_bytes"],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        return int(out.strip())

    def run_in(self, side):
        return ["ip", "netns", "exec", self.src if side == "src" else self.dst]

    def close(self):
        for ns in (self.src, self.dst):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


def sh(*args):
    subprocess.run(args, check=True)


def wait_listening(link, port, timeout=10.0):
    """Until something listens on `port` in the destination's namespace."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(link.run_in("dst") + ["ss", "-Hltn", f"sport = :{port}"],
                             stdout=subprocess.PIPE, text=True).stdout
        if out.strip():
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port} in {link.dst}")


def parse_size(text):
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "": 1}
    t = text.strip().lower()
    for u in ("kib", "mib", "gib"):
        if t.endswith(u):
            return int(float(t[: -len(u)]) * units[u])
    return int(t)


class Qmp:
    """A QMP connection over a unix socket."""

    def __init__(self, path, timeout=20.0):
        deadline = time.time() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(path)
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"QEMU's QMP socket {path} never appeared")
                time.sleep(0.02)
        self.file = self.sock.makefile("rw")
        json.loads(self.file.readline())  # greeting
        self.cmd("qmp_capabilities")

    def cmd(self, name, **args):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "error" in reply:
                raise RuntimeError(f"QMP {name}: {reply['error']}")
            if "return" in reply:
                return reply["return"]

    def close(self):
        self.sock.close()


# KVM's dirty ring instead of its bitmap: entries per vCPU (a power of two).
DIRTY_RING = 4096


def qemu(ram_object, qmp_path, extra, prefix=(), tracking="bitmap"):
    accel = "kvm" if tracking == "bitmap" else f"kvm,dirty-ring-size={DIRTY_RING}"
    args = list(prefix) + [
        "qemu-system-x86_64",
        "-machine", "pc,memory-backend=ram", "-accel", accel,
        "-m", str(MEMORY >> 20) + "M",
        "-object", ram_object,
        "-nodefaults", "-display", "none", "-serial", "none", "-parallel", "none",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ] + extra
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def qemu_once(image, setting, workdir, link=None, prealloc=True):
    """One QEMU migration; `setting` is (channels, compression, dirty tracking)."""
    channels, compression, tracking = setting
    src_qmp = os.path.join(workdir, "src.qmp")
    dst_qmp = os.path.join(workdir, "dst.qmp")
    for p in (src_qmp, dst_qmp):
        if os.path.exists(p):
            os.unlink(p)
    size = MEMORY
    # prealloc: the source's RAM is read in (and copied, share=off) before the
    # migration starts, as ferry's source loads the image before it sends.
    pre = ",prealloc=on" if prealloc else ""
    src = qemu(f"memory-backend-file,id=ram,size={size},mem-path={image},share=off{pre}", src_qmp, [],
               link.run_in("src") if link else (), tracking)
    dst = qemu(f"memory-backend-ram,id=ram,size={size}", dst_qmp, ["-incoming", "defer"],
               link.run_in("dst") if link else (), tracking)
    try:
        s, d = Qmp(src_qmp), Qmp(dst_qmp)
        for q in (s, d):
            q.cmd("migrate-set-capabilities",
                  capabilities=[{"capability": "multifd", "state": True}])
            q.cmd("migrate-set-parameters", **{
                "multifd-channels": channels,
                "multifd-compression": compression,
                "max-bandwidth": 100 << 30,  # lift the default 128 MiB/s cap
                "downtime-limit": 300,
            })
        port = free_port()
        host = DEST_IP if link else "127.0.0.1"
        d.cmd("migrate-incoming", uri=f"tcp:{host}:{port}")
        s.cmd("cont")  # a live guest: the firmware runs, finds nothing to boot, idles
        time.sleep(0.2)
        tx0 = link.tx_bytes() if link else None
        started = time.monotonic()
        s.cmd("migrate", uri=f"tcp:{host}:{port}")
        deadline = time.time() + 300
        while True:
            info = s.cmd("query-migrate")
            status = info.get("status")
            if status == "completed":
                wall_ms = (time.monotonic() - started) * 1e3
                break
            if status in ("failed", "cancelled") or time.time() > deadline:
                raise RuntimeError(f"QEMU migration {status}: {info}")
            time.sleep(0.005)
        ram = info.get("ram", {})
        return {
            # From the migrate command to `completed` seen (5 ms polls); QEMU's
            # own total-time agrees but has read 0 on some runs.
            "total_ms": wall_ms,
            "qemu_total_time_ms": float(info["total-time"]),
            "downtime_ms": float(info.get("downtime", 0)),
            "wire_bytes": int(ram.get("transferred", 0)),  # QEMU's count, not bytes on the link
            "link_bytes": link.tx_bytes() - tx0 if link else None,
            "zero_pages": int(ram.get("duplicate", 0)),
        }
    finally:
        for p in (src, dst):
            p.kill()
            p.wait()


def ferry_once(ferry, image, codec, channels, link=None):
    port = free_port()
    addr = f"{DEST_IP if link else '127.0.0.1'}:{port}"
    recv = subprocess.Popen(
        (link.run_in("dst") if link else []) + [ferry, "receive", "--listen", addr, "--once", "--json"]
        # Plain TCP from the other namespace, as QEMU's migration is.
        + (["--insecure"] if link else []),
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        if link:
            wait_listening(link, port)
        else:
            deadline = time.time() + 10
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                    break
                except OSError:
                    if time.time() > deadline:
                        raise RuntimeError("ferry receive did not start")
                    time.sleep(0.02)
        # A probe connection is refused as a session; receive --once keeps
        # waiting for a real one.
        tx0 = link.tx_bytes() if link else None
        out = subprocess.run(
            (link.run_in("src") if link else []) + [ferry, "send", "--to", addr, "--image", image, "--workload", "idle",
             "--codec", codec, "--channels", str(channels), "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=600)
        if out.returncode != 0:
            raise RuntimeError(f"ferry send failed: {out.stderr.strip()}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        if r["outcome"] != "completed":
            raise RuntimeError(f"ferry migration {r['outcome']}: {r.get('error')}")
        recv.wait(timeout=60)
        return {
            "total_ms": float(r["total_ms"]),
            "downtime_ms": float(r["downtime_ms"]),
            "wire_bytes": int(r["wire_bytes"]),
            "link_bytes": link.tx_bytes() - tx0 if link else None,
            "zero_pages": int(r["pages"]["zero"]),
        }
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()


def summarize(name, runs):
    totals = [r["total_ms"] for r in runs]
    return {
        "config": name,
        "total_ms": {"median": statistics.median(totals), "min": min(totals), "max": max(totals)},
        "downtime_ms": statistics.median(r["downtime_ms"] for r in runs),
        "wire_bytes": int(statistics.median(r["wire_bytes"] for r in runs)),
        # What the source's side of the tbf link sent (headers included).
        "link_bytes": (int(statistics.median(r["link_bytes"] for r in runs))
                       if runs[0]["link_bytes"] is not None else None),
        "zero_pages": int(statistics.median(r["zero_pages"] for r in runs)),
        "repeats": len(runs),
    }


def main():
    global MEMORY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--memory", default="1GiB", help="guest size for the generated image")
    ap.add_argument("--image", help="use this RAM image instead of generating one")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--qemu-channels", default="2,4,8")
    ap.add_argument("--qemu-compression", default="none,zstd")
    ap.add_argument("--qemu-prealloc", choices=("on", "off"), default="on",
                    help="read the source guest's RAM in before migrating (as ferry's source does)")
    ap.add_argument("--qemu-dirty-tracking", default="bitmap,ring",
                    help="KVM's dirty bitmap, its dirty ring, or both (each a configuration)")
    ap.add_argument("--ferry-codecs", default="auto,none,lz4")
    ap.add_argument("--ferry-channels", type=int, default=4)
    ap.add_argument("--ferry", default=os.path.join(ROOT, "target", "release", "ferry"))
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    ap.add_argument("--seed", type=int, default=1, help="seed of the run order")
    ap.add_argument("--link", choices=("loopback", "tbf"), default="loopback",
                    help="tbf (root): two namespaces joined by a tbf-shaped veth pair")
    ap.add_argument("--bandwidth", default="1Gbit", help="the tbf link's rate (1Gbit, 125MB/s)")
    a = ap.parse_args()

    if not os.path.exists(a.ferry):
        sys.exit(f"no ferry binary at {a.ferry}: run `cargo build --release` first")
    if subprocess.run(["which", "qemu-system-x86_64"], stdout=subprocess.DEVNULL).returncode:
        sys.exit("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        sys.exit("/dev/kvm is not usable: QEMU's side needs KVM")

    bad = set(a.qemu_dirty_tracking.split(",")) - {"bitmap", "ring"}
    if bad:
        sys.exit(f"--qemu-dirty-tracking: {','.join(sorted(bad))} is not bitmap or ring")
    if a.link != "tbf" and "--bandwidth" in sys.argv:
        print("--bandwidth shapes the tbf link only (--link tbf): ignored", file=sys.stderr)
    link = TbfLink(parse_rate(a.bandwidth)) if a.link == "tbf" else None
    # A SIGTERM unwinds like Ctrl-C, so the namespaces are torn down.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        results = run_all(a, link)
    finally:
        if link:
            link.close()
    report(a, results)


def run_all(a, link):
    global MEMORY
    with tempfile.TemporaryDirectory(prefix="ferry-qemu-") as work:
        image = a.image
        if image is None:
            image = os.path.join(work, "ram.img")
            subprocess.run([a.ferry, "image", "--memory", a.memory, "--out", image],
                           check=True, stdout=sys.stderr)
        MEMORY = os.path.getsize(image)
        # Interleaved, in a shuffled order each pass: every configuration runs
        # once per pass, so that the machine's slow and fast spells (a shared
        # host, memory the hypervisor reclaimed) fall on all of them alike.
        configs = []
        for ch in [int(c) for c in a.qemu_channels.split(",")]:
            for comp in a.qemu_compression.split(","):
                for tr in a.qemu_dirty_tracking.split(","):
                    configs.append(("qemu", f"qemu multifd channels={ch} compression={comp} {tr}",
                                    lambda s=(ch, comp, tr): qemu_once(image, s, work, link,
                                                                       a.qemu_prealloc == "on")))
        for codec in a.ferry_codecs.split(","):
            configs.append(("ferry", f"ferry channels={a.ferry_channels} codec={codec}",
                            lambda codec=codec: ferry_once(a.ferry, image, codec, a.ferry_channels, link)))
        runs = {name: [] for _, name, _ in configs}
        rng = random.Random(a.seed)
        for i in range(a.repeats):
            order = configs[:]
            rng.shuffle(order)
            for tool, name, once in order:
                print(f"pass {i + 1}/{a.repeats}: {name}", file=sys.stderr)
                runs[name].append(once())
        return [dict(summarize(name, runs[name]), tool=tool) for tool, name, _ in configs]


def report(a, results):
    best = {t: min((r for r in results if r["tool"] == t), key=lambda r: r["total_ms"]["median"])
            for t in ("qemu", "ferry")}
    ratio = best["ferry"]["total_ms"]["median"] / best["qemu"]["total_ms"]["median"]
    fastest = {t: min(r["total_ms"]["min"] for r in results if r["tool"] == t) for t in ("qemu", "ferry")}
    if a.json:
        print(json.dumps({"memory_bytes": MEMORY, "link": a.link,
                          "bandwidth": a.bandwidth if a.link == "tbf" else None,
                          "results": results,
                          "best": {t: b["config"] for t, b in best.items()},
                          "ferry_over_qemu": ratio,
                          "fastest_ms": fastest}))
        return
    where = f"a {a.bandwidth} tbf link" if a.link == "tbf" else "loopback"
    print(f"{MEMORY >> 20} MiB guest, {where}, {a.repeats} runs each; total time median (min-max)")
    w = max(len(r["config"]) for r in results)
    print(f"{'configuration':{w}} {'total':>10} {'spread':>17} {'downtime':>9} {'wire':>10}"
          + (f" {'on link':>11}" if a.link == "tbf" else ""))
    for r in results:
        t = r["total_ms"]
        mark = " *" if r in best.values() else ""
        print(f"{r['config']:{w}} {t['median']:8.0f} ms {t['min']:7.0f}-{t['max']:<7.0f}ms"
              f" {r['downtime_ms']:6.1f} ms {r['wire_bytes'] / 2**20:7.0f} MiB"
              + (f" {r['link_bytes'] / 2**20:7.0f} MiB" if r["link_bytes"] is not None else "")
              + mark)
    print(f"ferry's best / QEMU's best: {ratio:.3f} (target: at most 0.65 on a 1 Gbit/s link)")
    print(f"fastest single runs: ferry {fastest['ferry']:.0f} ms, QEMU {fastest['qemu']:.0f} ms "
          f"({fastest['ferry'] / fastest['qemu']:.3f})")
    pause = {t: max(r["downtime_ms"] for r in results if r["tool"] == t) for t in ("qemu", "ferry")}
    print(f"longest median pause: ferry {pause['ferry']:.1f} ms, QEMU {pause['qemu']:.1f} ms "
          "(ferry's goals: under 20 ms for a 64 MiB hot set written at 100 MB/s, under 50 ms "
          "for a 128 MiB one at 120 MB/s through a 125 MB/s cap; never above the 300 ms limit)")


MEMORY = 0
if __name__ == "__main__":
    main()
