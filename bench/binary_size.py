#!/usr/bin/env python3
"""Where the bytes of the static release keygate go.

Reads the linker map of the release build (BUILD_DIR/keygate.map, written by
the static link) and prints one table: the bytes each library (or keygate's
own code) keeps in the binary after section garbage collection, split into
code, read-only data, writable data and unwind tables; then the largest
object files. The stripped size of BUILD_DIR/dist/keygate comes first.

Usage: bench/binary_size.py [BUILD_DIR] [--objects N]   (default build-release, 25)
"""
import collections
import os
import re
import sys

KINDS = (  # (column, section-name prefixes); first match wins
    ("code", (".text",)),
    ("rodata", (".rodata", ".data.rel.ro")),
    ("data", (".data", ".tdata", ".init_array", ".fini_array", "__libc")),
    ("unwind", (".eh_frame", ".gcc_except_table")),
)
ENTRY = re.compile(r"^ (\S+)\s+0x[0-9a-f]+\s+0x([0-9a-f]+)\s+(\S.*)$")
NAME_ONLY = re.compile(r"^ ([.\w][^\s]*)$")
CONTINUED = re.compile(r"^\s{10,}0x[0-9a-f]+\s+0x([0-9a-f]+)\s+(\S.*)$")
MEMBER = re.compile(r"(?:.*/)?([^/()]+\.a)\(([^)]+)\)$")


def kind_of(section):
    for kind, prefixes in KINDS:
        if section.startswith(prefixes):
            return kind
    return None


def owner(path):
    """(library, object) for an input file of the link."""
    m = MEMBER.match(path)
    if m:
        lib = m.group(1)
        if lib.startswith("libkeygate_"):
            lib = "keygate (" + lib[len("libkeygate_"):-2] + ")"
        return lib, m.group(2)
    name = os.path.basename(path)
    if "CMakeFiles" in path:
        return "keygate (main)", name
    return name, name


def read_map(path):
    text = open(path, encoding="utf-8", errors="replace").read()
    if "Linker script and memory map" not in text:
        sys.exit(f"binary_size: {path} is not a GNU ld map file")
    text = text.split("Linker script and memory map", 1)[1]
    libs = collections.defaultdict(collections.Counter)
    objects = collections.Counter()
    pending = None
    for line in text.splitlines():
        m = ENTRY.match(line)
        if m:
            section, size, source = m.group(1), int(m.group(2), 16), m.group(3)
        else:
            # A long section name stands on its own line; its numbers follow.
            n = NAME_ONLY.match(line)
            c = CONTINUED.match(line)
            if n:
                pending = n.group(1)
                continue
            if not (c and pending):
                pending = None
                continue
            section, size, source = pending, int(c.group(1), 16), c.group(2)
        pending = None
        kind = kind_of(section)
        if kind is None or size == 0 or section.startswith((".tbss", ".bss")):
            continue
        if section.startswith(".eh_frame_hdr"):
            # Made by the linker (one entry per function with unwind
            # information), though the map names the first input file.
            lib, obj = "(.eh_frame_hdr index)", "linker"
        else:
            lib, obj = owner(source.strip())
        libs[lib][kind] += size
        objects[f"{lib}: {obj}"] += size
    return libs, objects


def main():
    args = sys.argv[1:]
    top = 25
    if "--objects" in args:
        i = args.index("--objects")
        top = int(args[i + 1])
        del args[i : i + 2]
    build = args[0] if args else "build-release"
    libs, objects = read_map(os.path.join(build, "keygate.map"))
    binary = os.path.join(build, "dist", "keygate")
    if os.path.exists(binary):
        size = os.path.getsize(binary)
        print(f"{binary}: {size} bytes stripped ({size / 2**20:.2f} MiB)")
    total = sum(sum(c.values()) for c in libs.values())
    cols = [k for k, _ in KINDS]
    print(f"\nbytes kept per library (linker map, after --gc-sections): {total} in all")
    print(f"{'library':<28}" + "".join(f"{c:>10}" for c in cols) + f"{'total':>10}{'share':>8}")
    for lib, c in sorted(libs.items(), key=lambda kv: -sum(kv[1].values())):
        t = sum(c.values())
        print(f"{lib:<28}" + "".join(f"{c[k]:>10}" for k in cols) + f"{t:>10}{100 * t / total:>7.1f}%")
    print(f"\nlargest {top} object files")
    for name, size in objects.most_common(top):
        print(f"  {size:>9}  {name}")


if __name__ == "__main__":
    main()
