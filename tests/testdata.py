"""Download the test photos and the SSD test model into testdata/ (for machines without ../shared).

    python tests/testdata.py [DEST]        (what `make testdata` runs)

Each file is streamed, checked against its sha256 and renamed into place by detect.fetch_model, so an
interrupted run leaves no half-written file and can simply be run again.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import detect  # noqa: E402

MANIFEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "testdata_manifest.json")


def main(dest: str = "testdata") -> int:
    with open(MANIFEST, encoding="utf-8") as f:
        files = json.load(f)["files"]
    failed = 0
    for rel, spec in files.items():
        path = os.path.join(dest, rel)
        if os.path.exists(path):
            continue
        entry = detect.KnownModel(rel, spec["url"], spec["sha256"], os.path.basename(rel))
        try:
            detect.fetch_model(entry, os.path.dirname(path))
        except detect.ModelFetchError as e:
            print(f"testdata: {e}", file=sys.stderr)
            failed += 1
        else:
            print(path)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
