"""The counts behind GET /objects and match=all (store.py's object_count and object_pair, schema version 5).

They are kept beside the detections in the same write transactions, so after any sequence of writes they
must equal what a GROUP BY over the detections says; and the searches that use them to stop early must
find exactly what a plain reading of the rules finds.
"""

from __future__ import annotations

import hashlib
import sqlite3

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import store

pytestmark = pytest.mark.both_backends

NAMES = ["cat", "dog", "person", "hot dog", "Car"]  # "Car": a label's name is lower-cased

COUNTS_BY_GROUP = "SELECT name, COUNT(DISTINCT image_id) FROM detection GROUP BY name"
PAIRS_BY_GROUP = (
    "SELECT x.name, y.name, COUNT(DISTINCT x.image_id) FROM detection x "
    "JOIN detection y ON y.image_id = x.image_id AND y.name > x.name GROUP BY x.name, y.name"
)


def new_image(labels, n: int, confidences=None) -> store.NewImage:
    data = f"image {n}".encode()
    found = tuple(
        store.Found(label, confidences[i] if confidences else 0.9, 0.1, 0.1, 0.5, 0.5) for i, label in enumerate(labels)
    )
    return store.NewImage(data, hashlib.sha256(data).hexdigest(), "image/jpeg", 10, 10, "x", True, True, found,
                          created_ms=n)


def assert_counts_agree(s: store.Store) -> None:
    db = s.database
    counts = dict(db.execute_sql("SELECT name, images FROM object_count").fetchall())
    assert counts == dict(db.execute_sql(COUNTS_BY_GROUP).fetchall())
    pairs = {(a, b): n for a, b, n in db.execute_sql("SELECT a, b, images FROM object_pair").fetchall()}
    assert pairs == {(a, b): n for a, b, n in db.execute_sql(PAIRS_BY_GROUP).fetchall()}
    assert s.objects() == sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


labels = st.lists(st.sampled_from(NAMES), max_size=4)  # repeats: two dogs in one picture
# A database per example from new_db (dropped after it), so its fixture being per test does no harm.
EXAMPLES = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), labels),
        st.tuples(st.just("add_many"), st.lists(labels, max_size=4)),
        st.tuples(st.just("add_frame"), labels, st.integers(0, 3)),
        st.tuples(st.just("delete"), st.integers(0, 50)),
        st.tuples(st.just("redetect"), st.integers(0, 50), labels),
    ),
    max_size=12,
)


def redetect(s: store.Store, image_id: int, new_labels) -> None:
    """Store.replace_detections, as POST /images/{id}/detect and `ingest.py redetect` call it."""
    found = [store.Found(label, 0.8, 0.0, 0.0, 1.0, 1.0) for label in new_labels]
    s.replace_detections(image_id, found, "0123456789abcdef@0.5", "ssd", None)


@settings(max_examples=60, **EXAMPLES)
@given(sequence=ops)
def test_the_counts_equal_a_group_by_after_any_writes(new_db, sequence):
    target = new_db()
    s = store.Store(target)
    try:
        with s.connection():
            n = 0
            for op in sequence:
                ids = [r.id for r in s.list(limit=1000)[0]]
                if op[0] == "add":
                    n += 1
                    s.add(new_image(op[1], n))
                elif op[0] == "add_many":
                    s.add_many([new_image(found, n + i + 1) for i, found in enumerate(op[1])], batch=2)
                    n += len(op[1])
                elif op[0] == "add_frame":
                    n += 1
                    s.add_frame(new_image(op[1], n), keep=op[2])
                elif ids and op[0] == "delete":
                    s.delete(ids[op[1] % len(ids)])
                elif ids and op[0] == "redetect":
                    redetect(s, ids[op[1] % len(ids)], op[2])
                assert_counts_agree(s)
    finally:
        s.shutdown()
        new_db.drop(target)


