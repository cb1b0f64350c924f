"""Embedded store: one Qdrant Edge shard per collection, inside this process.

Layout: ``<root>/<collection>/`` holds ``lookalike-collection.json`` (our
:class:`CollectionSpec`, so that ``ensure_collection`` can verify dim and distance on
reopen), ``CURRENT`` (the name of the generation directory that holds the shard) and that
directory, ``gen-<n>/``. A collection written before generations existed has its shard
files in ``<root>/<collection>/`` itself and no ``CURRENT``; its first index build moves it.

Index builds happen outside this process. Qdrant Edge holds the GIL for the whole of
``optimize()`` (100k 1280-d points: ~100 s with every thread of the process frozen, Kafka
heartbeats included), so :meth:`EdgeStore.optimize` copies the flushed shard to the next
generation, lets a child process (``python -m lookalike.shared.stores.edge_build``) build
the HNSW graph and the int8 quantization there, then loads the result, replays the writes
made meanwhile, points ``CURRENT`` at it and drops the old generation. Searches go on
throughout; writes wait only while the copy is taken and while the result is swapped in.
A background thread starts a build when ``index_after_points`` points are unindexed.
A crash at any step leaves ``CURRENT`` naming a complete shard; leftovers of an unfinished
build are removed on the next open.

Only one process may open a shard (its WAL is locked); a second open fails and is
reported as :class:`StoreUnavailable` (e.g. the old process is still shutting down).

Durability: we do not call ``shard.flush()`` after each write. With the WAL enabled
(the default) ``update()`` returns after the operation is appended to the WAL, and a
reopen replays it: a point written right before ``os._exit`` is there after reload,
so a process crash loses nothing acknowledged. ``flush()`` would also write the
segments out: I/O per batch for nothing the WAL doesn't already give us against a
crash; ``close()`` flushes. (Power loss was not tested: that depends on the WAL's
fsync policy, which the binding does not document.)
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy
import qdrant_edge as qe

from lookalike.shared.errors import StoreUnavailable
from lookalike.shared.messages import SearchFilters
from lookalike.shared.stores.base import (
    PAYLOAD_INDEXES,
    SCROLL_PAGE,
    SEARCH_OMITS,
    CollectionSpec,
    Conditions,
    Hit,
    MatchAny,
    MatchValue,
    PointRecord,
    Range,
    VectorStore,
    as_vector,
    product_conditions,
    search_conditions,
    to_hits,
)

log = logging.getLogger("lookalike.stores.edge")

SPEC_FILE = "lookalike-collection.json"
CURRENT_FILE = "CURRENT"
DOCS_DIR = "_docs"  # read_doc/write_doc: beside the collections, never one of them (no spec file)
_GENERATION = re.compile(r"^gen-(\d+)$")
# A child build of a million points takes ~20 min on 2 cores; past this it is stuck.
BUILD_TIMEOUT_S = 3 * 3600.0
# How long a swap waits for searches still running on the old generation before closing it.
READERS_DRAIN_S = 5.0
# Index and search settings, measured at 100k 1280-d points on 2 cores (docs/benchmarks.md):
# - HNSW m 16 with 64 candidates while building, over int8-quantized vectors: about half
#   the build time of float vectors; payload_m 0 (no extra links per payload value) halves
#   it again. Built out of process, so the build time costs cores, not stalls.
# - Searches take 128 candidates and rescore the best 2x with the float vectors: int8 alone
#   never rescores, and recall@10 drops from 0.998 to 0.92.
# - A filter that keeps fewer points than full_scan_threshold KB of vectors (~20k) scans
#   them exactly, and ACORN walks the graph through filtered-out nodes above that: without
#   both a 2 % category filter found 1 of 30 results.
HNSW = {"m": 16, "ef_construct": 64, "full_scan_threshold": 100_000, "payload_m": 0}
SEARCH_EF = 128
# Builds merge segments down to this many: each segment is one more graph walk per search.
SEGMENTS = 2
RESCORE_OVERSAMPLING = 2.0
# A flush of many unflushed points holds the GIL (99k points: 2 s); the writer flushes
# every few thousand points, so each flush stays short (~0.25 s at 10k).
FLUSH_AFTER_POINTS = 2000
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")  # a collection name is a directory name
_DISTANCES = {"cosine": qe.Distance.Cosine, "euclid": qe.Distance.Euclid}
# Payload indexes and float vectors stay on disk (memory-mapped; warm_page_cache reads a
# shard's files into the page cache when it opens and before a build serves): loading a built
# 100k-point shard then takes ~0.4 s instead of ~1.5 s, time the swap spends holding the GIL.
# Searches read the int8 copies, which stay in RAM.
_INDEX_TYPES = {
    "keyword": lambda: qe.KeywordIndexParams(memory=qe.Memory.Cold),
    "float": lambda: qe.FloatIndexParams(memory=qe.Memory.Cold),
    "bool": lambda: qe.BoolIndexParams(memory=qe.Memory.Cold),
}
# posix_fadvise(WILLNEED) reads at most max(read_ahead_kb, max_sectors_kb) of the file's device
# per call (8 MB on the machine the figures come from, 128 KB by the kernel's default), so a file
# is asked for in steps of the default: 512 MB took 51-218 ms of calls, as in 8 MB steps.
READAHEAD_STEP = 128 << 10
# The binding raises plain ``Exception``; these message prefixes are the caller's fault.
_CALLER_ERRORS = ("Wrong input", "Bad input", "Bad request", "Vector dimension error", "Not found", "Format error")


@contextmanager
def _engine_errors(what: str) -> Iterator[None]:
    """Engine I/O failures -> StoreUnavailable; caller mistakes stay ValueError/KeyError/TypeError."""
    try:
        yield
    except (KeyError, ValueError, TypeError):
        raise
    except Exception as e:
        if type(e) is Exception and str(e).startswith(_CALLER_ERRORS):
            raise ValueError(f"qdrant-edge {what}: {e}") from e
        raise StoreUnavailable(f"qdrant-edge {what}: {e}") from e


@dataclass
class _Open:
    shard: Any  # qe.EdgeShard
    spec: CollectionSpec
    path: Path  # the shard's directory (a generation, or the collection itself for old layouts)
    readers: int = 0  # searches running on this shard; a swap waits for them before closing it
    journal: list | None = None  # (write, its new points) since a build copied the shard, replayed onto its result
    unindexed_after_build: int = 0  # what the last build left unindexed (no build loops on it)
    unflushed: int = 0  # points written since the last flush (the WAL has them; see FLUSH_AFTER_POINTS)


class EdgeStore(VectorStore):
    """Qdrant Edge shards under ``root``, shared by the threads of one process.

    Writes (and opening, swapping, closing) are serialised by one lock; searches take no
    lock and run concurrently with each other and with a write.

    ``index_after_points``: when this many points of a collection (or a tenth of it, if
    more) are not in an HNSW index, a background thread builds the index out of process
    (see the module docstring); the same figure sets Qdrant's indexing threshold, so that
    a build indexes what triggered it. ``background_index=False`` leaves builds to
    ``optimize()`` calls.
    """

    backend = "qdrant-edge"

    def __init__(self, root: Path, index_after_points: int = 2000, background_index: bool = True,
                 index_check_s: float = 2.0) -> None:
        self.root = Path(root)
        self.index_after_points = index_after_points
        self._shards: dict[str, _Open] = {}
        self._lock = threading.RLock()
        self._building = threading.Lock()  # one build at a time: they compete for the same cores
        self._readers = threading.Condition()
        self._closed = False
        self._stop = threading.Event()
        self._builder: subprocess.Popen | None = None
        self._indexer: threading.Thread | None = None
        if background_index:
            self._indexer = threading.Thread(target=self._index_loop, args=(index_check_s,), daemon=True,
                                             name="edge-indexer")
            self._indexer.start()

    # ------------------------------------------------------------------ collections

    def ensure_collection(self, spec: CollectionSpec) -> None:
        with self._lock:
            self._check_open()
            opened = self._shards.get(spec.name)
            if opened is not None:
                spec.check_matches(opened.spec.dim, opened.spec.distance)
                return
            existing = self._read_spec(spec.name)
            if existing is not None:
                spec.check_matches(existing.dim, existing.distance)
                self._load(existing)
                return
            collection = self._path(spec.name)
            path = collection / "gen-0"
            with _engine_errors(f"create {spec.name}"):
                if collection.exists():  # a create that died before its spec file: start over
                    shutil.rmtree(collection)
                path.mkdir(parents=True)
                shard = qe.EdgeShard.create(str(path), self._config(spec))
                self._ensure_indexes(shard)
                _write_atomically(collection / CURRENT_FILE, path.name)
                self._write_spec(spec)  # last: a spec file means "fully created"
            self._shards[spec.name] = _Open(shard, spec, path)

    def collections(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            d.name for d in self.root.iterdir() if _NAME.match(d.name) and self._read_spec(d.name) is not None
        )

    def count(self, collection: str) -> int:
        with self._reading(collection) as opened, _engine_errors(f"count {collection}"):
            return opened.shard.count(qe.CountRequest(exact=True))

    def unindexed(self, collection: str) -> int:
        """Points of the collection that searches still scan plainly (not yet in an HNSW index)."""
        return self._index_state(collection)[1]

    def _index_state(self, collection: str) -> tuple[int, int]:
        """(points, of them not yet in an HNSW index)."""
        with self._reading(collection) as opened, _engine_errors(f"info {collection}"):
            return _points_and_unindexed(opened.shard.info())

    # ------------------------------------------------------------------ writes

    def upsert(self, collection: str, points: Sequence[PointRecord]) -> None:
        opened = self._shard(collection)
        batch = [qe.Point(p.id, as_vector(p.vector, opened.spec.dim), dict(p.payload)) for p in points]
        if batch:
            self._update(collection, qe.UpdateOperation.upsert_points(batch), points=len(batch))

    def delete_points(self, collection: str, ids: Sequence[str]) -> None:
        if ids:
            self._update(collection, qe.UpdateOperation.delete_points(list(ids)))

    def delete_product(self, collection: str, product_id: str) -> None:
        flt = _filter(product_conditions(product_id))
        self._update(collection, qe.UpdateOperation.delete_points_by_filter(flt))

    def delete_product_images(self, collection: str, product_id: str, image_ids: Collection[str]) -> None:
        if image_ids:
            flt = _filter(product_conditions(product_id, image_ids))
            self._update(collection, qe.UpdateOperation.delete_points_by_filter(flt))

    def set_product_payload(self, collection: str, product_id: str, payload: dict) -> None:
        flt = _filter(product_conditions(product_id))
        self._update(collection, qe.UpdateOperation.set_payload_by_filter(flt, dict(payload)))

    def drop_collection(self, name: str) -> None:
        """Close the collection (after its running searches) and remove its files.

        A build of it in flight notices at its switch and throws its result away."""
        path = self._path(name)
        with self._lock:
            self._check_open()
            opened = self._shards.pop(name, None)
            if opened is None and not path.exists():
                return
            # Remove the spec file first: from then on the collection does not exist, even if
            # the removal below is cut short (a restart finishes it: see _read_spec).
            (path / SPEC_FILE).unlink(missing_ok=True)
            (path / CURRENT_FILE).unlink(missing_ok=True)
        if opened is not None:
            self._retire(opened)
        shutil.rmtree(path, ignore_errors=True)

    def read_doc(self, name: str) -> dict | None:
        try:
            return json.loads(self._doc_path(name).read_text())
        except FileNotFoundError:
            return None

    def write_doc(self, name: str, doc: dict) -> None:
        path = self._doc_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(path, json.dumps(doc, sort_keys=True), durable=True)

    def _doc_path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"invalid document name {name!r}")
        return self.root / DOCS_DIR / f"{name}.json"

    def optimize(self, collection: str) -> None:
        """Build the HNSW index and quantization of everything written so far, out of process.

        Blocks the calling thread until the new generation serves searches; the rest of the
        process keeps running (the build's GIL is the child's). Raises StoreUnavailable if
        the build fails; the collection then stays as it was.
        """
        with self._building:
            self._build(collection)

    # ------------------------------------------------------------------ reads

    def search(
        self,
        collection: str,
        vector: Any,
        limit: int,
        filters: SearchFilters | None = None,
        exclude_product_ids: Collection[str] = (),
        with_vectors: bool = False,
    ) -> list[Hit]:
        conds = search_conditions(filters, exclude_product_ids)
        with self._reading(collection) as opened:
            request = qe.QueryRequest(
                limit=limit,
                query=qe.Query.Nearest(as_vector(vector, opened.spec.dim)),
                filter=_filter(conds) if conds else None,
                params=qe.SearchParams(
                    hnsw_ef=max(SEARCH_EF, limit), acorn=qe.AcornSearchParams(enable=True),
                    quantization=qe.QuantizationSearchParams(rescore=True, oversampling=RESCORE_OVERSAMPLING)),
                with_payload=qe.PayloadSelector.Exclude(list(SEARCH_OMITS)),
                with_vector=with_vectors,
            )
            with _engine_errors(f"search {collection}"):
                found = opened.shard.query(request)
        return to_hits(found, with_vectors)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        self._stop.set()
        builder = self._builder
        if builder is not None:  # an index build in flight: its copy is thrown away
            builder.kill()
        if self._indexer is not None and self._indexer is not threading.current_thread():
            self._indexer.join(timeout=30)
        with self._lock:
            if self._closed:
                return
            self._closed = True
            shards, self._shards = self._shards, {}
            first_error: Exception | None = None
            for name, opened in shards.items():
                try:
                    with _engine_errors(f"close {name}"):
                        opened.shard.flush()
                        opened.shard.close()
                except Exception as e:  # close the others anyway
                    first_error = first_error or e
            if first_error is not None:
                raise first_error

    # ------------------------------------------------------------------ index builds

    def _index_loop(self, every_s: float) -> None:
        """Background builds: a collection with ``index_after_points`` unindexed points gets one."""
        while not self._stop.wait(every_s):
            for name in list(self._shards):
                if self._stop.is_set():
                    return
                try:
                    opened = self._shards.get(name)
                    points, waiting = self._index_state(name)
                    # Builds grow with the collection (a tenth of it), so that rebuilding merged
                    # segments stays a bounded share of the work.
                    enough = max(self.index_after_points, points // 10)
                    if opened is None or waiting < opened.unindexed_after_build + enough:
                        continue
                    log.info("indexing %s out of process: %d points unindexed", name, waiting)
                    self.optimize(name)
                except Exception as e:  # a failed build leaves the collection as it was; try later
                    if not self._stop.is_set():
                        log.warning("background index build of %s failed: %s", name, e)

    def _build(self, name: str) -> None:
        opened = self._shard(name)
        collection = self._path(name)
        target = collection / f"gen-{_generation_number(opened.path) + 1}"
        built = None
        # 1. Copy the flushed shard; from here every write is also journaled for the result.
        with self._lock:
            self._check_open()
            with _engine_errors(f"flush {name}"):
                opened.shard.flush()
            if target.exists():
                shutil.rmtree(target)
            _copy_shard(opened.path, target)
            opened.journal = []
        try:
            # 2. Build in a child process: its GIL, not ours.
            t0 = time.monotonic()
            self._run_builder(name, target)
            # 3. Load the result and replay the writes made meanwhile: most of them while
            # writes go on (one write at a time holds the GIL), the rest under the lock.
            t_load = time.monotonic()
            with _engine_errors(f"load {target}"):
                built = qe.EdgeShard.load(str(target), self._config(opened.spec))
            t_load = time.monotonic() - t_load
            warm_page_cache(target, self._stop)  # asked for now; the kernel reads while the writes replay
            replayed, unflushed = 0, 0
            while len(opened.journal) - replayed > 0 and not self._stop.is_set():
                operation, points = opened.journal[replayed]
                built.update(operation)
                replayed += 1
                # Flushed as the writer flushes: a build during a long import replays tens of
                # thousands of points, and one flush of them all held the GIL for over a second.
                unflushed += points
                if unflushed >= FLUSH_AFTER_POINTS:
                    with _engine_errors(f"flush {target}"):
                        built.flush()
                    unflushed = 0
            with self._lock:
                self._check_open()
                if self._shards.get(name) is not opened:  # dropped meanwhile: nothing to switch to
                    built.close()
                    built = None
                    shutil.rmtree(target, ignore_errors=True)
                    return
                with _engine_errors(f"replay onto {target}"):
                    for operation, points in opened.journal[replayed:]:
                        built.update(operation)
                        unflushed += points
                    info = built.info()
                # 4. Switch: CURRENT names the new generation; a crash from here on opens it.
                _write_atomically(collection / CURRENT_FILE, target.name)
                self._shards[name] = _Open(built, opened.spec, target, unflushed=unflushed,
                                           unindexed_after_build=_points_and_unindexed(info)[1])
            log.info("%s: %s serves searches (built in %.1f s, loaded in %.2f s, %d writes replayed; %d of %d "
                     "points indexed)", name, target.name, time.monotonic() - t0, t_load, len(opened.journal),
                     info.indexed_vectors_count, info.points_count)
            t_retire = time.monotonic()
            self._retire(opened)
            log.info("%s: %s retired in %.2f s", name, opened.path.name, time.monotonic() - t_retire)
        finally:
            opened.journal = None
            if self._shards.get(name) is opened:  # the build failed: the old generation stays
                if built is not None:
                    built.close()
                shutil.rmtree(target, ignore_errors=True)

    def _run_builder(self, name: str, target: Path) -> None:
        child = subprocess.Popen([sys.executable, "-m", "lookalike.shared.stores.edge_build", str(target)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._builder = child  # close() stops it
        try:
            _, stderr = child.communicate(timeout=BUILD_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            child.kill()
            child.communicate()
            raise StoreUnavailable(f"qdrant-edge index build of {name} took over {BUILD_TIMEOUT_S:.0f} s") from e
        finally:
            self._builder = None
        if child.returncode != 0:
            raise StoreUnavailable(f"qdrant-edge index build of {name} failed ({child.returncode}): "
                                   f"{stderr.strip()[-500:]}")

    def _retire(self, old: _Open) -> None:
        """Close a replaced shard once its running searches finish, then remove its files."""
        deadline = time.monotonic() + READERS_DRAIN_S
        with self._readers:
            while old.readers and time.monotonic() < deadline:
                self._readers.wait(timeout=0.05)
        try:
            old.shard.close()
        except Exception as e:  # its replacement holds everything; only files are left behind
            log.warning("closing the replaced shard %s failed: %s", old.path, e)
        _remove_shard_files(old.path, self._path(old.spec.name))

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("EdgeStore is closed")

    def _path(self, name: str) -> Path:
        if not _NAME.match(name):
            raise ValueError(f"invalid collection name {name!r}")
        return self.root / name

    def _config(self, spec: CollectionSpec) -> Any:
        # Qdrant indexes a segment from this size on: the size of index_after_points vectors,
        # so the build that these points trigger indexes them.
        threshold_kb = max(1, self.index_after_points * spec.dim * 4 // 1024)
        return qe.EdgeConfig(
            vectors=qe.EdgeVectorParams(size=spec.dim, distance=_DISTANCES[spec.distance], memory=qe.Memory.Cold),
            optimizers=qe.EdgeOptimizersConfig(indexing_threshold=threshold_kb, default_segment_number=SEGMENTS),
            hnsw_config=qe.HnswIndexConfig(**HNSW),
            quantization_config=qe.ScalarQuantizationConfig(type=qe.ScalarType.Int8, always_ram=True),
            max_search_threads=os.cpu_count() or 1,  # segments searched in parallel (one by default here)
        )

    @contextmanager
    def _reading(self, name: str) -> Iterator[_Open]:
        """The collection's shard, kept open (not retired by a swap) while the caller reads."""
        while True:
            opened = self._shard(name)
            with self._readers:
                opened.readers += 1
            if self._shards.get(name) is opened:
                break
            self._done_reading(opened)  # swapped meanwhile: take the new one
        try:
            yield opened
        finally:
            self._done_reading(opened)

    def _done_reading(self, opened: _Open) -> None:
        with self._readers:
            opened.readers -= 1
            self._readers.notify_all()

    def _shard(self, name: str) -> _Open:
        """The open shard of a collection, loading it from disk on first use."""
        opened = self._shards.get(name)  # fast path, no lock: reads stay concurrent
        if opened is not None:
            return opened
        with self._lock:
            self._check_open()
            opened = self._shards.get(name)
            if opened is not None:
                return opened
            spec = self._read_spec(name)
            if spec is None:
                raise KeyError(f"unknown collection {name!r}")
            return self._load(spec)

    def _load(self, spec: CollectionSpec) -> _Open:
        collection = self._path(spec.name)
        path = _current_shard(collection)
        # Passing the config re-checks compatibility and applies our index settings.
        with _engine_errors(f"load {spec.name}"):
            shard = qe.EdgeShard.load(str(path), self._config(spec))
            self._ensure_indexes(shard)
        # Only now, holding the shard's lock: a process that failed to open it must not
        # delete the generation another process is building.
        _remove_leftovers(collection, path)
        opened = self._shards[spec.name] = _Open(shard, spec, path)
        threading.Thread(target=warm_page_cache, args=(path, self._stop), daemon=True,
                         name=f"edge-warm-{spec.name}").start()
        return opened

    @staticmethod
    def _ensure_indexes(shard: Any) -> None:
        present = set(shard.info().payload_schema)
        for field, kind in PAYLOAD_INDEXES.items():
            if field not in present:
                shard.update(qe.UpdateOperation.create_field_index(field, _INDEX_TYPES[kind]()))

    def _read_spec(self, name: str) -> CollectionSpec | None:
        """Our spec file, else what Qdrant's own edge_config.json says; None if neither."""
        path = self._path(name)
        try:
            data = json.loads((path / SPEC_FILE).read_text())
            return CollectionSpec(name=name, dim=int(data["dim"]), distance=data["distance"])
        except FileNotFoundError:
            pass
        try:  # created, but we died before writing our spec file
            vectors = json.loads((_current_shard(path) / "edge_config.json").read_text())["vectors"][""]
            return CollectionSpec(name=name, dim=int(vectors["size"]), distance=vectors["distance"].lower())
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _write_spec(self, spec: CollectionSpec) -> None:
        _write_atomically(self._path(spec.name) / SPEC_FILE, json.dumps({"dim": spec.dim, "distance": spec.distance}))

    def _update(self, collection: str, operation: Any, points: int = 0) -> None:
        """Apply one write (``points`` new points), journal it for a running build, flush when due."""
        with self._lock:
            self._check_open()
            opened = self._shard(collection)
            with _engine_errors(f"write {collection}"):
                opened.shard.update(operation)
            if opened.journal is not None:  # a build copied the shard before this write
                opened.journal.append((operation, points))
            opened.unflushed += points
            if opened.unflushed >= FLUSH_AFTER_POINTS:
                with _engine_errors(f"flush {collection}"):
                    opened.shard.flush()
                opened.unflushed = 0

    def _scroll(
        self, collection: str, conds: Conditions, fields: list[str] | None, with_vector: bool
    ) -> Iterator[Any]:
        flt = _filter(conds)
        offset = None
        while True:
            request = qe.ScrollRequest(
                offset=offset,
                limit=SCROLL_PAGE,
                filter=flt,
                with_payload=True if fields is None else qe.PayloadSelector.Include(fields),
                with_vector=with_vector,
            )
            with self._reading(collection) as opened, _engine_errors(f"scroll {collection}"):
                records, offset = opened.shard.scroll(request)
            yield from records
            if offset is None:
                return


