#!/usr/bin/python3
"""NBD protocol features of nbds3d, driven through libnbd. Used by tests/e2e_nbdsh.rs.

Run with Debian's /usr/bin/python3 (python3-libnbd).

  nbd_features.py rw URI SIZE   flags, trim, zero (plain, NO_HOLE, FAST_ZERO), cache,
                                block_status (with and without REQ_ONE), flush, FUA,
                                multi-conn visibility, out-of-range and oversized requests;
                                leaves a known layout behind for `ro`
  nbd_features.py ro URI SIZE   the same export served --read-only: the layout is there,
                                every write-like command fails with EPERM
  nbd_features.py ro-layout URI SIZE   only check the layout

Prints one "ok: ..." line per check; the first failure prints "FAIL: ..." and exits 1.
"""

import errno
import sys

import nbd

KiB = 1024
MiB = 1024 * KiB
HOLE = nbd.STATE_HOLE
ZERO = nbd.STATE_ZERO

# The layout `rw` leaves behind (offset, length, byte) — everything else reads as zeros.
LAYOUT = [
    (0, 256 * KiB, 0x5A),
    (2 * MiB, 64 * KiB, 0xF1),
    (3 * MiB, 64 * KiB, 0x77),
    (3 * MiB + 64 * KiB, 64 * KiB, 0x78),
    (5 * MiB, 1 * MiB, 0xC8),
]


def log(msg):
    print(msg, flush=True)


def fail(msg):
    print("FAIL: " + msg, flush=True)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)
    log("ok: " + msg)


def connect(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


def errname(n):
    return errno.errorcode.get(n, str(n))


def expect_errno(what, fn, allowed):
    try:
        fn()
    except nbd.Error as e:
        num = e.args[1] if len(e.args) > 1 else None
        if num not in allowed:
            fail(f"{what}: failed with {e!r} ({errname(num)}), want {[errname(a) for a in allowed]}")
        log(f"ok: {what} -> {errname(num)}")
        return
    fail(f"{what}: succeeded, want an error in {[errname(a) for a in allowed]}")


def extents(h, off, count, flags=0):
    """One BLOCK_STATUS: the base:allocation extents as [(length, flags)]."""
    got = []

    def cb(ctx, offset, entries, err):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            if offset != off:
                got.append(("bad offset", offset))
            got.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(count, off, cb, flags)
    if any(e[0] == "bad offset" for e in got):
        fail(f"block_status({off}, {count}): callback offset differs from the request")
    if not got:
        fail(f"block_status({off}, {count}): no extents")
    if any(length == 0 for length, _ in got):
        fail(f"block_status({off}, {count}): zero-length extent in {got}")
    return got


def flags_over(h, off, count):
    """Set of flag values covering [off, off+count), with as many BLOCK_STATUS calls as it takes."""
    seen = set()
    pos, end = off, off + count
    while pos < end:
        ext = extents(h, pos, end - pos)
        for length, fl in ext:
            seen.add(fl)
            pos += length
            if pos >= end:
                break
    return seen


def is_fill(data, byte):
    return data == bytes([byte]) * len(data)


def rw(uri, size):
    h = connect(uri)
    check(h.get_size() == size, f"export size is {size}")
    check(not h.is_read_only(), "export is writable")
    check(h.can_flush(), "can_flush")
    check(h.can_fua(), "can_fua")
    check(h.can_trim(), "can_trim")
    check(h.can_zero(), "can_zero")
    check(h.can_fast_zero(), "can_fast_zero")
    check(h.can_cache(), "can_cache")
    check(h.can_multi_conn(), "can_multi_conn (one shared volume per export)")
    check(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION), "base:allocation negotiated")

    # 0..2M of data, then carve it up.
    for off in range(0, 2 * MiB, 256 * KiB):
        h.pwrite(bytes([0x5A]) * (256 * KiB), off)
    h.flush()
    check(is_fill(h.pread(2 * MiB, 0), 0x5A), "2 MiB written and read back")

    h.trim(256 * KiB, 256 * KiB)
    check(is_fill(h.pread(256 * KiB, 256 * KiB), 0), "trimmed range reads as zeros")
    check(flags_over(h, 256 * KiB, 256 * KiB) == {HOLE | ZERO}, "trimmed range is a hole")

    h.zero(256 * KiB, 512 * KiB, nbd.CMD_FLAG_NO_HOLE)
    check(is_fill(h.pread(256 * KiB, 512 * KiB), 0), "zero(NO_HOLE) range reads as zeros")
    fl = flags_over(h, 512 * KiB, 256 * KiB)
    check(all(f & HOLE == 0 for f in fl), f"zero(NO_HOLE) range is not reported as a hole ({fl})")

    try:
        h.zero(256 * KiB, 768 * KiB, nbd.CMD_FLAG_FAST_ZERO)
        check(is_fill(h.pread(256 * KiB, 768 * KiB), 0), "zero(FAST_ZERO) succeeded, reads as zeros")
        fl = flags_over(h, 768 * KiB, 256 * KiB)
        check(all(f & ZERO for f in fl), f"zero(FAST_ZERO) range reported as zero ({fl})")
    except nbd.Error as e:
        # Allowed by the spec only as ENOTSUP, and then nothing may have changed.
        if e.args[1] != errno.ENOTSUP:
            fail(f"zero(FAST_ZERO) failed with {e!r}, want success or ENOTSUP")
        check(is_fill(h.pread(256 * KiB, 768 * KiB), 0x5A), "zero(FAST_ZERO) refused, data unchanged")

    h.zero(1 * MiB, 1 * MiB)
    check(is_fill(h.pread(1 * MiB, 1 * MiB), 0), "plain zero reads as zeros")
    check(flags_over(h, 1 * MiB, 1 * MiB) == {HOLE | ZERO}, "plain zero became a hole (not stored)")

    check(flags_over(h, 0, 256 * KiB) == {0}, "written range is data")
    check(flags_over(h, 8 * MiB, 8 * MiB) == {HOLE | ZERO}, "never-written range is a hole")

    one = extents(h, 0, 2 * MiB, nbd.CMD_FLAG_REQ_ONE)
    check(len(one) == 1, f"REQ_ONE gives exactly one extent ({one})")
    check(one[0][1] == 0 and one[0][0] <= 256 * KiB, f"REQ_ONE at 0: data, within the 256 KiB written ({one})")
    one = extents(h, 256 * KiB, 64 * KiB, nbd.CMD_FLAG_REQ_ONE)
    check(len(one) == 1 and one[0][0] <= 64 * KiB, f"REQ_ONE extent within the request ({one})")
    check(one[0][1] & ZERO, f"REQ_ONE at 256 KiB: zeros ({one})")
    full = extents(h, 0, size)
    check(sum(l for l, _ in full[:-1]) < size, "extents of a whole-device query stay within it")

    h.cache(1 * MiB, 0)
    h.cache(4 * MiB, 8 * MiB)
    check(True, "cache over data and over a hole")

    h.pwrite(bytes([0xF1]) * (64 * KiB), 2 * MiB, nbd.CMD_FLAG_FUA)
    check(is_fill(h.pread(64 * KiB, 2 * MiB), 0xF1), "FUA write read back")
    h.flush()
    check(True, "flush")

    # Multi-conn: a flush on one connection makes writes completed on it visible to all.
    h2 = connect(uri)
    check(h2.can_multi_conn(), "second connection also gets multi-conn")
    h.pwrite(bytes([0x77]) * (64 * KiB), 3 * MiB)
    h.flush()
    check(is_fill(h2.pread(64 * KiB, 3 * MiB), 0x77), "conn 2 sees conn 1's flushed write")
    h2.pwrite(bytes([0x78]) * (64 * KiB), 3 * MiB + 64 * KiB)
    h2.flush()
    check(is_fill(h.pread(64 * KiB, 3 * MiB + 64 * KiB), 0x78), "conn 1 sees conn 2's flushed write")
    h2.pwrite(bytes([0x99]) * (64 * KiB), 4 * MiB)
    h2.trim(64 * KiB, 4 * MiB)
    h2.flush()
    check(is_fill(h.pread(64 * KiB, 4 * MiB), 0), "conn 1 sees conn 2's flushed trim")
    h2.shutdown()

    # Error paths: let the bad requests reach the server.
    h.set_strict_mode(0)
    expect_errno("read crossing the end", lambda: h.pread(4096, size - 2048), [errno.EINVAL])
    expect_errno("read starting at the end", lambda: h.pread(4096, size), [errno.EINVAL])
    expect_errno("write crossing the end", lambda: h.pwrite(bytes(4096), size - 2048), [errno.ENOSPC, errno.EINVAL])
    expect_errno("trim past the end", lambda: h.trim(8192, size - 4096), [errno.ENOSPC, errno.EINVAL])
    expect_errno("zero past the end", lambda: h.zero(8192, size - 4096), [errno.ENOSPC, errno.EINVAL])
    expect_errno("block_status at the end", lambda: extents(h, size, 4096), [errno.EINVAL])
    expect_errno("read larger than the maximum block size (33 MiB)", lambda: h.pread(33 * MiB, 0), [errno.EINVAL, errno.EOVERFLOW, errno.ENOMEM])
    check(is_fill(h.pread(256 * KiB, 0), 0x5A), "connection still works after error replies")

    h.pwrite(bytes([0xC8]) * MiB, 5 * MiB)
    h.flush()
    verify_layout(h)
    h.shutdown()
    log("ALL OK")


