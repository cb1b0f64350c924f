"""Qdrant Edge index builds out of process: nothing written meanwhile is lost, a failed or
crashed build leaves the collection as it was, and old layouts keep working.

The HNSW build runs in a child process (``EdgeStore.optimize``) because Qdrant Edge holds
the GIL while it optimizes; these tests check the copy / build / replay / swap around it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest
import qdrant_edge as qe

from lookalike.shared.errors import StoreUnavailable
from lookalike.shared.stores import CollectionSpec, EdgeStore, PointRecord, edge
from lookalike.shared.stores.edge import CURRENT_FILE, SPEC_FILE

DIM = 32
COLL = "lookalike__builds"


def points(start: int, n: int, seed: int = 0) -> list[PointRecord]:
    rng = np.random.default_rng(seed + start)
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    return [PointRecord(id=str(uuid.UUID(int=start + i + 1)), vector=v / np.linalg.norm(v),
                        payload={"product_id": f"p{(start + i) // 4}", "image_id": f"img{(start + i) % 4}",
                                 "title": "t", "price": 1.0, "in_stock": True})
            for i, v in enumerate(vectors)]


def open_store(root, **kw) -> EdgeStore:
    store = EdgeStore(root, **{"index_after_points": 100, **kw})
    store.ensure_collection(CollectionSpec(COLL, DIM))
    return store


def all_ids(store: EdgeStore) -> set[str]:
    return {str(r.id) for r in store._scroll(COLL, store_conditions(), ["product_id"], False)}


def store_conditions():
    from lookalike.shared.stores.base import Conditions

    return Conditions()


def test_build_moves_the_collection_to_an_indexed_generation(tmp_path):
    # GIVEN a collection with 1000 points, none indexed
    store = open_store(tmp_path, background_index=False)
    written = points(0, 1000)
    store.upsert(COLL, written)
    assert store.unindexed(COLL) == 1000
    try:
        # WHEN optimize() builds the index (in a child process)
        store.optimize(COLL)
        # THEN the next generation serves, fully indexed, and finds every point
        assert (tmp_path / COLL / CURRENT_FILE).read_text() == "gen-1"
        assert not (tmp_path / COLL / "gen-0").exists()
        assert store.unindexed(COLL) == 0 and store.count(COLL) == 1000
        for p in written[:20]:
            assert store.search(COLL, p.vector, limit=1)[0].id == p.id
    finally:
        store.close()
    # AND a reopen finds the same
    again = EdgeStore(tmp_path, background_index=False)
    try:
        assert again.count(COLL) == 1000 and again.unindexed(COLL) == 0
    finally:
        again.close()


@pytest.mark.parametrize("flush_after_points", [edge.FLUSH_AFTER_POINTS, 30],
                         ids=["one-flush", "flushed-while-replayed"])
def test_writes_made_during_a_build_are_kept(tmp_path, monkeypatch, flush_after_points):
    # GIVEN a collection, and writes that land while the child builds and before the swap
    # (30: the replay flushes the built shard between writes, as a long import's replay does)
    monkeypatch.setattr(edge, "FLUSH_AFTER_POINTS", flush_after_points)
    store = open_store(tmp_path, background_index=False)
    store.upsert(COLL, points(0, 400))
    during, after = points(400, 100), points(500, 100)
    real_builder = store._run_builder

    def builder_with_traffic(name, target):
        store.upsert(COLL, during)
        store.delete_product(COLL, "p3")  # points 12..15
        store.set_product_payload(COLL, "p5", {"title": "changed"})
        real_builder(name, target)
        store.upsert(COLL, after)

    monkeypatch.setattr(store, "_run_builder", builder_with_traffic)
    try:
        # WHEN the build runs
        store.optimize(COLL)
        # THEN the new generation holds every write, the deletion and the payload change
        expected = {p.id for p in points(0, 600)} - {p.id for p in points(12, 4)}
        assert all_ids(store) == expected
        assert store.product_payloads(COLL, "p5")[0]["title"] == "changed"
    finally:
        store.close()
    again = EdgeStore(tmp_path, background_index=False)
    try:
        assert all_ids(again) == expected
    finally:
        again.close()


def test_a_failed_build_leaves_the_collection_as_it_was(tmp_path, monkeypatch):
    # GIVEN a collection whose index build fails in the child
    store = open_store(tmp_path, background_index=False)
    store.upsert(COLL, points(0, 300))
    monkeypatch.setattr("lookalike.shared.stores.edge.sys.executable", "/bin/false")
    try:
        # WHEN optimize() runs
        with pytest.raises(StoreUnavailable, match="index build"):
            store.optimize(COLL)
        # THEN the old generation still serves and takes writes, and the half build is gone
        assert (tmp_path / COLL / CURRENT_FILE).read_text() == "gen-0"
        assert not (tmp_path / COLL / "gen-1").exists()
        store.upsert(COLL, points(300, 10))
        assert store.count(COLL) == 310
    finally:
        store.close()


CRASH = textwrap.dedent("""
    import os, sys, uuid
    import numpy as np
    from lookalike.shared.stores import CollectionSpec, EdgeStore, PointRecord
    from lookalike.shared.stores import edge
    root, where = sys.argv[1], sys.argv[2]
    store = EdgeStore(root, index_after_points=100, background_index=False)
    store.ensure_collection(CollectionSpec("lookalike__builds", 32))
    rng = np.random.default_rng(0)
    def write(start, n):
        store.upsert("lookalike__builds", [PointRecord(id=str(uuid.UUID(int=start + i + 1)),
                     vector=rng.standard_normal(32), payload={"product_id": "p", "image_id": str(i)})
                     for i in range(n)])
    write(0, 300)
    real_builder, real_retire = store._run_builder, store._retire
    def builder(name, target):
        write(300, 50)  # acknowledged during the build
        real_builder(name, target)
        if where == "before-swap":
            os._exit(9)
    def retire(old):
        if where == "after-swap":
            os._exit(9)
        real_retire(old)
    store._run_builder, store._retire = builder, retire
    store.optimize("lookalike__builds")
