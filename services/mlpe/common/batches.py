"""Columnar metric batches: numpy arrays in, protobuf bytes out, and back.

One Kafka message carries every sample of every device of one kind on one node over
one flush interval: a timestamp array shared by the devices plus one packed
(devices x samples) array per field. Decoding is a handful of
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
    """The samples of one device: what a detector or a test reasons about. The wire
    carries a node's devices together (NodeBatch); `NodeBatch.device(d)` is one of them."""
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


@dataclass
class NodeBatch:
    """Every device of one kind on one node over one flush (one Kafka message)."""
    node_id: str
    device_kind: int
    agent_epoch_ns: int
    device_indices: np.ndarray             # int64 (D,)
    device_uuids: list[str]
    batch_seqs: np.ndarray                 # uint64 (D,)
    first_sample_seqs: np.ndarray          # uint64 (D,)
    timestamps_ns: np.ndarray              # int64 (S,), shared by every device
    columns: dict[int, np.ndarray]         # Field -> float32/float64 array (D, S)
    events: list[list[pb.DeviceEvent]]     # per device
    sample_hz: float = 0.0
    job_id: str = ""
    # Per device, the job it works for (the stream fills it from placements); None: job_id.
    jobs: list[str] | None = None

    @property
    def samples(self) -> int:
        return len(self.timestamps_ns)

    @property
    def devices(self) -> int:
        return len(self.device_indices)

    @property
    def values(self) -> int:
        return self.samples * self.devices * len(self.columns)

    def job_of_device(self, d: int) -> str:
        return self.job_id if self.jobs is None else self.jobs[d]

    def matrix(self) -> tuple[tuple[int, ...], np.ndarray]:
        """(sorted field numbers, float64 array (samples, devices, fields)); computed once."""
        cached = self.__dict__.get("_matrix")
        if cached is None:
            fields = tuple(sorted(self.columns))
            if fields:  # one stack and one transpose, not a copy per field
                out = np.stack([self.columns[f] for f in fields], axis=-1,
                               dtype=np.float64).transpose(1, 0, 2)
            else:
                out = np.empty((self.samples, self.devices, 0))
            cached = self.__dict__["_matrix"] = (fields, out)
        return cached

    def device(self, d: int) -> Batch:
        """Device d as a Batch (views of the arrays, no copies)."""
        return Batch(
            node_id=self.node_id, device_kind=self.device_kind,
            device_index=int(self.device_indices[d]), device_uuid=self.device_uuids[d],
            agent_epoch_ns=self.agent_epoch_ns, batch_seq=int(self.batch_seqs[d]),
            first_sample_seq=int(self.first_sample_seqs[d]), timestamps_ns=self.timestamps_ns,
            columns={f: v[d] for f, v in self.columns.items()}, events=self.events[d],
            sample_hz=self.sample_hz, job_id=self.job_of_device(d))

    def select(self, keep: np.ndarray) -> NodeBatch:
        """The devices where `keep` (bool, (D,)) is true, as a batch of their own."""
        rows = np.flatnonzero(keep)
        return NodeBatch(
            node_id=self.node_id, device_kind=self.device_kind,
            agent_epoch_ns=self.agent_epoch_ns, device_indices=self.device_indices[rows],
            device_uuids=[self.device_uuids[d] for d in rows],
            batch_seqs=self.batch_seqs[rows], first_sample_seqs=self.first_sample_seqs[rows],
            timestamps_ns=self.timestamps_ns,
            columns={f: v[rows] for f, v in self.columns.items()},
            events=[self.events[d] for d in rows], sample_hz=self.sample_hz,
            job_id=self.job_id, jobs=None if self.jobs is None else [self.jobs[d] for d in rows])


def join(devices: list[Batch]) -> NodeBatch:
    """Batches of one node's devices (same kind, timestamps and fields) as one NodeBatch."""
    if not devices:
        raise BatchError("join: no devices")
    first = devices[0]
    for b in devices[1:]:
        if (b.node_id, b.device_kind) != (first.node_id, first.device_kind) or \
                set(b.columns) != set(first.columns) or \
                not np.array_equal(b.timestamps_ns, first.timestamps_ns):
            raise BatchError("join: devices differ in node, kind, fields or timestamps")
    return NodeBatch(
        node_id=first.node_id, device_kind=first.device_kind,
        agent_epoch_ns=first.agent_epoch_ns,
        device_indices=np.array([b.device_index for b in devices], dtype=np.int64),
        device_uuids=[b.device_uuid for b in devices],
        batch_seqs=np.array([b.batch_seq for b in devices], dtype=np.uint64),
        first_sample_seqs=np.array([b.first_sample_seq for b in devices], dtype=np.uint64),
        timestamps_ns=np.asarray(first.timestamps_ns, dtype=np.int64),
        columns={f: np.stack([np.asarray(b.columns[f]) for b in devices])
                 for f in first.columns},
        events=[list(b.events) for b in devices], sample_hz=first.sample_hz,
        job_id=first.job_id)


