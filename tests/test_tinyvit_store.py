"""The logit store: encodings, crash-safe shards, corruption detection, multi-rank index."""
import os

import numpy as np
import pytest
import torch

from vitfast.ops import topk_softmax
from vitfast.tinyvit.store import (LogitStore, StoreError, StoreMeta, decode, encode, read_meta, shard_path,
                                   write_meta, write_shard)


def teacher_topk(n, classes, k):
    logits = torch.randn(n, classes) * 3
    logits.scatter_add_(1, torch.randint(0, classes, (n, 3)), torch.full((n, 3), 8.0))
    v, i = topk_softmax(logits, k, values_dtype=torch.float32)
    return torch.softmax(logits.double(), -1), v.numpy(), i.long().numpy()


def reconstruct(values, indices, classes):
    """Dense distribution from a top-k record (rest spread evenly), as the student's loss sees it."""
    v, i = torch.as_tensor(values, dtype=torch.float64), torch.as_tensor(indices)
    rest = ((1 - v.sum(-1, keepdim=True)) / (classes - v.shape[1])).clamp_min(0)
    return rest.expand(v.shape[0], classes).clone().scatter(1, i, v)


@pytest.mark.parametrize("encoding", ["exact", "compact"])
@pytest.mark.parametrize("classes,k", [(10, 5), (1000, 10), (21841, 100), (40000, 64)])
def test_encode_decode_roundtrip(encoding, classes, k):
    meta = StoreMeta(k=k, num_classes=classes, encoding=encoding)
    _, v, i = teacher_topk(37, classes, k)
    seeds = np.random.default_rng(0).integers(0, 2**32, 37, dtype=np.uint64).astype(np.uint32)
    rec = encode(meta, seeds, v, i)
    assert rec.shape == (37, meta.record_bytes)
    s2, v2, i2 = decode(meta, rec)
    assert np.array_equal(s2, seeds) and np.array_equal(i2, i)
    if encoding == "exact":
        assert np.array_equal(v2, v.astype(np.float16).astype(np.float32))
    else:  # values 2..k within half a log step (where representable), the top one by the mass rule
        ok = -np.log(v[:, 1:]) < 20
        assert np.all(np.abs(np.log(v2[:, 1:]) - np.log(v[:, 1:]))[ok] <= 20 / 255 / 2 + 1e-6)
        # the top value absorbs the others' rounding: at most a half log step of the tail mass
        bound = (np.exp(20 / 255 / 2) - 1) * v[:, 1:].sum(1) + 1e-3 * (1 - v.sum(1)) + 1e-6
        assert np.all(np.abs(v2[:, 0] - v[:, 0]) <= bound)
        # the total is 1 - rest, with rest kept to half a 16-bit log step (3.1e-4 of itself)
        rest = 1 - v.astype(np.float64).sum(1)
        assert np.all(np.abs(v2.astype(np.float64).sum(1) - v.astype(np.float64).sum(1)) <= 3.1e-4 * rest + 1e-5)


def test_record_sizes_and_compact_fidelity():
    """The issue's table: K=100, C=21841 -- original 404 bytes; compact <= 75% of it with mean KL
    to the exact top-k reconstruction under 1e-3."""
    exact, compact = StoreMeta(100, 21841, "exact"), StoreMeta(100, 21841, "compact")
    assert exact.record_bytes == 404
    assert compact.record_bytes <= 0.75 * 404
    _, v, i = teacher_topk(2048, 21841, 100)
    seeds = np.zeros(2048, np.uint32)
    p_exact = reconstruct(*decode(exact, encode(exact, seeds, v, i))[1:], 21841)
    p_compact = reconstruct(*decode(compact, encode(compact, seeds, v, i))[1:], 21841)
    kl = (p_exact * (p_exact.clamp_min(1e-300).log() - p_compact.clamp_min(1e-300).log())).sum(-1).mean().item()
    assert kl < 1e-3, kl


