"""Images, their bytes and their detections in one database (Peewee), SQLite by default.

One file holds everything, so a backup is one copy. WAL with synchronous=FULL: an acknowledged image
survives a power cut (a Pi gets unplugged). Writes take the write lock up front (BEGIN IMMEDIATE) so two
writers queue on the busy timeout instead of failing half-way. Bytes live in their own table keyed by
sha256, stored once however many images use them; listing never reads them. Detections live in their
own table, indexed by (name, image) so `objects=dog` walks an index newest first. How many images hold
each name, and each pair of names, is kept beside them (object_count, object_pair: changed in the same
transaction), so GET /objects reads a few rows and a search knows which names to skip. Thumbnails are kept
in theirs, keyed by (sha256, size, format): a cache, made again when purged, gone with their bytes.

A `Store` owns its database object: `Store(target)` asks `open_backend()` for the backend that serves
`target` (today a SQLite file path) and binds its own table classes to that backend's database, so two
stores on two files in one process are independent. Everything SQLite-specific (pragmas, WAL,
AUTOINCREMENT, busy handling, what its errors mean, how much room is left) lives in `SqliteBackend`. Peewee keeps one
connection per thread; request threads connect and close around each request (server.py's hooks),
worker threads use `store.connection()`. The store returns domain records (`ImageRecord`, `Found`) and
writes no API JSON. Writes stop at a floor of free disk space (`min_free_mb`, MIN_FREE_DISK_MB) with
`LowDisk` while reads and deletes go on: on a Pi the SD card holding the database holds the system too.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import random
import re
import sqlite3
import sys
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Collection, Iterable, Iterator, Sequence

import peewee as pw
from playhouse.pool import MaxConnectionsExceeded, PooledPostgresqlDatabase, PooledSqliteDatabase
from playhouse.sqlite_ext import AutoIncrementField

log = logging.getLogger(__name__)

SCHEMA_VERSION = 5  # 2: image ids are never reused (AUTOINCREMENT); 3: image.filename, the thumbnail table;
# 4: image.model_name (what produced the detections, for people; detected_with has the digest and threshold)
# 5: the object_count and object_pair tables, the (name, confidence, image) index


class StoreError(Exception):
    """Base of the store's errors."""


class NotFound(StoreError):
    """No image with that id."""


class StoreFull(StoreError):
    """The disk (or the database's size limit) is full: nothing was written."""


class LowDisk(StoreFull):
    """The write would take the database's filesystem below the space kept free: nothing was written."""