def verify_layout(h):
    size = h.get_size()
    end = 8 * MiB
    data = h.pread(end, 0)
    want = bytearray(end)
    for off, length, byte in LAYOUT:
        want[off:off + length] = bytes([byte]) * length
    if data != bytes(want):
        first = next(i for i in range(end) if data[i] != want[i])
        fail(f"layout differs first at byte {first}: got {data[first]:#x}, want {want[first]:#x}")
    check(is_fill(h.pread(MiB, size - MiB), 0), "layout as expected (0..8 MiB, last MiB zero)")


def ro(uri, size):
    h = connect(uri)
    check(h.get_size() == size, f"export size is {size}")
    check(h.is_read_only(), "export is read-only")
    verify_layout(h)
    check(flags_over(h, 8 * MiB, 8 * MiB) == {HOLE | ZERO}, "block_status works read-only")
    h.set_strict_mode(0)
    expect_errno("write on a read-only export", lambda: h.pwrite(bytes([1]) * 4096, 0), [errno.EPERM])
    expect_errno("FUA write on a read-only export", lambda: h.pwrite(bytes([1]) * 4096, 0, nbd.CMD_FLAG_FUA), [errno.EPERM])
    expect_errno("trim on a read-only export", lambda: h.trim(4096, 0), [errno.EPERM])
    expect_errno("zero on a read-only export", lambda: h.zero(4096, 0), [errno.EPERM])
    verify_layout(h)
    h.shutdown()
    log("ALL OK")


def layout_only(uri, size):
    h = connect(uri)
    verify_layout(h)
    h.shutdown()
    log("ALL OK")


def main():
    mode, uri, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"rw": rw, "ro": ro, "ro-layout": layout_only}[mode](uri, size)


if __name__ == "__main__":
    main()