def write_epoch(root, meta, epoch, world, keys_per_rank):
    for rank, keys in enumerate(keys_per_rank):
        _, v, i = teacher_topk(len(keys), meta.num_classes, meta.k)
        write_shard(root, meta, epoch, rank, world, np.asarray(keys), encode(meta, np.asarray(keys, np.uint32), v, i))


def test_multi_rank_store_lookup(tmp_path):
    root = str(tmp_path / "store")
    meta = StoreMeta(k=5, num_classes=50, encoding="exact", dataset_size=30)
    write_meta(root, meta)
    write_epoch(root, meta, 0, 3, [[5, 1, 9], [0, 2, 3, 4], list(range(10, 30)) + [6, 7, 8]])
    store = LogitStore(root)
    assert store.epochs() == [0] and len(store.keys(0)) == 30
    seeds, values, indices = store.lookup(0, [9, 0, 29, 6])
    assert seeds.tolist() == [9, 0, 29, 6]  # the test writes key == seed
    assert values.shape == indices.shape == (4, 5)
    with pytest.raises(StoreError, match="no record for sample key"):
        store.lookup(0, [31])
    with pytest.raises(StoreError, match="no epoch 1"):
        store.lookup(1, [0])


def test_duplicate_keys_across_ranks_are_rejected(tmp_path):
    root = str(tmp_path / "store")
    meta = StoreMeta(k=2, num_classes=10)
    write_meta(root, meta)
    write_epoch(root, meta, 0, 2, [[0, 1], [1, 2]])
    with pytest.raises(StoreError, match="holds sample key 1 twice"):
        LogitStore(root).lookup(0, [0])


def test_truncated_and_corrupt_shards_are_named(tmp_path):
    root = str(tmp_path / "store")
    meta = StoreMeta(k=3, num_classes=20, dataset_size=10)
    write_meta(root, meta)
    write_epoch(root, meta, 0, 1, [list(range(10))])
    write_epoch(root, meta, 1, 1, [list(range(10))])
    p0, p1 = shard_path(root, 0, 0), shard_path(root, 1, 0)
    with open(p0, "r+b") as f:  # truncate
        f.truncate(os.path.getsize(p0) - 5)
    with open(p1, "r+b") as f:  # flip one byte of a record
        f.seek(64 + 7)
        b = f.read(1)
        f.seek(64 + 7)
        f.write(bytes([b[0] ^ 0xFF]))
    store = LogitStore(root)
    with pytest.raises(StoreError, match=f"shard '{p0}' is truncated"):
        store.lookup(0, [1])
    with pytest.raises(StoreError, match=f"shard '{p1}' is corrupt"):
        store.lookup(1, [1])


def test_temp_files_are_never_read_and_meta_must_match(tmp_path):
    root = str(tmp_path / "store")
    meta = StoreMeta(k=3, num_classes=20, dataset_size=4)
    write_meta(root, meta)
    write_epoch(root, meta, 0, 1, [list(range(4))])
    with open(shard_path(root, 0, 1) + ".tmp", "wb") as f:  # a crashed writer's leftover
        f.write(b"garbage")
    assert len(LogitStore(root).keys(0)) == 4
    with pytest.raises(StoreError, match=r"written with another k \(3 stored, 4 now\); write to another --out"):
        write_meta(root, StoreMeta(k=4, num_classes=20, dataset_size=4))
    with pytest.raises(StoreError, match=r"another augmentation \(mixup differ\)"):
        write_meta(root, StoreMeta(k=3, num_classes=20, dataset_size=4, augmentation={"mixup": {"mixup_alpha": 1}}))
    with pytest.raises(StoreError, match="not a logit store"):
        LogitStore(str(tmp_path))