""")


@pytest.mark.parametrize("where", ["before-swap", "after-swap"])
def test_a_crash_around_the_swap_loses_nothing(tmp_path, where):
    # GIVEN a process killed right before (or right after) it switches to the built generation
    done = subprocess.run([sys.executable, "-c", CRASH, str(tmp_path), where], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 9, done.stderr
    # WHEN the store opens again
    store = EdgeStore(tmp_path, background_index=False)
    try:
        # THEN every acknowledged point is there, and only the generation CURRENT names is left
        assert store.count(COLL) == 350
        current = (tmp_path / COLL / CURRENT_FILE).read_text()
        assert current == ("gen-0" if where == "before-swap" else "gen-1")
        assert sorted(p.name for p in (tmp_path / COLL).iterdir() if p.name.startswith("gen-")) == [current]
    finally:
        store.close()


def test_background_builds_index_a_growing_collection(tmp_path):
    # GIVEN a store that builds once 200 points are unindexed, checking often
    store = open_store(tmp_path, index_after_points=200, index_check_s=0.1)
    try:
        # WHEN 600 points arrive
        store.upsert(COLL, points(0, 600))
        # THEN a background build indexes them (bounded wait) while searches keep answering
        deadline = time.monotonic() + 120
        while store.unindexed(COLL) and time.monotonic() < deadline:
            assert store.search(COLL, points(0, 1)[0].vector, limit=1)
            time.sleep(0.1)
        assert store.unindexed(COLL) == 0 and store.count(COLL) == 600
    finally:
        store.close()


def test_a_collection_in_the_old_layout_opens_and_moves_on_its_first_build(tmp_path):
    # GIVEN a collection written before generations: the shard's files in the collection directory
    path = tmp_path / COLL
    path.mkdir()
    shard = qe.EdgeShard.create(str(path), qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=DIM,
                                                                                     distance=qe.Distance.Cosine)))
    written = points(0, 200)
    shard.update(qe.UpdateOperation.upsert_points([qe.Point(p.id, list(map(float, p.vector)), p.payload)
                                                   for p in written]))
    shard.close()
    (path / SPEC_FILE).write_text(json.dumps({"dim": DIM, "distance": "cosine"}))
    store = EdgeStore(tmp_path, background_index=False)
    try:
        # WHEN it is searched, then built
        assert store.search(COLL, written[0].vector, limit=1)[0].id == written[0].id
        store.optimize(COLL)
        # THEN it lives in gen-1 and the old files are gone, nothing lost
        assert (path / CURRENT_FILE).read_text() == "gen-1"
        assert sorted(p.name for p in path.iterdir()) == [CURRENT_FILE, "gen-1", SPEC_FILE]
        assert store.count(COLL) == 200
    finally:
        store.close()


def test_a_second_opener_leaves_a_running_build_alone(tmp_path, monkeypatch):
    # GIVEN a store building the next generation of its collection
    store = open_store(tmp_path, background_index=False)
    store.upsert(COLL, points(0, 300))
    real_builder = store._run_builder
    seen = {}

    def builder_meanwhile_opened_elsewhere(name, target):
        # WHEN another store opens the same directory while the build's copy exists
        other = EdgeStore(tmp_path, background_index=False)
        with pytest.raises(StoreUnavailable):
            other.count(COLL)
        other.close()
        seen["copy_left"] = target.exists()
        real_builder(name, target)

    monkeypatch.setattr(store, "_run_builder", builder_meanwhile_opened_elsewhere)
    try:
        store.optimize(COLL)
        # THEN the failed opener removed nothing, and the build finished
        assert seen["copy_left"]
        assert (tmp_path / COLL / CURRENT_FILE).read_text() == "gen-1" and store.count(COLL) == 300
    finally:
        store.close()


def _resident_fraction(path) -> float:
    """How much of a file the page cache holds (mincore over a private mapping of it)."""
    import ctypes
    import mmap
    import os

    size = os.path.getsize(path)
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        vec = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        return sum(v & 1 for v in vec) / pages
    finally:
        del address
        mapped.close()


def _vector_files(shard) -> list:
    return [f for f in shard.glob("segments/*/vector_storage/*") if f.is_file() and f.stat().st_size]


linux_page_cache = pytest.mark.skipif(not hasattr(__import__("os"), "posix_fadvise") or sys.platform != "linux",
                                      reason="page-cache advice and mincore are Linux's")


def built_collection(root):
    """A collection of 3,000 points, built and closed: the directory of the generation that serves it."""
    store = open_store(root, background_index=False)
    store.upsert(COLL, points(0, 3000))
    store.optimize(COLL)
    store.close()
    return edge._current_shard(root / COLL)


def _evict(path) -> None:
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


@linux_page_cache
def test_a_built_generation_is_read_into_the_page_cache_before_it_serves(tmp_path, monkeypatch):
    # GIVEN a collection whose build's files left the page cache (a child process wrote them; on
    # this machine they were not cached, and a search's first walk through them took 20-50 ms)
    store = open_store(tmp_path, background_index=False)
    store.upsert(COLL, points(0, 3000))
    served_warm = []
    real_build = EdgeStore._run_builder

    def build_then_evict(self, name, target):
        real_build(self, name, target)
        for f in _vector_files(target):
            _evict(f)

    real_write = edge._write_atomically

    def switch(path, text, durable=False):  # the moment the new generation starts serving
        if path.name == CURRENT_FILE:
            deadline = time.monotonic() + 10
            files = _vector_files(path.parent / text)
            while min(_resident_fraction(f) for f in files) < 0.99 and time.monotonic() < deadline:
                time.sleep(0.05)  # the kernel's reads are asynchronous
            served_warm.append(min(_resident_fraction(f) for f in files))
        return real_write(path, text, durable)

    monkeypatch.setattr(EdgeStore, "_run_builder", build_then_evict)
    monkeypatch.setattr(edge, "_write_atomically", switch)
    try:
        # WHEN it is built and swapped in
        store.optimize(COLL)
        # THEN its vector files were in the page cache by the time it served searches
        assert served_warm and served_warm[0] >= 0.99
    finally:
        store.close()


@linux_page_cache
def test_a_collection_opened_after_a_restart_is_read_into_the_page_cache(tmp_path):
    # GIVEN a built collection whose files are not in the page cache (a restarted host)
    files = _vector_files(built_collection(tmp_path))
    assert files
    for f in files:
        _evict(f)
    if max(_resident_fraction(f) for f in files) > 0.5:
        pytest.skip("this kernel kept the pages after POSIX_FADV_DONTNEED")
    # WHEN a process opens it
    store = open_store(tmp_path, background_index=False)
    try:
        # THEN its files are read in the background, before any search asks for them
        deadline = time.monotonic() + 10
        while min(_resident_fraction(f) for f in files) < 0.99:
            assert time.monotonic() < deadline, "the vector files were not read into the page cache in 10 s"
            time.sleep(0.05)
    finally:
        store.close()


def test_a_container_whose_memory_limit_leaves_too_little_room_does_not_read_a_collection_in(tmp_path, monkeypatch):
    # GIVEN a built collection, and a process in a container (cgroup v2) whose limit leaves room for
    # the collection's files once over; the host's /proc/meminfo, which a container sees, has plenty
    shard = built_collection(tmp_path / "store")
    files_bytes = sum(f.stat().st_blocks * 512 for f in (shard / "segments").rglob("*") if f.is_file())
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()
    (cgroup / "memory.current").write_text(f"{2**30}\n")
    (cgroup / "memory.max").write_text(f"{2**30 + files_bytes}\n")
    (cgroup / "memory.stat").write_text("anon 1073741824\ninactive_file 0\n")
    monkeypatch.setattr(edge, "CGROUP_MEMORY_FILES", ((str(cgroup / "memory.max"), str(cgroup / "memory.current"),
                                                       str(cgroup / "memory.stat"), "inactive_file"),))
    # WHEN the store would read the collection's files into the page cache
    # THEN it does not: they would take over half the room left (the kernel would evict them again,
    # inside the container's limit)
    assert edge.warm_page_cache(shard) == 0
    # AND when most of that usage is page cache the kernel would reclaim first, it reads them in,
    # as it does without a limit
    (cgroup / "memory.stat").write_text("anon 1048576\ninactive_file 1072693248\n")
    reclaimable = edge.warm_page_cache(shard)
    (cgroup / "memory.stat").write_text("anon 1073741824\ninactive_file 0\n")
    (cgroup / "memory.max").write_text("max\n")
    assert reclaimable == edge.warm_page_cache(shard) > 0


@linux_page_cache
def test_the_pages_qdrant_reserves_ahead_are_not_read_into_the_page_cache(tmp_path):
    # GIVEN a built collection: Qdrant sizes a segment's payload storage (32 MB) and each payload
    # index (4 MB) ahead of use; what is not written yet is a hole, and reading it would fill
    # memory with zeros
    shard = built_collection(tmp_path)
    files = [f for f in (shard / "segments").rglob("*") if f.is_file() and f.stat().st_size]
    for f in files:
        _evict(f)  # after its fsync, st_blocks is what the file holds on disk
    size = sum(f.stat().st_size for f in files)
    allocated = sum(f.stat().st_blocks * 512 for f in files)
    if size <= 2 * allocated:
        pytest.skip(f"{size} bytes of files, {allocated} on disk: this filesystem or Qdrant version keeps no holes")
    # WHEN the store reads the collection in
    edge.warm_page_cache(shard)
    # THEN the vectors are read, and of the files no more than their data is in the page cache
    deadline = time.monotonic() + 10
    while min(_resident_fraction(f) for f in _vector_files(shard)) < 0.99:
        assert time.monotonic() < deadline, "the vector files were not read into the page cache in 10 s"
        time.sleep(0.05)
    time.sleep(0.2)  # the kernel's last reads
    resident = sum(_resident_fraction(f) * f.stat().st_size for f in files)
    assert resident <= allocated * 1.05 + (1 << 20), (resident, allocated, size)
