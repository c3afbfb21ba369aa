"""The free-space floor (MIN_FREE_DISK_MB): below it writes answer 507 naming the setting, reads and
deletes keep working (issue 10, "Disk and slow senders").

The other tests run with the floor at 0 (tests/conftest.py, tests/test_server.py): test machines can be
short of disk. The tmpfs test fills a real 64 MB filesystem; it needs root to mount one.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import urllib.error
import urllib.request

import pytest
from PIL import Image
from test_server import start_server, stop_server

import server
import store
from helpers import assert_problem, b64, jpeg

MB = 1024 * 1024
EVERY_DISK = 2**40  # MB: more than any disk has free


def test_writes_below_the_floor_are_507_and_reads_and_deletes_work(make_service):
    service = make_service(min_free_disk_mb=EVERY_DISK)
    service.store.min_free_mb = 0  # one image stored before the disk "fills"
    created = service.client.post_json("/images", {"image": b64(jpeg())}).json
    service.store.min_free_mb = EVERY_DISK

    res = service.client.post_json("/images", {"image": b64(jpeg((1, 2, 3)))}, status=507)
    detail = assert_problem(res, 507)
    assert "MIN_FREE_DISK_MB" in detail and "delete images" in detail
    assert service.counts() == (1, 1)  # nothing stored
    assert [i["id"] for i in service.client.get("/images").json] == [created["id"]]
    assert service.client.get(f"/images/{created['id']}/file").body == base64.b64decode(b64(jpeg()))
    service.client.delete(f"/images/{created['id']}", status=204)  # deleting is how one gets out
    assert service.counts() == (0, 0)


def test_the_floor_counts_the_write_and_the_database_free_pages(tmp_path):
    """A write needs twice its size (WAL, then the file); pages that deleted images leave count as free,
    since new data reuses them (the file does not shrink, so "delete images" must help)."""
    images = store.Store(str(tmp_path / "images.db"))
    data = os.urandom(MB)
    new = store.NewImage(data, "a" * 64, "image/png", 1, 1, "noise", False, False)
    try:
        with images.connection():
            rec = images.add(new)
            assert images.backend.reusable_bytes() < MB
            images.delete(rec.id)
            assert images.backend.reusable_bytes() >= MB
            free_mb = images.backend.free_bytes() // MB
            images.min_free_mb = free_mb - 1  # room for 1 MB, not for the 2 MB a 1 MB write needs
            with pytest.raises(store.LowDisk, match="MIN_FREE_DISK_MB"):
                images.add(new)
            images.min_free_mb = free_mb - 3
            images.add(new)
    finally:
        images.shutdown()


def test_low_disk_is_a_507():
    assert issubclass(store.LowDisk, store.StoreFull) and server.status_for(store.LowDisk("x")) == 507


# --------------------------------------------------------------------------------------------------------
# A real 64 MB filesystem
# --------------------------------------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path):
    """A 64 MB tmpfs mounted on a fresh folder, unmounted afterwards; skips where that is not allowed."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "tmpfs"
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def _noise_bmp(side: int = 512) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "BMP")
    return buf.getvalue()


def _post(base: str, data: bytes) -> tuple[int, dict]:
    body = json.dumps({"image": base64.b64encode(data).decode()}).encode()
    req = urllib.request.Request(base + "/images", body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as res:
            return res.status, json.load(res)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def _free_mb(folder) -> float:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize / MB


def test_uploads_stop_at_the_floor_on_a_full_tmpfs(tmpfs, tmp_path):
    """Issue 10's target: a 64 MB filesystem and a 24 MB floor; 768 KB images (1 MB as base64) until the
    first 507. At least 12 MB stay free, reads work, and deleting images makes room again."""
    proc, base, _ = start_server(
        tmp_path, "--db", str(tmpfs / "images.db"), "--model", str(tmp_path / "none.tflite"),
        env={"MIN_FREE_DISK_MB": "24"},
    )
    try:
        stored, refusal = [], None
        for _ in range(60):  # 64 MB holds fewer than 60 of them
            status, body = _post(base, _noise_bmp())
            if status != 200:
                refusal = (status, body)
                break
            stored.append(body["id"])
        assert refusal is not None, "60 images fitted on a 64 MB disk"
        assert refusal[0] == 507 and "MIN_FREE_DISK_MB" in refusal[1]["detail"], refusal
        assert len(stored) >= 10, len(stored)
        assert _free_mb(tmpfs) >= 12, _free_mb(tmpfs)
        with urllib.request.urlopen(f"{base}/images?limit=1000", timeout=10) as res:
            assert len(json.load(res)) == len(stored)  # reads keep working
        for image_id in stored[:4]:
            req = urllib.request.Request(f"{base}/images/{image_id}", method="DELETE")
            with urllib.request.urlopen(req, timeout=10) as res:
                assert res.status == 204
        assert _post(base, _noise_bmp())[0] == 200  # the freed pages take the next image
    finally:
        err = stop_server(proc)
    assert "Traceback" not in err, err


def test_the_server_says_at_start_when_the_disk_is_below_the_floor(tmp_path):
    proc, _, _ = start_server(tmp_path, "--model", str(tmp_path / "none.tflite"), env={"MIN_FREE_DISK_MB": str(EVERY_DISK)})
    err = stop_server(proc)
    assert "below MIN_FREE_DISK_MB" in err and "507" in err, err
