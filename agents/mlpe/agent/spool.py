"""A bounded first-in-first-out queue of Kafka records on disk.

Records are framed in segment files (length, CRC-32, topic, key, value); a
cursor file says how far the head has been delivered, so a restarted agent
replays exactly what was not acknowledged. When the bound is hit the oldest
segment is dropped and its records are counted as lost, never silently.
"""

from __future__ import annotations

import contextlib
import json
import logging
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
HEADER = struct.Struct("<IIHI")  # body length, crc32(body), topic length, key length


@dataclass(frozen=True)
class Record:
    topic: str
    key: bytes
    value: bytes


class Spool:
    def __init__(self, directory: Path, max_bytes: int = 512 << 20, segment_bytes: int = 8 << 20):
        if max_bytes < 2 * segment_bytes:
            segment_bytes = max(max_bytes // 4, 4096)
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.lost = 0                            # records dropped because the bound was hit
        self.counts: dict[int, int] = {}         # segment -> records not yet delivered
        self.sizes: dict[int, int] = {}          # segment -> bytes on disk
        self.head_offset = 0                     # byte offset of the next record in the head
        self._writer = None
        self._load()

    # -- state on disk -----------------------------------------------------------------
    def _path(self, segment: int) -> Path:
        return self.dir / f"{segment:012d}.spool"

    def _load(self) -> None:
        cursor = {}
        with contextlib.suppress(OSError, ValueError):
            cursor = json.loads((self.dir / "cursor.json").read_text())
        for path in sorted(self.dir.glob("*.spool")):
            segment = int(path.stem)
            if segment < cursor.get("segment", -1):
                path.unlink()
                continue
            start = cursor.get("offset", 0) if segment == cursor.get("segment") else 0
            count, good_end = 0, start
            with path.open("rb") as f:
                f.seek(start)
                for _, end in _frames(f, start):
                    count, good_end = count + 1, end
            if good_end < path.stat().st_size:  # a record cut short by a crash: drop it
                with path.open("r+b") as f:
                    f.truncate(good_end)
            self.counts[segment] = count
            self.sizes[segment] = good_end
        if self.counts and cursor.get("segment") == min(self.counts):
            self.head_offset = cursor.get("offset", 0)
        if len(self):
            log.info("spool: %d undelivered records found in %s", len(self), self.dir)

    def _save_cursor(self) -> None:
        tmp = self.dir / "cursor.tmp"
        head = min(self.counts) if self.counts else 0
        tmp.write_text(json.dumps({"segment": head, "offset": self.head_offset}))
        tmp.replace(self.dir / "cursor.json")

    # -- queue ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return sum(self.counts.values())

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values()) - self.head_offset

    def append(self, records: list[Record]) -> None:
        for record in records:
            topic = record.topic.encode()
            body = topic + record.key + record.value
            frame = HEADER.pack(len(body), zlib.crc32(body), len(topic), len(record.key)) + body
            tail = max(self.counts) if self.counts else -1
            full = tail >= 0 and self.sizes[tail] > 0 and \
                self.sizes[tail] + len(frame) > self.segment_bytes
            if self._writer is None or full:
                tail = self._roll(tail + 1)
            self._writer.write(frame)
            self.counts[tail] += 1
            self.sizes[tail] += len(frame)
            while self.bytes > self.max_bytes and len(self.counts) > 1:
                self._drop_oldest()
        if self._writer is not None:
            self._writer.flush()  # in the OS after each append: survives an agent crash

    def _roll(self, segment: int) -> int:
        if self._writer is not None:
            self._writer.close()
        self._writer = self._path(segment).open("ab")
        self.counts.setdefault(segment, 0)
        self.sizes.setdefault(segment, 0)
        return segment

    def _drop_oldest(self) -> None:
        head = min(self.counts)
        dropped = self.counts.pop(head)
        self.sizes.pop(head)
        self._path(head).unlink(missing_ok=True)
        self.head_offset = 0
        self.lost += dropped
        self._save_cursor()
        log.error("spool: bound of %d bytes reached; dropped %d oldest records (%d lost in all)",
                  self.max_bytes, dropped, self.lost)

    def peek(self, limit: int) -> list[tuple[Record, int, int]]:
        """Up to `limit` oldest records as (record, segment, end offset), not removed."""
        out: list[tuple[Record, int, int]] = []
        if self._writer is not None:
            self._writer.flush()
        for segment in sorted(self.counts):
            start = self.head_offset if segment == min(self.counts) else 0
            with self._path(segment).open("rb") as f:
                f.seek(start)
                for record, end in _frames(f, start):
                    out.append((record, segment, end))
                    if len(out) >= limit:
                        return out
        return out

    def ack(self, delivered: list[tuple[Record, int, int]]) -> None:
        """Remove records returned by peek() once Kafka has acknowledged them."""
        if not delivered:
            return
        for _, segment, _ in delivered:
            if segment in self.counts:
                self.counts[segment] -= 1
        _, last_segment, last_end = delivered[-1]
        for segment in sorted(self.counts):
            if segment < last_segment or (segment == last_segment and self.counts[segment] == 0
                                          and segment != max(self.counts)):
                self.counts.pop(segment)
                self.sizes.pop(segment)
                self._path(segment).unlink(missing_ok=True)
        if last_segment in self.counts:
            self.head_offset = last_end
        else:
            self.head_offset = 0
        if not len(self):  # everything delivered: start afresh
            if self._writer is not None:
                self._writer.close()
                self._writer = None
            for segment in list(self.counts):
                self._path(segment).unlink(missing_ok=True)
            self.counts.clear()
            self.sizes.clear()
            self.head_offset = 0
        self._save_cursor()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _frames(f, offset: int):
    """Yield (record, end offset) for each complete, intact frame from the file position."""
    while True:
        header = f.read(HEADER.size)
        if len(header) < HEADER.size:
            return
        length, crc, topic_len, key_len = HEADER.unpack(header)
        body = f.read(length)
        if len(body) < length or zlib.crc32(body) != crc:
            return
        offset += HEADER.size + length
        topic = body[:topic_len].decode()
        key = body[topic_len:topic_len + key_len]
        yield Record(topic, key, body[topic_len + key_len:]), offset