def test_a_version_3_database_gains_the_counts_and_the_index(tmp_path):
    """A database as schema version 3 left it (no count tables, no (name, confidence) index) is migrated on
    start: the counts filled from its detections, ids and detections kept."""
    path = str(tmp_path / "v3.db")
    s = store.Store(path)
    with s.connection():
        for n, found in enumerate([["dog", "dog", "cat"], ["person"], [], ["cat", "person", "Car"]], 1):
            s.add(new_image(found, n))
    s.shutdown()
    conn = sqlite3.connect(path)
    conn.executescript(
        "BEGIN; DROP TABLE object_count; DROP TABLE object_pair; DROP INDEX detection_name_confidence_image_id;"
        "UPDATE setting SET value = '3' WHERE key = 'schema_version'; COMMIT;"
    )
    conn.close()

    s = store.Store(path)
    try:
        with s.connection():
            assert s.schema_version == store.SCHEMA_VERSION
            assert s.objects() == [("cat", 2), ("person", 2), ("car", 1), ("dog", 1)]
            assert_counts_agree(s)
            indexes = {row[0] for row in s.database.execute_sql("SELECT name FROM sqlite_master WHERE type = 'index'")}
            assert "detection_name_confidence_image_id" in indexes
            assert [r.id for r in s.list(objects=["cat", "person"], match_all=True)[0]] == [4]
            s.delete(4)
            assert_counts_agree(s)
            assert s.list(objects=["cat", "person"], match_all=True)[0] == []
    finally:
        s.shutdown()


# --------------------------------------------------------------------------------------------------------
# The searches find what the rules say, whichever way they take
# --------------------------------------------------------------------------------------------------------

IMAGES = st.lists(
    st.lists(st.tuples(st.sampled_from(NAMES), st.sampled_from([0.5, 0.7, 0.9, 0.95])), max_size=3), min_size=1,
    max_size=40,
)
QUERIES = st.lists(
    st.tuples(
        st.lists(st.lists(st.sampled_from(NAMES + ["horse"]), min_size=1, max_size=2), min_size=1, max_size=3),
        st.booleans(),
        st.sampled_from([None, 0.7, 0.95, 0.99]),
        st.one_of(st.none(), st.integers(1, 42)),
        st.integers(1, 5),
    ),
    min_size=1, max_size=15,
)


@settings(max_examples=40, **EXAMPLES)
@given(images=IMAGES, queries=QUERIES, deleted=st.integers(0, 5))
def test_searches_find_what_the_rules_say(new_db, images, queries, deleted):
    target = new_db()
    s = store.Store(target)
    try:
        with s.connection():
            s.add_many([new_image([n for n, _ in found], i, [c for _, c in found]) for i, found in enumerate(images, 1)])
            held = {i: found for i, found in enumerate(images, 1)}
            for image_id in list(held)[:deleted]:
                s.delete(image_id)
                del held[image_id]
            for groups, match_all, min_confidence, before, limit in queries:
                groups = [{n.lower() for n in g} for g in groups]

                def holds(found, group, min_confidence=min_confidence):
                    return any(n.lower() in group and (min_confidence is None or c >= min_confidence) for n, c in found)

                want = [
                    i for i in sorted(held, reverse=True)
                    if (before is None or i < before)
                    and (all if match_all else any)(holds(held[i], g) for g in groups)
                ]
                records, more = s.list(limit=limit, before=before, objects=groups, match_all=match_all,
                                       min_confidence=min_confidence)
                assert [r.id for r in records] == want[:limit]
                assert more == (len(want) > limit)
    finally:
        s.shutdown()
        new_db.drop(target)


def test_match_all_of_a_name_and_a_group_holding_it(new_db):
    """`objects=dog,animal&match=all`: an image with a dog alone holds both terms, although no pair of
    names counts it."""
    s = store.Store(new_db())
    try:
        with s.connection():
            s.add_many([new_image(["dog"], 1), new_image(["cat"], 2), new_image(["person"], 3)])
            found = s.list(objects=["dog", ("cat", "dog", "horse")], match_all=True)[0]
            assert [r.id for r in found] == [1]
            assert s.list(objects=["person", ("cat", "dog")], match_all=True)[0] == []  # never together
    finally:
        s.shutdown()
