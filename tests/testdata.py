"""The test photos and the SSD test model, for machines without ../shared.

    python tests/testdata.py [DEST]      download what is missing into DEST (default testdata/): `make testdata`
    python tests/testdata.py --ensure    what `make test` runs first (below)

Each file of tests/testdata_manifest.json comes from its public URL, or from `TESTDATA_BASE_URL/<path>`
when that is set (a mirror: any HTTP server holding the same tree, such as `python -m http.server` in a
filled testdata/ folder). Everything is downloaded into a temporary folder beside DEST, each file
checked against its size and sha256, and moved into DEST only when every file has arrived: a failed run
leaves nothing behind, and can simply be run again. The first failure stops the run (offline, that is
at once).

`--ensure` checks what the tests will read (conftest.py): the photos in TESTDATA_DIR/images, else
testdata/images; the model at DETECT_MODEL, else in testdata/models. What should come from testdata/
and is missing is downloaded; when that fails, or a variable names a missing path, it says in one
short message how to provide the data, and exits 2 before any test runs.

Standard library only, so it runs before any virtual environment exists.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MANIFEST = os.path.join(HERE, "testdata_manifest.json")
CHUNK = 1 << 16

HOW = (
    "Provide it one of two ways:\n"
    "  - point at a copy: TESTDATA_DIR=../shared/testdata "
    "DETECT_MODEL=../shared/models/coco_ssd_mobilenet_v1_1.0_quant_2018_06_29.tflite make test\n"
    "  - or download it on a machine with internet: make testdata (into testdata/; "
    "TESTDATA_BASE_URL=http://host:port downloads from a mirror instead)"
)


class DownloadError(Exception):
    """A file could not be downloaded or was not the manifest's; nothing was saved."""


def load_manifest(path: str = MANIFEST) -> dict[str, dict]:
    """{relative path: {"url", "sha256", "size"}}."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)["files"]


def missing(dest: str, files: dict[str, dict]) -> list[str]:
    """The manifest paths not in `dest` with their manifest size (the sha256 was checked on download)."""
    out = []
    for rel, spec in files.items():
        path = os.path.join(dest, rel)
        if not (os.path.isfile(path) and os.path.getsize(path) == spec["size"]):
            out.append(rel)
    return out


def source_url(rel: str, spec: dict, base_url: str | None) -> str:
    return f"{base_url.rstrip('/')}/{urllib.parse.quote(rel)}" if base_url else spec["url"]


def _fetch(url: str, spec: dict, out_path: str, timeout: float) -> None:
    digest = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=timeout) as res, open(out_path, "wb") as out:
            while chunk := res.read(CHUNK):
                size += len(chunk)
                if size > spec["size"]:  # a wrong or endless answer never fills the disk
                    raise DownloadError(f"{url} sent more than the {spec['size']:,} bytes expected")
                digest.update(chunk)
                out.write(chunk)
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url} answered {e.code} {e.reason}") from e
    except urllib.error.URLError as e:
        raise DownloadError(f"could not reach {urllib.parse.urlsplit(url).netloc}: {e.reason}") from e
    except (OSError, ValueError, http.client.HTTPException) as e:  # timeouts, resets, a broken answer
        raise DownloadError(f"downloading {url} failed: {e}") from e
    if size < spec["size"]:
        raise DownloadError(f"{url} stopped after {size:,} of {spec['size']:,} bytes")
    if digest.hexdigest() != spec["sha256"]:
        raise DownloadError(
            f"{url} gave {size:,} bytes with sha256 {digest.hexdigest()}, expected {spec['size']:,} bytes "
            f"with sha256 {spec['sha256']}"
        )


def download(dest: str, files: dict[str, dict], *, base_url: str | None = None, timeout: float = 30.0,
             progress=None) -> list[str]:
    """Download the files of `files` missing from `dest`; return their paths. All or nothing.

    Raises DownloadError on the first failure, leaving `dest` as it was.
    """
    todo = missing(dest, files)
    if not todo:
        return []
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dest)}-", suffix=".part", dir=parent)
    try:
        for rel in todo:
            url = source_url(rel, files[rel], base_url)
            if progress:
                progress(rel, url)
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)), exist_ok=True)
            _fetch(url, files[rel], os.path.join(tmp, rel), timeout)
        if not os.path.exists(dest):
            os.rename(tmp, dest)  # the whole folder appears at once
            return [os.path.join(dest, rel) for rel in todo]
        for rel in todo:  # complete an existing folder file by file: each move is whole
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            os.replace(os.path.join(tmp, rel), os.path.join(dest, rel))
        return [os.path.join(dest, rel) for rel in todo]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def ensure(env: dict[str, str], *, root: str = ROOT, manifest: str = MANIFEST, out=sys.stderr) -> int:
    """`make test`'s first step: 0 when the tests will find their data (downloading it if need be), else 2."""
    data_dir, model = env.get("TESTDATA_DIR"), env.get("DETECT_MODEL")
    if data_dir and not os.path.isdir(os.path.join(data_dir, "images")):
        print(f"make test: TESTDATA_DIR={data_dir} has no images/ folder.\n{HOW}", file=out)
        return 2
    if model and not os.path.isfile(model):
        print(f"make test: DETECT_MODEL={model} is not a file.\n{HOW}", file=out)
        return 2
    # What conftest.py reads from testdata/ when the variables are unset.
    wanted = {
        rel: spec for rel, spec in load_manifest(manifest).items()
        if (rel.startswith("images/") and not data_dir) or (rel.startswith("models/") and not model)
    }
    dest = os.path.join(root, "testdata")
    todo = missing(dest, wanted)
    if not todo:
        return 0
    base_url = env.get("TESTDATA_BASE_URL") or None
    mb = sum(wanted[rel]["size"] for rel in todo) / 1e6
    print(f"make test: no test data yet; downloading {len(todo)} files ({mb:.1f} MB) into testdata/", file=out)
    try:
        download(dest, wanted, base_url=base_url)
    except DownloadError as e:
        print(f"make test: could not download the test data ({e}); nothing was saved.\n{HOW}", file=out)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/testdata.py", description=__doc__.split("\n")[0])
    parser.add_argument("dest", nargs="?", default=os.path.join(ROOT, "testdata"), help="where to put the files")
    parser.add_argument("--ensure", action="store_true", help="what `make test` runs first: check, download if need be")
    parser.add_argument("--manifest", default=MANIFEST, help="the list of files (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.ensure:
        return ensure(dict(os.environ), manifest=args.manifest)
    files = load_manifest(args.manifest)
    try:
        saved = download(
            args.dest, files, base_url=os.environ.get("TESTDATA_BASE_URL") or None,
            progress=lambda rel, url: print(f"testdata: {rel} <- {url}", file=sys.stderr),
        )
    except DownloadError as e:
        print(f"testdata: {e}; nothing was saved, run it again when the files can be reached", file=sys.stderr)
        return 1
    print(f"testdata: {len(saved)} files saved, {len(files) - len(saved)} already there, in {args.dest}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
