"""Label Studio brush RLE (the thi-ng rle-pack bitstream), in numpy, without the heavy SDK.

A brush region is an H x W x 4 RGBA array flattened and packed MSB-first:
  32 bits  number of values (H*W*4)
   5 bits  word size - 1 (7: bytes)
  4x4 bits run-length field sizes - 1 (3, 4, 8, 16)
then chunks: 1 bit "repeat", 2 bits size index k, rle_sizes[k] bits n (count = n + 1), followed by one
word repeated n + 1 times (repeat) or n + 1 literal words; zero-padded to a whole byte.
The mask is the alpha channel; 255 marks the region so that it renders opaque in the editor.
"""
from __future__ import annotations

import numpy as np

WORD = 8
RLE_SIZES = (3, 4, 8, 16)
MAX_RUN = 1 << RLE_SIZES[-1]


class _Bits:
    def __init__(self):
        self.out = bytearray()
        self.acc = 0
        self.nbits = 0

    def write(self, value: int, width: int) -> None:
        self.acc = (self.acc << width) | (value & ((1 << width) - 1))
        self.nbits += width
        while self.nbits >= 8:
            self.nbits -= 8
            self.out.append((self.acc >> self.nbits) & 0xFF)
        self.acc &= (1 << self.nbits) - 1

    def finish(self) -> list[int]:
        if self.nbits:
            self.out.append((self.acc << (8 - self.nbits)) & 0xFF)
            self.acc = self.nbits = 0
        return list(self.out)


def _size_index(n: int) -> int:
    return next(i for i, bits in enumerate(RLE_SIZES) if n < (1 << bits))


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(start, length) of maximal runs of equal values."""
    change = np.flatnonzero(np.diff(values)) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [len(values)]]))
    return starts, lengths


def encode(values: np.ndarray) -> list[int]:
    """Pack a flat uint8 array; runs of two or more equal words become repeat chunks."""
    values = np.asarray(values, dtype=np.uint8).ravel()
    bits = _Bits()
    bits.write(len(values), 32)
    bits.write(WORD - 1, 5)
    for size in RLE_SIZES:
        bits.write(size - 1, 4)
    literals: list[int] = []

    def flush_literals():
        while literals:
            part = literals[:MAX_RUN]
            del literals[:MAX_RUN]
            n = len(part) - 1
            k = _size_index(n)
            bits.write(0, 1)
            bits.write(k, 2)
            bits.write(n, RLE_SIZES[k])
            for word in part:
                bits.write(word, WORD)

    for start, length in zip(*_runs(values)):
        word = int(values[start])
        if length == 1:
            literals.append(word)
            continue
        flush_literals()
        while length:
            count = min(length, MAX_RUN)
            k = _size_index(count - 1)
            bits.write(1, 1)
            bits.write(k, 2)
            bits.write(count - 1, RLE_SIZES[k])
            bits.write(word, WORD)
            length -= count
    flush_literals()
    return bits.finish()


def decode(data: list[int]) -> np.ndarray:
    """Unpack to a flat uint8 array; raises ValueError on a malformed stream."""
    buf = np.asarray(data, dtype=np.uint8)
    bitstream = np.unpackbits(buf)
    pos = 0

    def read(width: int) -> int:
        nonlocal pos
        if pos + width > len(bitstream):
            raise ValueError("brush RLE stream ends early")
        chunk = bitstream[pos:pos + width]
        pos += width
        return int(chunk.dot(1 << np.arange(width - 1, -1, -1, dtype=np.int64))) if width else 0

    total = read(32)
    word = read(5) + 1
    sizes = [read(4) + 1 for _ in range(4)]
    out = np.empty(total, dtype=np.uint8)
    i = 0
    while i < total:
        repeat = read(1)
        n = read(sizes[read(2)]) + 1
        if i + n > total:
            raise ValueError("brush RLE run goes past the declared size")
        if repeat:
            out[i:i + n] = read(word)
        else:
            if pos + n * word > len(bitstream):
                raise ValueError("brush RLE stream ends early")
            words = bitstream[pos:pos + n * word].reshape(n, word)
            out[i:i + n] = words.dot(1 << np.arange(word - 1, -1, -1, dtype=np.int64))
            pos += n * word
        i += n
    return out


def mask_to_rle(mask: np.ndarray) -> list[int]:
    """Binary H x W mask -> brush RLE of its RGBA form with 255 where the mask is set."""
    alpha = np.where(np.asarray(mask) > 0, 255, 0).astype(np.uint8)
    return encode(np.repeat(alpha.ravel(), 4))


def rle_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Brush RLE -> boolean H x W mask (alpha > 0); ValueError if it does not hold H x W x 4 values."""
    flat = decode(rle)
    if flat.size != height * width * 4:
        raise ValueError(f"brush RLE holds {flat.size} values, expected {height}x{width}x4 = {height * width * 4}")
    return flat.reshape(height, width, 4)[:, :, 3] > 0
