#!/usr/bin/python3
"""Pattern-block workload against an NBD server, with a model of what must survive a crash.

Run with Debian's /usr/bin/python3 (python3-libnbd). Used by tests/e2e_crash.rs.

  nbd_workload.py write  URI STATE [--seconds S] [--flush-every K] [--durable flush|ack]
                                   [--qd Q] [--blocks N] [--seed X] [--hold] [--conns C]
  nbd_workload.py verify URI STATE

Every block of the first N 4 KiB blocks holds either zeros or a self-describing pattern:
24-byte header (magic, block number, generation) + bytes derived from it, so any torn or
misplaced block is recognised. Each operation (a write of 1-8 consecutive blocks, or a trim or
zero of them) gets a fresh generation; a block never has two operations in flight at once, so
the order of completions is the order of effects. With --conns C the operations are spread
over C connections (one thread each, QD per connection), and a FLUSH on any of them covers
writes completed on all of them (multi-conn).

`--durable flush`: a block's generation becomes durable when a FLUSH sent after the write
completed has itself completed (the NBD contract). `--durable ack`: every completed write is
durable (what a graceful SIGTERM promises: finish in-flight requests, flush everything).

`write` runs until S seconds pass or the connection dies (the daemon was killed), then writes
STATE (JSON). With --hold it then keeps the connection open and idle until the server goes
away (for SIGTERM-while-dirty tests). Progress goes to STATE.progress (one line, rewritten
after every completed flush and every 256 completed writes) so the test knows when to pull the plug; STATE.idle appears when
--hold starts idling.

`verify` reads every block and checks it against the model: its content must be exactly one
of the values issued to it whose generation is >= its durable generation (0 = never written
= zeros). It then rewrites STATE with what it found (all of it durable now), so rounds chain.
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
MAGIC = 0x7372633373646E62  # b"nbds3crs" little-endian
HEADER = struct.Struct("<QQQ")
ZERO_BLOCK = bytes(BS)


def content(block, gen):
    head = HEADER.pack(MAGIC, block, gen)
    d = hashlib.blake2b(head, digest_size=64).digest()
    return head + (d * (BS // 64))[HEADER.size:]


def log(msg):
    print(msg, flush=True)


def load_state(path, blocks):
    if os.path.exists(path):
        with open(path) as f:
            st = json.load(f)
        assert st["blocks"] == blocks, "state was made for a different block count"
        return st
    return {
        "blocks": blocks,
        "next_gen": 1,
        # Per block: generations that may legally be read now (>= the durable one), as
        # [gen, kind] with kind "w" (pattern) or "z" (zeros: trim, write_zeroes, never written).
        "issued": [[[0, "z"]] for _ in range(blocks)],
        "durable": [0] * blocks,
    }


def save_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_progress(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


class Writer:
    """Shared model; one thread per connection drives its own handle (multi-conn: a FLUSH
    on any connection covers writes completed on all of them)."""

    def __init__(self, args, st):
        self.args = args
        self.st = st
        self.issued, self.durable = st["issued"], st["durable"]
        self.lock = threading.Lock()
        self.rng = random.Random(args.seed)
        self.busy = set()  # blocks with an operation in flight (on any connection)
        self.completed = []  # (block, gen) completed since the last flush was sent
        self.flush_seq = 0
        self.flush_snaps = {}  # flush sequence number -> (block, gen) pairs it makes durable
        self.ops_since_flush = 0
        self.stats = {"ops": 0, "writes_acked": 0, "flushes_acked": 0, "bytes": 0}
        self.stop = threading.Event()
        self.errors = []
        self.deadline = time.monotonic() + args.seconds

    def progress(self):
        write_progress(
            self.args.state + ".progress",
            f"flushes={self.stats['flushes_acked']} writes={self.stats['writes_acked']}",
        )

    def mark_durable(self, pairs):
        for b, g in pairs:
            if g > self.durable[b]:
                self.durable[b] = g
                self.issued[b] = [e for e in self.issued[b] if e[0] >= g]

    def retire(self, entry):
        """Under the lock: account one completed command."""
        kind, payload = entry[0], entry[1]
        if kind == "flush":
            self.stats["flushes_acked"] += 1
            # A completed flush covers every write completed before it was sent, so also
            # those of earlier flushes still in flight.
            for s in sorted(k for k in self.flush_snaps if k <= payload):
                self.mark_durable(self.flush_snaps.pop(s))
            self.progress()
        else:
            for b, _ in payload:
                self.busy.discard(b)
            self.stats["writes_acked"] += 1
            if self.stats["writes_acked"] % 256 == 0:
                self.progress()
            if self.args.durable == "ack":
                self.mark_durable(payload)
            else:
                self.completed.extend(payload)

    def next_op(self):
        """Under the lock: choose the next command, or None when the blocks are busy."""
        a = self.args
        if self.ops_since_flush >= a.flush_every:
            self.flush_seq += 1
            self.flush_snaps[self.flush_seq], self.completed = self.completed, []
            self.ops_since_flush = 0
            return ("flush", self.flush_seq)
        n = 1 if self.rng.random() < 0.6 else self.rng.randint(2, 8)
        start = self.rng.randrange(0, a.blocks - n + 1)
        blocks = range(start, start + n)
        if any(b in self.busy for b in blocks):
            return None
        gen = self.st["next_gen"]
        self.st["next_gen"] += 1
        r = self.rng.random()
        kind = "w" if r < 0.9 else ("t" if r < 0.95 else "z")
        for b in blocks:
            self.issued[b].append([gen, "w" if kind == "w" else "z"])
            self.busy.add(b)
        self.stats["ops"] += 1
        self.ops_since_flush += 1
        if kind == "w":
            self.stats["bytes"] += n * BS
        return (kind, start, n, gen)

    def run_conn(self, h):
        inflight = {}  # cookie -> (kind, payload, buffer)

        def reap(block):
            while inflight:
                c = h.aio_peek_command_completed()
                if c <= 0:
                    if block:
                        h.poll(-1)
                        block = False
                        continue
                    return
                # Raises when the command failed (it is retired then); the run stops there.
                h.aio_command_completed(c)
                with self.lock:
                    self.retire(inflight.pop(c))

        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline:
                with self.lock:
                    op = self.next_op()
                if op is None:
                    reap(block=bool(inflight))
                    if not inflight:
                        time.sleep(0.0005)  # another connection holds those blocks
                    continue
                if op[0] == "flush":
                    c = h.aio_flush()
                    inflight[c] = ("flush", op[1], None)
                else:
                    kind, start, n, gen = op
                    pairs = [(b, gen) for b in range(start, start + n)]
                    if kind == "w":
                        buf = nbd.Buffer.from_bytearray(
                            b"".join(content(b, gen) for b in range(start, start + n))
                        )
                        c = h.aio_pwrite(buf, start * BS)
                        inflight[c] = ("op", pairs, buf)
                    elif kind == "t":
                        c = h.aio_trim(n * BS, start * BS)
                        inflight[c] = ("op", pairs, None)
                    else:
                        c = h.aio_zero(n * BS, start * BS)
                        inflight[c] = ("op", pairs, None)
                while len(inflight) >= self.args.qd:
                    reap(block=True)
                reap(block=False)
            while inflight:
                reap(block=True)
        except nbd.Error as e:
            self.errors.append(f"nbd error: {e}")
            self.stop.set()


def cmd_write(args):
    st = load_state(args.state, args.blocks)
    handles = []
    for _ in range(args.conns):
        h = nbd.NBD()
        h.connect_uri(args.uri)
        handles.append(h)
    size = handles[0].get_size()
    if size < args.blocks * BS:
        log(f"FAIL: export is {size} bytes, workload needs {args.blocks * BS}")
        return 1
    if args.conns > 1 and not handles[0].can_multi_conn():
        log("FAIL: several connections requested but the server does not offer multi-conn")
        return 1
    w = Writer(args, st)
    threads = [threading.Thread(target=w.run_conn, args=(h,)) for h in handles]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop_reason = w.errors[0] if w.errors else "time"
    if args.hold and not w.errors:
        h = handles[0]
        write_progress(args.state + ".idle", "idle")
        log("holding the connection open, idle")
        hold_deadline = time.monotonic() + 300
        try:
            while not (h.aio_is_dead() or h.aio_is_closed()):
                if time.monotonic() > hold_deadline:
                    stop_reason = "hold timed out"
                    break
                h.poll(500)
            else:
                stop_reason = "server closed the idle connection"
        except nbd.Error as e:
            stop_reason = f"server closed the idle connection ({e})"
    stats = w.stats
    st["stop_reason"] = stop_reason
    st["stats"] = stats
    save_json(args.state, st)
    log(
        f"stopped ({stop_reason}): {stats['ops']} ops on {args.conns} connection(s), "
        f"{stats['writes_acked']} acked, {stats['flushes_acked']} flushes acked, "
        f"{stats['bytes'] >> 20} MiB written"
    )
    return 0


def cmd_verify(args):
    with open(args.state) as f:
        st = json.load(f)
    blocks = st["blocks"]
    issued, durable = st["issued"], st["durable"]
    h = nbd.NBD()
    h.connect_uri(args.uri)
    bad = []
    newer = 0  # blocks holding a value newer than the durable one (allowed)
    chunk = 256
    for first in range(0, blocks, chunk):
        n = min(chunk, blocks - first)
        data = h.pread(n * BS, first * BS)
        for i in range(n):
            b = first + i
            got = data[i * BS:(i + 1) * BS]
            cands = [e for e in issued[b] if e[0] >= durable[b]]
            found = None
            if got == ZERO_BLOCK:
                zeros = [e for e in cands if e[1] == "z"]
                if zeros:
                    found = max(zeros, key=lambda e: e[0])
            else:
                magic, hb, hg = HEADER.unpack_from(got)
                if magic == MAGIC and hb == b and got == content(b, hg):
                    found = next((e for e in cands if e[0] == hg and e[1] == "w"), None)
            if found is None:
                if got == ZERO_BLOCK:
                    desc = "zeros"
                else:
                    magic, hb, hg = HEADER.unpack_from(got)
                    intact = magic == MAGIC and got == content(hb, hg)
                    desc = (
                        f"pattern(block={hb}, gen={hg}, intact={intact})"
                        if magic == MAGIC
                        else f"garbage {got[:16].hex()}..."
                    )
                bad.append(
                    f"block {b}: read {desc}; durable gen {durable[b]}, allowed {cands[-8:]}"
                )
                continue
            if found[0] > durable[b]:
                newer += 1
            issued[b] = [found]
            durable[b] = found[0]
    if bad:
        log(f"FAIL: {len(bad)} of {blocks} blocks violate the model:")
        for line in bad[:30]:
            log("  " + line)
        return 1
    save_json(args.state, st)
    log(f"verified {blocks} blocks: all consistent ({newer} hold writes newer than the last acked flush)")
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["write", "verify"])
    p.add_argument("uri")
    p.add_argument("state")
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--flush-every", type=int, default=64)
    p.add_argument("--durable", choices=["flush", "ack"], default="flush")
    p.add_argument("--qd", type=int, default=16)
    p.add_argument("--blocks", type=int, default=2048)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--hold", action="store_true")
    p.add_argument("--conns", type=int, default=1)
    args = p.parse_args()
    return cmd_write(args) if args.mode == "write" else cmd_verify(args)


if __name__ == "__main__":
    sys.exit(main())