def test_streaming_writer_async_equals_sync_and_reports_errors(tmp_path):
    from vitfast.tinyvit.store import ShardWriter

    meta = StoreMeta(k=4, num_classes=30, encoding="compact", dataset_size=35)
    batches = []
    for b in range(5):
        _, v, i = teacher_topk(7, 30, 4)
        batches.append((np.arange(7) + 7 * b, np.arange(7, dtype=np.uint32) * 3 + b, v, i))
    paths = []
    for name, asynchronous in (("sync", False), ("async", True)):
        root = str(tmp_path / name)
        write_meta(root, meta)
        w = ShardWriter(root, meta, 0, 0, 1, asynchronous=asynchronous)
        for batch in batches:
            w.add(*batch)
        paths.append(w.close())
    assert open(paths[0], "rb").read() == open(paths[1], "rb").read()
    store = LogitStore(str(tmp_path / "async"))
    seeds, _, _ = store.lookup(0, [0, 34])
    assert seeds.tolist() == [0, 6 * 3 + 4]
    # a bad batch on the writer thread surfaces at close(), and no shard appears
    root = str(tmp_path / "bad")
    write_meta(root, meta)
    w = ShardWriter(root, meta, 0, 0, 1, asynchronous=True)
    w.add(np.arange(2), np.zeros(2, np.uint32), np.full((2, 4), 0.1), np.full((2, 4), 99))
    with pytest.raises(ValueError, match="argument 'indices'"):
        w.close()
    assert not os.path.exists(shard_path(root, 0, 0))


def test_incomplete_epochs_are_named_by_every_reader(tmp_path):
    """A rank that died, a writer killed before its rename, shards of two world sizes: the epoch
    is incomplete, says why, and no reader uses it."""
    from vitfast.tinyvit.store import epoch_state

    root = str(tmp_path / "store")
    meta = StoreMeta(k=3, num_classes=20, dataset_size=10)
    write_meta(root, meta)
    write_epoch(root, meta, 0, 2, [list(range(5)), list(range(5, 10))])  # complete, 2 ranks
    write_epoch(root, meta, 1, 2, [list(range(5))])  # rank 1 of 2 died
    os.makedirs(os.path.dirname(shard_path(root, 2, 0)))
    with open(shard_path(root, 2, 0) + ".tmp", "wb") as f:  # killed before its rename
        f.write(b"partial")
    write_epoch(root, meta, 3, 2, [list(range(5))])
    write_epoch(root, meta, 3, 1, [list(range(10))])  # rank 0 of a later 1-rank run + rank 1 of 2
    _, v, i = teacher_topk(5, 20, 3)
    write_shard(root, meta, 3, 1, 2, np.arange(5, 10), encode(meta, np.arange(5, 10, dtype=np.uint32), v, i))
    store = LogitStore(root)
    assert store.epochs() == [0, 1, 2, 3] and store.complete_epochs() == [0]
    s1, s2, s3 = (epoch_state(root, meta, e) for e in (1, 2, 3))
    assert "5 of 10 records" in s1.describe() and "missing [1]" in s1.describe()
    assert "0 of 10" in s2.describe() and "rank_0000.vfl.tmp" in s2.describe()
    assert "different world sizes" in s3.describe()
    assert len(store.keys(0)) == 10
    with pytest.raises(StoreError, match=r"incomplete epochs \(epoch 1 incomplete: 5 of 10 records"):
        store.lookup(1, [0])
    with pytest.raises(StoreError, match="epoch 2 incomplete"):
        store.keys(2)
    with pytest.raises(StoreError, match="holds sample key|epoch 3 incomplete"):
        store.keys(3)
    with pytest.raises(StoreError, match="--epochs 1:4"):
        store.require_complete(store.epochs())


