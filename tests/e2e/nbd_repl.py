#!/usr/bin/python3
"""A libnbd connection driven line by line from stdin, so a test can interleave steps on
several connections and daemons. Run with Debian's /usr/bin/python3 (python3-libnbd).

  nbd_repl.py TARGET [EXPORT_NAME]

TARGET is tcp:HOST:PORT or unix:PATH (the export is EXPORT_NAME, default "", any bytes), or
an NBD URI naming its export. Commands, one per line:

  write OFFSET LENGTH BYTE [fua]   fill with BYTE (hex)
  read OFFSET LENGTH BYTE          read and compare with BYTE repeated
  zero OFFSET LENGTH | trim OFFSET LENGTH | flush
  list                             NBD_OPT_LIST on a fresh connection: names, one per line
  size
  quit

Each command answers exactly one line: "ok [detail]" or "err ERRNAME message". A mismatch on
read answers "err MISMATCH first differing offset and byte".
"""

import errno
import sys

import nbd


def connect(h, target, name):
    if target.startswith("tcp:"):
        host, port = target[4:].rsplit(":", 1)
        h.set_export_name(name or "")
        h.connect_tcp(host, port)
    elif target.startswith("unix:"):
        h.set_export_name(name or "")
        h.connect_unix(target[5:])
    else:
        h.connect_uri(target)


def main():
    target = sys.argv[1]
    name = sys.argv[2] if len(sys.argv) > 2 else None
    h = nbd.NBD()
    h.set_strict_mode(0)  # let the server judge every request
    try:
        connect(h, target, name)
    except nbd.Error as e:
        num = e.args[1] if len(e.args) > 1 else 0
        print(f"err {errno.errorcode.get(num, str(num))} {e}", flush=True)
        return
    print("ok connected", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd, args = words[0], words[1:]
        try:
            if cmd == "write":
                off, length, byte = int(args[0]), int(args[1]), int(args[2], 16)
                flags = nbd.CMD_FLAG_FUA if "fua" in args[3:] else 0
                h.pwrite(bytes([byte]) * length, off, flags)
                print("ok", flush=True)
            elif cmd == "read":
                off, length, byte = int(args[0]), int(args[1]), int(args[2], 16)
                data = h.pread(length, off)
                want = bytes([byte]) * length
                if data == want:
                    print("ok", flush=True)
                else:
                    i = next(i for i in range(length) if data[i] != want[i])
                    print(f"err MISMATCH at {off + i}: got {data[i]:#04x}, want {byte:#04x}", flush=True)
            elif cmd == "zero":
                h.zero(int(args[1]), int(args[0]))
                print("ok", flush=True)
            elif cmd == "trim":
                h.trim(int(args[1]), int(args[0]))
                print("ok", flush=True)
            elif cmd == "flush":
                h.flush()
                print("ok", flush=True)
            elif cmd == "size":
                print(f"ok {h.get_size()}", flush=True)
            elif cmd == "list":
                l = nbd.NBD()
                l.set_opt_mode(True)
                connect(l, target, name)
                names = []
                l.opt_list(lambda n, d: names.append(n) or 0)
                l.opt_abort()
                print("ok " + "\x1f".join(names), flush=True)
            elif cmd == "quit":
                print("ok", flush=True)
                break
            else:
                print(f"err EINVAL unknown command {cmd}", flush=True)
        except nbd.Error as e:
            num = e.args[1] if len(e.args) > 1 else 0
            print(f"err {errno.errorcode.get(num, str(num))} {e}", flush=True)
    try:
        h.shutdown()
    except nbd.Error:
        pass


if __name__ == "__main__":
    main()