def encode(batch: Batch | NodeBatch) -> bytes:
    """A MetricBatch's bytes; a Batch becomes a node batch of one device."""
    node = join([batch]) if isinstance(batch, Batch) else batch
    ts = np.asarray(node.timestamps_ns, dtype=np.int64)
    base = int(ts[0]) if len(ts) else 0
    offsets_us = (ts - base) // 1000
    if len(ts) and (offsets_us.min() < 0 or offsets_us.max() > 0xFFFFFFFF):
        raise BatchError("timestamps must be ascending and span under 71 minutes")
    message = pb.MetricBatch(
        node_id=node.node_id,
        device_kind=node.device_kind,
        agent_epoch_ns=node.agent_epoch_ns,
        base_time_ns=base,
        time_offsets_us=offsets_us.astype("<u4").tobytes(),
        sample_hz=node.sample_hz,
        job_id=node.job_id,
    )
    for d in range(node.devices):
        message.devices.add(index=int(node.device_indices[d]), uuid=node.device_uuids[d],
                            batch_seq=int(node.batch_seqs[d]),
                            first_sample_seq=int(node.first_sample_seqs[d]),
                            events=node.events[d])
    for number, values in node.columns.items():
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
def _series_prefix(number: int, devices: int, samples: int) -> bytes:
    """Wire bytes of MetricBatch.series (field 10) up to its values: tag, length, field, type."""
    kind = value_type(number)
    size = devices * samples * _DTYPES[kind].itemsize
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


def encode_nodes(
    template: pb.MetricBatch,
    nodes: list[tuple[str, int, np.ndarray, list[pb.Device]]],
    timestamps_ns: np.ndarray,
    values: np.ndarray,
    fields: tuple[int, ...],
) -> list[bytes]:
    """encode() for every node of a source at once: one numpy conversion for the whole
    (samples, devices, fields) block, then each node's bytes cut out of it.

    template carries agent_epoch_ns and sample_hz; nodes are (node id, device kind, the
    node's rows in `values`' device axis (contiguous, ascending), its Device messages
    with their seqs and events set).
    """
    samples = len(timestamps_ns)
    base = int(timestamps_ns[0])
    template.base_time_ns = base
    template.time_offsets_us = ((timestamps_ns - base) // 1000).astype("<u4").tobytes()
    groups = []  # float32 fields, then float64 fields: (F_sub, D, S) blocks
    for dtype, cols in _columns_by_dtype(fields):
        block = np.ascontiguousarray(values[:samples][:, :, cols].transpose(2, 1, 0),
                                     dtype=dtype)
        groups.append((block, cols))
    out = []
    for node, kind, rows, devices in nodes:
        template.node_id, template.device_kind = node, kind
        del template.devices[:]
        template.devices.extend(devices)
        parts = [template.SerializeToString()]
        lo, hi = int(rows[0]), int(rows[-1]) + 1
        for block, cols in groups:
            for j, col in enumerate(cols):
                chunk = block[j, lo:hi].tobytes()
                parts.append(_series_prefix(fields[col], hi - lo, samples))
                parts.append(chunk)
        out.append(b"".join(parts))
    return out


def decode(raw: bytes) -> NodeBatch:
    """Parse and check the structure; raises BatchError naming the first problem found.
    (Limits and identifiers are the consumer's to check: mlpe.stream.decoding.)"""
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
    devices = message.devices
    if not devices:
        raise BatchError("MetricBatch: no devices (from an agent older than the node "
                         "batch format? agents and stream are upgraded together)")
    indices = np.array([d.index for d in devices], dtype=np.int64)
    if len(np.unique(indices)) != len(indices):
        raise BatchError(f"MetricBatch: device indices {indices.tolist()[:16]} repeat")
    offsets = np.frombuffer(message.time_offsets_us, dtype="<u4")
    timestamps = message.base_time_ns + offsets.astype(np.int64) * 1000
    samples, n_dev = len(offsets), len(devices)
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
        if len(values) != dtype.itemsize * samples * n_dev:
            raise BatchError(
                f"MetricBatch: field {name} has {len(values) / dtype.itemsize:g} "
                f"values, {n_dev} devices x {samples} timestamps need {n_dev * samples}")
        if field_number in seen:
            raise BatchError(f"MetricBatch: field {name} appears twice")
        seen.add(field_number)
        fields, chunks = by_type.setdefault(kind, ([], []))
        fields.append(field_number)
        chunks.append(values)
    columns: dict[int, np.ndarray] = {}
    for kind, (fields, chunks) in by_type.items():
        block = np.frombuffer(b"".join(chunks), dtype=_DTYPES[kind]).reshape(
            len(fields), n_dev, samples)
        columns.update(zip(fields, block, strict=True))
    return NodeBatch(
        node_id=message.node_id,
        device_kind=message.device_kind,
        agent_epoch_ns=message.agent_epoch_ns,
        device_indices=indices,
        device_uuids=[d.uuid for d in devices],
        batch_seqs=np.array([d.batch_seq for d in devices], dtype=np.uint64),
        first_sample_seqs=np.array([d.first_sample_seq for d in devices], dtype=np.uint64),
        timestamps_ns=timestamps,
        columns=columns,
        events=[list(d.events) for d in devices],
        sample_hz=message.sample_hz,
        job_id=message.job_id,
    )
