"""Images, their bytes and their detections in one SQLite file (Peewee).

One file holds everything, so a backup is one copy. WAL with synchronous=FULL: an acknowledged image
survives a power cut (a Pi gets unplugged). Writes take the write lock up front (BEGIN IMMEDIATE) so two
writers queue on the busy timeout instead of failing half-way. Bytes live in their own table keyed by
sha256, stored once however many images use them; listing never reads them. Detections live in their
own table, indexed by (name, image) so `objects=dog` walks an index newest first.

The database is late-bound (peewee's `SqliteDatabase(None)` + `init()`): `Store(path)` opens it. Peewee
keeps one connection per thread; request threads connect and close around each request (server.py's
hooks), worker threads use `store.connection()`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import peewee as pw
from playhouse.pool import PooledSqliteDatabase
from playhouse.sqlite_ext import AutoIncrementField

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2  # 2: image ids are never reused (AUTOINCREMENT)
LABEL_MAX = 200

# A pool: a request's close() hands its connection back instead of closing it. Closing SQLite's last
# connection checkpoints and deletes the WAL (a second fsync per write), and reopening costs the pragmas
# again; both were measurable in bench/api.py.
db = PooledSqliteDatabase(None)


class StoreError(Exception):
    """Base of the store's errors."""


class NotFound(StoreError):
    """No image with that id."""


class StoreFull(StoreError):
    """The disk (or the database's size limit) is full: nothing was written."""


class StoreUnavailable(StoreError):
    """The database cannot be used right now (locked past the busy timeout, read-only, corrupt)."""


# ---------------------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------------------


class _Base(pw.Model):
    class Meta:
        database = db
        legacy_table_names = False


class Setting(_Base):
    """Key/value facts about the database itself (the schema version)."""

    key = pw.TextField(primary_key=True)
    value = pw.TextField()


class Blob(_Base):
    sha256 = pw.FixedCharField(64, primary_key=True)
    data = pw.BlobField()


class Image(_Base):
    # AUTOINCREMENT: a plain INTEGER PRIMARY KEY hands out the largest id again once it is deleted, and
    # /images/{id}/file is served as immutable, so an id must never name other bytes later.
    id = AutoIncrementField()
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


class Detection(_Base):
    image = pw.ForeignKeyField(Image, on_delete="CASCADE", backref="detections", index=False)
    name = pw.TextField()  # the label, lower-cased: what objects= searches
    label = pw.TextField()
    confidence = pw.FloatField()
    x_min = pw.FloatField()
    y_min = pw.FloatField()
    x_max = pw.FloatField()
    y_max = pw.FloatField()

    class Meta:
        indexes = (
            (("image", "confidence"), False),  # an image's detections, and the cascade on delete
            (("name", "image", "confidence"), False),  # objects=: walk one name newest first
        )


MODELS = (Setting, Blob, Image, Detection)


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

    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "confidence": self.confidence,
            "box": {"x_min": self.x_min, "y_min": self.y_min, "x_max": self.x_max, "y_max": self.y_max},
        }


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
    created_ms: int
    detections: tuple[Found, ...] = field(default=())

    @property
    def objects(self) -> list[str]:
        return sorted({d.label for d in self.detections})

    @property
    def created_at(self) -> str:
        return iso_ms(self.created_ms)


def iso_ms(ms: int) -> str:
    """ISO 8601 UTC with milliseconds and Z: 2017-12-22T16:48:29.123Z."""
    t = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.timezone.utc)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


# ---------------------------------------------------------------------------------------------------------
# Labels
# ---------------------------------------------------------------------------------------------------------

_IRREGULAR = {"person": "people", "mouse": "mice", "knife": "knives", "sheep": "sheep", "skis": "skis", "scissors": "scissors"}


