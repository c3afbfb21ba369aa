"""How the code is laid out: which module may import which, every error has a status, README stays true."""

import ast
import importlib
import inspect
import os
import re

import pytest

import server
import settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Our own top-level modules, and the ones each may import. README's "How the code is laid out" says the same.
OWN = ("server", "ingest", "imaging", "detect", "store", "fetch", "jobs", "imgur", "settings", "lan", "vision")
ALLOWED = {
    "server": {"ingest", "store", "detect", "imaging", "fetch", "jobs", "imgur", "settings", "lan", "vision"},
    "ingest": {"fetch", "imaging", "detect", "store"},
    "detect": {"imaging"},
    "jobs": {"fetch", "imgur"},
    "imaging": set(),
    "store": set(),
    "fetch": set(),
    "imgur": set(),
    "settings": set(),
    "lan": set(),
    "vision": {"detect"},
}
WITH_COMMAND_LINE = {"detect", "ingest", "store", "imgur", "server", "settings"}  # may import settings
THIRD_PARTY_HTTP = ("bottle", "waitress")


def _imports(module: str) -> set[str]:
    """Top-level names a module imports anywhere in its file (function-level imports included)."""
    tree = ast.parse(open(os.path.join(ROOT, f"{module}.py"), encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_every_top_level_module_is_known():
    found = {f[:-3] for f in os.listdir(ROOT) if f.endswith(".py")}
    assert found == set(OWN), "a new module states its allowed imports here and in README"


@pytest.mark.parametrize("module", OWN)
def test_imports_follow_the_layout(module):
    own = _imports(module) & set(OWN)
    allowed = ALLOWED[module] | ({"settings"} if module in WITH_COMMAND_LINE else set())
    assert own - {module} <= allowed, f"{module} imports {sorted(own - allowed - {module})}"


@pytest.mark.parametrize("module", [m for m in OWN if m != "server"])
def test_domain_modules_never_speak_http(module):
    imported = _imports(module)
    assert "server" not in imported
    assert not imported & set(THIRD_PARTY_HTTP), f"{module} imports {sorted(imported & set(THIRD_PARTY_HTTP))}"


def test_the_named_rules_hold():
    assert not _imports("store") & {"detect", "imaging"}
    assert "fetch" not in _imports("imgur")
    assert "store" not in _imports("jobs")


# Errors that never leave a route, each with the reason. Everything else a module defines needs a status.
EXEMPT = {
    "detect.DetectError": "base class, never raised itself",
    "detect.ModelFetchError": "only `python detect.py --fetch` downloads models",
    "fetch.FetchError": "base class, never raised itself",
    "imaging.ImageError": "base class, never raised itself",
    "imgur.ImgurError": "base class, never raised itself",
    "imgur.NotUploadable": "jobs.py records it as the reason a URL failed",
    "imgur.Rejected": "jobs.py records it as the reason a URL failed",
    "imgur.Unavailable": "jobs.py records it as the reason a URL failed",
    "imgur.Stopped": "jobs.py records it as the reason a URL failed",
    "ingest.IngestError": "base class, never raised itself",
    "jobs.JobError": "base class, never raised itself",
    "jobs.InvalidBatch": "the route words it in the request's terms (server.batch_detail) as a 400",
    "lan.KeyUnusable": "start-up only: main() prints it and exits",
    "settings.SettingError": "start-up only: main() prints it and exits",
    "store.StoreError": "base class, never raised itself",
    "vision.VisionError": "base class, never raised itself",
}


def _error_classes():
    for name in OWN:
        if name == "server":
            continue
        module = importlib.import_module(name)
        for attr, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == name and not attr.startswith("_"):
                yield f"{name}.{attr}", obj


def test_every_error_a_route_can_meet_has_a_status():
    missing = [
        qual for qual, cls in _error_classes()
        if qual not in EXEMPT and not any(c in server.ERROR_STATUS for c in cls.__mro__)
    ]
    assert missing == [], f"add these to server.ERROR_STATUS or to EXEMPT with a reason: {missing}"
    known = dict(_error_classes())
    assert set(EXEMPT) <= set(known), f"exempt but gone: {set(EXEMPT) - set(known)}"


def test_error_statuses_are_client_or_server_errors():
    for cls, status in server.ERROR_STATUS.items():
        assert 400 <= status < 600, (cls, status)


def test_readme_settings_table_is_made_from_settings():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    start = readme.index("| variable | flag | default | meaning |")
    end = readme.index("\n\n", start)
    assert readme[start:end] == settings.markdown_table(), "run `python settings.py --markdown` and paste it into README"


def test_readme_describes_the_layout():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("## How the code is laid out"):]
    section = section[: section.index("\n## ", 1)]
    for module in OWN:
        assert re.search(rf"^\| `{module}\.py` \|", section, re.M), module


def test_make_app_leaves_bottles_process_wide_state_alone(service):
    import bottle

    assert bottle.BaseRequest.MEMFILE_MAX == 102400  # Bottle's own default: each app reads bodies itself
