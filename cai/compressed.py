"""Compressed input (gzip, bzip2, xz, zstd), told by suffix or by its first bytes and read
decompressed as it is needed; bad or cut-off data is one InputError, not the codec's exception."""

from __future__ import annotations

import bz2
import io
import lzma
import zlib
from typing import IO

from cai.errors import InputError

COMPRESSED_SUFFIXES = {".gz": "gzip", ".bz2": "bzip2", ".xz": "xz", ".zst": "zstd"}

_SIGNATURES = {"gzip": b"\x1f\x8b", "bzip2": b"BZh", "xz": b"\xfd7zXZ\x00", "zstd": b"\x28\xb5\x2f\xfd"}


def sniff_compression(head: bytes) -> str | None:
    """The compression whose signature `head` starts with (none of them can start UTF-8 text,
    bar bzip2's, which is checked further)."""
    for kind, signature in _SIGNATURES.items():
        if head.startswith(signature):
            if kind == "bzip2" and not (head[3:4].isdigit() and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90")):
                continue
            return kind
    return None


def _decompressor(kind: str, name: str):
    if kind == "gzip":
        return lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)
    if kind == "bzip2":
        return bz2.BZ2Decompressor
    if kind == "xz":
        return lzma.LZMADecompressor
    try:
        import zstandard
    except ImportError:
        try:
            from compression.zstd import ZstdDecompressor       # Python 3.14's standard library
        except ImportError:
            raise InputError(name, "is zstd-compressed: reading it needs the zstandard package "
                                   "(pip install zstandard)") from None
        return ZstdDecompressor
    return zstandard.ZstdDecompressor().decompressobj


class Decompressing(io.RawIOBase):
    """The decompressed bytes of a compressed stream (gzip, bzip2, xz or zstd; several members or
    frames one after another, as `cat a.gz b.gz` makes), read as they are needed. Bad or cut-off
    data is one InputError, not the codec's exception."""

    CHUNK = 1 << 16

    def __init__(self, fp: IO[bytes], kind: str, name: str):
        super().__init__()
        self._fp, self._kind, self._name = fp, kind, name
        self._new = _decompressor(kind, name)
        self._codec = None
        self._out, self._at = b"", 0
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._at == len(self._out) and not self._done:
            self._out, self._at = self._fill(), 0
        n = min(len(buffer), len(self._out) - self._at)
        buffer[:n] = self._out[self._at:self._at + n]
        self._at += n
        return n

    def _fill(self) -> bytes:
        chunk = self._fp.read(self.CHUNK)
        if not chunk:
            self._done = True
            if self._codec is not None and not self._codec.eof:
                raise self._error("it ends early: cut off?")
            return b""
        if self._codec is None and not chunk.startswith(_SIGNATURES[self._kind][:len(chunk)]):
            raise self._error(f"it does not start with the {self._kind} signature")
        out = []
        try:
            while chunk:
                if self._codec is None or self._codec.eof:
                    self._codec = self._new()
                out.append(self._codec.decompress(chunk))
                chunk = self._codec.unused_data if self._codec.eof else b""
        except InputError:
            raise
        except Exception as exc:        # zlib.error, OSError, lzma.LZMAError, zstandard.ZstdError…
            raise self._error(str(exc) or type(exc).__name__) from None
        return b"".join(out)

    def _error(self, detail: str) -> InputError:
        return InputError(self._name, f"not a valid {self._kind} file ({detail})")


def open_stream(fp: IO[bytes], name: str, head_size: int = 16,
                kind: str | None = None) -> tuple[IO[bytes], bytes]:
    """(the stream to read, decompressed where `kind` or the first bytes say so; those first
    bytes of the data as stored). A stream that cannot seek keeps the bytes it was peeked at."""
    if fp.seekable():
        head = fp.read(head_size)
        fp.seek(-len(head), io.SEEK_CUR)
    else:
        head = fp.read(head_size)
        fp = io.BufferedReader(_Rejoined(head, fp))
    kind = kind or sniff_compression(head)
    return (io.BufferedReader(Decompressing(fp, kind, name)) if kind else fp), head


class _Rejoined(io.RawIOBase):
    """Bytes already read from a stream, then the rest of it."""

    def __init__(self, head: bytes, fp: IO[bytes]):
        super().__init__()
        self._head, self._fp = head, fp

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n], self._head = self._head[:n], self._head[n:]
            return n
        data = self._fp.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)