class StoreUnavailable(StoreError):
    """The database cannot be used right now (locked past the busy timeout, unreachable, read-only, corrupt).

    `retry_after`: seconds after which trying again may work (busy, unreachable), else None."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class WriteConflict(StoreUnavailable):
    """A write lost a deadlock or a serialization check (PostgreSQL): nothing was written, and the store
    tries it again itself (`_retried`) before this reaches a caller."""


class DriverMissing(StoreUnavailable):
    """The target names a database whose driver is not installed."""


BUSY_RETRY_AFTER = 2  # seconds: a busy or unreachable database, on either backend
WRITE_ATTEMPTS = 5  # a write that loses a deadlock or serialization check is run again up to this many times


# ---------------------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Found:
    """One detection as stored: label, confidence and a box normalised 0..1."""

    label: str
    confidence: float
    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass(frozen=True)
class NewImage:
    """What an ingest knows before the image is stored."""

    data: bytes
    sha256: str
    content_type: str
    width: int
    height: int
    label: str
    label_generated: bool
    detection_enabled: bool
    detections: Sequence[Found] = ()
    detected_with: str | None = None
    source_url: str | None = None
    created_ms: int | None = None  # None: now (by the store's clock)
    filename: str | None = None  # the uploaded file's name, or the URL's last path segment (a display string)
    model_name: str | None = None  # the model file's stem, when detected_with is set


@dataclass(frozen=True)
class ImageRecord:
    id: int
    sha256: str
    label: str
    label_generated: bool
    detection_enabled: bool
    content_type: str
    size: int
    width: int
    height: int
    source_url: str | None
    created_ms: int  # milliseconds since the epoch, UTC
    detections: tuple[Found, ...] = field(default=())
    filename: str | None = None  # null for images stored before schema version 3
    detected_with: str | None = None  # "<model digest prefix>@<threshold>"; None: detection never ran
    model_name: str | None = None  # the model file's stem; null for images detected before schema version 4

    @property
    def objects(self) -> list[str]:
        return sorted({d.label for d in self.detections})

    @property
    def model(self) -> str | None:
        """The digest prefix of the model file that produced the detections (None: detection never ran)."""
        return None if self.detected_with is None else self.detected_with.partition("@")[0]

    @property
    def threshold(self) -> float | None:
        """The threshold the detections were kept at (None: detection never ran)."""
        return None if self.detected_with is None else _threshold_of(self.detected_with)


@dataclass(frozen=True)
class Thumbnail:
    """A rendition of some stored bytes, made once and kept (keyed by sha256, size and format)."""

    data: bytes
    width: int
    height: int


# ---------------------------------------------------------------------------------------------------------
# Schema: table classes made per database, so each Store binds its own
# ---------------------------------------------------------------------------------------------------------


def _tables(database: pw.Database, id_field: Callable[[], pw.Field]) -> SimpleNamespace:
    class _Base(pw.Model):
        class Meta:
            legacy_table_names = False

    _Base._meta.set_database(database)

    class Setting(_Base):
        """Key/value facts about the database itself (the schema version)."""

        key = pw.TextField(primary_key=True)
        value = pw.TextField()

    class Blob(_Base):
        sha256 = pw.FixedCharField(64, primary_key=True)
        data = pw.BlobField()

    class Image(_Base):
        # Ids are never reused: /images/{id}/file is served as immutable, so an id must never name other
        # bytes later (the backend's id field: AUTOINCREMENT on SQLite).
        id = id_field()
        sha256 = pw.FixedCharField(64, index=True)
        label = pw.TextField()
        label_generated = pw.BooleanField()
        detection_enabled = pw.BooleanField()
        # What produced the detections (model file digest and threshold), so identical bytes analysed the
        # same way reuse them instead of running the model again.
        detected_with = pw.TextField(null=True)
        content_type = pw.TextField()
        size = pw.IntegerField()
        width = pw.IntegerField()
        height = pw.IntegerField()
        source_url = pw.TextField(null=True)
        created_ms = pw.BigIntegerField()  # milliseconds since the epoch, UTC
        filename = pw.TextField(null=True)  # schema version 3; older rows null
        model_name = pw.TextField(null=True)  # schema version 4: the model file's stem; older rows null

    class Detection(_Base):
        image = pw.ForeignKeyField(Image, on_delete="CASCADE", backref="detections", index=False)
        name = pw.TextField()  # the label, lower-cased: what objects= searches
        label = pw.TextField()
        confidence = pw.DoubleField()  # double precision on PostgreSQL (FloatField would be its 4-byte REAL)
        x_min = pw.DoubleField()
        y_min = pw.DoubleField()
        x_max = pw.DoubleField()
        y_max = pw.DoubleField()

        class Meta:
            indexes = (
                (("image", "confidence"), False),  # an image's detections, and the cascade on delete
                (("name", "image", "confidence"), False),  # objects=: walk one name newest first
                (("name", "confidence", "image"), False),  # min_confidence=: the few at or above it (version 5)
            )

    class Thumbnail(_Base):
        """Renditions of stored bytes: keyed by what they are made from, so every image with the same
        bytes shares them and every process sees those another made. They go with their bytes."""

        sha256 = pw.FixedCharField(64)
        size = pw.IntegerField()  # the longest side asked for, at most the picture's own
        format = pw.TextField()  # "jpeg" or "webp"
        data = pw.BlobField()
        width = pw.IntegerField()
        height = pw.IntegerField()
        created_ms = pw.BigIntegerField()

        class Meta:
            primary_key = pw.CompositeKey("sha256", "size", "format")

    class VisionFrame(_Base):
        """Images stored by /v1/vision/* (VISION_STORE), so that only the newest VISION_STORE_MAX are kept.
        A table of its own (created where it is missing): older databases gain it without a migration."""

        image = pw.ForeignKeyField(Image, primary_key=True, on_delete="CASCADE")

    class StagedBlob(_Base):
        """Bytes written ahead of their image (Store.stage_blob: while the model runs), until the image's own
        transaction takes them. A table of its own (created where it is missing); what a crash left here
        is deleted at the next start unless an image holds it."""

        sha256 = pw.FixedCharField(64, primary_key=True)

    class ObjectCount(_Base):
        """How many images hold each name (schema version 5): GET /objects reads it instead of counting every
        detection, and a search walks its rarest name first. Changed in the transaction that changes the
        detections (Store._count_changes); a name no image holds has no row."""

        name = pw.TextField(primary_key=True)
        images = pw.IntegerField()

    class ObjectPair(_Base):
        """How many images hold both of two names, `a` < `b` (schema version 5), so that `match=all` of names
        that never occur together is answered at once instead of walking every image of the rarer one."""

        a = pw.TextField()
        b = pw.TextField()
        images = pw.IntegerField()

        class Meta:
            primary_key = pw.CompositeKey("a", "b")

    return SimpleNamespace(
        Setting=Setting, Blob=Blob, Image=Image, Detection=Detection, Thumbnail=Thumbnail, VisionFrame=VisionFrame,
        ObjectCount=ObjectCount, ObjectPair=ObjectPair, StagedBlob=StagedBlob,
        all=(Setting, Blob, Image, Detection, Thumbnail, VisionFrame, ObjectCount, ObjectPair, StagedBlob),
    )


# ---------------------------------------------------------------------------------------------------------
# Backends
# ---------------------------------------------------------------------------------------------------------


def _chain(e: BaseException | None) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


class SqliteBackend:
    """One SQLite file: pooled connections, WAL, synchronous=FULL, a busy timeout, AUTOINCREMENT ids."""

    name = "sqlite"
    _FULL = re.compile(r"database or disk is full", re.I)
    DEFAULT_POOL = 64  # more than waitress' threads plus the upload workers: SQLite connections are cheap
    lock_rows = ""  # SQLite has no row locks: a write transaction holds the one write lock (BEGIN IMMEDIATE)
    share_rows = ""
    blob_upsert = "ON CONFLICT (sha256) DO NOTHING"  # writers are serialised: a blob seen is a blob kept

    def __init__(self, path: str, *, busy_timeout_ms: int = 10_000, pool_size: int = 0):
        self.path = path
        self.description = path
        max_connections = pool_size or self.DEFAULT_POOL
        self._page_size: int | None = None
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        # A pool: a request's close() hands its connection back instead of closing it. Closing SQLite's
        # last connection checkpoints and deletes the WAL (a second fsync per write), and reopening costs
        # the pragmas again; both were measurable in bench/api.py.
        self.database = PooledSqliteDatabase(
            path,
            max_connections=max_connections,  # more than waitress' threads plus the upload workers
            stale_timeout=600,
            check_same_thread=False,  # pooled connections move between threads, one thread at a time
            pragmas={
                "journal_mode": "wal",
                "synchronous": 2,  # FULL: fsync the WAL on every commit
                "busy_timeout": busy_timeout_ms,
                "foreign_keys": 1,
                "cache_size": -8000,  # 8 MB page cache per connection
            },
        )

    id_field = staticmethod(AutoIncrementField)

    def free_bytes(self) -> int | None:
        """Bytes new data can take: free space on the database's filesystem (what an unprivileged writer
        may use), plus the database's own free pages, which deleted images leave and new data reuses (the
        file never shrinks by itself). None where the filesystem cannot say."""
        try:
            st = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
        except OSError:
            return None  # no statvfs here: no floor rather than no writes
        return st.f_bavail * st.f_frsize + self.reusable_bytes()

    def reusable_bytes(self) -> int:
        """Bytes of free pages inside the database file (on this thread's connection)."""
        if self._page_size is None:  # fixed once the file exists
            self._page_size = self.database.execute_sql("PRAGMA page_size").fetchone()[0]
        return self.database.execute_sql("PRAGMA freelist_count").fetchone()[0] * self._page_size

    def write(self) -> Any:
        """A write transaction that holds the write lock from its start (writers queue, never fail half-way)."""
        return self.database.atomic("IMMEDIATE")

    def snapshot(self) -> Any:
        """A read transaction: its statements see one state of the database (WAL: the state at its first read)."""
        return self.database.atomic()

    def plan_for_values(self) -> None:
        """Plan the rest of the transaction's statements for their own parameters: SQLite always does."""

    def serialize(self, key: str) -> None:
        """Make writers that pass the same `key` take turns (inside a write transaction): they already do here."""

    def translate(self, e: BaseException) -> StoreError:
        # On a full disk SQLite rolls the transaction back itself; peewee's own ROLLBACK then fails ("no
        # transaction is active") and that error hides the real one, which is still in the chain.
        texts = [str(x) for x in _chain(e)]
        text = texts[0]
        if any(self._FULL.search(t) for t in texts):
            return StoreFull("the disk holding the database is full; free some space and try again")
        if "locked" in text or "busy" in text or isinstance(e, MaxConnectionsExceeded):
            return StoreUnavailable(
                "the database is busy (another writer held it past DB_BUSY_TIMEOUT); try again in a moment",
                retry_after=BUSY_RETRY_AFTER,
            )
        return StoreUnavailable(f"the database cannot be used: {text}")

    def reserve_ids(self, n: int) -> list[int]:
        """`n` fresh image ids (inside a write transaction): past every id ever handed out."""
        first = self.id_high_water() + 1
        return list(range(first, first + n))

    def id_high_water(self) -> int:
        """The highest image id ever handed out, deleted ones included (AUTOINCREMENT's sqlite_sequence)."""
        seq = self.database.execute_sql("SELECT seq FROM sqlite_sequence WHERE name = 'image'").fetchone()
        top = self.database.execute_sql("SELECT MAX(id) FROM image").fetchone()
        return max(seq[0] if seq else 0, top[0] or 0)

    def raise_id_floor(self, n: int) -> None:
        """Make the next image id handed out greater than `n` (inside a write transaction)."""
        if n <= self.id_high_water():
            return
        db = self.database
        if db.execute_sql("UPDATE sqlite_sequence SET seq = ? WHERE name = 'image'", [n]).rowcount == 0:
            db.execute_sql("INSERT INTO sqlite_sequence (name, seq) VALUES ('image', ?)", [n])

    def size_bytes(self) -> int:
        """Bytes of the database file and its write-ahead log on disk."""
        size = 0
        for name in (self.path, self.path + "-wal"):  # the WAL holds what is not yet checkpointed into the file
            try:
                size += os.stat(name).st_size
            except OSError:
                pass
        return size

    def migrate_v1_to_v2(self, tables: SimpleNamespace) -> None:
        """Rebuild `image` with AUTOINCREMENT (SQLite cannot alter a primary key), keeping every id."""
        db = self.database
        log.info("migrating %s to schema version 2 (image ids never reused)", self.path)

        class ImageV2(tables.Image):
            class Meta:
                table_name = "image_v2"

        # Off for the swap: dropping the old table must not cascade to the detections. Outside the
        # transaction, because SQLite ignores this pragma inside one.
        db.execute_sql("PRAGMA foreign_keys = OFF")
        try:
            with self.write():
                ImageV2.create_table()
                present = {c.name for c in db.get_columns("image")}  # a v1 table has no later columns
                columns = ", ".join(f'"{f.column_name}"' for f in tables.Image._meta.sorted_fields if f.column_name in present)
                db.execute_sql(f"INSERT INTO image_v2 ({columns}) SELECT {columns} FROM image")
                db.execute_sql("DROP TABLE image")
                db.execute_sql("ALTER TABLE image_v2 RENAME TO image")
                db.execute_sql("DROP INDEX IF EXISTS image_v2_sha256")  # create_tables makes image_sha256
                broken = db.execute_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise StoreUnavailable(f"migrating {self.path} would break {len(broken)} references; nothing changed")
                tables.Setting.update(value="2").where(tables.Setting.key == "schema_version").execute()
        finally:
            db.execute_sql("PRAGMA foreign_keys = ON")

    def migrate_v2_to_v3(self, tables: SimpleNamespace) -> None:
        """Add image.filename (older rows null); the thumbnail table comes with create_tables."""
        log.info("migrating %s to schema version 3 (file names, thumbnails)", self.path)
        with self.write():
            if "filename" not in {c.name for c in self.database.get_columns("image")}:  # v1 rebuilt has it
                self.database.execute_sql("ALTER TABLE image ADD COLUMN filename TEXT")
            tables.Setting.update(value="3").where(tables.Setting.key == "schema_version").execute()

    def migrate_v3_to_v4(self, tables: SimpleNamespace) -> None:
        """Add image.model_name. Older rows keep their detected_with, which already says the model's digest
        and the threshold (the API's `model` and `threshold`); the file's name was never recorded: null."""
        log.info("migrating %s to schema version 4 (the model's name beside its digest)", self.path)
        with self.write():
            if "model_name" not in {c.name for c in self.database.get_columns("image")}:  # v1 rebuilt has it
                self.database.execute_sql("ALTER TABLE image ADD COLUMN model_name TEXT")
            tables.Setting.update(value="4").where(tables.Setting.key == "schema_version").execute()


    def migrate_v4_to_v5(self, tables: SimpleNamespace) -> None:
        """Add the counts behind GET /objects and match=all (object_count, object_pair), filled from the
        detections, and the (name, confidence, image) index of min_confidence searches."""
        log.info("migrating %s to schema version 5 (object counts, an index for min_confidence)", self.path)
        db = self.database
        with self.write():
            db.create_tables([tables.ObjectCount, tables.ObjectPair], safe=True)
            db.execute_sql('CREATE INDEX IF NOT EXISTS "detection_name_confidence_image_id" '
                           'ON "detection" ("name", "confidence", "image_id")')
            db.execute_sql("DELETE FROM object_count")
            db.execute_sql("DELETE FROM object_pair")
            db.execute_sql(
                "INSERT INTO object_count (name, images) "
                "SELECT name, COUNT(DISTINCT image_id) FROM detection GROUP BY name"
            )
            db.execute_sql(
                "INSERT INTO object_pair (a, b, images) "
                "SELECT x.name, y.name, COUNT(DISTINCT x.image_id) FROM detection x "
                "JOIN detection y ON y.image_id = x.image_id AND y.name > x.name GROUP BY x.name, y.name"
            )
            tables.Setting.update(value="5").where(tables.Setting.key == "schema_version").execute()


class _PostgresDatabase(PooledPostgresqlDatabase):
    """Peewee's pooled PostgreSQL database, each new connection given the session settings of the backend.

    The pool pings a connection (SELECT 1) before handing it out, to find one the server has cut. Here only
    a connection idle for PING_AFTER seconds is pinged: one handed back a moment ago is as alive as it was
    then, and a round trip to another process was a tenth of the cheapest searches. (A server restarted
    while requests flow fails the requests that meet its cut connections: 503 with Retry-After.)"""

    PING_AFTER = 5.0

    def __init__(self, *args: Any, session: Sequence[str] = (), **kwargs: Any):
        self._session = tuple(session)
        self._returned: dict[int, float] = {}
        super().__init__(*args, **kwargs)

    def _is_closed(self, conn: Any) -> bool:
        if conn.closed:
            return True
        if time.monotonic() - self._returned.get(id(conn), 0.0) < self.PING_AFTER:
            return False
        return super()._is_closed(conn)

    def _close(self, conn: Any, close_conn: bool = False) -> None:
        self._returned[id(conn)] = time.monotonic()
        super()._close(conn, close_conn)

    def _close_raw(self, conn: Any) -> None:
        self._returned.pop(id(conn), None)
        super()._close_raw(conn)

    def _connect(self) -> Any:
        conn = super()._connect()
        with conn.cursor() as cursor:
            for statement in self._session:
                cursor.execute(statement)
        return conn


# SQLSTATEs (PostgreSQL's appendix A) and what they mean here.
_PG_RETRY = {"40001", "40P01"}  # serialization_failure, deadlock_detected: run the transaction again
_PG_FULL = {"53100"}  # disk_full
_PG_BUSY_CLASSES = ("08", "53", "57")  # connection exceptions, insufficient resources, operator intervention
_PG_BUSY = {"55P03", "55006", "57014"}  # lock_not_available (lock_timeout), object_in_use, query_canceled


def _sqlstate(e: BaseException) -> str | None:
    for x in _chain(e):
        code = getattr(x, "sqlstate", None) or getattr(x, "pgcode", None)  # psycopg 3, psycopg2
        if code:
            return code
    return None


class PostgresBackend:
    """A PostgreSQL database: pooled connections, SERIAL ids from a sequence (never reused), row locks.

    Writers run concurrently (READ COMMITTED). What SQLite's single write lock gave for free, row locks
    give here: deleting bytes locks their blob row first and then looks for images holding them (`lock_rows`),
    storing an image upserts its blob so the row is locked until it commits (`blob_upsert`), and the counts
    are changed in name order, so two writers meet on a hot row ("person") in one order and do not deadlock.
    A deadlock or serialization failure that happens anyway is run again (`Store._retried`). Each connection
    waits at most the busy timeout for a row lock (`lock_timeout`): past it, 503 with Retry-After."""

    name = "postgresql"
    DEFAULT_POOL = 16  # per process: two processes at 64 would pass PostgreSQL's default max_connections (100)
    lock_rows = " FOR UPDATE"
    share_rows = " FOR KEY SHARE"
    blob_upsert = "ON CONFLICT (sha256) DO UPDATE SET sha256 = excluded.sha256"  # locks the row it meets
    DRIVERS = ("psycopg", "psycopg2")  # postgresql+<driver>:// picks one (the bench compares them)

    def __init__(self, url: str, *, busy_timeout_ms: int = 10_000, pool_size: int = 0, read_only: bool = False):
        self.description = redact(url)
        self.path = self.description
        scheme, rest = url.split("://", 1)
        driver = scheme.partition("+")[2] or None  # postgresql+psycopg2://: the bench compares the drivers
        if driver is not None and driver not in self.DRIVERS:
            raise StoreUnavailable(f"{scheme}:// names an unknown driver {driver!r}; use postgresql://, postgresql+psycopg:// or postgresql+psycopg2://")
        prefer3 = driver != "psycopg2"
        if not _driver_present(driver):
            raise DriverMissing(
                f"IMAGES_DB names a PostgreSQL database but its driver ({driver or 'psycopg'}) is not installed: "
                "pip install -r requirements-postgres.txt"
            )
        self.database = _PostgresDatabase(
            "postgresql://" + rest,
            max_connections=pool_size or self.DEFAULT_POOL,
            stale_timeout=600,
            timeout=max(1, -(-busy_timeout_ms // 1000)),  # wait this long for a pooled connection, then 503
            prefer_psycopg3=prefer3,
            connect_timeout=max(1, min(10, busy_timeout_ms // 1000)),
            application_name="imgsvc",
            session=(f"SET lock_timeout = {int(busy_timeout_ms)}",) + (("SET default_transaction_read_only = on",) if read_only else ()),
        )

    @staticmethod
    def id_field() -> pw.Field:
        return pw.AutoField()  # SERIAL: a sequence, which never hands out an id twice

    def free_bytes(self) -> int | None:
        return None  # the server's disk is the server's: MIN_FREE_DISK_MB applies to SQLite files only

    def write(self) -> Any:
        return self.database.atomic()

    def snapshot(self) -> Any:
        """A read transaction whose statements see one snapshot (READ COMMITTED gives each statement its own)."""
        return self.database.atomic(isolation_level="REPEATABLE READ")

    def plan_for_values(self) -> None:
        """Plan the rest of this transaction's statements for their own parameters. psycopg 3 prepares a
        statement run 5 times, and PostgreSQL may then keep one plan for any parameters: one made without
        knowing min_confidence=0.99 walks every detection of the name (13.6 ms instead of 5 at 1,000,000
        images). Only there: planning every statement cost the cheapest searches a fifth of their time."""
        self.database.execute_sql("SET LOCAL plan_cache_mode = force_custom_plan")

    def serialize(self, key: str) -> None:
        """Make writers that pass the same `key` take turns until their transactions end."""
        self.database.execute_sql("SELECT pg_advisory_xact_lock(hashtext(%s))", [key])

    def translate(self, e: BaseException) -> StoreError:
        code = _sqlstate(e)
        text = _first_line(e)
        if code in _PG_RETRY:
            return WriteConflict("the database was busy with a conflicting write; try again", retry_after=1)
        if code in _PG_FULL:
            return StoreFull("the disk holding the PostgreSQL database is full; free some space on the database server and try again")
        if isinstance(e, MaxConnectionsExceeded):
            return StoreUnavailable(
                "every database connection of this process is in use (DB_POOL_SIZE); try again in a moment",
                retry_after=BUSY_RETRY_AFTER,
            )
        # No SQLSTATE on an OperationalError: the connection itself failed (refused, timed out, closed under
        # us). Without one on another error, the driver refused a value itself (a NUL in text): not transient.
        lost = code is None and isinstance(e, (pw.OperationalError, pw.InterfaceError))
        if lost or (code is not None and (code in _PG_BUSY or code.startswith(_PG_BUSY_CLASSES))):
            return StoreUnavailable(
                f"the database {self.description} is busy or unreachable ({text}; DB_BUSY_TIMEOUT is the wait); "
                "try again in a moment",
                retry_after=BUSY_RETRY_AFTER,
            )
        return StoreUnavailable(f"the database cannot be used: {text}")

    def _sequence(self) -> str:
        return self.database.execute_sql("SELECT pg_get_serial_sequence('image', 'id')").fetchone()[0]

    def reserve_ids(self, n: int) -> list[int]:
        """`n` fresh image ids from the sequence (not always consecutive when other writers take some too)."""
        if n <= 0:
            return []
        sql = "SELECT nextval(%s) FROM generate_series(1, %s)"
        return [row[0] for row in self.database.execute_sql(sql, [self._sequence(), n]).fetchall()]

    def id_high_water(self) -> int:
        """The highest image id ever handed out, deleted ones included (the sequence's last value)."""
        seq = self._sequence()
        last, called = self.database.execute_sql(f"SELECT last_value, is_called FROM {seq}").fetchone()
        top = self.database.execute_sql("SELECT MAX(id) FROM image").fetchone()[0] or 0
        return max(last if called else last - 1, top)

    def raise_id_floor(self, n: int) -> None:
        """Make the next image id handed out greater than `n`."""
        if n > self.id_high_water():
            self.database.execute_sql("SELECT setval(%s, %s, true)", [self._sequence(), n])

    def size_bytes(self) -> int:
        return self.database.execute_sql("SELECT pg_database_size(current_database())").fetchone()[0]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _driver_present(driver: str | None) -> bool:
    """Whether peewee found the driver named (None: either), as it imports psycopg and psycopg2 when installed."""
    return any(getattr(pw, n, None) is not None for n in ([driver] if driver else ["psycopg", "psycopg2"]))


def is_url(target: str) -> bool:
    """Whether `target` is a database URL (scheme://...) rather than a SQLite file path."""
    return re.match(r"^[a-z][a-z0-9+.-]*://", target, re.I) is not None


def redact(target: str) -> str:
    """`target` with any password replaced by ***, fit for logs, errors and /health."""
    if not is_url(target):
        return target
    parts = urllib.parse.urlsplit(target)
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = urllib.parse.urlencode(
        [(k, "***" if k.lower() == "password" else v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)]
    )
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


class _ReadOnlyPostgres:
    """A PostgreSQL database opened for reading only (every transaction READ ONLY), without migrating."""

    def __init__(self, url: str, busy_timeout_ms: int):
        self._backend = PostgresBackend(url, busy_timeout_ms=busy_timeout_ms, pool_size=1, read_only=True)

    def one(self, sql: str, params: Sequence[Any]) -> Any:
        db = self._backend.database
        try:
            if not db.table_exists("image"):
                return None  # a database the service never used holds nothing
            return db.execute_sql(sql.replace("?", "%s"), params).fetchone()
        except (pw.DatabaseError, MaxConnectionsExceeded) as e:
            raise self._backend.translate(e) from e

    def close(self) -> None:
        self._backend.database.close_all()


class ReadOnlyHoldings:
    """Store.holds() on a database opened read-only, without migrating or writing a row (dry runs).

    A SQLite file that does not exist holds nothing (and is not created). SQLite may create the WAL's side
    files (-wal, -shm) beside it; the database itself is not written. A PostgreSQL database is read in
    READ ONLY transactions."""

    def __init__(self, path: str, *, busy_timeout_ms: int = 10_000):
        self._conn: sqlite3.Connection | None = None
        self._pg = _ReadOnlyPostgres(path, busy_timeout_ms) if is_url(path) else None
        if self._pg is None and os.path.exists(path):
            uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
            self._conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_ms / 1000, check_same_thread=False)

    def holds(self, sha256: str) -> bool:
        if self._pg is not None:
            return self._pg.one("SELECT 1 FROM image WHERE sha256 = ? LIMIT 1", [sha256]) is not None
        if self._conn is None:
            return False
        try:
            return self._conn.execute("SELECT 1 FROM image WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone() is not None
        except sqlite3.Error as e:
            raise StoreUnavailable(f"the database cannot be read: {e}") from e

    def close(self) -> None:
        if self._pg is not None:
            self._pg.close()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def redetect_where(
    which: str, detected_with: str, objects: Sequence[Collection[str]] = (), until: int | None = None
) -> tuple[str, list]:
    """The SQL condition on `image` (and its parameters) of the images to detect again: see
    Store.redetect_ids. Only columns every schema version has, so a dry run can ask any file read-only."""
    conditions = {
        "stale": ("detected_with IS NOT NULL AND detected_with != ?", [detected_with]),
        "undetected": ("detected_with IS NULL", []),
        "all": ("TRUE", []),
    }
    if which not in conditions:
        raise ValueError(f"which must be one of {', '.join(conditions)}")
    where, params = conditions[which]
    if until is not None:
        where, params = f"{where} AND id <= ?", [*params, until]
    names = sorted(set().union(*_name_groups(objects))) if objects else []
    if names:
        where += f" AND id IN (SELECT image_id FROM detection WHERE name IN ({','.join('?' * len(names))}))"
        params = [*params, *names]
    return where, params


def read_only_redetect_count(
    path: str, which: str, detected_with: str, objects: Sequence[Collection[str]] = (), *, busy_timeout_ms: int = 10_000
) -> int:
    """Store.redetect_count on a database opened read-only, without migrating or writing (dry runs).
    A SQLite file that does not exist holds nothing (and is not created)."""
    where, params = redetect_where(which, detected_with, objects)
    if is_url(path):
        pg = _ReadOnlyPostgres(path, busy_timeout_ms)
        try:
            row = pg.one(f"SELECT COUNT(*) FROM image WHERE {where}", params)
        finally:
            pg.close()
        return 0 if row is None else row[0]
    if not os.path.exists(path):
        return 0
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=busy_timeout_ms / 1000)
        try:
            return conn.execute(f"SELECT COUNT(*) FROM image WHERE {where}", params).fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise StoreUnavailable(f"the database cannot be read: {e}") from e


def open_backend(target: str, **options: Any) -> SqliteBackend | PostgresBackend:
    """The backend that serves `target`: postgresql:// (or postgres://) is PostgreSQL, a file path SQLite."""
    if is_url(target):
        scheme = target.split("://", 1)[0].lower()
        if scheme.partition("+")[0] in ("postgresql", "postgres"):
            return PostgresBackend(target, **options)
        raise StoreUnavailable(
            f"IMAGES_DB takes a SQLite file path or a postgresql:// URL; {scheme}:// databases are not supported"
        )
    return SqliteBackend(target, **options)


# ---------------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------------


def _retried(method: Callable[..., Any]) -> Callable[..., Any]:
    """Run a Store write again when it loses a deadlock or a serialization check (WriteConflict: PostgreSQL
    rolled it back, nothing was written), up to WRITE_ATTEMPTS times with a short random pause. Only the
    outermost transaction is run again: a write called inside another lets the conflict through to it."""

    @functools.wraps(method)
    def run(self: "Store", *args: Any, **kwargs: Any) -> Any:
        return _run_again_on_conflict(self._db, lambda: method(self, *args, **kwargs), method.__name__)

    return run


def _run_again_on_conflict(db: pw.Database, write: Callable[[], Any], what: str) -> Any:
    for attempt in range(1, WRITE_ATTEMPTS + 1):
        try:
            return write()
        except WriteConflict:
            if db.in_transaction() or attempt == WRITE_ATTEMPTS:
                raise
            log.info("%s lost a write conflict (attempt %d of %d); running it again", what, attempt, WRITE_ATTEMPTS)
            time.sleep(random.uniform(0.005, 0.02) * attempt)
    raise AssertionError("unreachable")


class Store:
    """The image store. Thread-safe: peewee gives each thread its own connection."""

    def __init__(
        self,
        target: str,
        *,
        now: Callable[[], float] = time.time,
        busy_timeout_ms: int = 10_000,
        backend: Callable[..., SqliteBackend | PostgresBackend] = open_backend,
        min_free_mb: int = 0,
        pool_size: int = 0,
    ):
        self.now = now
        self.min_free_mb = min_free_mb
        self.backend = backend(target, busy_timeout_ms=busy_timeout_ms, pool_size=pool_size)
        self.path = self.backend.description
        self._db = self.backend.database
        self._t = _tables(self._db, self.backend.id_field)
        # Plain SQL below is written with ? placeholders; PostgreSQL's drivers take %s.
        self._marks = str.maketrans({"?": "%s"}) if self._db.param == "%s" else None
        with self._errors(), self.connection():
            self._migrate()

    @property
    def database(self) -> pw.Database:
        """The Peewee database this store owns (for tests and maintenance: PRAGMAs, integrity checks)."""
        return self._db

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (pw.OperationalError, pw.DatabaseError, MaxConnectionsExceeded) as e:
            if isinstance(e, pw.IntegrityError):
                raise
            raise self.backend.translate(e) from e

    def _sql(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run plain SQL written with ? placeholders on this thread's connection; returns the cursor."""
        return self._db.execute_sql(sql if self._marks is None else sql.translate(self._marks), params)

    def _many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """executemany() of plain SQL written with ? placeholders."""
        if rows:
            with pw.__exception_wrapper__:  # the driver's errors as peewee's, as execute_sql gives them
                self._db.cursor().executemany(sql if self._marks is None else sql.translate(self._marks), rows)

    # -- connections -------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Close every pooled connection (at exit, and in tests before the file goes)."""
        self.close()
        self._db.close_all()

    def connect(self) -> None:
        with self._errors():
            self._db.connect(reuse_if_open=True)

    def close(self) -> None:
        if not self._db.is_closed():
            self._db.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[None]:
        """A connection for this thread for the block (worker threads; requests use connect/close)."""
        opened = self._db.is_closed()
        if opened:
            self.connect()
        try:
            yield
        finally:
            if opened:
                self._db.close()

    def _migrate(self) -> None:
        version = self._version()
        if version is not None and version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{self.path} has schema version {version}, newer than this service ({SCHEMA_VERSION}); "
                "upgrade the service or use another IMAGES_DB"
            )
        while version is not None and version < SCHEMA_VERSION:  # SQLite files from earlier versions
            step = getattr(self.backend, f"migrate_v{version}_to_v{version + 1}", None)
            if step is None:
                raise StoreUnavailable(f"{self.path} has schema version {version}, which this service cannot migrate")
            step(self._t)
            version += 1
        Setting = self._t.Setting
        with self.backend.write():
            self.backend.serialize("imgsvc schema")  # processes starting at once on one new database take turns
            self._db.create_tables(self._t.all, safe=True)
            Setting.insert(key="schema_version", value=str(SCHEMA_VERSION)).on_conflict(
                conflict_target=[Setting.key], update={Setting.value: str(SCHEMA_VERSION)}
            ).execute()
            # Bytes staged by a process that stopped before their image was added (a crash, a kill -9). A
            # process still running may have staged some of them: its add() writes them again.
            left = [row.sha256 for row in self._t.StagedBlob.select().limit(10_000)]
            dropped = self._drop_staged(left) if left else 0
            if dropped:
                log.info("deleted the bytes of %d image(s) whose upload did not finish", dropped)

    def _version(self) -> int | None:
        if not self._db.table_exists("setting"):
            return None
        Setting = self._t.Setting
        row = Setting.get_or_none(Setting.key == "schema_version")
        return int(row.value) if row else None

    @property
    def schema_version(self) -> int:
        Setting = self._t.Setting
        return int(Setting.get(Setting.key == "schema_version").value)

    # -- writes ------------------------------------------------------------------------------------------

    def _check_space(self, size: int) -> None:
        """LowDisk unless `size` more bytes of data leave `min_free_mb` free (MIN_FREE_DISK_MB).

        A full disk takes the operating system down with the database (a Pi's SD card holds both), so
        writes stop at a floor while reads and deletes go on. New data is written twice, to the WAL and
        then to the database file, so a write counts twice its size. Called inside the write
        transaction, where writers queue, so each check sees the space the previous write took; one
        statvfs is about a microsecond, nothing beside the fsync of a commit.
        """
        if self.min_free_mb <= 0:
            return
        free = self.backend.free_bytes()
        if free is None:
            return
        left = free - 2 * size
        if left < self.min_free_mb * 1024 * 1024:
            raise LowDisk(
                f"the disk holding the database has {free / 2**20:,.0f} MB free and this write would leave "
                f"{max(left, 0) / 2**20:,.0f} MB, below the {self.min_free_mb:,} MB kept free (MIN_FREE_DISK_MB); "
                "delete images or free space on that disk, or lower MIN_FREE_DISK_MB"
            )

    @_retried
    def add(self, new: NewImage) -> ImageRecord:
        """Store an image (and its bytes, unless those are stored already) in one transaction."""
        t = self._t
        created_ms = int(self.now() * 1000) if new.created_ms is None else new.created_ms
        with self._errors(), self.backend.write():
            staged = t.StagedBlob.delete().where(t.StagedBlob.sha256 == new.sha256).execute()
            self._check_space(0 if staged else len(new.data))
            # Not written when they are stored already (by another image, or staged ahead: only the small rows
            # below are written then); written again when a delete took staged bytes meanwhile. On PostgreSQL
            # the row stays locked until this commits, so a delete of the last image holding them waits.
            self._sql(f"INSERT INTO blob (sha256, data) VALUES (?, ?) {self.backend.blob_upsert}", [new.sha256, new.data])
            image = t.Image.create(
                sha256=new.sha256,
                label=new.label,
                label_generated=new.label_generated,
                detection_enabled=new.detection_enabled,
                detected_with=new.detected_with,
                content_type=new.content_type,
                size=len(new.data),
                width=new.width,
                height=new.height,
                source_url=new.source_url,
                created_ms=created_ms,
                filename=new.filename,
                model_name=new.model_name if new.detected_with is not None else None,
            )
            if new.detections:
                t.Detection.insert_many([self._detection_row(image.id, d) for d in new.detections]).execute()
                self._count_changes((), {d.label.lower() for d in new.detections})
        return ImageRecord(
            image.id, new.sha256, new.label, new.label_generated, new.detection_enabled, new.content_type,
            len(new.data), new.width, new.height, new.source_url, created_ms, tuple(new.detections), new.filename,
            new.detected_with, new.model_name if new.detected_with is not None else None,
        )

    @_retried
    def stage_blob(self, sha256: str, data: bytes) -> bool:
        """Write an image's bytes ahead of the image (Ingest.add writes them while the model runs, so the
        image's own transaction is small), in a transaction of their own. True when this call wrote them
        (then `unstage_blob` takes them back if the image is not added after all); False when they were
        stored already. LowDisk below the disk floor, as add() would be."""
        t = self._t
        with self._errors(), self.backend.write():
            if t.Blob.select().where(t.Blob.sha256 == sha256).exists():
                return False
            self._check_space(len(data))
            if not self._sql("INSERT INTO blob (sha256, data) VALUES (?, ?) ON CONFLICT (sha256) DO NOTHING", [sha256, data]).rowcount:
                return False  # another writer stored them meanwhile (PostgreSQL: writers do not queue)
            t.StagedBlob.insert(sha256=sha256).on_conflict_ignore().execute()
        return True

    @_retried
    def unstage_blob(self, sha256: str) -> None:
        """Take back bytes stage_blob wrote for an image that was not added (its request failed): deleted
        unless an image holds them by now."""
        with self._errors(), self.backend.write():
            self._drop_staged([sha256])

    def _drop_staged(self, shas: Sequence[str]) -> int:
        t = self._t
        staged = [row.sha256 for row in t.StagedBlob.select().where(t.StagedBlob.sha256.in_(list(shas)))]
        if not staged:
            return 0
        t.StagedBlob.delete().where(t.StagedBlob.sha256.in_(staged)).execute()
        return self._drop_unheld(staged)

    def _drop_unheld(self, shas: Collection[str]) -> int:
        """Delete the bytes, and their thumbnails, of those of `shas` no image holds (inside a write
        transaction); returns how many went. Their blob rows are locked first (PostgreSQL), so an add()
        of the same bytes that is under way commits its image before this looks for images holding them,
        or waits and writes the bytes again after."""
        shas = sorted(set(shas))
        if not shas:
            return 0
        marks = ",".join("?" * len(shas))
        if self.backend.lock_rows:
            self._sql(f"SELECT sha256 FROM blob WHERE sha256 IN ({marks}) ORDER BY sha256{self.backend.lock_rows}", shas)
        held = {row[0] for row in self._sql(f"SELECT DISTINCT sha256 FROM image WHERE sha256 IN ({marks})", shas).fetchall()}
        orphans = [sha for sha in shas if sha not in held]
        if orphans:
            marks = ",".join("?" * len(orphans))
            self._sql(f"DELETE FROM blob WHERE sha256 IN ({marks})", orphans)
            self._sql(f"DELETE FROM thumbnail WHERE sha256 IN ({marks})", orphans)
        return len(orphans)

    @_retried
    def add_frame(self, new: NewImage, keep: int) -> ImageRecord:
        """add() an image as a vision frame (VISION_STORE): in the same transaction, vision frames beyond the
        newest `keep` are deleted, with their bytes when no other image uses them. Images added otherwise
        are never deleted here."""
        t = self._t
        with self._errors(), self.backend.write():
            self.backend.serialize("vision frames")  # two processes pruning the same frames would count them twice
            rec = self.add(new)
            t.VisionFrame.insert(image=rec.id).execute()
            old = [
                row.image_id
                for row in t.VisionFrame.select(t.VisionFrame.image).order_by(t.VisionFrame.image.desc()).offset(keep)
            ]
            if old:
                shas = {row.sha256 for row in t.Image.select(t.Image.sha256).where(t.Image.id.in_(old))}
                held = self._names_of(old)
                t.Image.delete().where(t.Image.id.in_(old)).execute()  # detections and frames by ON DELETE CASCADE
                self._count_images(removed=held.values())
                self._drop_unheld(shas)
                log.debug("deleted %d vision frame(s) beyond VISION_STORE_MAX (%d)", len(old), keep)
        return rec

    def vision_frames(self) -> list[int]:
        """Ids of the images stored as vision frames, newest first."""
        t = self._t
        with self._errors():
            return [row.image_id for row in t.VisionFrame.select(t.VisionFrame.image).order_by(t.VisionFrame.image.desc())]

    @staticmethod
    def _detection_row(image_id: int, d: Found) -> dict[str, Any]:
        return {
            "image": image_id, "name": d.label.lower(), "label": d.label, "confidence": d.confidence,
            "x_min": d.x_min, "y_min": d.y_min, "x_max": d.x_max, "y_max": d.y_max,
        }

    def add_many(self, images: Iterable[NewImage], *, batch: int = 10_000) -> int:
        """Store many images fast (bulk loads, benchmarks): `batch` per transaction, ids in order.

        The same tables and rules as `add()` (bytes once by sha256, ids never reused), without building
        a record per image. Returns how many were stored.
        """
        stored, chunk = 0, []

        def flush() -> None:
            _run_again_on_conflict(self._db, write, "add_many")

        def write() -> None:
            with self._errors(), self.backend.write():
                self._check_space(sum(len(n.data) for n in chunk))
                ids = self.backend.reserve_ids(len(chunk))
                blobs = sorted({n.sha256: n.data for n in chunk}.items())
                self._many(f"INSERT INTO blob (sha256, data) VALUES (?, ?) {self.backend.blob_upsert}", blobs)
                # Plain executemany: peewee's per-row query building was most of a fill.
                now_ms = int(self.now() * 1000)
                self._many(
                    "INSERT INTO image (id, sha256, label, label_generated, detection_enabled, detected_with, "
                    f"content_type, size, width, height, source_url, created_ms, filename, model_name) VALUES ({', '.join('?' * 14)})",
                    [
                        (ids[i], n.sha256, n.label, n.label_generated, n.detection_enabled, n.detected_with,
                         n.content_type, len(n.data), n.width, n.height, n.source_url,
                         now_ms if n.created_ms is None else n.created_ms, n.filename,
                         n.model_name if n.detected_with is not None else None)
                        for i, n in enumerate(chunk)
                    ],
                )
                self._many(
                    "INSERT INTO detection (image_id, name, label, confidence, x_min, y_min, x_max, y_max) "
                    f"VALUES ({', '.join('?' * 8)})",
                    [
                        (ids[i], d.label.lower(), d.label, d.confidence, d.x_min, d.y_min, d.x_max, d.y_max)
                        for i, n in enumerate(chunk)
                        for d in n.detections
                    ],
                )
                self._count_images(added=[{d.label.lower() for d in n.detections} for n in chunk])

        with self.connection():
            for new in images:
                chunk.append(new)
                if len(chunk) >= batch:
                    flush()
                    stored += len(chunk)
                    chunk = []
            if chunk:
                flush()
                stored += len(chunk)
        return stored

    @_retried
    def delete(self, image_id: int) -> None:
        """Delete an image; its bytes go too when no other image uses them."""
        with self._errors(), self.backend.write():
            # Locked (PostgreSQL) so that a re-detection or another delete of it waits for this one.
            row = self._sql(f"SELECT sha256 FROM image WHERE id = ?{self.backend.lock_rows}", [image_id]).fetchone()
            if row is None:
                raise NotFound(f"there is no image {image_id}")
            if self.backend.lock_rows:  # its bytes' row before the counts' rows, the order add() takes them in
                self._sql(f"SELECT 1 FROM blob WHERE sha256 = ?{self.backend.lock_rows}", [row[0]])
            held = self._names_of([image_id]).get(image_id, ())
            self._sql("DELETE FROM image WHERE id = ?", [image_id])  # detections go by ON DELETE CASCADE
            self._count_changes(held, ())
            self._drop_unheld([row[0]])

    @_retried
    def replace_detections(
        self, image_id: int, found: Sequence[Found], detected_with: str, model_name: str | None, label: str | None = None
    ) -> ImageRecord:
        """Replace an image's detections with `found` (a new detection run), in one write transaction: the
        old detections go, `detected_with` and `model_name` say what produced the new ones, detection is
        enabled, and `label` (one generated from `found`) replaces the label only while that label is a
        generated one: a user's label is never touched. NotFound when the image is gone (deleted while it
        was being detected): nothing is written."""
        # Plain SQL, as add_many: peewee's query building was a third of it.
        with self._errors(), self.backend.write():
            self._check_space(0)
            # Locked (PostgreSQL): a delete or another re-detection of this image waits for this one.
            if self._sql(f"SELECT 1 FROM image WHERE id = ?{self.backend.lock_rows}", [image_id]).fetchone() is None:
                raise NotFound(f"there is no image {image_id}; it was deleted")
            self._count_changes(self._names_of([image_id]).get(image_id, ()), {d.label.lower() for d in found})
            self._sql("DELETE FROM detection WHERE image_id = ?", [image_id])
            self._many(
                "INSERT INTO detection (image_id, name, label, confidence, x_min, y_min, x_max, y_max) "
                f"VALUES ({', '.join('?' * 8)})",
                [(image_id, d.label.lower(), d.label, d.confidence, d.x_min, d.y_min, d.x_max, d.y_max) for d in found],
            )
            self._sql(
                "UPDATE image SET detected_with = ?, model_name = ?, detection_enabled = TRUE, "
                "label = CASE WHEN label_generated THEN COALESCE(?, label) ELSE label END WHERE id = ?",
                [detected_with, model_name, label, image_id],
            )
            return self._records("WHERE id = ?", [image_id])[0]

    def redetect_ids(
        self, which: str, detected_with: str, *, objects: Sequence[Collection[str]] = (), after: int = 0,
        until: int | None = None, limit: int | None = None,
    ) -> list[int]:
        """Ids of images to detect again, oldest first, past `after` and up to `until`, at most `limit`.

        `which`: "stale" (detections from another model or threshold than `detected_with`), "undetected"
        (never analysed) or "all". `objects`: only images holding a name of any of these groups.
        """
        where, params = redetect_where(which, detected_with, objects, until)
        sql = f"SELECT id FROM image WHERE id > ? AND {where} ORDER BY id"
        args = [after, *params]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._errors():
            return [row[0] for row in self._sql(sql, args).fetchall()]

    def redetect_count(
        self, which: str, detected_with: str, *, objects: Sequence[Collection[str]] = (), until: int | None = None
    ) -> int:
        """How many images redetect_ids would give in all."""
        where, params = redetect_where(which, detected_with, objects, until)
        with self._errors():
            return self._sql(f"SELECT COUNT(*) FROM image WHERE {where}", params).fetchone()[0]

    def last_id(self) -> int:
        """The newest image's id (0 when there is none)."""
        with self._errors():
            return self._sql("SELECT COALESCE(MAX(id), 0) FROM image").fetchone()[0]

    # -- the counts behind GET /objects and match=all -------------------------------------------------------

    def _count_changes(self, old_names: Iterable[str], new_names: Iterable[str]) -> None:
        """Change object_count and object_pair for one image whose names go from `old_names` to `new_names`
        (an add: () to its names; a delete: its names to (); a re-detection: before to after). Call it inside
        the write transaction that changes the detections, so the counts never disagree with them."""
        self._count_images(added=[set(new_names)], removed=[set(old_names)])

    def _count_images(self, added: Iterable[Collection[str]] = (), removed: Iterable[Collection[str]] = ()) -> None:
        """object_count and object_pair for many images at once: `added` and `removed` hold each image's names."""
        sets: Counter[tuple[str, ...]] = Counter()  # images holding the same names, counted once (bulk loads)
        for sign, images in ((1, added), (-1, removed)):
            for held in images:
                sets[tuple(sorted(set(held)))] += sign
        names: Counter[str] = Counter()
        pairs: Counter[tuple[str, str]] = Counter()
        for held, k in sets.items():
            for name in held:
                names[name] += k
            for pair in itertools.combinations(held, 2):
                pairs[pair] += k
        # In name order, so two writers change the rows in one order (row locks, on a database that has them).
        by_name = sorted((n, k) for n, k in names.items() if k)
        by_pair = sorted((a, b, k) for (a, b), k in pairs.items() if k)
        # (An upsert locks the row it changes until the transaction ends, on PostgreSQL.)
        self._many(
            "INSERT INTO object_count (name, images) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET images = object_count.images + excluded.images",
            by_name,
        )
        self._many(
            "INSERT INTO object_pair (a, b, images) VALUES (?, ?, ?) "
            "ON CONFLICT (a, b) DO UPDATE SET images = object_pair.images + excluded.images",
            by_pair,
        )
        # A name no image holds any more has no row, as in a GROUP BY.
        self._many("DELETE FROM object_count WHERE name = ? AND images <= 0", [(n,) for n, k in by_name if k < 0])
        self._many("DELETE FROM object_pair WHERE a = ? AND b = ? AND images <= 0", [(a, b) for a, b, k in by_pair if k < 0])

    def _names_of(self, ids: Sequence[int]) -> dict[int, set[str]]:
        """The names each of these images holds (images without detections are left out)."""
        out: dict[int, set[str]] = {}
        for i in range(0, len(ids), 500):
            part = list(ids[i:i + 500])
            sql = f"SELECT DISTINCT image_id, name FROM detection WHERE image_id IN ({','.join('?' * len(part))})"
            for image_id, name in self._sql(sql, part).fetchall():
                out.setdefault(image_id, set()).add(name)
        return out

    # -- reads -------------------------------------------------------------------------------------------

    def cached_detections(self, sha256: str, detected_with: str) -> tuple[Found, ...] | None:
        """Detections stored for these bytes by the same model and threshold, or None. Both reads in one
        read transaction (one snapshot): a re-detection committed between them would otherwise hand over
        detections kept at another threshold under this one's name."""
        with self._errors(), self.backend.snapshot():
            image = (
                self._t.Image.select(self._t.Image.id)
                .where((self._t.Image.sha256 == sha256) & (self._t.Image.detected_with == detected_with))
                .order_by(self._t.Image.id.desc())
                .first()
            )
            if image is None:
                return None
            return self._detections([image.id]).get(image.id, ())

    def holds(self, sha256: str) -> bool:
        """Whether some image (whoever added it) has these bytes: `python ingest.py import` skips them."""
        with self._errors():
            return self._t.Image.select(self._t.Image.id).where(self._t.Image.sha256 == sha256).exists()

    def get(self, image_id: int) -> ImageRecord:
        with self._errors(), self.backend.snapshot():
            records = self._records("WHERE id = ?", [image_id])
        if not records:
            raise NotFound(f"there is no image {image_id}")
        return records[0]

    def file(self, image_id: int) -> tuple[bytes, str, str]:
        """(bytes, content type, sha256) of an image."""
        with self._errors():
            row = (
                self._t.Image.select(self._t.Image.content_type, self._t.Blob.data, self._t.Blob.sha256)
                .join(self._t.Blob, on=(self._t.Image.sha256 == self._t.Blob.sha256))
                .where(self._t.Image.id == image_id)
                .tuples()
                .first()
            )
        if row is None:
            raise NotFound(f"there is no image {image_id}")
        content_type, data, sha256 = row
        return bytes(data), content_type, sha256

    def list(
        self,
        *,
        limit: int = 100,
        before: int | None = None,
        objects: Sequence[str | Collection[str]] = (),
        match_all: bool = False,
        min_confidence: float | None = None,
    ) -> tuple[list[ImageRecord], bool]:
        """Images newest first, at most `limit`, and whether more remain.

        With `objects`, only images holding any (or, with `match_all`, every) of those names, at or above
        `min_confidence` when given. An entry may be a group of names instead of one (a search term and
        what it stands for, such as "animal"): a group is held when any of its names is.
        """
        groups = _name_groups(objects)
        names = sorted(set().union(*groups)) if groups else []
        if names:
            with self._errors():
                # The counts steer the walk (which names any image holds, which never meet), read before the
                # snapshot: a search nothing can match ends here, without a transaction (on PostgreSQL, two
                # round trips fewer). Counts a moment older than the walk's snapshot cost a search nothing an
                # earlier arrival would not have.
                walk = self._walk(groups, match_all, min_confidence, before, limit + 1)
                if walk is None:
                    return [], False
                with self.backend.snapshot():
                    if min_confidence is not None:
                        self.backend.plan_for_values()
                    ids = [row[0] for row in self._sql(*walk).fetchall()]
                    more = len(ids) > limit
                    ids = ids[:limit]
                    records = self._records(f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id DESC", ids) if ids else []
                return records, more
        with self._errors(), self.backend.snapshot():
            if before is None:
                records = self._records("ORDER BY id DESC LIMIT ?", [limit + 1])
            else:
                records = self._records("WHERE id < ? ORDER BY id DESC LIMIT ?", [before, limit + 1])
            more = len(records) > limit
            return records[:limit], more

    def _walk(
        self, groups: list[tuple[str, ...]], match_all: bool, min_confidence: float | None, before: int | None, limit: int
    ) -> tuple[str, list] | None:
        """The query (SQL, parameters) of the ids of images holding a name of any/every group, newest first,
        at most `limit`; None when the counts say no image can match.

        The cost depends on the page size, not on how many images hold a name. object_count says which
        names any image holds and which is rarest, object_pair which never occur together; each name left
        is one walk down the (name, image) index from `before`, stopping after `limit` images. With
        `min_confidence`, the detections of a name at or above it are counted up to a cap of
        sqrt(limit x images holding the name): below the cap they are read through the (name, confidence)
        index, all of them, and sorted; at the cap the walk by id finds a page in about as many steps when
        they are spread over time. None at all ends that name at once.
        """
        counts = self._held({n for g in groups for n in g})
        few: set[str] = set()  # names read by confidence
        if min_confidence is not None:
            for name in sorted(counts):
                cap = max(limit, math.isqrt(limit * counts[name]))
                at = self._count_at(name, min_confidence, cap)
                if at < cap:
                    few.add(name)
                if not at:
                    del counts[name]
        if match_all:
            # Every group must be held, and by one image: a pair of groups no image holds together ends the
            # search at once. Then walk the rarest group; each candidate must hold a name of every other
            # group (an index lookup each).
            if not all(any(n in counts for n in g) for g in groups) or (len(groups) > 1 and self._apart(groups, counts)):
                return None
            groups = sorted(groups, key=lambda g: sum(counts.get(n, 0) for n in g))
            walked, others = [n for n in groups[0] if n in counts], groups[1:]
        else:
            walked, others = sorted(n for n in set().union(*groups) if n in counts), []

        also, also_args = "", []
        for group in others:
            cond = "o.name = ?" if len(group) == 1 else f"o.name IN ({','.join('?' * len(group))})"
            also_args += group
            if min_confidence is not None:
                cond += " AND o.confidence >= ?"
                also_args.append(min_confidence)
            also += f" AND EXISTS (SELECT 1 FROM detection o WHERE o.image_id = d.image_id AND {cond})"
        below, below_args = ("", []) if before is None else (" AND d.image_id < ?", [before])
        walks, params = [], []
        # A unary + keeps SQLite's planner off an index: off (name, confidence) for a walk by id, and off
        # (name, image) for the few at min_confidence, which it would otherwise walk to satisfy the order.
        # PostgreSQL's planner weighs the indexes by their statistics (and its DISTINCT wants the plain column).
        plus = "+" if self.backend.name == "sqlite" else ""
        for k, name in enumerate(walked):
            order = "d.image_id"
            if min_confidence is None:
                cond, cond_args = "d.name = ?", [name]
            elif name in few:  # all of them by confidence, then sorted by id
                cond, cond_args, order = "d.name = ? AND d.confidence >= ?", [name, min_confidence], f"{plus}d.image_id"
            else:  # many: walk by id
                cond, cond_args = f"d.name = ? AND {plus}d.confidence >= ?", [name, min_confidence]
            walks.append(
                f"SELECT * FROM (SELECT DISTINCT d.image_id FROM detection d WHERE {cond}{below}{also} "
                f"ORDER BY {order} DESC LIMIT ?) AS w{k}"
            )
            params += cond_args + below_args + also_args + [limit]
        if not walks:
            return None
        sql = f"SELECT image_id FROM ({' UNION '.join(walks)}) AS u ORDER BY image_id DESC LIMIT ?"
        params.append(limit)
        return sql, params

    def _held(self, names: Collection[str]) -> dict[str, int]:
        """How many images hold each of `names` (object_count); names no image holds are left out."""
        if not names:
            return {}
        names = sorted(names)
        sql = f"SELECT name, images FROM object_count WHERE name IN ({','.join('?' * len(names))})"
        return dict(self._sql(sql, names).fetchall())

    def _count_at(self, name: str, min_confidence: float, cap: int) -> int:
        """Detections of `name` at or above `min_confidence`, counted up to `cap` (an index range of at most
        `cap` rows; `before` is left out, which would make it a filter over the whole range)."""
        sql = "SELECT COUNT(*) FROM (SELECT 1 FROM detection WHERE name = ? AND confidence >= ? LIMIT ?) AS c"
        return self._sql(sql, [name, min_confidence, cap]).fetchone()[0]

    def _apart(self, groups: list[tuple[str, ...]], counts: dict[str, int]) -> bool:
        """Whether two of `groups` are never held by one image (object_pair), only names in `counts` counted."""
        held = sorted({n for g in groups for n in g if n in counts})
        marks = ",".join("?" * len(held))
        together = {
            (a, b) for a, b in self._sql(
                f"SELECT a, b FROM object_pair WHERE a IN ({marks}) AND b IN ({marks})", held + held
            ).fetchall()
        }
        for g, h in itertools.combinations(groups, 2):
            g, h = [n for n in g if n in counts], [n for n in h if n in counts]
            if set(g) & set(h):
                continue  # one name stands for both groups
            if not any((min(a, b), max(a, b)) in together for a in g for b in h):
                return True
        return False

    # Hot reads use plain SQL and tuples: peewee's per-value conversion was most of a 100-image page.
    _IMAGE_COLUMNS = (
        "id, sha256, label, label_generated, detection_enabled, content_type, size, width, height, source_url, created_ms, filename, "
        "detected_with, model_name"
    )

    def _detections(self, ids: list[int]) -> dict[int, tuple[Found, ...]]:
        out: dict[int, list[Found]] = {}
        if not ids:
            return {}
        sql = (
            "SELECT image_id, label, confidence, x_min, y_min, x_max, y_max FROM detection "
            f"WHERE image_id IN ({','.join('?' * len(ids))}) ORDER BY image_id, confidence DESC, id"
        )
        for image_id, *rest in self._sql(sql, ids).fetchall():
            out.setdefault(image_id, []).append(Found(*rest))
        return {k: tuple(v) for k, v in out.items()}

    def _records(self, where: str, params: list) -> list[ImageRecord]:
        rows = self._sql(f"SELECT {self._IMAGE_COLUMNS} FROM image {where}", params).fetchall()
        found = self._detections([r[0] for r in rows])
        return [
            ImageRecord(i, sha, label, bool(gen), bool(det), ct, size, w, h, url, ms, found.get(i, ()), name, dw, model)
            for i, sha, label, gen, det, ct, size, w, h, url, ms, name, dw, model in rows
        ]

    def objects(self) -> list[tuple[str, int]]:
        """Every name found so far with the number of images holding it, most common first."""
        with self._errors():
            # The counts kept beside the detections (object_count): one row per name, whatever the images.
            rows = self._sql("SELECT name, images FROM object_count ORDER BY images DESC, name").fetchall()
        return [(name, n) for name, n in rows]

    def count(self) -> tuple[int, int]:
        """(images, distinct byte blobs): for tests and health."""
        with self._errors():
            return self._t.Image.select().count(), self._t.Blob.select().count()

    # -- thumbnails --------------------------------------------------------------------------------------

    def thumbnail_source(self, image_id: int) -> tuple[str, int, int]:
        """(sha256, width, height) of an image: what a thumbnail of it is keyed by and sized from."""
        with self._errors():
            row = self._sql("SELECT sha256, width, height FROM image WHERE id = ?", [image_id]).fetchone()
        if row is None:
            raise NotFound(f"there is no image {image_id}")
        return row[0], row[1], row[2]

    def thumbnail(self, sha256: str, size: int, fmt: str) -> Thumbnail | None:
        """The kept thumbnail of these bytes at this size and format, or None when none was made yet."""
        with self._errors():
            row = self._sql(
                "SELECT data, width, height FROM thumbnail WHERE sha256 = ? AND size = ? AND format = ?", [sha256, size, fmt]
            ).fetchone()
        return None if row is None else Thumbnail(bytes(row[0]), row[1], row[2])

    def has_thumbnail(self, sha256: str, size: int, fmt: str) -> bool:
        """Whether that thumbnail is kept (without reading its bytes)."""
        with self._errors():
            return self._sql(
                "SELECT 1 FROM thumbnail WHERE sha256 = ? AND size = ? AND format = ?", [sha256, size, fmt]
            ).fetchone() is not None

    @_retried
    def keep_thumbnail(self, sha256: str, size: int, fmt: str, thumb: Thumbnail) -> bool:
        """Keep a thumbnail; False when its bytes are gone meanwhile (nothing kept). Two processes making
        the same one at once both succeed: the second insert is ignored. LowDisk below the disk floor."""
        t = self._t
        with self._errors(), self.backend.write():
            self._check_space(len(thumb.data))
            # Deleted while it was made? (Locked, on PostgreSQL, so a delete of the bytes waits for this.)
            if self._sql(f"SELECT 1 FROM blob WHERE sha256 = ?{self.backend.share_rows}", [sha256]).fetchone() is None:
                return False
            t.Thumbnail.insert(
                sha256=sha256, size=size, format=fmt, data=thumb.data, width=thumb.width, height=thumb.height,
                created_ms=int(self.now() * 1000),
            ).on_conflict_ignore().execute()
        return True

    @_retried
    def purge_thumbnails(self) -> int:
        """Delete every kept thumbnail (they are made again on request); returns how many went."""
        with self._errors(), self.backend.write():
            return self._t.Thumbnail.delete().execute()

    def thumbnail_count(self) -> tuple[int, int]:
        """(kept thumbnails, their bytes): for tests, health and the command line."""
        with self._errors():
            n, size = self._sql("SELECT COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM thumbnail").fetchone()
        return n, size


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


def _threshold_of(detected_with: str) -> float | None:
    """The threshold of a detected_with ("<digest>@0.5" -> 0.5); None when it holds none."""
    try:
        return float(detected_with.partition("@")[2])
    except ValueError:
        return None


def _name_groups(objects: Sequence[str | Collection[str]]) -> list[tuple[str, ...]]:
    """`objects` of Store.list as groups of names (a lone name is a group of one), trimmed, lower-cased,
    without empty names, empty groups or repeated groups."""
    groups = []
    for entry in objects:
        names = tuple(sorted({n.strip().lower() for n in ([entry] if isinstance(entry, str) else entry) if n.strip()}))
        if names and names not in groups:
            groups.append(names)
    return groups


# -- python store.py copy: a whole library from one database to another ------------------------------------
#
# Resumable by construction: images go in id order, a batch (with the bytes its images need first, their
# detections and vision frames) in one target transaction, so after an interruption the target's highest
# image id says where to go on. Bytes and thumbnails are inserted with ON CONFLICT DO NOTHING (a batch
# written twice changes nothing). Memory is bounded by the batches: at most `batch_rows` image rows, and
# bytes read `batch_mb` at a time (plus one image, if a single one is larger).

_COPY_FROM = "copy_from"  # setting written in the target before any data: the copy under way, from where
_COPIED_FROM = "copied_from"  # written instead when the copy verified
_NOT_COPIED = ("schema_version", _COPY_FROM, _COPIED_FROM)  # setting keys a copy leaves to the target


class _CopyFailed(StoreError):
    """A copy that cannot start (a target holding another library) or did not verify."""


def _place(target: str) -> str:
    """Where a library is, safe to print and the same however it is spelt: the absolute path of a SQLite file,
    a URL without its password."""
    return redact(target) if is_url(target) else os.path.abspath(target)


class _Rows:
    """Plain SQL over one table class's columns (peewee's per-row query building would be most of a copy),
    with each value made what the other database takes: booleans as bool, bytes as bytes (PostgreSQL's
    driver may hand out memoryview)."""

    def __init__(self, model: Any, skip: Collection[str] = ()):
        fields = [f for f in model._meta.sorted_fields if f.column_name not in skip]
        self.table = model._meta.table_name
        self.columns = [f.column_name for f in fields]
        self.names = ", ".join(f'"{c}"' for c in self.columns)
        kinds = [bool if isinstance(f, pw.BooleanField) else bytes if isinstance(f, pw.BlobField) else None for f in fields]
        self._convert = [(i, k) for i, k in enumerate(kinds) if k is not None]

    def select(self, db: pw.Database, where: str = "", params: Sequence[Any] = (), order: str = "") -> list[list]:
        sql = f'SELECT {self.names} FROM "{self.table}" {where} {order}'
        rows = [list(r) for r in db.execute_sql(sql.replace("?", db.param), list(params)).fetchall()]
        for row in rows:
            for i, kind in self._convert:
                if row[i] is not None:
                    row[i] = kind(row[i])
        return rows

    def insert(self, db: pw.Database, rows: Sequence[Sequence[Any]], *, ignore: bool = False) -> None:
        if rows:
            marks = ", ".join([db.param] * len(self.columns))
            also = " ON CONFLICT DO NOTHING" if ignore else ""
            with pw.__exception_wrapper__:  # a raw cursor: the driver's errors as peewee's
                db.cursor().executemany(f'INSERT INTO "{self.table}" ({self.names}) VALUES ({marks}){also}', rows)


def _put_setting(t: SimpleNamespace, key: str, value: str) -> None:
    t.Setting.insert(key=key, value=value).on_conflict(conflict_target=[t.Setting.key], update={t.Setting.value: value}).execute()


def _one(db: pw.Database, sql: str, params: Sequence[Any] = ()) -> Any:
    return db.execute_sql(sql.replace("?", db.param), list(params)).fetchone()[0]


# What a copy compares at the end: each table's rows as the source's library holds them (bytes and
# thumbnails held by an image: what staged_blob marks of an unfinished upload is left behind).
_HELD = "EXISTS (SELECT 1 FROM image i WHERE i.sha256 = {t}.sha256)"
_TABLE_COUNTS = {
    "image": "SELECT COUNT(*) FROM image",
    "blob": f"SELECT COUNT(*) FROM blob WHERE {_HELD.format(t='blob')}",
    "detection": "SELECT COUNT(*) FROM detection",
    "thumbnail": f"SELECT COUNT(*) FROM thumbnail WHERE {_HELD.format(t='thumbnail')}",
    "vision_frame": "SELECT COUNT(*) FROM vision_frame",
    "object_count": "SELECT COUNT(*) FROM object_count",
    "object_pair": "SELECT COUNT(*) FROM object_pair",
}
# The counts tables as kept, and as a GROUP BY over the target's own detections gives them: the rows in one
# and not the other, each way round, must be none.
_KEPT_AND_RECOUNTED = (
    ("object_count", "SELECT name, images FROM object_count",
     "SELECT name, COUNT(DISTINCT image_id) FROM detection GROUP BY name"),
    ("object_pair", "SELECT a, b, images FROM object_pair",
     "SELECT x.name, y.name, COUNT(DISTINCT x.image_id) FROM detection x "
     "JOIN detection y ON y.image_id = x.image_id AND y.name > x.name GROUP BY x.name, y.name"),
)


@dataclass
class CopyReport:
    """What copy_library did: rows written by this run, and what the verification compared."""

    images: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    detections: int = 0
    frames: int = 0
    thumbnails: int = 0
    already: int = 0  # images an earlier, interrupted run had copied
    counts: dict[str, int] = field(default_factory=dict)  # each table's rows, equal in both
    checked: int = 0  # blobs whose sha256 was recomputed from the target's bytes
    high_water: int = 0  # the next image id in the target is above this


def _identity(images: Store) -> tuple:
    """What tells two databases apart however their targets are spelt (a URL's host as a name or an address,
    its port left out or given): the file itself, or the server (its start time) and the database's name."""
    if images.backend.name == "sqlite":
        return ("sqlite", os.path.realpath(images.backend.path))
    row = images.database.execute_sql("SELECT current_database(), CAST(pg_postmaster_start_time() AS TEXT)").fetchone()
    return ("postgresql", *row)


def _check_copy_target(target: Store, source_place: str) -> bool:
    """Whether `target` can take a copy of the library at `source_place`: True when an earlier copy from there
    was started (it goes on), False when it is empty. _CopyFailed when it holds anything else."""
    db, t = target.database, target._t
    with target._errors():
        setting = {row.key: row.value for row in t.Setting.select().where(t.Setting.key.in_([_COPY_FROM, _COPIED_FROM]))}
        started = setting.get(_COPY_FROM)
        if started == source_place:
            return True
        if started is not None:
            raise _CopyFailed(f"{target.path} holds an unfinished copy of another library ({started}); "
                              "give that library as the source to finish it, or copy into an empty database")
        if _COPIED_FROM in setting:
            raise _CopyFailed(f"{target.path} already holds a verified copy ({setting[_COPIED_FROM]}); "
                              "copy into an empty database")
        images, blobs = _one(db, "SELECT COUNT(*) FROM image"), _one(db, "SELECT COUNT(*) FROM blob")
        if images or blobs:
            raise _CopyFailed(f"{target.path} is not empty ({images} image(s), {blobs} blob(s)) and no copy was "
                              "started there; copy into an empty database")
    return False


def copy_library(
    source: Store,
    target: Store,
    *,
    progress: Callable[..., Any] | None = None,
    batch_rows: int = 1000,
    batch_mb: float = 8,
    after_batch: Callable[[int], None] | None = None,
) -> CopyReport:
    """Copy every image (same ids), its bytes, detections and vision frame, the thumbnails, the counts and the
    settings from `source` to `target`, raise the target's id floor to the source's high-water mark (an id
    deleted in the source never comes back), verify (verify_copy) and mark the target copied.

    Goes on where an interrupted copy from the same source stopped; _CopyFailed when `target` holds
    anything else, or when the verification fails (nothing is marked copied then). `progress(total, what,
    unit=...)` makes a progress display for each step (_Bar; ingest.Progress fits too); `after_batch(images
    so far)` is called after each committed batch of images (tests interrupt the copy there).
    """
    place = _place(source.path)
    progress = progress or _Quiet
    report = CopyReport()
    sdb, tdb, st, tt = source.database, target.database, source._t, target._t
    with source.connection(), target.connection():
        with source._errors(), target._errors():
            if _identity(source) == _identity(target):
                raise _CopyFailed(f"{place} and {target.path} are the same database; give another TARGET")
        resuming = _check_copy_target(target, place)
        with target._errors(), target.backend.write():
            _put_setting(tt, _COPY_FROM, place)
        with source._errors(), target._errors():
            last = _one(tdb, "SELECT COALESCE(MAX(id), 0) FROM image")
            report.already = _one(tdb, "SELECT COUNT(*) FROM image") if resuming else 0
            total = _one(sdb, "SELECT COUNT(*) FROM image WHERE id > ?", [last])
            with progress(total, "copy images", unit="image") as bar:
                if report.already:
                    bar.write(f"going on after image {last}: {report.already} image(s) were copied before")
                _copy_images(source, target, last, report, bar, batch_rows, int(batch_mb * 2**20), after_batch)
            _copy_thumbnails(source, target, report, progress, int(batch_mb * 2**20))
            with target.backend.write():
                marks = ", ".join("?" * len(_NOT_COPIED))
                for key, value in _Rows(st.Setting).select(sdb, f"WHERE key NOT IN ({marks})", _NOT_COPIED):
                    _put_setting(tt, key, value)
                # The counts as the source kept them (the verification recounts them from the detections).
                for model, key in ((st.ObjectCount, "name"), (st.ObjectPair, "a, b")):
                    table = _Rows(model)
                    tdb.execute_sql(f'DELETE FROM "{table.table}"')
                    _copy_pages(sdb, tdb, table, key, 5000)
                report.high_water = source.backend.id_high_water()
                target.backend.raise_id_floor(report.high_water)
        problems = verify_copy(source, target, report, progress=progress, batch_mb=batch_mb)
        if problems:
            raise _CopyFailed(
                f"the copy in {target.path} does not match {place}: " + "; ".join(problems)
                + " (it is not marked done; did the service write meanwhile? stop it and copy into an empty database)"
            )
        with target._errors(), target.backend.write():
            tt.Setting.delete().where(tt.Setting.key == _COPY_FROM).execute()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(target.now()))
            _put_setting(tt, _COPIED_FROM, f"{place} at {stamp}")
    return report


def _copy_images(
    source: Store, target: Store, last: int, report: CopyReport, bar: Any, batch_rows: int, batch_bytes: int,
    after_batch: Callable[[int], None] | None,
) -> None:
    sdb, tdb, st = source.database, target.database, source._t
    images, detections, frames = _Rows(st.Image), _Rows(st.Detection, skip=("id",)), _Rows(st.VisionFrame)
    size_at, sha_at = images.columns.index("size"), images.columns.index("sha256")
    blobs = _Rows(st.Blob)
    queue: list[list] = []
    while True:
        if not queue:
            queue = images.select(sdb, "WHERE id > ?", [last], f"ORDER BY id LIMIT {int(batch_rows)}")
            if not queue:
                return
        # A batch: images up to batch_bytes of bytes (at least one), then the bytes the target lacks.
        take, size = 0, 0
        while take < len(queue) and (take == 0 or size + queue[take][size_at] <= batch_bytes):
            size += queue[take][size_at]
            take += 1
        batch, queue = queue[:take], queue[take:]
        lo, hi = last, batch[-1][0]
        shas = sorted({row[sha_at] for row in batch})
        marks = ", ".join("?" * len(shas))
        have = {r[0] for r in tdb.execute_sql(f"SELECT sha256 FROM blob WHERE sha256 IN ({marks})".replace("?", tdb.param), shas)}
        need = [s for s in shas if s not in have]
        with target.backend.write():
            if need:
                got = blobs.select(sdb, f"WHERE sha256 IN ({', '.join('?' * len(need))})", need)
                blobs.insert(tdb, got, ignore=True)
                report.blobs += len(got)
                report.blob_bytes += sum(len(r[1]) for r in got)
                del got
            images.insert(tdb, batch)
            found = detections.select(sdb, "WHERE image_id > ? AND image_id <= ?", [lo, hi], "ORDER BY image_id, id")
            detections.insert(tdb, found)
            held = frames.select(sdb, "WHERE image_id > ? AND image_id <= ?", [lo, hi])
            frames.insert(tdb, held)
        last = hi
        report.images += len(batch)
        report.detections += len(found)
        report.frames += len(held)
        for _ in batch:
            bar.update("added")
        if after_batch is not None:
            after_batch(report.already + report.images)


def _copy_thumbnails(source: Store, target: Store, report: CopyReport, progress: Any, batch_bytes: int) -> None:
    sdb, tdb, thumbs = source.database, target.database, _Rows(source._t.Thumbnail)
    held = _HELD.format(t="thumbnail")
    top = tdb.execute_sql("SELECT sha256, size, format FROM thumbnail ORDER BY sha256 DESC, size DESC, format DESC LIMIT 1").fetchone()
    after = list(top) if top else ["", -1, ""]
    total = _one(sdb, f"SELECT COUNT(*) FROM thumbnail WHERE (sha256, size, format) > (?, ?, ?) AND {held}", after)
    with progress(total, "copy thumbnails", unit="thumbnail") as bar:
        for group in _byte_groups(sdb, "thumbnail", "sha256, size, format", held, after, batch_bytes):
            lo, hi = group[0], group[-1]
            rows = thumbs.select(
                sdb, f"WHERE (sha256, size, format) >= (?, ?, ?) AND (sha256, size, format) <= (?, ?, ?) AND {held}",
                [*lo, *hi], "ORDER BY sha256, size, format",
            )
            with target.backend.write():
                thumbs.insert(tdb, rows, ignore=True)
            report.thumbnails += len(rows)
            for _ in rows:
                bar.update("added")


def _byte_groups(db: pw.Database, table: str, key: str, where: str, after: list, batch_bytes: int,
                 page: int = 1000) -> Iterator[list[tuple]]:
    """Keys of `table` past `after`, in key order, in groups whose data add up to at most `batch_bytes`
    (a group of one when a single row is larger): reads keys and lengths, never the bytes."""
    n = len(after)
    cols = key.split(", ")
    group: list[tuple] = []
    size = 0
    while True:
        marks = ", ".join("?" * n)
        sql = f"SELECT {key}, LENGTH(data) FROM {table} WHERE ({key}) > ({marks}) AND {where} ORDER BY {key} LIMIT {page}"
        rows = db.execute_sql(sql.replace("?", db.param), after).fetchall()
        if not rows:
            break
        for row in rows:
            k, length = tuple(row[: len(cols)]), row[len(cols)]
            if group and size + length > batch_bytes:
                yield group
                group, size = [], 0
            group.append(k)
            size += length
        after = list(rows[-1][: len(cols)])
    if group:
        yield group


def _copy_pages(sdb: pw.Database, tdb: pw.Database, rows: _Rows, key: str, page: int) -> None:
    """Every row of a small table (the counts), `page` rows at a time, in key order."""
    offset = 0
    while True:
        got = rows.select(sdb, "", (), f"ORDER BY {key} LIMIT {page} OFFSET {offset}")
        rows.insert(tdb, got)
        if len(got) < page:
            return
        offset += page


def verify_copy(
    source: Store, target: Store, report: CopyReport | None = None, *, progress: Callable[..., Any] | None = None,
    batch_mb: float = 8,
) -> list[str]:
    """What differs between the library in `source` and its copy in `target` (an empty list: nothing).

    Compared: the rows of every table (bytes and thumbnails held by an image), the newest image id, the id
    high-water mark (the target's next id is above the source's), the counts against a recount from the
    target's own detections, and every blob's sha256 recomputed from the target's bytes, read `batch_mb` at
    a time."""
    import hashlib

    report = report or CopyReport()
    progress = progress or _Quiet
    sdb, tdb = source.database, target.database
    problems = []
    with source.connection(), target.connection(), source._errors(), target._errors():
        for table, sql in _TABLE_COUNTS.items():
            a, b = _one(sdb, sql), _one(tdb, sql)
            report.counts[table] = b
            if a != b:
                problems.append(f"{table}: {a} row(s) in the source, {b} in the copy")
        a, b = _one(sdb, "SELECT COALESCE(MAX(id), 0) FROM image"), _one(tdb, "SELECT COALESCE(MAX(id), 0) FROM image")
        if a != b:
            problems.append(f"the newest image is {a} in the source, {b} in the copy")
        a, b = source.backend.id_high_water(), target.backend.id_high_water()
        report.high_water = a
        if b < a:
            problems.append(f"the copy would hand out image id {b + 1}, which the source gave already (up to {a})")
        for what, kept, recount in _KEPT_AND_RECOUNTED:
            n = sum(_one(tdb, f"SELECT COUNT(*) FROM ({x} EXCEPT {y}) AS d") for x, y in ((kept, recount), (recount, kept)))
            if n:
                problems.append(f"{what}: {n} row(s) disagree with a recount from the copy's detections")
        bad, report.checked = [], 0
        blobs = _Rows(target._t.Blob)
        total = _one(tdb, "SELECT COUNT(*) FROM blob")
        with progress(total, "verify bytes", unit="blob") as bar:
            for group in _byte_groups(tdb, "blob", "sha256", "1 = 1", [""], int(batch_mb * 2**20)):
                for sha, data in blobs.select(tdb, "WHERE sha256 >= ? AND sha256 <= ?", [group[0][0], group[-1][0]]):
                    report.checked += 1
                    if hashlib.sha256(data).hexdigest() != sha.strip():
                        bad.append(sha.strip())
                    bar.update("failed" if bad and bad[-1] == sha.strip() else "added")
        if bad:
            problems.append(f"{len(bad)} blob(s) whose bytes do not match their sha256: {', '.join(bad[:5])}"
                            + (" ..." if len(bad) > 5 else ""))
    return problems


class _Quiet:
    """No progress display (copy_library and verify_copy called from code)."""

    def __init__(self, total: int | None, what: str, **_: Any):
        pass

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass

    def update(self, outcome: str, reason: str | None = None) -> None:
        pass

    def write(self, text: str) -> None:
        pass


class _Bar:
    """Progress of one step of the copy on `stream` (stderr): a tqdm bar on a terminal, elsewhere a plain line
    every `every` seconds and at the end. The subset of ingest.Progress a copy uses, with its interface:
    store.py imports no module of ours (tests/test_layout.py), so it cannot use that one."""

    def __init__(self, total: int | None, what: str, *, unit: str = "row", stream: Any = None, tty: bool | None = None,
                 every: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.total, self.what, self.unit, self.every, self.clock = total, what, unit, every, clock
        self.stream = stream if stream is not None else sys.stderr
        self.tty = tty if tty is not None else bool(getattr(self.stream, "isatty", lambda: False)())
        self.done, self.failed, self._bar = 0, 0, None

    def __enter__(self) -> _Bar:
        self.started = self._last = self.clock()
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=self.what, unit=f" {self.unit}s", file=self.stream,
                             dynamic_ncols=True, mininterval=0.25, smoothing=0.1)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.close()
        elif not self.total or self.done < self.total:
            self._status()  # the last line says where it ended (interrupted, or nothing to do)

    def update(self, outcome: str, reason: str | None = None) -> None:
        self.done += 1
        self.failed += outcome == "failed"
        if self._bar is not None:
            self._bar.update(1)
        elif self.clock() - self._last >= self.every or self.done == self.total:
            self._status()

    def write(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self._line(text)

    def _status(self) -> None:
        self._last = now = self.clock()
        rate = self.done / (now - self.started) if now > self.started else 0.0
        share = f"/{self.total} {self.unit}s ({100 * self.done / self.total:.0f}%)" if self.total else f" {self.unit}s"
        failed = f", {self.failed} failed" if self.failed else ""
        self._line(f"{self.what}: {self.done}{share}{failed}; {rate:.1f} {self.unit}s/s")

    def _line(self, text: str) -> None:
        self.stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        self.stream.flush()


def _same_library(a: str, b: str) -> bool:
    if is_url(a) or is_url(b):
        return _place(a) == _place(b)
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _run_copy(args: Any, parser: Any) -> int:
    if _same_library(args.source, args.target):
        parser.error(f"SOURCE and TARGET are the same database ({_place(args.source)}); give another TARGET")
    if not is_url(args.source) and not os.path.isfile(args.source):
        parser.error(f"{args.source} does not exist; give the library to copy (a SQLite file or a postgresql:// URL)")
    if args.batch_mb <= 0:
        parser.error("--batch-mb must be above 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    source = target = None

    def bar(total: int | None, what: str, **kw: Any) -> _Bar:
        return _Bar(total, what, every=args.log_every, **kw)

    try:
        source = Store(args.source)  # migrates an older SQLite file first, as the server would
        target = Store(args.target)  # created where it is missing, with the current schema
        report = copy_library(source, target, progress=bar, batch_mb=args.batch_mb)
    except KeyboardInterrupt:
        print("store.py copy: interrupted; run the same command again to go on where it stopped", file=sys.stderr)
        return 1
    except (StoreError, pw.DatabaseError) as e:
        print(f"store.py copy: {e}", file=sys.stderr)
        return 1
    finally:
        for s in (source, target):
            if s is not None:
                s.shutdown()
    before = f" ({report.already:,} copied before)" if report.already else ""
    print(
        f"copied {report.images:,} image(s){before}, {report.blobs:,} blob(s) ({report.blob_bytes / 2**20:,.1f} MB), "
        f"{report.detections:,} detection(s), {report.frames:,} vision frame(s) and {report.thumbnails:,} thumbnail(s) "
        f"from {_place(args.source)} to {_place(args.target)} in {time.monotonic() - started:.1f} s; verified: "
        f"{len(report.counts)} tables' rows equal, {report.checked:,} sha256 recomputed, next image id above {report.high_water:,}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Maintenance of a library, the service running or not: `python store.py purge-thumbnails --db data/images.db`;
    `python store.py copy SOURCE TARGET` (with the service stopped) copies it to another database."""
    import argparse

    parser = argparse.ArgumentParser(prog="store.py", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    purge = commands.add_parser("purge-thumbnails", help="delete every kept thumbnail (they are made again on request)")
    purge.add_argument("--db", default=os.environ.get("IMAGES_DB", "data/images.db"),
                       help="the database: a SQLite file or a postgresql:// URL (default: $IMAGES_DB, else data/images.db)")
    copy = commands.add_parser(
        "copy", help="copy a whole library to another database, SQLite or PostgreSQL, resumable and verified",
        description=(
            "Copy every image with its id, bytes, detections, counts, thumbnails and vision frames from SOURCE to "
            "TARGET (each a SQLite file or a postgresql://user:pass@host:port/dbname URL), keeping the id "
            "high-water mark: an id deleted in SOURCE is never handed out again in TARGET. Stop the service "
            "first. SOURCE is opened as the server opens it: an older SQLite file is migrated to the current "
            "schema first. TARGET is created (a SQLite file) or migrated; it must be empty, or hold a copy "
            "of SOURCE that was interrupted: run the same command again and it goes on where it stopped. At "
            "the end the rows of every table are counted in both and every blob's sha256 is recomputed from "
            "TARGET's bytes. Exit status 0: copied and verified; 1: the database failed, TARGET holds other data, "
            "or the verification failed (one line on stderr); 2: wrong arguments."
        ),
    )
    copy.add_argument("source", metavar="SOURCE", help="the library to copy: a SQLite file or a postgresql:// URL")
    copy.add_argument("target", metavar="TARGET", help="where to: a SQLite file or a postgresql:// URL (the database must exist)")
    copy.add_argument("--batch-mb", type=float, default=8,
                      help="bytes read and written per transaction, in MB (default 8; a larger image goes alone)")
    copy.add_argument("--log-every", type=float, default=5.0, metavar="SECONDS",
                      help="off a terminal, a progress line at most every this many seconds (default 5)")
    args = parser.parse_args(argv)
    if args.command == "copy":
        return _run_copy(args, parser)
    if not is_url(args.db) and not os.path.exists(args.db):
        parser.error(f"{args.db} does not exist; give the service's database with --db (IMAGES_DB)")
    try:
        images = Store(args.db)
    except StoreError as e:  # as ingest.py's commands: a database that cannot be opened is a wrong --db
        print(f"store.py purge-thumbnails: cannot open the database {redact(args.db)}: {e}", file=sys.stderr)
        return 2
    try:
        with images.connection():
            _, size = images.thumbnail_count()
            n = images.purge_thumbnails()
    except StoreError as e:
        print(f"store.py: {e}", file=sys.stderr)
        return 1
    finally:
        images.shutdown()
    print(f"deleted {n} thumbnail(s), {size / 2**20:,.1f} MB; the database file keeps its size, new data reuses the room")
    return 0


if __name__ == "__main__":
    sys.exit(main())

