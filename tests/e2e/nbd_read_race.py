#!/usr/bin/python3
"""Reads racing writes, flushes, compaction and GC. Used by tests/e2e_compaction.rs.
Run with Debian's /usr/bin/python3 (python3-libnbd).

  nbd_read_race.py URI SECONDS [--blocks N] [--readers R] [--seed X] [--state FILE]

A writer thread overwrites random 4 KiB blocks with self-describing patterns (the same
format as nbd_workload.py) on its own connection, one write at a time, with a FLUSH now and
then so commits pile up dead data for compaction. Reader threads (each on its own
connection) read 1 MiB chunks over and over. Every block a reader gets must be intact and be
a value written to that block, at least as new as the last write to it that had completed
before the read was sent (a read may see a newer write still in flight, never an older one).
Any read error fails the run. At the end everything is flushed and read back once more.
With --state the expected contents carry over between runs (e.g. across a daemon restart).
Prints "ALL OK" and a summary on success, "FAIL: …" otherwise.
"""

import argparse
import hashlib
import json
import os
import random
import struct
import sys
import threading
import time

import nbd

BS = 4096
MAGIC = 0x7372633373646E62
HEADER = struct.Struct("<QQQ")
ZERO = bytes(BS)
CHUNK = 256  # blocks per read


def content(block, gen):
    head = HEADER.pack(MAGIC, block, gen)
    d = hashlib.blake2b(head, digest_size=64).digest()
    return head + (d * (BS // 64))[HEADER.size:]


class Race:
    def __init__(self, args):
        self.args = args
        self.n = args.blocks
        self.lock = threading.Lock()
        self.done_gen = [0] * self.n  # newest completed write per block
        self.max_gen = [0] * self.n  # newest issued write per block
        self.stop = threading.Event()
        self.failures = []
        self.reads = 0
        self.writes = 0
        self.flushes = 0

    def fail(self, msg):
        with self.lock:
            self.failures.append(msg)
        self.stop.set()

    def writer(self, h):
        rng = random.Random(self.args.seed)
        gen = max(self.max_gen)
        try:
            while not self.stop.is_set():
                b = rng.randrange(self.n)
                gen += 1
                with self.lock:
                    self.max_gen[b] = gen
                h.pwrite(content(b, gen), b * BS)
                with self.lock:
                    self.done_gen[b] = gen
                self.writes += 1
                if rng.random() < 0.02:
                    h.flush()
                    self.flushes += 1
        except nbd.Error as e:
            self.fail(f"writer: {e}")

    def check_chunk(self, first, data, floor):
        for i in range(len(floor)):
            b = first + i
            got = data[i * BS:(i + 1) * BS]
            if got == ZERO:
                g = 0
            else:
                magic, hb, g = HEADER.unpack_from(got)
                if magic != MAGIC or hb != b or got != content(b, g):
                    return f"block {b}: garbage or misplaced data (header {got[:24].hex()})"
            with self.lock:
                top = self.max_gen[b]
            if g < floor[i] or g > top:
                return f"block {b}: read gen {g}, but gen {floor[i]} had completed before the read (newest issued {top})"
        return None

    def reader(self, h, seed):
        rng = random.Random(seed)
        try:
            while not self.stop.is_set():
                first = rng.randrange(0, self.n - CHUNK + 1)
                with self.lock:
                    floor = self.done_gen[first:first + CHUNK]
                data = h.pread(CHUNK * BS, first * BS)
                err = self.check_chunk(first, data, floor)
                if err:
                    self.fail("reader: " + err)
                    return
                self.reads += 1
        except nbd.Error as e:
            self.fail(f"reader: read failed: {e}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("uri")
    p.add_argument("seconds", type=float)
    p.add_argument("--blocks", type=int, default=4096)
    p.add_argument("--readers", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--state", help="JSON with each block's last write: read at start, written at the end")
    args = p.parse_args()
    r = Race(args)
    if args.state and os.path.exists(args.state):
        with open(args.state) as f:
            done = json.load(f)["done_gen"]
        assert len(done) == args.blocks
        r.done_gen, r.max_gen = list(done), list(done)
    handles = []
    for _ in range(1 + args.readers):
        h = nbd.NBD()
        h.connect_uri(args.uri)
        handles.append(h)
    threads = [threading.Thread(target=r.writer, args=(handles[0],))]
    threads += [
        threading.Thread(target=r.reader, args=(h, args.seed * 1000 + i))
        for i, h in enumerate(handles[1:])
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + args.seconds
    while time.monotonic() < deadline and not r.stop.is_set():
        time.sleep(0.05)
    r.stop.set()
    for t in threads:
        t.join()
    if r.failures:
        for f in r.failures[:10]:
            print("FAIL: " + f, flush=True)
        return 1
    # Quiesced: everything flushed, and every block exactly its last write.
    h = handles[1]
    h.flush()
    for first in range(0, r.n, CHUNK):
        data = h.pread(CHUNK * BS, first * BS)
        for i in range(CHUNK):
            b = first + i
            want = ZERO if r.done_gen[b] == 0 else content(b, r.done_gen[b])
            if data[i * BS:(i + 1) * BS] != want:
                print(f"FAIL: after quiescing, block {b} is not its last write (gen {r.done_gen[b]})", flush=True)
                return 1
    if args.state:
        with open(args.state, "w") as f:
            json.dump({"done_gen": r.done_gen}, f)
    print(f"ALL OK: {r.writes} writes, {r.flushes} flushes, {r.reads} chunk reads of {CHUNK * BS >> 10} KiB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
