"""The sparse logit store: (sample key, epoch) -> (augmentation seed, teacher top-k).

Layout: STORE/store.json (k, classes, encoding, teacher, augmentation; written once) and one shard
per (epoch, rank): STORE/epoch_EEEE/rank_RRRR.vfl. A shard is

    header (64 bytes, little-endian):
        magic b"VFLSTORE", version u16, encoding u8, index_bits u8, k u16, reserved u16,
        num_classes u32, epoch u32, rank u32, world u32, count u64, record_bytes u32, crc32 u32,
        reserved (16 bytes)
    count fixed-size records: seed u32 | indices | values
    count sample keys: int64

crc32 covers the header (its crc field zeroed), the records and the keys (version 1 shards, whose
crc covers records and keys only, are still read). Encodings:
    exact    int16 indices (int32 past 32,768 classes) + float16 values: 4k + 4 bytes (TinyViT's own)
    compact  indices bit-packed at ceil(log2 C) bits; values 2..k as uint8 steps of -log(p) over
             [0, 20]; the mass outside the top k as a uint16 step of -log over [0, 40]; the largest
             value is what remains, so every record sums to exactly 1 and the dominant value
             carries only the small absolute error of the others:
             4 + ceil(k log2 C / 8) + (k - 1) + 2 bytes; 293 for k=100, C=21841 (404 exact)

Writes are crash-safe: a shard is written to "<name>.tmp", fsynced and renamed, so a final name
always holds a complete shard; the writer skips shards already complete (resume), and takes up a
stopped writer's .tmp at its last checkpoint ("<name>.tmp.progress": batches, records and their
crc32, written after an fsync of the records). Readers verify size and crc32 of every shard they
open and name the shard when either is wrong.

Completeness: every epoch holds exactly one record per sample, keys 0..dataset_size-1, in the
shards of ranks 0..world-1 of one world size. An epoch that falls short (a rank that died, a
writer killed before its rename, shards of two world sizes) is incomplete: `epoch_state` says
why, every reader refuses it by name, and save-logits completes it on the next run.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import time
import zlib
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from ..data.identity import data_identity, identity_mismatch
from ..errors import UserError

MAGIC = b"VFLSTORE"
VERSION = 1  # store.json's format
SHARD_VERSION = 2  # 2: the crc covers the header too; 1: records and keys only (still read)
HEADER = struct.Struct("<8sHBBHHIIIIQII16x")
assert HEADER.size == 64
ENCODINGS = {"exact": 0, "compact": 1}
LOG_RANGE = 20.0  # compact values: -log(p) quantised over [0, LOG_RANGE] in 255 steps
REST_LOG_RANGE = 40.0  # compact rest mass: -log(rest) over [0, REST_LOG_RANGE] in 65535 steps
_SUSPEND = object()  # a ShardWriter's queue: checkpoint what is written and stop


class StoreError(UserError):
    """A shard or store that is missing, truncated, corrupt or inconsistent."""


@dataclass(frozen=True)
class StoreMeta:
    k: int
    num_classes: int
    encoding: str = "exact"
    teacher: str = ""
    dataset_size: int = 0
    seed: int = 0
    augmentation: dict | None = None
    data: dict | None = None  # vitfast.data.identity of the data set (None: a store written before it was kept)

    @property
    def index_bits(self) -> int:
        return max(1, math.ceil(math.log2(self.num_classes)))

    @property
    def record_bytes(self) -> int:
        if self.encoding == "exact":
            return 4 + self.k * (2 if self.num_classes <= 32768 else 4) + 2 * self.k
        return 4 + math.ceil(self.k * self.index_bits / 8) + (self.k - 1) + 2


# ---------------------------------------------------------------- encoding
def _pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """(n, k) non-negative ints < 2^bits -> (n, ceil(k bits / 8)) uint8, little-endian bit order."""
    n, k = values.shape
    b = ((values[:, :, None].astype(np.uint64) >> np.arange(bits, dtype=np.uint64)) & 1).astype(np.uint8)
    return np.packbits(b.reshape(n, k * bits), axis=1, bitorder="little")


def _unpack_bits(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    n = packed.shape[0]
    b = np.unpackbits(packed, axis=1, bitorder="little", count=k * bits).reshape(n, k, bits).astype(np.int64)
    return (b << np.arange(bits, dtype=np.int64)).sum(-1)


def encode(meta: StoreMeta, seeds: np.ndarray, values: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """(n,) seeds, (n, k) probabilities and class indices -> (n, record_bytes) uint8."""
    n, k = values.shape
    if k != meta.k:
        raise ValueError(f"store: argument 'values' has k={k}, the store holds k={meta.k}")
    if indices.min(initial=0) < 0 or indices.max(initial=0) >= meta.num_classes:
        raise ValueError(f"store: argument 'indices' has entries outside [0, {meta.num_classes})")
    parts = [seeds.astype("<u4").view(np.uint8).reshape(n, 4)]
    if meta.encoding == "exact":
        idt = "<i2" if meta.num_classes <= 32768 else "<i4"
        parts.append(indices.astype(idt).view(np.uint8).reshape(n, -1))
        parts.append(values.astype("<f2").view(np.uint8).reshape(n, -1))
    else:
        parts.append(_pack_bits(indices.astype(np.int64), meta.index_bits))
        v = values.astype(np.float64)
        q = np.rint(-np.log(np.clip(v[:, 1:], 1e-300, 1.0)) / LOG_RANGE * 255.0)
        parts.append(np.clip(q, 0, 255).astype(np.uint8))
        rest = np.clip(1.0 - v.sum(1), 1e-300, 1.0)
        qr = np.clip(np.rint(-np.log(rest) / REST_LOG_RANGE * 65535.0), 0, 65535).astype("<u2")
        parts.append(qr.view(np.uint8).reshape(n, 2))
    rec = np.concatenate(parts, axis=1)
    assert rec.shape[1] == meta.record_bytes
    return rec


def decode(meta: StoreMeta, records: np.ndarray):
    """(n, record_bytes) uint8 -> seeds (n,) uint32, values (n, k) float32, indices (n, k) int64."""
    n, k = records.shape[0], meta.k
    records = np.ascontiguousarray(records)
    seeds = records[:, :4].copy().view("<u4").reshape(n)
    if meta.encoding == "exact":
        ib = 2 if meta.num_classes <= 32768 else 4
        idx = records[:, 4:4 + k * ib].copy().view("<i2" if ib == 2 else "<i4").astype(np.int64)
        vals = records[:, 4 + k * ib:].copy().view("<f2").astype(np.float32)
    else:
        nb = math.ceil(k * meta.index_bits / 8)
        idx = _unpack_bits(records[:, 4:4 + nb], k, meta.index_bits)
        tail = np.exp(-records[:, 4 + nb:4 + nb + k - 1].astype(np.float64) * (LOG_RANGE / 255.0))
        qr = records[:, 4 + nb + k - 1:].copy().view("<u2").reshape(n).astype(np.float64)
        rest = np.exp(-qr * (REST_LOG_RANGE / 65535.0))
        rest[qr == 65535] = 0.0
        top = np.maximum(1.0 - rest - tail.sum(1), 0.0)  # may dip below the 2nd value on flat rows: harmless
        vals = np.concatenate([top[:, None], tail], axis=1).astype(np.float32)
    return seeds, vals, idx


# ---------------------------------------------------------------- files
def shard_path(root: str, epoch: int, rank: int) -> str:
    return os.path.join(root, f"epoch_{epoch:04d}", f"rank_{rank:04d}.vfl")


def write_meta(root: str, meta: StoreMeta) -> None:
    """Creates store.json, or checks that the one there holds `meta`. Jobs started together on one
    store (epochs split across an array job) race here: the file is created exclusively (a link of
    a complete temporary file), so exactly one job writes it and every other compares with it."""
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "store.json")
    if not os.path.exists(path):
        tmp = f"{path}.tmp.{os.getpid()}"
        try:
            with open(tmp, "w") as f:
                json.dump({"format": "vitfast-logit-store", "version": VERSION, **asdict(meta)}, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)  # fails if another job created it first: then compared below
                return
            except FileExistsError:
                pass
            except OSError:  # a file system without hard links: the last job's rename wins
                os.replace(tmp, path)
                return
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    existing = read_meta(root)
    if existing.data is None:  # written before data identities were kept: resumable as before
        meta = replace(meta, data=None)
    if existing != meta:
        raise StoreError(f"store '{root}' already holds logits written with another "
                         f"{_meta_difference(existing, meta)}; write to another --out (or delete '{root}')")


def _meta_difference(stored: StoreMeta, new: StoreMeta) -> str:
    """The first field that differs, in words on one line (the augmentation's repr spans lines)."""
    for name in StoreMeta.__dataclass_fields__:
        a, b = getattr(stored, name), getattr(new, name)
        if a == b:
            continue
        if name == "data":
            return f"data set ({identity_mismatch(a, b)})"
        if name == "augmentation":
            keys = sorted(k for k in set(a or {}) | set(b or {}) if (a or {}).get(k) != (b or {}).get(k))
            return f"augmentation ({', '.join(keys)} differ)"
        return f"{name} ({a!r} stored, {b!r} now)"
    return "configuration"


def read_meta(root: str) -> StoreMeta:
    path = os.path.join(root, "store.json")
    if not os.path.exists(path):
        raise StoreError(f"'{root}' is not a logit store (no store.json)")
    with open(path) as f:
        d = json.load(f)
    if d.pop("format", None) != "vitfast-logit-store" or d.pop("version", None) != VERSION:
        raise StoreError(f"'{path}' is not a version-{VERSION} vitfast logit store")
    return StoreMeta(**d)


def check_store_data(root: str, meta: StoreMeta, dataset) -> None:
    """A StoreError when `dataset` is not the data the store was written for: its soft labels are
    matched to images by position (a store that predates data identities, or data that cannot say
    what it holds, is taken on trust, as before)."""
    why = identity_mismatch(meta.data, data_identity(dataset))
    if why:
        raise StoreError(f"store '{root}' was written for other data than these {len(dataset)} samples: {why}; "
                         "its soft labels are matched to images by position, so pass the data it was written "
                         "for, or write a store for these (save-logits)")


def shard_complete(root: str, meta: StoreMeta, epoch: int, rank: int, world: int) -> bool:
    """A finished, intact shard of this rank written by a run of the same world size."""
    path = shard_path(root, epoch, rank)
    if not os.path.exists(path):
        return False
    try:
        shard = Shard(path, meta)
    except StoreError:
        return False
    return shard.world == world


def epoch_state(root: str, meta: StoreMeta, epoch: int) -> EpochState:
    d = os.path.join(root, f"epoch_{epoch:04d}")
    state = EpochState(epoch, meta.dataset_size, [], [], [])
    if not os.path.isdir(d):
        return state
    for name in sorted(os.listdir(d)):
        if name.endswith(".tmp"):
            from ..engine.folder_lock import holder_pid

            pid = holder_pid(os.path.join(d, name))
            saved = read_progress(os.path.join(d, name[:-len(".tmp")]))
            state.pending.append(f"{name} (" + (f"being written by pid {pid})" if pid else
                                                f"left by a writer that stopped after {saved['records']} records; "
                                                "save-logits resumes it)" if saved else
                                                "left by a writer that stopped; save-logits rewrites it)"))
        elif name.endswith(".vfl"):
            try:
                _, _, rank, world, count, _, _ = read_header(os.path.join(d, name), meta)
                state.shards.append((rank, world, count))
            except StoreError as exc:
                state.problems.append(str(exc))
    return state


def remove_stale_shards(root: str, meta: StoreMeta, epoch: int, world: int, finished: bool = True) -> list[str]:
    """What a `world`-rank run of `epoch` will never write, removed: files of ranks >= world. Their
    finished shards (finished=True: the epoch is incomplete), so that the epoch cannot mix two runs'
    partitions; and what their stopped writers left (".tmp" and its progress files), which would
    otherwise take disk space for good and be reported as resumable. A ".tmp" that a live writer
    holds is left alone. Returns the names removed."""
    from ..engine.folder_lock import holder_pid

    d = os.path.join(root, f"epoch_{epoch:04d}")
    if not os.path.isdir(d):
        return []
    removed = []
    for name in sorted(os.listdir(d)):
        base = name[:len("rank_0000.vfl")]  # the shard, of its own file or of one that belongs to it
        if not (base.startswith("rank_") and base.endswith(".vfl") and base[5:9].isdigit() and
                name[len(base):] in ("", ".tmp", ".tmp.progress", ".tmp.progress.tmp") and int(base[5:9]) >= world):
            continue
        if name == base and not finished or holder_pid(os.path.join(d, base + ".tmp")):
            continue
        try:
            os.remove(os.path.join(d, name))
        except FileNotFoundError:  # another job cleaned up first
            continue
        removed.append(name)
    return removed


def _open_exclusive(path: str, what: str):
    """`path` opened for writing (not emptied: a resumable writer keeps its saved part), locked
    against a writer in another process: two jobs given the same epochs would otherwise write one
    .tmp file at once (epochs split across jobs never meet here). The lock lasts until the file is
    closed (engine.folder_lock.try_lock)."""
    from ..engine.folder_lock import FolderInUse, try_lock

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try_lock(fd, path)  # False: a file system without locks, unguarded
        except FolderInUse:
            os.close(fd)
            raise StoreError(f"{what} is being written by another process (two save-logits jobs given the same "
                             "epochs); give each job its own --epochs") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file the other writer had just renamed to its shard: open the new one
    return os.fdopen(fd, "r+b")


@dataclass
class ResumePoint:
    """How a writer that stopped within its shard is taken up again: `plan` identifies the order of
    the records (world size, batch size, seed: the same plan gives the same records), and
    `keys(b)` names the samples of the shard's first b batches, in order."""
    plan: dict
    keys: object  # Callable[[int], np.ndarray]


def progress_path(path: str) -> str:
    """Beside a shard's "<name>.tmp": how much of it is saved (records, batches, their crc32)."""
    return path + ".tmp.progress"


def read_progress(path: str) -> dict | None:
    try:
        with open(progress_path(path)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _crc_of(f, start: int, size: int, chunk: int = 1 << 24) -> int:
    """crc32 of `size` bytes of `f` from `start`, read in chunks (a shard's records can be GBs)."""
    crc = 0
    f.seek(start)
    while size > 0:
        data = f.read(min(chunk, size))
        if not data:
            raise EOFError
        crc, size = zlib.crc32(data, crc), size - len(data)
    return crc


class ShardWriter:
    """Streams one shard to "<name>.tmp" as batches arrive; `close()` appends the keys, writes the
    final header (count, crc32), fsyncs and renames. Nothing appears under the final name unless
    close() completes. With asynchronous=True, encoding and writing run on a background thread so
    that the producer (the teacher loop) never waits on the disk.

    Resumable (given a ResumePoint): every `checkpoint_seconds` (between batches) and at
    `suspend()` the records so far are fsynced and "<name>.tmp.progress" says how many batches
    they hold and their crc32; a writer opened later on the same plan keeps them (after checking
    the crc: a torn or foreign .tmp starts over) and `batches` says where its producer resumes. A
    run stopped by SIGTERM, Ctrl-C or an error, or killed outright, so loses at most the batches
    since the last checkpoint instead of the whole shard."""

    def __init__(self, root: str, meta: StoreMeta, epoch: int, rank: int, world: int, asynchronous: bool = False,
                 resume: ResumePoint | None = None, checkpoint_seconds: float | None = None):
        self.meta, self.epoch, self.rank, self.world = meta, epoch, rank, world
        self.path = shard_path(root, epoch, rank)
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._f = _open_exclusive(self.path + ".tmp", f"epoch {epoch}, rank {rank} of store '{root}'")
        self._keys: list[np.ndarray] = []
        self._crc = 0
        self.batches = 0  # batches written (by the writer's thread), counting those of a resumed .tmp
        self.records = 0
        self._resume, self._every = resume, checkpoint_seconds
        self._last_checkpoint = time.monotonic()
        self._writing = False  # within _write: the file and the sums may disagree
        self._error: BaseException | None = None
        self._queue = None
        with contextlib.suppress(FileNotFoundError):  # a writer killed while it replaced its progress file
            os.remove(progress_path(self.path) + ".tmp")
        if not (resume is not None and self._take_up(resume)):
            self._f.seek(0)
            self._f.truncate()
            self._f.write(b"\0" * HEADER.size)
            if os.path.exists(progress_path(self.path)):
                os.remove(progress_path(self.path))
        if asynchronous:
            import queue
            import threading

            self._queue = queue.Queue(maxsize=8)
            self._thread = threading.Thread(target=self._drain, daemon=True)
            self._thread.start()

    def _take_up(self, resume: ResumePoint) -> bool:
        """Keeps the saved part of a stopped writer's .tmp when it was written on the same plan and
        its crc32 holds; positions the file after it."""
        saved = read_progress(self.path)
        want = {"epoch": self.epoch, "rank": self.rank, "world": self.world, "record_bytes": self.meta.record_bytes,
                "plan": resume.plan}
        if not saved or any(saved.get(k) != v for k, v in want.items()):
            return False
        batches, records = int(saved["batches"]), int(saved["records"])
        end = HEADER.size + records * self.meta.record_bytes
        keys = np.ascontiguousarray(resume.keys(batches), dtype="<i8")
        if keys.shape != (records,) or os.fstat(self._f.fileno()).st_size < end:
            return False
        try:
            if _crc_of(self._f, HEADER.size, end - HEADER.size) != saved["crc"]:
                return False
        except EOFError:
            return False
        self._f.truncate(end)  # what was written after the last checkpoint is written again
        self._f.seek(end)
        self._crc, self._keys, self.batches, self.records = saved["crc"], [keys], batches, records
        return True

    def _write(self, keys, seeds, values, indices) -> None:
        self._writing = True
        rec = np.ascontiguousarray(encode(self.meta, seeds, values, indices))
        self._f.write(rec.tobytes())
        self._crc = zlib.crc32(rec, self._crc)
        self._keys.append(np.ascontiguousarray(keys, dtype="<i8"))
        self.batches += 1
        self.records += len(rec)
        self._writing = False
        if self._every is not None and time.monotonic() - self._last_checkpoint >= self._every:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Records so far made durable, then the progress file that vouches for them."""
        if self._resume is None or self._writing:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        info = {"epoch": self.epoch, "rank": self.rank, "world": self.world, "record_bytes": self.meta.record_bytes,
                "plan": self._resume.plan, "batches": self.batches, "records": self.records, "crc": self._crc}
        path = progress_path(self.path)
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        self._last_checkpoint = time.monotonic()

    def _drain(self) -> None:
        while True:
            item = self._queue.get()
            if item is None or item is _SUSPEND:
                if item is _SUSPEND and self._error is None:
                    try:
                        self._checkpoint()
                    except BaseException as exc:
                        self._error = exc
                return
            try:
                if self._error is None:
                    self._write(*item)
            except BaseException as exc:  # reported by the next add() or close()
                self._error = exc

    def suspend(self) -> None:
        """The producer stops before the shard is whole (SIGTERM, Ctrl-C, an error): what was handed
        over is written and checkpointed (when resumable), and the .tmp file is closed, which frees
        it for the run that resumes. Errors of the writer are not raised here: the producer is
        already raising its own."""
        if self._f.closed:
            return
        try:
            if self._queue is not None:
                self._queue.put(_SUSPEND)
                self._thread.join()
            elif self._error is None:
                self._checkpoint()
        except BaseException:  # noqa: BLE001 - a second interrupt while stopping: the last checkpoint stands
            pass
        finally:
            self._f.close()

    def add(self, keys, seeds, values, indices) -> None:
        """Append records: keys (n,), seeds (n,), values (n, k) probabilities, indices (n, k)."""
        if self._error is not None:
            raise self._error
        if self._queue is not None:
            self._queue.put((np.asarray(keys), np.asarray(seeds), np.asarray(values), np.asarray(indices)))
        else:
            self._write(keys, seeds, values, indices)

    def close(self) -> str:
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            self._f.close()
            raise self._error
        keys = np.concatenate(self._keys) if self._keys else np.zeros(0, "<i8")
        self._f.write(keys.tobytes())
        fields = (MAGIC, SHARD_VERSION, ENCODINGS[self.meta.encoding], self.meta.index_bits, self.meta.k, 0,
                  self.meta.num_classes, self.epoch, self.rank, self.world, keys.shape[0], self.meta.record_bytes)
        crc = zlib.crc32(HEADER.pack(*fields, 0), zlib.crc32(keys, self._crc))
        self._f.seek(0)
        self._f.write(HEADER.pack(*fields, crc))
        self._f.flush()
        os.fsync(self._f.fileno())
        os.replace(self.path + ".tmp", self.path)  # renamed while locked: no second writer opens it
        if os.path.exists(progress_path(self.path)):
            os.remove(progress_path(self.path))
        self._f.close()
        dfd = os.open(os.path.dirname(self.path), os.O_RDONLY)  # make the rename itself durable
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return self.path


def write_shard(root: str, meta: StoreMeta, epoch: int, rank: int, world: int, keys: np.ndarray,
                records: np.ndarray) -> str:
    """Write one complete shard of already encoded records atomically."""
    keys = np.ascontiguousarray(keys, dtype="<i8")
    records = np.ascontiguousarray(records, dtype=np.uint8)
    if records.shape != (keys.shape[0], meta.record_bytes):
        raise ValueError(f"store: {records.shape} records do not match {keys.shape[0]} keys x {meta.record_bytes} bytes")
    w = ShardWriter(root, meta, epoch, rank, world)
    w._f.write(records.tobytes())
    w._crc = zlib.crc32(records)
    w._keys.append(keys)
    return w.close()


def read_header(path: str, meta: StoreMeta) -> tuple:
    """The checked header fields (version, epoch, rank, world, count, crc, raw header bytes)."""
    size = os.path.getsize(path)
    if size < HEADER.size:
        raise StoreError(f"shard '{path}' is truncated ({size} bytes, no header)")
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    (magic, version, enc, bits, k, _, classes, epoch, rank, world, count, rbytes, crc) = HEADER.unpack(raw)
    if magic != MAGIC or version not in (1, SHARD_VERSION):
        raise StoreError(f"shard '{path}' is not a vitfast shard (version 1 or {SHARD_VERSION})")
    if (k, classes, enc, rbytes) != (meta.k, meta.num_classes, ENCODINGS[meta.encoding], meta.record_bytes):
        raise StoreError(f"shard '{path}' (k={k}, classes={classes}) does not match store.json")
    expected = HEADER.size + count * (rbytes + 8)
    if size != expected:
        raise StoreError(f"shard '{path}' is truncated or padded: {size} bytes, header says {expected}")
    where = os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
    if where != os.path.join(f"epoch_{epoch:04d}", f"rank_{rank:04d}.vfl") or not rank < world:
        raise StoreError(f"shard '{path}' says it is epoch {epoch} rank {rank} of {world}: it was moved or its header "
                         "is corrupt")
    return version, epoch, rank, world, count, crc, raw


class Shard:
    """A memory-mapped, verified shard."""

    def __init__(self, path: str, meta: StoreMeta, verify: bool = True):
        self.path = path
        version, epoch, rank, world, count, crc, raw = read_header(path, meta)
        self.epoch, self.rank, self.world, self.count = epoch, rank, world, count
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        rbytes = meta.record_bytes
        self.records = mm[HEADER.size:HEADER.size + count * rbytes].reshape(count, rbytes)
        self.keys = mm[HEADER.size + count * rbytes:].view("<i8")
        if verify:
            body = zlib.crc32(self.keys, zlib.crc32(self.records))
            whole = body if version == 1 else zlib.crc32(raw[:-20] + b"\0\0\0\0" + raw[-16:], body)
            if whole != crc:
                raise StoreError(f"shard '{path}' is corrupt: crc32 mismatch")


@dataclass
class EpochState:
    """What an epoch's directory holds, from the shard headers (no records read)."""
    epoch: int
    expected: int  # records a complete epoch holds: one per sample
    shards: list  # (rank, world, count) of every finished shard
    pending: list  # .tmp files (writers that never finished, or are writing now), each with which
    problems: list  # unreadable shards

    @property
    def records(self) -> int:
        return sum(c for _, _, c in self.shards)

    @property
    def complete(self) -> bool:
        worlds = {w for _, w, _ in self.shards}
        return (not self.problems and len(worlds) == 1 and {r for r, _, _ in self.shards} == set(range(worlds.pop()))
                and self.records == self.expected)

    def describe(self) -> str:
        if self.complete:
            return f"complete: {self.records} records in {len(self.shards)} shard(s)"
        worlds = sorted({w for _, w, _ in self.shards})
        parts = [f"incomplete: {self.records} of {self.expected} records"]
        for w in worlds:
            ranks = sorted(r for r, ww, _ in self.shards if ww == w)
            parts.append(f"ranks {ranks} of a {w}-rank run" + (f" (missing {sorted(set(range(w)) - set(ranks))})"
                                                               if set(ranks) != set(range(w)) else ""))
        if len(worlds) > 1:
            parts.append("shards of different world sizes")
        if self.pending:
            parts.append(f"unfinished {', '.join(self.pending)}")
        parts += self.problems
        return "; ".join(parts)


class LogitStore:
    """Reads a store written by any number of ranks: `lookup(epoch, keys)`."""

    def __init__(self, root: str, verify: bool = True):
        self.root = root
        self.meta = read_meta(root)
        self.verify = verify
        self._epochs: dict[int, tuple[list[Shard], np.ndarray, np.ndarray, np.ndarray]] = {}
        self._verified: set[int] = set()  # epochs whose shard checksums were checked (here or in a parent)

    def __getstate__(self):
        # Data-loader workers get a copy: memory maps reopen lazily there, and epochs this process
        # already verified are not checksummed again.
        state = self.__dict__.copy()
        state["_verified"] = self._verified | set(self._epochs) if self.verify else set()
        state["_epochs"] = {}
        return state

    def epochs(self) -> list[int]:
        """Every epoch with a directory, complete or not (see `epoch_state`)."""
        out = []
        for name in sorted(os.listdir(self.root)):
            if name.startswith("epoch_") and name[len("epoch_"):].isdigit() and \
                    os.path.isdir(os.path.join(self.root, name)):
                out.append(int(name[len("epoch_"):]))
        return out

    def epoch_state(self, epoch: int) -> EpochState:
        return epoch_state(self.root, self.meta, epoch)

    def complete_epochs(self) -> list[int]:
        return [e for e in self.epochs() if self.epoch_state(e).complete]

    def require_complete(self, epochs) -> None:
        """StoreError naming every incomplete epoch among `epochs`, and how to complete it."""
        bad = [self.epoch_state(e) for e in epochs]
        bad = [s for s in bad if not s.complete]
        if bad:
            lines = "; ".join(f"epoch {s.epoch} {s.describe()}" for s in bad[:5])
            raise StoreError(f"store '{self.root}' has incomplete epochs ({lines}); complete them with "
                             f"'vitfast tinyvit save-logits --out {self.root} --epochs {bad[0].epoch}:{bad[-1].epoch + 1}' "
                             "and the same teacher and data")

    def _index(self, epoch: int):
        if epoch not in self._epochs:
            d = os.path.join(self.root, f"epoch_{epoch:04d}")
            if not os.path.isdir(d):
                raise StoreError(f"store '{self.root}' has no epoch {epoch} (epochs: {self.epochs()})")
            verify = self.verify and epoch not in self._verified
            shards = [Shard(os.path.join(d, f), self.meta, verify) for f in sorted(os.listdir(d))
                      if f.endswith(".vfl")]
            keys = np.concatenate([s.keys for s in shards]) if shards else np.zeros(0, np.int64)
            shard_of = np.concatenate([np.full(s.count, i) for i, s in enumerate(shards)]) if shards else keys
            row_of = np.concatenate([np.arange(s.count) for s in shards]) if shards else keys
            order = np.argsort(keys, kind="stable")
            keys, shard_of, row_of = keys[order], shard_of[order], row_of[order]
            if keys.size > 1 and (keys[1:] == keys[:-1]).any():
                dup = keys[1:][keys[1:] == keys[:-1]][0]
                raise StoreError(f"store '{self.root}' epoch {epoch} holds sample key {dup} twice")
            n = self.meta.dataset_size
            if keys.size != n or (n and (keys[0] != 0 or keys[-1] != n - 1)):  # distinct + sorted: == 0..n-1
                self.require_complete([epoch])  # names what is missing
                raise StoreError(f"store '{self.root}' epoch {epoch} holds keys outside 0..{n - 1} (dataset_size {n})")
            self._epochs[epoch] = (shards, keys, shard_of, row_of)
        return self._epochs[epoch]

    def keys(self, epoch: int) -> np.ndarray:
        return self._index(epoch)[1]

    def lookup(self, epoch: int, keys) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(seeds int64, values float32 (n, k), indices int64 (n, k)) for the given sample keys."""
        shards, sorted_keys, shard_of, row_of = self._index(epoch)
        keys = np.asarray(keys, dtype=np.int64)
        pos = np.searchsorted(sorted_keys, keys)
        found = (pos < sorted_keys.size) & (sorted_keys[np.minimum(pos, sorted_keys.size - 1)] == keys)
        if not found.all():
            raise StoreError(f"store '{self.root}' epoch {epoch} has no record for sample key(s) "
                             f"{keys[~found][:5].tolist()}")
        recs = np.empty((keys.size, self.meta.record_bytes), dtype=np.uint8)
        for i in np.unique(shard_of[pos]):
            sel = shard_of[pos] == i
            recs[sel] = shards[i].records[row_of[pos][sel]]
        seeds, vals, idx = decode(self.meta, recs)
        return torch.from_numpy(seeds.astype(np.int64)), torch.from_numpy(vals), torch.from_numpy(idx)