def test_the_header_is_checksummed_and_placed(tmp_path):
    """A flipped byte anywhere in the header -- even the padding -- is caught; a shard whose
    header says another epoch or rank than its file name is refused; version-1 shards still read."""
    import struct
    import zlib

    from vitfast.tinyvit.store import HEADER

    root = str(tmp_path / "store")
    meta = StoreMeta(k=3, num_classes=20, dataset_size=6)
    write_meta(root, meta)
    write_epoch(root, meta, 0, 1, [list(range(6))])
    path = shard_path(root, 0, 0)
    clean = open(path, "rb").read()
    for offset, words in ((50, "corrupt"), (14, "corrupt"), (20, "says it is epoch 1")):
        data = bytearray(clean)
        data[offset] ^= 0x01
        open(path, "wb").write(bytes(data))
        with pytest.raises(StoreError, match=words):
            LogitStore(root).keys(0)
    # version 1: crc over records and keys only
    fields = list(HEADER.unpack(clean[:64]))
    fields[1] = 1
    fields[-1] = zlib.crc32(clean[64:])
    open(path, "wb").write(HEADER.pack(*fields) + clean[64:])
    assert len(LogitStore(root).keys(0)) == 6
    assert struct.unpack("<H", clean[8:10])[0] == 2  # new shards are version 2


def _start_store(root, k, barrier, results):
    barrier.wait()  # every job reaches write_meta at once, as an array job's do
    try:
        write_meta(root, StoreMeta(k=k, num_classes=20, dataset_size=4))
        results.put((k, "ok"))
    except StoreError:
        results.put((k, "refused"))


