#!/usr/bin/python3
"""Pattern-block workload against an NBD server, with a model of what must survive a crash.

Run with Debian's /usr/bin/python3 (python3-libnbd). Used by tests/e2e_crash.rs.

  nbd_workload.py write  URI STATE [--seconds S] [--flush-every K] [--durable flush|ack]
                                   [--qd Q] [--blocks N] [--seed X] [--hold]
  nbd_workload.py verify URI STATE

Every block of the first N 4 KiB blocks holds either zeros or a self-describing pattern:
24-byte header (magic, block number, generation) + bytes derived from it, so any torn or
misplaced block is recognised. Each operation (a write of 1-8 consecutive blocks, or a trim or
zero of them) gets a fresh generation; a block never has two operations in flight at once, so
the order of completions is the order of effects.

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


def cmd_write(args):
    st = load_state(args.state, args.blocks)
    rng = random.Random(args.seed)
    issued, durable = st["issued"], st["durable"]
    h = nbd.NBD()
    h.connect_uri(args.uri)
    size = h.get_size()
    if size < args.blocks * BS:
        log(f"FAIL: export is {size} bytes, workload needs {args.blocks * BS}")
        return 1
    busy = set()  # blocks with an operation in flight
    inflight = {}  # cookie -> ("op", [(block, gen)], buffer) | ("flush", flush sequence number)
    completed = []  # (block, gen) completed since the last flush was sent
    stats = {"ops": 0, "writes_acked": 0, "flushes_acked": 0, "bytes": 0}
    writes_since_flush = 0
    flush_seq = 0
    flush_snaps = {}  # flush sequence number -> (block, gen) pairs it makes durable
    stop_reason = "time"
    deadline = time.monotonic() + args.seconds

    def mark_durable(pairs):
        for b, g in pairs:
            if g > durable[b]:
                durable[b] = g
                issued[b] = [e for e in issued[b] if e[0] >= g]

    def progress():
        write_progress(
            args.state + ".progress",
            f"flushes={stats['flushes_acked']} writes={stats['writes_acked']}",
        )

    def retire(cookie):
        kind, pairs, *_ = inflight.pop(cookie)
        if kind == "flush":
            stats["flushes_acked"] += 1
            # A completed flush covers every write completed before it was sent, so also
            # those of earlier flushes still in flight.
            seq = pairs
            for s in sorted(k for k in flush_snaps if k <= seq):
                mark_durable(flush_snaps.pop(s))
            progress()
        else:
            for b, _ in pairs:
                busy.discard(b)
            stats["writes_acked"] += 1
            if stats["writes_acked"] % 256 == 0:
                progress()
            if args.durable == "ack":
                mark_durable(pairs)
            else:
                completed.extend(pairs)

    def reap(block):
        while inflight:
            c = h.aio_peek_command_completed()
            if c <= 0:
                if block and inflight:
                    h.poll(-1)
                    block = False
                    continue
                return
            # Raises when the command failed (it is retired then); the run stops there.
            h.aio_command_completed(c)
            retire(c)

    try:
        while time.monotonic() < deadline:
            if writes_since_flush >= args.flush_every:
                flush_seq += 1
                flush_snaps[flush_seq], completed = completed, []
                c = h.aio_flush()
                inflight[c] = ("flush", flush_seq)
                writes_since_flush = 0
            else:
                n = 1 if rng.random() < 0.6 else rng.randint(2, 8)
                start = rng.randrange(0, args.blocks - n + 1)
                blocks = range(start, start + n)
                if any(b in busy for b in blocks):
                    reap(block=True)
                    continue
                gen = st["next_gen"]
                st["next_gen"] += 1
                r = rng.random()
                kind = "w" if r < 0.9 else "z"
                for b in blocks:
                    issued[b].append([gen, kind])
                    busy.add(b)
                pairs = [(b, gen) for b in blocks]
                if kind == "w":
                    buf = nbd.Buffer.from_bytearray(b"".join(content(b, gen) for b in blocks))
                    c = h.aio_pwrite(buf, start * BS)
                    inflight[c] = ("op", pairs, buf)
                    stats["bytes"] += n * BS
                elif r < 0.95:
                    c = h.aio_trim(n * BS, start * BS)
                    inflight[c] = ("op", pairs)
                else:
                    c = h.aio_zero(n * BS, start * BS)
                    inflight[c] = ("op", pairs)
                stats["ops"] += 1
                writes_since_flush += 1
            while len(inflight) >= args.qd:
                reap(block=True)
            reap(block=False)
        # Drain what is in flight.
        while inflight:
            reap(block=True)
        if args.hold:
            write_progress(args.state + ".idle", "idle")
            log("holding the connection open, idle")
            hold_deadline = time.monotonic() + 300
            while not (h.aio_is_dead() or h.aio_is_closed()):
                if time.monotonic() > hold_deadline:
                    stop_reason = "hold timed out"
                    break
                h.poll(500)
            else:
                stop_reason = "server closed the idle connection"
    except nbd.Error as e:
        stop_reason = f"nbd error: {e}"
    st["stop_reason"] = stop_reason
    st["stats"] = stats
    save_json(args.state, st)
    log(
        f"stopped ({stop_reason}): {stats['ops']} ops, {stats['writes_acked']} acked, "
        f"{stats['flushes_acked']} flushes acked, {stats['bytes'] >> 20} MiB written"
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
    args = p.parse_args()
    return cmd_write(args) if args.mode == "write" else cmd_verify(args)


if __name__ == "__main__":
    sys.exit(main())
