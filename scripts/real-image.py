#!/usr/bin/env python3
"""Builds a RAM image of real content, for `--image` and scripts/qemu-compare.py.

A running server's memory is a third or so zero pages, and the rest code
(binaries and libraries), text (configuration, logs, source, documents), heap
and already-compressed data. This takes each kind from real files on this
machine instead of a generator:

  * code: ELF files under /usr/lib, /usr/bin, /usr/libexec;
  * text: /usr/share/doc, /usr/include, Python's standard library, /etc;
  * heap: the live memory of a Python process that has imported its standard
    library and built some data structures (read from /proc/<pid>/mem);
  * compressed: .gz, .xz, .bz2, .zst, .png, .jpg, .zip, .jar, .deb, .whl files.

Content goes in 64 KiB extents (16 pages) of one kind each, shuffled with a
fixed seed, in the proportions of --mix (default zero:33,code:25,text:17,
heap:15,compressed:10); zero extents stay holes. The same seed and machine
give the same image.

    scripts/real-image.py --size 1GiB --out real.img
"""

import argparse
import os
import random
import re
import subprocess
import sys

EXTENT = 64 << 10
PAGE = 4096

SOURCES = {
    "code": (["/usr/lib", "/usr/bin", "/usr/libexec", "/usr/sbin"], None),
    "text": (["/usr/share/doc", "/usr/include", "/etc", "/usr/share/perl5",
              os.path.dirname(os.__file__)], None),
    "compressed": (["/usr/share", "/usr/lib", "/var/cache/apt", "/root/.cargo/registry/cache"],
                   re.compile(r"\.(gz|xz|bz2|zst|png|jpg|jpeg|zip|jar|deb|whl|crate)$")),
}


def parse_size(text):
    t = text.strip().lower()
    for suffix, mult in (("gib", 1 << 30), ("mib", 1 << 20), ("kib", 1 << 10)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(t)


def is_elf(path):
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def is_text(path):
    """Whether the file's first 4 KiB are printable text."""
    try:
        with open(path, "rb") as f:
            head = f.read(PAGE)
    except OSError:
        return False
    printable = sum(1 for b in head if 32 <= b < 127 or b in (9, 10, 13))
    return len(head) > 0 and printable >= 0.97 * len(head)


def files_of(kind, rng, want_bytes):
    """Real files of one kind, shuffled, until they hold `want_bytes`."""
    roots, pattern = SOURCES[kind]
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for n in names:
                p = os.path.join(dirpath, n)
                if os.path.islink(p) or not os.path.isfile(p):
                    continue
                if kind == "code":
                    if not is_elf(p):
                        continue
                elif kind == "text":
                    if not is_text(p):
                        continue
                elif not pattern.search(p):
                    continue
                found.append(p)
    found.sort()
    rng.shuffle(found)
    total, out = 0, []
    for p in found:
        try:
            size = os.path.getsize(p)
        except OSError:
            continue
        if size < PAGE:
            continue
        out.append(p)
        total += size
        if total >= want_bytes * 2:
            break
    return out


def extents_from_files(paths, count):
    """`count` 64 KiB extents read from `paths` in turn (short tails padded
    with the next file's bytes, as page cache and heap pages are full)."""
    buf = bytearray()
    extents = []
    for p in paths:
        try:
            with open(p, "rb") as f:
                buf += f.read(8 << 20)
        except OSError:
            continue
        while len(buf) >= EXTENT and len(extents) < count:
            extents.append(bytes(buf[:EXTENT]))
            del buf[:EXTENT]
        if len(extents) >= count:
            break
    # Fewer real bytes than asked for: reuse them rather than invent content.
    i = 0
    while extents and len(extents) < count:
        extents.append(extents[i])
        i += 1
    return extents


HEAP_PROGRAM = r"""
import sys, os, json, collections, pkgutil, importlib
for m in pkgutil.iter_modules():
    if m.name.startswith(('test', 'idlelib', 'turtle', 'tkinter', 'antigravity', 'this')):
        continue
    try:
        importlib.import_module(m.name)
    except BaseException:
        pass
data = []
for i in range(200000):
    data.append({'id': i, 'name': f'user{i}', 'tags': [i % 7, i % 11], 'score': i * 0.37})
index = collections.defaultdict(list)
for d in data:
    index[d['tags'][0]].append(d['name'])
blob = json.dumps(data[:20000]).encode()
print('ready', flush=True)
sys.stdin.read()
"""


def heap_extents(count):
    """Extents of a live Python process's writable memory (heap, data, stacks)."""
    proc = subprocess.Popen([sys.executable, "-c", HEAP_PROGRAM],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    try:
        proc.stdout.readline()
        extents = []
        with open(f"/proc/{proc.pid}/maps") as maps, open(f"/proc/{proc.pid}/mem", "rb") as mem:
            for line in maps:
                fields = line.split()
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if "rw" not in fields[1][:2] or (len(fields) > 5 and fields[5].startswith("[v")):
                    continue
                mem.seek(lo)
                try:
                    data = mem.read(hi - lo)
                except OSError:
                    continue
                for at in range(0, len(data) - EXTENT + 1, EXTENT):
                    chunk = data[at:at + EXTENT]
                    if chunk.count(0) == EXTENT:
                        continue  # zero pages are counted separately
                    extents.append(chunk)
        return extents
    finally:
        proc.kill()
        proc.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB")
    ap.add_argument("--mix", default="zero:33,code:25,text:17,heap:15,compressed:10")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    size = parse_size(a.size)
    if size % EXTENT:
        sys.exit("--size must be a multiple of 64 KiB")
    weights = {}
    for part in a.mix.split(","):
        k, w = part.split(":")
        if k not in ("zero", "code", "text", "heap", "compressed"):
            sys.exit(f"unknown kind {k}")
        weights[k] = int(w)
    total_w = sum(weights.values())
    n = size // EXTENT
    rng = random.Random(a.seed)
    counts = {k: n * w // total_w for k, w in weights.items()}
    counts["zero"] = counts.get("zero", 0) + n - sum(counts.values())

    pool = {}
    for kind, c in counts.items():
        if kind == "zero" or c == 0:
            continue
        print(f"collecting {c * EXTENT >> 20} MiB of {kind}", file=sys.stderr)
        if kind == "heap":
            ext = heap_extents(c)
            i = 0
            while ext and len(ext) < c:
                ext.append(ext[i])
                i += 1
            pool[kind] = ext[:c]
        else:
            pool[kind] = extents_from_files(files_of(kind, rng, c * EXTENT), c)
        if len(pool[kind]) < c:
            sys.exit(f"found no {kind} content on this machine")
    layout = [k for k, c in counts.items() for _ in range(c)]
    rng.shuffle(layout)
    taken = {k: 0 for k in counts}
    with open(a.out, "wb") as f:
        f.truncate(size)
        for i, kind in enumerate(layout):
            if kind == "zero":
                continue
            f.seek(i * EXTENT)
            f.write(pool[kind][taken[kind]])
            taken[kind] += 1
    zero_pages = 0
    with open(a.out, "rb") as f:
        while True:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            for p in range(0, len(chunk), PAGE):
                if chunk[p:p + PAGE].count(0) == PAGE:
                    zero_pages += 1
    print(f"wrote {size >> 20} MiB to {a.out}: {', '.join(f'{k} {c * EXTENT >> 20} MiB' for k, c in counts.items())}; "
          f"{100.0 * zero_pages / (size // PAGE):.1f}% zero pages")


if __name__ == "__main__":
    main()