# ---------------------------------------------------------------------- generation files


def warm_page_cache(shard: Path, stop: threading.Event | None = None) -> int:
    """Ask the kernel to read a shard's segment files into the page cache; the bytes asked for.

    Float vectors, graph links and payloads are memory-mapped (``Memory.Cold``), and a build's
    files were not in the page cache when it began to serve (the child process wrote them): at
    100k points a search whose graph walk reached pages not yet read took 20-50 ms instead of
    about 1 (docs/benchmarks.md). The reads are the kernel's, asynchronous, without the GIL.
    Only the parts of a file that hold data are asked for: Qdrant reserves pages ahead (32 MB of
    payload storage a segment, 4 MB a payload index), which stay holes until written. 0 (nothing
    asked) without ``posix_fadvise``, or when the data would take over half the memory available
    (MemAvailable, or the room a container's cgroup limit leaves): the kernel would evict it
    again, and searches fault in what they need. The pages are file-backed and clean: once
    mapped they count in RSS (RssFile), and the kernel can reclaim them. ``stop``: set, it stops
    asking (the store is closing).
    """
    if not hasattr(os, "posix_fadvise"):
        return 0
    files = []  # (path, its data ranges)
    try:
        paths = [f for f in (shard / "segments").rglob("*") if f.is_file()]
    except OSError:  # retired meanwhile
        return 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # retired meanwhile
            continue
        try:
            files.append((path, _data_ranges(fd)))
        except OSError:
            pass
        finally:
            os.close(fd)
    total = sum(end - start for _, ranges in files for start, end in ranges)
    available = _memory_available()
    if available is not None and total > available // 2:
        log.info("%s: %d MB of segment files, over half the %d MB available: not read ahead",
                 shard, total >> 20, available >> 20)
        return 0
    asked = 0
    for path, ranges in files:
        if stop is not None and stop.is_set():
            break
        if not ranges:
            continue
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:  # retired meanwhile
            continue
        try:
            for start, end in ranges:
                for offset in range(start, end, READAHEAD_STEP):
                    os.posix_fadvise(fd, offset, min(READAHEAD_STEP, end - offset), os.POSIX_FADV_WILLNEED)
                asked += end - start
        except OSError:  # advice only
            pass
        finally:
            os.close(fd)
    return asked