def test_jobs_started_together_on_one_store_agree_on_its_meta(tmp_path):
    """store.json is created exclusively: of jobs racing to start one store with two configurations,
    those of the configuration that won go on and every other is refused (before, each could pass
    the existence check and rename its own file over the other's)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    for attempt in range(3):
        root = str(tmp_path / f"store{attempt}")
        barrier, results = ctx.Barrier(8), ctx.Queue()
        jobs = [ctx.Process(target=_start_store, args=(root, 3 + i % 2, barrier, results)) for i in range(8)]
        for j in jobs:
            j.start()
        for j in jobs:
            j.join(60)
        outcome = [results.get(timeout=10) for _ in jobs]
        winner = read_meta(root).k
        assert sorted(outcome) == sorted((k, "ok" if k == winner else "refused") for k, _ in outcome)
        assert [n for n in os.listdir(root) if n != "store.json"] == []  # no temporary file left


def test_a_stopped_writer_is_taken_up_at_its_last_checkpoint(tmp_path):
    """A resumable writer checkpoints (fsynced records + "<shard>.tmp.progress"); a writer opened
    later on the same plan keeps what was saved and continues, giving the shard of an unbroken
    write byte for byte. A torn .tmp (crc32 no longer matches), another plan, or what was written
    after the last checkpoint are written again."""
    from vitfast.tinyvit.store import ResumePoint, ShardWriter, epoch_state, progress_path

    meta = StoreMeta(k=4, num_classes=30, encoding="compact", dataset_size=35)
    batches = []
    for b in range(5):
        _, v, i = teacher_topk(7, 30, 4)
        batches.append((np.arange(7) + 7 * b, np.arange(7, dtype=np.uint32) * 3 + b, v, i))
    plan = ResumePoint({"batch_pairs": 7}, lambda b: np.arange(7 * b))

    def write(root, stop_after=None, every=0.0, asynchronous=True, resume=plan):
        w = ShardWriter(root, meta, 0, 0, 1, asynchronous=asynchronous, resume=resume, checkpoint_seconds=every)
        start = w.batches
        for batch in batches[start:stop_after]:
            w.add(*batch)
        if stop_after is not None:
            w.suspend()
            return start, None
        return start, w.close()

    whole = str(tmp_path / "whole")
    write_meta(whole, meta)
    reference = open(write(whole, resume=None)[1], "rb").read()

    root = str(tmp_path / "stopped")
    write_meta(root, meta)
    assert write(root, stop_after=3, every=1e9) == (0, None)  # no timed checkpoint: suspend() saves
    tmp = shard_path(root, 0, 0) + ".tmp"
    assert os.path.exists(progress_path(shard_path(root, 0, 0)))
    assert "rank_0000.vfl.tmp (left by a writer that stopped after 21 records; save-logits resumes it)" in \
        epoch_state(root, meta, 0).describe()
    start, path = write(root)
    assert start == 3 and open(path, "rb").read() == reference
    assert not os.path.exists(tmp) and not os.path.exists(progress_path(shard_path(root, 0, 0)))

    # killed without suspend(): the timed checkpoints (every batch here) are what stands; records
    # written after the last one are dropped
    root = str(tmp_path / "killed")
    write_meta(root, meta)
    w = ShardWriter(root, meta, 0, 0, 1, asynchronous=False, resume=plan, checkpoint_seconds=0.0)
    for batch in batches[:2]:
        w.add(*batch)
    w._every = None  # the third batch reaches the file but no checkpoint
    w.add(*batches[2])
    w._f.flush()
    w._f.close()  # the process died here
    tmp = shard_path(root, 0, 0) + ".tmp"
    assert os.path.getsize(tmp) == 64 + 3 * 7 * meta.record_bytes
    assert write(root)[0] == 2 and open(shard_path(root, 0, 0), "rb").read() == reference

    # a torn record, or another plan: the writer starts over (and still writes the right shard)
    for damage in ("torn", "plan"):
        root = str(tmp_path / damage)
        write_meta(root, meta)
        write(root, stop_after=3)
        if damage == "torn":
            with open(shard_path(root, 0, 0) + ".tmp", "r+b") as f:
                f.seek(64 + 5)
                byte = f.read(1)
                f.seek(64 + 5)
                f.write(bytes([byte[0] ^ 1]))
        other = plan if damage == "torn" else ResumePoint({"batch_pairs": 8}, plan.keys)
        start, path = write(root, resume=other)
        assert start == 0 and open(path, "rb").read() == reference


def test_files_of_ranks_a_run_will_not_write_are_removed_unless_a_writer_holds_them(tmp_path):
    """remove_stale_shards(world=2): every file of ranks >= 2 (finished shards only when asked),
    but not a .tmp (nor its progress files) that a live writer in another process holds; files of
    ranks < 2 and foreign names stay."""
    import subprocess
    import sys

    from vitfast.tinyvit.store import remove_stale_shards

    meta = StoreMeta(k=4, num_classes=30, encoding="compact", dataset_size=35)
    d = tmp_path / "epoch_0003"
    d.mkdir(parents=True)
    kept = ["rank_0000.vfl", "rank_0001.vfl.tmp", "rank_0001.vfl.tmp.progress", "notes.txt", "rank_0002.vflx",
            "rank_0004.vfl.tmp", "rank_0004.vfl.tmp.progress"]
    stale = ["rank_0002.vfl", "rank_0002.vfl.tmp", "rank_0002.vfl.tmp.progress", "rank_0003.vfl.tmp.progress.tmp",
             "rank_0010.vfl"]
    for n in kept + stale:
        (d / n).write_text(n)
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDWR)\n"
                               "fcntl.lockf(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)",
                               str(d / "rank_0004.vfl.tmp")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert remove_stale_shards(str(tmp_path), meta, 3, 2, finished=False) == stale[1:4]
        assert sorted(os.listdir(d)) == sorted(kept + ["rank_0002.vfl", "rank_0010.vfl"])
        assert remove_stale_shards(str(tmp_path), meta, 3, 2) == ["rank_0002.vfl", "rank_0010.vfl"]
        assert sorted(os.listdir(d)) == sorted(kept)
    finally:
        holder.kill()
        holder.wait()
    assert remove_stale_shards(str(tmp_path), meta, 3, 2) == ["rank_0004.vfl.tmp", "rank_0004.vfl.tmp.progress"]
    assert remove_stale_shards(str(tmp_path), meta, 9, 2) == []  # no such epoch
