#!/usr/bin/env python3
"""Drives one QEMU boot over its serial console (QEMU's stdio).

Usage: serial_driver.py LOG EXPECT [--answer PROMPT TEXT]... [--forbid TEXT]...
       [--timeout S] -- qemu-system-x86_64 ...

Streams the console to LOG, answers each PROMPT with TEXT (once), and exits 0
when EXPECT appears, 1 when a --forbid text appears first, the guest stops
without EXPECT, or the timeout passes. Prints what it saw.
"""
import os
import select
import subprocess
import sys
import time


def main(argv):
    sep = argv.index("--")
    opts, cmd = argv[1:sep], argv[sep + 1:]
    log_path, expect = opts[0], opts[1]
    answers, forbid, timeout = [], [], 600.0
    i = 2
    while i < len(opts):
        if opts[i] == "--answer":
            answers.append([opts[i + 1], opts[i + 2], False])
            i += 3
        elif opts[i] == "--forbid":
            forbid.append(opts[i + 1])
            i += 2
        elif opts[i] == "--timeout":
            timeout = float(opts[i + 1])
            i += 2
        else:
            sys.exit("serial_driver: unknown option " + opts[i])

    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    seen = ""
    start = time.monotonic()
    result = 1
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        while True:
            left = timeout - (time.monotonic() - start)
            if left <= 0:
                print(f"serial_driver: timeout after {timeout:.0f} s waiting for {expect!r}")
                break
            ready, _, _ = select.select([proc.stdout], [], [], min(left, 1.0))
            if not ready:
                if proc.poll() is not None:
                    print("serial_driver: guest stopped before " + repr(expect))
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                print("serial_driver: console closed before " + repr(expect))
                break
            text = chunk.decode("utf-8", errors="replace")
            log.write(text)
            log.flush()
            seen += text
            bad = [f for f in forbid if f in seen]
            if bad:
                print(f"serial_driver: forbidden {bad[0]!r} appeared")
                break
            for answer in answers:
                if not answer[2] and answer[0] in seen:
                    answer[2] = True
                    print(f"serial_driver: answering {answer[0]!r}")
                    proc.stdin.write(answer[1].encode() + b"\n")
                    proc.stdin.flush()
            if expect in seen:
                result = 0
                print(f"serial_driver: saw {expect!r} after {time.monotonic() - start:.1f} s")
                break
    if proc.poll() is None:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv))