def _data_ranges(fd: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each part of the file that holds data (all of it where the filesystem
    cannot tell holes apart)."""
    size = os.fstat(fd).st_size
    ranges, offset = [], 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # nothing but a hole from offset to the end
                break
            return [(0, size)]
        if start >= size:  # the file grew meanwhile: what is past the size it had is not asked for
            break
        end = min(size, max(os.lseek(fd, start, os.SEEK_HOLE), start + 1))
        ranges.append((start, end))
        offset = end
    return ranges


# A container sees the host's /proc/meminfo; its own limit is its cgroup's (v2, then v1): the limit,
# the usage, and the statistics whose inactive file pages (reclaimable cache) the usage includes.
CGROUP_MEMORY_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)


def _memory_available() -> int | None:
    """Bytes this process may still fill: MemAvailable, or less where its cgroup's limit leaves
    less room (None when neither can be read). A cgroup's usage counts its page cache; the
    inactive part of it is reclaimed before anything else, so it leaves room (the working set
    that kubelet compares with the limit)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    for limit_file, usage_file, stat_file, inactive_key in CGROUP_MEMORY_FILES:
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's near-2**63: no limit
            room = max(0, int(limit) - (usage - _stat_value(stat_file, inactive_key)))
            available = room if available is None else min(available, room)
        break
    return available


def _stat_value(path: str, key: str) -> int:
    """One ``key value`` line of a cgroup's memory.stat; 0 when it cannot be read."""
    try:
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _points_and_unindexed(info: Any) -> tuple[int, int]:
    return info.points_count, max(0, info.points_count - info.indexed_vectors_count)


def _write_atomically(path: Path, text: str, durable: bool = False) -> None:
    """Write-then-rename: a reader (or a restart) sees the old text or the new, never a mix.
    ``durable``: fsync the file and its directory, so an acknowledged write survives a power cut."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _current_shard(collection: Path) -> Path:
    """The directory holding the collection's shard: ``CURRENT``'s generation, else (old layout) itself."""
    try:
        return collection / (collection / CURRENT_FILE).read_text().strip()
    except FileNotFoundError:
        return collection


def _generation_number(path: Path) -> int:
    match = _GENERATION.match(path.name)
    return int(match.group(1)) if match else 0


def _is_ours(entry: Path) -> bool:
    """Files of the collection directory that are not a shard's: our spec, CURRENT, generations."""
    return entry.name in (SPEC_FILE, CURRENT_FILE) or entry.name.startswith(".") or bool(
        _GENERATION.match(entry.name))


def _copy_shard(source: Path, target: Path) -> None:
    if source.name.startswith("gen-"):
        shutil.copytree(source, target)
        return
    target.mkdir()  # old layout: the shard's files sit beside ours in the collection directory
    for entry in source.iterdir():
        if not _is_ours(entry):
            (shutil.copytree if entry.is_dir() else shutil.copy2)(entry, target / entry.name)


def _remove_shard_files(path: Path, collection: Path) -> None:
    if path != collection:
        shutil.rmtree(path, ignore_errors=True)
        return
    for entry in collection.iterdir():  # old layout: leave our own files and the generations
        if not _is_ours(entry):
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def _remove_leftovers(collection: Path, current: Path) -> None:
    """What a crash can leave: an unfinished build's generation, or a replaced shard's files."""
    if current == collection:
        return
    for entry in collection.iterdir():
        if _GENERATION.match(entry.name) and entry != current:
            shutil.rmtree(entry, ignore_errors=True)
    _remove_shard_files(collection, collection)


def _condition(c: MatchAny | MatchValue | Range) -> Any:
    if isinstance(c, MatchAny):
        return qe.FieldCondition(c.key, match=qe.MatchAny(list(c.values)))
    if isinstance(c, MatchValue):
        # Quirk (qdrant-edge 0.9): MatchValue(True) is read as the integer 1 (bool is an int
        # subclass) and never matches a bool payload. numpy.bool_ is not an int, so it
        # reaches the binding's bool branch and matches.
        value = numpy.bool_(c.value) if isinstance(c.value, bool) else c.value
        return qe.FieldCondition(c.key, match=qe.MatchValue(value))
    return qe.FieldCondition(c.key, range=qe.RangeFloat(gte=c.gte, lte=c.lte))


def _filter(conds: Conditions) -> Any:
    return qe.Filter(
        must=[_condition(c) for c in conds.must] or None,
        must_not=[_condition(c) for c in conds.must_not] or None,
    )

