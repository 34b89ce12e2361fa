#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""Write the seed corpus of fuzz-format: a few small snapshot files for a
64-page region, valid and damaged.  The format: libcowmm/format.c."""
import os
import struct
import sys

POLY = 0x82F63B78
TABLE = []
for n in range(256):
    c = n
    for _ in range(8):
        c = (c >> 1) ^ POLY if c & 1 else c >> 1
    TABLE.append(c)


def crc32c(data, crc=0):
    crc ^= 0xFFFFFFFF
    for b in data:
        crc = TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def snapshot_file(npages, pages):
    """pages: {index: 4096 bytes}, all within the first chunk."""
    h = b"COWMMSNP" + struct.pack("<IIQQII", 1, 4096, npages * 4096, npages,
                                  512, 0) + bytes(20)
    h += struct.pack("<I", crc32c(h))
    out, chunks_crc, nchunks = h, 0, 0
    if pages:
        bitmap = bytearray(64)
        for i in pages:
            bitmap[i // 8] |= 1 << (i % 8)
        data = b"".join(pages[i] for i in sorted(pages))
        crc = crc32c(data, crc32c(bytes(bitmap)))
        out += struct.pack("<IIQII", 0x4B4E4843, 0, 0, len(pages), crc)
        out += bytes(bitmap) + data
        chunks_crc = crc32c(struct.pack("<I", crc))
        nchunks = 1
    t = b"COWMMEND" + struct.pack("<QQI", nchunks, len(pages), chunks_crc)
    return out + t + struct.pack("<I", crc32c(t))


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "corpus")
    os.makedirs(d, exist_ok=True)
    page = lambda v: bytes((v + i) & 0xFF for i in range(4096))
    two = snapshot_file(64, {0: page(1), 63: page(9)})
    seeds = {
        "empty-region": snapshot_file(64, {}),
        "two-pages": two,
        "three-pages": snapshot_file(64, {5: page(3), 6: page(4),
                                          40: page(5)}),
        "other-size": snapshot_file(32, {1: page(7)}),
        "bad-chunk-crc": two[:200] + bytes([two[200] ^ 1]) + two[201:],
        "truncated": two[:len(two) - 7],
        "no-trailer": two[:len(two) - 32],
        "version-2": two[:8] + struct.pack("<I", 2) + two[12:],
        "header-only": two[:64],
    }
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
