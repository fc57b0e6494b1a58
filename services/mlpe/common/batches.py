"""Columnar metric batches: numpy arrays in, protobuf bytes out, and back.

One Kafka message carries every sample of one device over one flush interval:
a timestamp array plus one packed array per field. Decoding is a handful of
np.frombuffer calls, never a Python object per sample.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError as ProtobufDecodeError

from mlpe.v1 import metrics_pb2 as pb

F = pb.Field
# Counters and bitmasks need float64 to stay exact; gauges fit float32.
F64_FIELDS = frozenset({F.GPU_ENERGY, F.GPU_THROTTLE_REASONS, F.GPU_ECC_CORRECTED,
                        F.GPU_ECC_UNCORRECTED})
FIELD_NAMES: dict[int, str] = {v: F.Name(v) for v in F.values() if v}  # enum lookups are slow
GPU_FIELDS: tuple[int, ...] = tuple(v for v in F.values() if 0 < v < 100)
HOST_FIELDS: tuple[int, ...] = tuple(v for v in F.values() if v >= 100)
_DTYPES = {pb.VALUE_TYPE_F32: np.dtype("<f4"), pb.VALUE_TYPE_F64: np.dtype("<f8")}


def field_name(number: int) -> str:
    """GPU_POWER -> "power"; HOST_NET_RX -> "net_rx" (InfluxDB field names, readable output)."""
    name = F.Name(number).lower()
    return name.split("_", 1)[1]


def value_type(number: int) -> int:
    return pb.VALUE_TYPE_F64 if number in F64_FIELDS else pb.VALUE_TYPE_F32


class BatchError(ValueError):
    """A batch that cannot be decoded; the message says exactly why."""


@dataclass
class Batch:
    node_id: str
    device_kind: int
    device_index: int
    device_uuid: str
    agent_epoch_ns: int
    batch_seq: int
    first_sample_seq: int
    timestamps_ns: np.ndarray              # int64, one per sample
    columns: dict[int, np.ndarray]         # Field -> float32/float64 array, same length
    events: list[pb.DeviceEvent] = field(default_factory=list)
    sample_hz: float = 0.0
    job_id: str = ""

    @property
    def samples(self) -> int:
        return len(self.timestamps_ns)

    @property
    def values(self) -> int:
        return self.samples * len(self.columns)

    def matrix(self) -> tuple[tuple[int, ...], np.ndarray]:
        """(sorted field numbers, float64 array of shape (samples, fields)); computed once."""
        cached = self.__dict__.get("_matrix")
        if cached is None:
            fields = tuple(sorted(self.columns))
            out = np.empty((self.samples, len(fields)))
            for j, f in enumerate(fields):
                out[:, j] = self.columns[f]
            cached = self.__dict__["_matrix"] = (fields, out)
        return cached


def encode(batch: Batch) -> bytes:
    ts = np.asarray(batch.timestamps_ns, dtype=np.int64)
    base = int(ts[0]) if len(ts) else 0
    offsets_us = (ts - base) // 1000
    if len(ts) and (offsets_us.min() < 0 or offsets_us.max() > 0xFFFFFFFF):
        raise BatchError("timestamps must be ascending and span under 71 minutes")
    message = pb.MetricBatch(
        node_id=batch.node_id,
        device_kind=batch.device_kind,
        device_index=batch.device_index,
        device_uuid=batch.device_uuid,
        agent_epoch_ns=batch.agent_epoch_ns,
        batch_seq=batch.batch_seq,
        first_sample_seq=batch.first_sample_seq,
        base_time_ns=base,
        time_offsets_us=offsets_us.astype("<u4").tobytes(),
        events=batch.events,
        sample_hz=batch.sample_hz,
        job_id=batch.job_id,
    )
    for number, values in batch.columns.items():
        kind = value_type(number)
        message.series.add(field=number, type=kind,
                           values=np.asarray(values, dtype=_DTYPES[kind]).tobytes())
    return message.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@functools.lru_cache(maxsize=4096)
def _series_prefix(number: int, samples: int) -> bytes:
    """Wire bytes of MetricBatch.series (field 10) up to its values: tag, length, field, type."""
    kind = value_type(number)
    size = samples * _DTYPES[kind].itemsize
    inner = b"\x08" + _varint(number) + b"\x10" + _varint(kind) + b"\x1a" + _varint(size)
    return b"\x52" + _varint(len(inner) + size) + inner


@functools.lru_cache(maxsize=64)
def _columns_by_dtype(fields: tuple[int, ...]) -> list[tuple[np.dtype, list[int]]]:
    out = []
    for dtype in (_DTYPES[pb.VALUE_TYPE_F32], _DTYPES[pb.VALUE_TYPE_F64]):
        cols = [i for i, f in enumerate(fields) if _DTYPES[value_type(f)] == dtype]
        if cols:
            out.append((dtype, cols))
    return out


def encode_devices(
    template: pb.MetricBatch,
    devices: list[tuple[str, int, int, str]],
    timestamps_ns: np.ndarray,
    values: np.ndarray,
    fields: tuple[int, ...],
    events: list[list[pb.DeviceEvent]],
    batch_seq: np.ndarray,
    first_sample_seq: np.ndarray,
) -> list[bytes]:
    """encode() for every device of a source at once: the same bytes a decode() accepts,
    but one numpy conversion for the whole (samples, devices, fields) block.

    template carries agent_epoch_ns and sample_hz; devices are (node, kind, index, uuid).
    """
    samples = len(timestamps_ns)
    base = int(timestamps_ns[0])
    template.base_time_ns = base
    template.time_offsets_us = ((timestamps_ns - base) // 1000).astype("<u4").tobytes()
    groups = []  # float32 fields, then float64 fields
    for dtype, cols in _columns_by_dtype(fields):
        block = np.ascontiguousarray(values[:samples][:, :, cols].transpose(1, 2, 0),
                                     dtype=dtype).tobytes()
        prefixes = [_series_prefix(fields[i], samples) for i in cols]
        groups.append((block, prefixes, samples * dtype.itemsize))
    out = []
    for d, (node, kind, index, uuid) in enumerate(devices):
        template.node_id, template.device_kind = node, kind
        template.device_index, template.device_uuid = index, uuid
        template.batch_seq, template.first_sample_seq = int(batch_seq[d]), int(first_sample_seq[d])
        del template.events[:]
        template.events.extend(events[d])
        parts = [template.SerializeToString()]
        for block, prefixes, size in groups:
            start = d * len(prefixes) * size
            for j, prefix in enumerate(prefixes):
                parts.append(prefix)
                parts.append(block[start + j * size:start + (j + 1) * size])
        out.append(b"".join(parts))
    return out


def decode(raw: bytes) -> Batch:
    """Parse and validate; raises BatchError naming the first problem found."""
    message = pb.MetricBatch()
    try:
        message.ParseFromString(raw)
    except (ProtobufDecodeError, RuntimeError) as err:
        raise BatchError(f"not a MetricBatch: {err}") from None
    if not message.node_id:
        raise BatchError("MetricBatch: node_id is empty")
    if message.device_kind not in (pb.DEVICE_KIND_GPU, pb.DEVICE_KIND_HOST):
        raise BatchError(f"MetricBatch: device_kind {message.device_kind} is not GPU or HOST")
    if len(message.time_offsets_us) % 4:
        raise BatchError(f"MetricBatch: time_offsets_us has {len(message.time_offsets_us)} "
                         "bytes, not a multiple of 4")
    offsets = np.frombuffer(message.time_offsets_us, dtype="<u4")
    timestamps = message.base_time_ns + offsets.astype(np.int64) * 1000
    samples = len(offsets)
    # One numpy conversion per value type rather than per field: the per-field loop only
    # checks numbers (this runs for every message the stream consumes).
    by_type: dict[int, tuple[list[int], list[bytes]]] = {}
    seen: set[int] = set()
    for field_number, kind, values in [(s.field, s.type, s.values) for s in message.series]:
        name = FIELD_NAMES.get(field_number)
        if name is None:
            raise BatchError(f"MetricBatch: unknown field number {field_number}")
        dtype = _DTYPES.get(kind)
        if dtype is None:
            raise BatchError(f"MetricBatch: field {name} has no value type")
        if len(values) != dtype.itemsize * samples:
            raise BatchError(
                f"MetricBatch: field {name} has {len(values) / dtype.itemsize:g} "
                f"samples, timestamps has {samples}")
        if field_number in seen:
            raise BatchError(f"MetricBatch: field {name} appears twice")
        seen.add(field_number)
        fields, chunks = by_type.setdefault(kind, ([], []))
        fields.append(field_number)
        chunks.append(values)
    columns: dict[int, np.ndarray] = {}
    for kind, (fields, chunks) in by_type.items():
        block = np.frombuffer(b"".join(chunks), dtype=_DTYPES[kind]).reshape(len(fields),
                                                                             samples)
        columns.update(zip(fields, block, strict=True))
    return Batch(
        node_id=message.node_id,
        device_kind=message.device_kind,
        device_index=message.device_index,
        device_uuid=message.device_uuid,
        agent_epoch_ns=message.agent_epoch_ns,
        batch_seq=message.batch_seq,
        first_sample_seq=message.first_sample_seq,
        timestamps_ns=timestamps,
        columns=columns,
        events=list(message.events),
        sample_hz=message.sample_hz,
        job_id=message.job_id,
    )