def plural(noun: str) -> str:
    head, _, last = noun.rpartition(" ")
    if last in _IRREGULAR:
        word = _IRREGULAR[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        word = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def describe(labels: Iterable[str], most: int = 3) -> str | None:
    """A readable phrase for what was found: "2 dogs", "person and dog", "3 people, kite and 2 more"."""
    counts = Counter(labels)
    if not counts:
        return None
    # Most frequent first; ties keep the order of first appearance (detections come highest confidence first).
    parts = [name if n == 1 else f"{n} {plural(name)}" for name, n in counts.most_common()]
    if len(parts) > most:
        rest = len(parts) - (most - 1)
        parts = parts[: most - 1] + [f"{rest} more"]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def name_hint(name: str | None) -> str | None:
    """A label from a file name or a URL's last path segment: "golden-retriever.jpg" -> "golden-retriever"."""
    if not name:
        return None
    if "://" in name:
        name = urllib.parse.urlsplit(name).path.rstrip("/").rpartition("/")[2]
    name = urllib.parse.unquote(name.replace("\\", "/").rpartition("/")[2])
    stem, dot, ext = name.rpartition(".")
    if dot and stem and 1 <= len(ext) <= 5:
        name = stem
    name = " ".join(name.split()).strip(" .")
    return name[:LABEL_MAX] or None


def make_label(user: str | None, found: Sequence[Found], hint: str | None, sha256: str) -> tuple[str, bool]:
    """(label, generated): the user's, else what was found, else the name, else "untitled <sha8>"."""
    if user is not None and user.strip():
        return user.strip()[:LABEL_MAX], False
    return describe(d.label for d in found) or name_hint(hint) or f"untitled {sha256[:8]}", True


# ---------------------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------------------


_FULL = re.compile(r"database or disk is full", re.I)


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _translate(e: pw.DatabaseError) -> StoreError:
    # On a full disk SQLite rolls the transaction back itself; peewee's own ROLLBACK then fails ("no
    # transaction is active") and that error hides the real one, which is still in the chain.
    texts = [str(x) for x in _chain(e)]
    text = texts[0]
    if any(_FULL.search(t) for t in texts):
        return StoreFull("the disk holding the database is full; free some space and try again")
    if "locked" in text or "busy" in text:
        return StoreUnavailable("the database is busy; try again in a moment")
    return StoreUnavailable(f"the database cannot be used: {text}")


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    try:
        yield
    except (pw.OperationalError, pw.DatabaseError) as e:
        if isinstance(e, pw.IntegrityError):
            raise
        raise _translate(e) from e


class Store:
    """The image store. Thread-safe: peewee gives each thread its own connection."""

    def __init__(self, path: str, *, now: Callable[[], float] = time.time, busy_timeout_ms: int = 10_000):
        self.path = path
        self.now = now
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        # init() keeps pooled connections, which would still point at a previous file: drop them.
        if not db.deferred:
            db.close_all()
        db.init(
            path,
            max_connections=64,  # more than waitress' threads plus the upload workers
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
        with self.connection():
            self._migrate()

    # -- connections -------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Close every pooled connection (at exit, and in tests before the file goes)."""
        self.close()
        db.close_all()

    def connect(self) -> None:
        with _errors():
            db.connect(reuse_if_open=True)

    def close(self) -> None:
        if not db.is_closed():
            db.close()

    @contextlib.contextmanager
    def connection(self) -> Iterator[None]:
        """A connection for this thread for the block (worker threads; requests use connect/close)."""
        opened = db.is_closed()
        if opened:
            db.connect()
        try:
            yield
        finally:
            if opened:
                db.close()

    def _migrate(self) -> None:
        version = self._version()
        if version is not None and version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{self.path} has schema version {version}, newer than this service ({SCHEMA_VERSION}); "
                "upgrade the service or use another IMAGES_DB"
            )
        if version == 1:
            self._v1_to_v2()
        with db.atomic("IMMEDIATE"):
            db.create_tables(MODELS, safe=True)
            Setting.insert(key="schema_version", value=str(SCHEMA_VERSION)).on_conflict_replace().execute()

    @staticmethod
    def _version() -> int | None:
        if not db.table_exists("setting"):
            return None
        row = Setting.get_or_none(Setting.key == "schema_version")
        return int(row.value) if row else None

    def _v1_to_v2(self) -> None:
        """Rebuild `image` with AUTOINCREMENT (SQLite cannot alter a primary key), keeping every id."""
        log.info("migrating %s to schema version 2 (image ids never reused)", self.path)

        class ImageV2(Image):
            class Meta:
                table_name = "image_v2"

        # Off for the swap: dropping the old table must not cascade to the detections. Outside the
        # transaction, because SQLite ignores this pragma inside one.
        db.execute_sql("PRAGMA foreign_keys = OFF")
        try:
            with db.atomic("IMMEDIATE"):
                ImageV2.create_table()
                columns = ", ".join(f'"{f.column_name}"' for f in Image._meta.sorted_fields)
                db.execute_sql(f"INSERT INTO image_v2 ({columns}) SELECT {columns} FROM image")
                db.execute_sql("DROP TABLE image")
                db.execute_sql("ALTER TABLE image_v2 RENAME TO image")
                db.execute_sql("DROP INDEX IF EXISTS image_v2_sha256")  # create_tables makes image_sha256
                broken = db.execute_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise StoreUnavailable(f"migrating {self.path} would break {len(broken)} references; nothing changed")
                Setting.update(value="2").where(Setting.key == "schema_version").execute()
        finally:
            db.execute_sql("PRAGMA foreign_keys = ON")

    @property
    def schema_version(self) -> int:
        return int(Setting.get(Setting.key == "schema_version").value)

    # -- writes ------------------------------------------------------------------------------------------

    def add(self, new: NewImage) -> ImageRecord:
        """Store an image (and its bytes, unless those are stored already) in one transaction."""
        created_ms = int(self.now() * 1000)
        with _errors(), db.atomic("IMMEDIATE"):
            Blob.insert(sha256=new.sha256, data=new.data).on_conflict_ignore().execute()
            image = Image.create(
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
            )
            if new.detections:
                Detection.insert_many(
                    [
                        {
                            "image": image.id,
                            "name": d.label.lower(),
                            "label": d.label,
                            "confidence": d.confidence,
                            "x_min": d.x_min,
                            "y_min": d.y_min,
                            "x_max": d.x_max,
                            "y_max": d.y_max,
                        }
                        for d in new.detections
                    ]
                ).execute()
        return ImageRecord(
            image.id, new.sha256, new.label, new.label_generated, new.detection_enabled, new.content_type,
            len(new.data), new.width, new.height, new.source_url, created_ms, tuple(new.detections),
        )

    def delete(self, image_id: int) -> None:
        """Delete an image; its bytes go too when no other image uses them."""
        with _errors(), db.atomic("IMMEDIATE"):
            image = Image.get_or_none(Image.id == image_id)
            if image is None:
                raise NotFound(f"there is no image {image_id}")
            image.delete_instance()  # detections go by ON DELETE CASCADE
            if not Image.select().where(Image.sha256 == image.sha256).exists():
                Blob.delete().where(Blob.sha256 == image.sha256).execute()

    # -- reads -------------------------------------------------------------------------------------------

    def cached_detections(self, sha256: str, detected_with: str) -> tuple[Found, ...] | None:
        """Detections stored for these bytes by the same model and threshold, or None."""
        with _errors():
            image = (
                Image.select(Image.id)
                .where((Image.sha256 == sha256) & (Image.detected_with == detected_with))
                .order_by(Image.id.desc())
                .first()
            )
            if image is None:
                return None
            return self._detections([image.id]).get(image.id, ())

    def get(self, image_id: int) -> ImageRecord:
        with _errors():
            records = self._records("WHERE id = ?", [image_id])
        if not records:
            raise NotFound(f"there is no image {image_id}")
        return records[0]

    def file(self, image_id: int) -> tuple[bytes, str, str]:
        """(bytes, content type, sha256) of an image."""
        with _errors():
            row = (
                Image.select(Image.content_type, Blob.data, Blob.sha256)
                .join(Blob, on=(Image.sha256 == Blob.sha256))
                .where(Image.id == image_id)
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
        objects: Sequence[str] = (),
        match_all: bool = False,
        min_confidence: float | None = None,
    ) -> tuple[list[ImageRecord], bool]:
        """Images newest first, at most `limit`, and whether more remain.

        With `objects`, only images holding any (or, with `match_all`, every) of those names, at or above
        `min_confidence` when given.
        """
        names = sorted({n.strip().lower() for n in objects if n.strip()})
        with _errors():
            if names:
                ids = self._ids_with(names, match_all, min_confidence, before, limit + 1)
                more = len(ids) > limit
                ids = ids[:limit]
                records = self._records(f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id DESC", ids) if ids else []
            elif before is None:
                records = self._records("ORDER BY id DESC LIMIT ?", [limit + 1])
            else:
                records = self._records("WHERE id < ? ORDER BY id DESC LIMIT ?", [before, limit + 1])
            if not names:
                more = len(records) > limit
                records = records[:limit]
            return records, more

    def _ids_with(
        self, names: list[str], match_all: bool, min_confidence: float | None, before: int | None, limit: int
    ) -> list[int]:
        """Ids of images with any/all of `names`, newest first.

        Each name is one walk down the (name, image, confidence) index from `before`, stopping after
        `limit` images, so the cost depends on the page size and not on how many images hold the name.
        """
        def holds(alias: str, name: str) -> tuple[str, list]:
            if min_confidence is None:
                return f"{alias}.name = ?", [name]
            return f"{alias}.name = ? AND {alias}.confidence >= ?", [name, min_confidence]

        below, below_args = ("", []) if before is None else (" AND d.image_id < ?", [before])
        if match_all:
            # Walk the rarest name; each candidate must hold every other name (an index lookup each).
            # A name nothing has ends the search at once instead of walking a common one to the end.
            names = sorted(names, key=self._rough_count)
            if self._rough_count(names[0]) == 0:
                return []
            first, params = holds("d", names[0])
            sql = f"SELECT DISTINCT d.image_id FROM detection d WHERE {first}{below}"
            params += below_args
            for name in names[1:]:
                cond, cond_args = holds("o", name)
                sql += f" AND EXISTS (SELECT 1 FROM detection o WHERE o.image_id = d.image_id AND {cond})"
                params += cond_args
            sql += " ORDER BY d.image_id DESC LIMIT ?"
            params.append(limit)
        else:
            walks, params = [], []
            for name in names:
                cond, cond_args = holds("d", name)
                walks.append(
                    f"SELECT * FROM (SELECT DISTINCT d.image_id FROM detection d WHERE {cond}{below} "
                    "ORDER BY d.image_id DESC LIMIT ?)"
                )
                params += cond_args + below_args + [limit]
            sql = f"SELECT image_id FROM ({' UNION '.join(walks)}) ORDER BY image_id DESC LIMIT ?"
            params.append(limit)
        return [row[0] for row in db.execute_sql(sql, params).fetchall()]

    @staticmethod
    def _rough_count(name: str, cap: int = 5000) -> int:
        """How many detections carry `name`, counted up to `cap` (an index walk of at most `cap` rows)."""
        sql = "SELECT COUNT(*) FROM (SELECT 1 FROM detection WHERE name = ? LIMIT ?)"
        return db.execute_sql(sql, [name, cap]).fetchone()[0]

    # Hot reads use plain SQL and tuples: peewee's per-value conversion was most of a 100-image page.
    _IMAGE_COLUMNS = (
        "id, sha256, label, label_generated, detection_enabled, content_type, size, width, height, source_url, created_ms"
    )

    def _detections(self, ids: list[int]) -> dict[int, tuple[Found, ...]]:
        out: dict[int, list[Found]] = {}
        if not ids:
            return {}
        sql = (
            "SELECT image_id, label, confidence, x_min, y_min, x_max, y_max FROM detection "
            f"WHERE image_id IN ({','.join('?' * len(ids))}) ORDER BY image_id, confidence DESC"
        )
        for image_id, *rest in db.execute_sql(sql, ids).fetchall():
            out.setdefault(image_id, []).append(Found(*rest))
        return {k: tuple(v) for k, v in out.items()}

    def _records(self, where: str, params: list) -> list[ImageRecord]:
        rows = db.execute_sql(f"SELECT {self._IMAGE_COLUMNS} FROM image {where}", params).fetchall()
        found = self._detections([r[0] for r in rows])
        return [
            ImageRecord(i, sha, label, bool(gen), bool(det), ct, size, w, h, url, ms, found.get(i, ()))
            for i, sha, label, gen, det, ct, size, w, h, url, ms in rows
        ]

    def objects(self) -> list[tuple[str, int]]:
        """Every name found so far with the number of images holding it, most common first."""
        with _errors():
            rows = db.execute_sql(
                "SELECT name, COUNT(DISTINCT image_id) AS n FROM detection GROUP BY name ORDER BY n DESC, name"
            ).fetchall()
        return [(name, n) for name, n in rows]

    def count(self) -> tuple[int, int]:
        """(images, distinct byte blobs): for tests and health."""
        with _errors():
            return Image.select().count(), Blob.select().count()
