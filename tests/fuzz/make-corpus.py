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
    chunks = [(0, pages)] if pages else []
    return crafted_file(npages, chunks)


def crafted_file(npages, chunks, region_size=None):
    """A file whose checksums and counts all match whatever it claims.

    chunks: [(first_page, {bit: 4096 bytes})], written in that order.
    """
    if region_size is None:
        region_size = npages * 4096
    h = b"COWMMSNP" + struct.pack("<IIQQII", 1, 4096, region_size,
                                  npages, 512, 0) + bytes(20)
    h += struct.pack("<I", crc32c(h))
    out, chunks_crc, stored = h, 0, 0
    for index, (first, pages) in enumerate(chunks):
        bitmap = bytearray(64)
        for i in pages:
            bitmap[i // 8] |= 1 << (i % 8)
        data = b"".join(pages[i] for i in sorted(pages))
        crc = crc32c(data, crc32c(bytes(bitmap)))
        out += struct.pack("<IIQII", 0x4B4E4843, index, first, len(pages),
                           crc)
        out += bytes(bitmap) + data
        chunks_crc = crc32c(struct.pack("<I", crc), chunks_crc)
        stored += len(pages)
    t = b"COWMMEND" + struct.pack("<QQI", len(chunks), stored, chunks_crc)
    return out + t + struct.pack("<I", crc32c(t))


WRAP = (1 << 52) + 64  # * 4096 == 64 pages' bytes, mod 2^64


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
        # npages * 4096 wraps to the region's size (issue 15, item 7):
        # the reader must bound pages by the region, not by npages.
        "npages-wrap": crafted_file(WRAP, [(512, {0: page(2)})], 64 * 4096),
        "npages-wrap-empty": crafted_file(WRAP, [], 64 * 4096),
        "npages-wrap-2-52": crafted_file(WRAP, [(1 << 52, {0: page(2)})],
                                         64 * 4096),
        "npages-wrap-u64": crafted_file((1 << 64) - 1, [(512, {0: page(2)})],
                                        (1 << 64) - 4096),
        # Honest counts, chunks that break the rules.
        "chunk-past-end": crafted_file(64, [(512, {0: page(2)})]),
        "bit-past-end": crafted_file(64, [(0, {1: page(2), 100: page(3)})]),
        "region-size-odd": crafted_file(64, [(0, {1: page(2)})],
                                        64 * 4096 + 1),
        # 1040 pages: two full chunks and a partial one.
        "big-three-chunks": crafted_file(1040, [(0, {0: page(1)}),
                                                (512, {511: page(2)}),
                                                (1024, {15: page(3)})]),
        "big-gap": crafted_file(1040, [(1024, {0: page(4), 1: page(5)})]),
        "big-out-of-order": crafted_file(1040, [(512, {0: page(1)}),
                                                (0, {0: page(2)})]),
        "big-same-chunk-twice": crafted_file(1040, [(512, {3: page(1)}),
                                                    (512, {4: page(2)})]),
        "big-bit-past-end": crafted_file(1040, [(1024, {16: page(1)})]),
    }
    for name, data in seeds.items():
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
