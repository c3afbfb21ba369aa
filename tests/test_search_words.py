"""Search by the words our own labels use (issue 15): plurals, COCO supercategories, repeated `objects`,
and the strictness of GET /images and GET /images/{id} about their query parameters.

Real photos through POST /images with the real model where the detections matter; crafted images through
store.add_many where a test needs names the photos do not hold (mice, knives, a cat beside a person).
"""

import base64
import hashlib
import re
import urllib.parse

import pytest

import detect
import ingest
import store
from helpers import assert_problem, b64, jpeg

pytestmark = pytest.mark.both_backends

LIST_PARAMS = ("limit", "before", "objects", "match", "min_confidence")


def ids_of(res):
    return [img["id"] for img in res.json]


@pytest.fixture
def gallery(service, photo):
    """pets (2 dogs), cat, coupleanddog (2 people, dog), traffic (cars), dragonfly (nothing)."""
    names = ["pets.jpg", "cat.bmp", "coupleanddog.jpeg", "traffic_0001.bmp", "dragonfly.bmp"]
    imgs = [service.client.post_json("/images", {"image": b64(photo(n)), "detect": True}).json for n in names]
    return service, dict(zip(names, imgs, strict=True))


def crafted(service, *images: tuple[str, ...], confidence: float = 0.9) -> list[int]:
    """One stored image per tuple of detected names, oldest first; their ids."""
    data = jpeg()
    new = [
        store.NewImage(
            data=data, sha256=hashlib.sha256(data).hexdigest(), content_type="image/jpeg", width=8, height=8,
            label=", ".join(names) or "nothing", label_generated=False, detection_enabled=True,
            detections=[store.Found(n, confidence, 0.1, 0.1, 0.5, 0.5) for n in names],
        )
        for names in images
    ]
    with service.store.connection():
        before = {r.id for r in service.store.list(limit=1000)[0]}
        service.store.add_many(new)
        return sorted({r.id for r in service.store.list(limit=1000)[0]} - before)


# --------------------------------------------------------------------------------------------------------
# Plurals
# --------------------------------------------------------------------------------------------------------


def test_the_words_of_generated_labels_find_their_images(gallery):
    service, imgs = gallery
    get = service.client.get
    assert (imgs["pets.jpg"]["label"], imgs["coupleanddog.jpeg"]["label"]) == ("2 dogs", "2 people and dog")
    assert ids_of(get("/images?objects=dogs")) == ids_of(get("/images?objects=dog")) != []
    assert ids_of(get("/images?objects=people")) == ids_of(get("/images?objects=person")) == [imgs["coupleanddog.jpeg"]["id"]]
    # Every word a generated label uses for what was found finds the image it labels.
    for img in imgs.values():
        for part in re.split(r", | and ", img["label"]):
            if img["objects"] and not part.endswith("more"):
                word = part.split(" ", 1)[1] if part[0].isdigit() else part
                assert img["id"] in ids_of(get("/images", {"objects": word})), (img["label"], word)


def test_irregular_and_compound_plurals_share_the_label_table(service):
    ids = crafted(service, ("mouse",), ("knife",), ("hot dog",), ("bus",), ("sheep",), ("wine glass",), ("skis",))
    mouse, knife, hot_dog, bus, sheep, wine_glass, skis = ids
    get = service.client.get
    for word, want in [("mice", mouse), ("knives", knife), ("hot dogs", hot_dog), ("buses", bus), ("sheep", sheep),
                       ("wine glasses", wine_glass), ("skis", skis)]:
        assert ids_of(get("/images", {"objects": word})) == [want], word
    # The label of two of each says the same plural that search understands: one table, one plural().
    for name in ("mouse", "knife", "person", "sheep", "hot dog", "bus"):
        word = ingest.describe([name, name]).split(" ", 1)[1]
        assert name in ingest.search_names(word), (name, word)
    assert ingest.search_names("unicorns") == ("unicorn", "unicorns")  # not COCO, still a plural of ours
    assert ingest.search_names("xyzzy") == ("xyzzy",)  # neither a name nor a plural nor a category: as written


def test_an_unknown_term_is_searched_as_written(service):
    (plate,) = crafted(service, ("licence plate",))
    assert ids_of(service.client.get("/images", {"objects": "licence plate"})) == [plate]
    assert service.client.get("/images", {"objects": "licence plat"}).json == []


# --------------------------------------------------------------------------------------------------------
# Categories
# --------------------------------------------------------------------------------------------------------


def test_categories_cover_the_test_model_label_map_once_each(model_path):
    names = [n for n in detect.load_labels(model_path) if n != "???"]
    members = [m for ms in ingest.CATEGORIES.values() for m in ms]
    assert sorted(members) == sorted(names) and len(members) == 80  # COCO 2017's 80 categories, each in one
    assert set(ingest.CATEGORIES) == {
        "animal", "vehicle", "food", "furniture", "electronic", "appliance", "kitchen", "indoor", "outdoor",
        "sports", "accessory", "person",
    }


def test_a_category_finds_its_members(gallery):
    service, imgs = gallery
    get = service.client.get
    pets, cat, couple, traffic = (imgs[n]["id"] for n in ("pets.jpg", "cat.bmp", "coupleanddog.jpeg", "traffic_0001.bmp"))
    assert ids_of(get("/images?objects=animal")) == [couple, cat, pets]
    assert ids_of(get("/images?objects=animals")) == [couple, cat, pets]
    assert ids_of(get("/images?objects=vehicle")) == [traffic]
    assert ids_of(get("/images?objects=animal,person&match=all")) == [couple]
    assert ids_of(get("/images?objects=animal,vehicle")) == [traffic, couple, cat, pets]
    assert get("/images?objects=animal,vehicle&match=all").json == []


def test_match_is_between_the_terms_and_each_term_is_an_or(service):
    cat_person, dogs_cat, person, horse, nothing = crafted(
        service, ("cat", "person"), ("dog", "cat"), ("person",), ("horse", "car"), ()
    )
    (bird,) = crafted(service, ("bird", "person"), confidence=0.3)
    get = service.client.get
    # All: a person and any animal. dog+cat is two animals but no person; a person alone has no animal.
    assert ids_of(get("/images?objects=animal,person&match=all")) == [bird, cat_person]
    assert ids_of(get("/images?objects=animal,person&match=all&min_confidence=0.5")) == [cat_person]
    # A term and its category together: the dog is an animal too.
    assert ids_of(get("/images?objects=dog,animal&match=all")) == [dogs_cat]
    assert ids_of(get("/images?objects=animal,vehicle&match=all")) == [horse]
    # Any: the union of every term's names.
    assert ids_of(get("/images?objects=animal")) == [bird, horse, dogs_cat, cat_person]
    assert ids_of(get("/images?objects=people,vehicle")) == [bird, horse, person, cat_person]
    assert nothing not in ids_of(get("/images?objects=animal,person"))


def test_twenty_terms_are_counted_before_expansion(service):
    (horse,) = crafted(service, ("horse", "person"))
    twelve = list(ingest.CATEGORIES)  # 12 terms that stand for 80 names
    twenty = twelve + ["dogs", "cats", "people", "mice", "knives", "buses", "horses", "cars"]
    assert len(twenty) == 20
    assert ids_of(service.client.get("/images", {"objects": ",".join(twenty)})) == [horse]
    assert ids_of(service.client.get("/images", {"objects": ",".join(twenty), "match": "all"})) == []
    res = service.client.get("/images", {"objects": ",".join(twenty + ["birds"])}, status=400)
    assert "more than 20" in assert_problem(res, 400)
    # Repeated parameters count together.
    query = urllib.parse.urlencode([("objects", ",".join(twenty[:10])), ("objects", ",".join(twenty[10:] + ["bird"]))])
    assert "more than 20" in assert_problem(service.client.get(f"/images?{query}", status=400), 400)


# --------------------------------------------------------------------------------------------------------
# Repeated objects, unknown parameters, include
# --------------------------------------------------------------------------------------------------------


def test_repeated_objects_combine(gallery):
    service, imgs = gallery
    get = service.client.get
    couple = imgs["coupleanddog.jpeg"]["id"]
    assert ids_of(get("/images?objects=dog&objects=cat")) == ids_of(get("/images?objects=dog,cat"))
    assert len(ids_of(get("/images?objects=dog&objects=cat"))) == 3
    assert ids_of(get("/images?objects=dog&objects=people&match=all")) == [couple]
    assert ids_of(get("/images?objects=dog,cat&objects=person&match=all")) == []
    assert_problem(get("/images?objects=dog&objects=", status=400), 400)  # each one must name an object


@pytest.mark.parametrize(
    "query", ["object=dog", "objects=dog&Match=all", "limits=5", "objects=dog&min_conf=0.5", "q=dog", "before=5&x="]
)
def test_an_unknown_list_parameter_is_a_400_naming_the_known_ones(service, query):
    detail = assert_problem(service.client.get(f"/images?{query}", status=400), 400)
    unknown = [k for k, _ in urllib.parse.parse_qsl(query, keep_blank_values=True) if k not in LIST_PARAMS]
    assert detail == f"unknown query parameter(s) {', '.join(sorted(unknown))}; the parameters are {', '.join(LIST_PARAMS)}"


def test_unknown_parameters_are_shown_readably_and_briefly(service):
    detail = assert_problem(service.client.get("/images?%C3%A9t%C3%A9=1", status=400), 400)
    assert detail.startswith("unknown query parameter(s) été;")
    many = "&".join(f"p{i}=1" for i in range(50)) + "&" + "x" * 5000 + "=1"
    detail = assert_problem(service.client.get(f"/images?{many}", status=400), 400)
    assert detail.startswith("unknown query parameter(s) p0, p1, p10, p11, p12 and 46 more;") and len(detail) < 300


def test_a_single_valued_parameter_given_twice_is_a_400(service):
    for query in ("limit=1&limit=2", "objects=dog&match=all&match=any", "before=3&before=3"):
        assert "give it once" in assert_problem(service.client.get(f"/images?{query}", status=400), 400)


def test_the_other_routes_are_as_strict(gallery):
    service, imgs = gallery
    one = imgs["pets.jpg"]["id"]
    detail = assert_problem(service.client.get(f"/images/{one}?inclde=data", status=400), 400)
    assert detail == "unknown query parameter(s) inclde; the parameters are include"
    detail = assert_problem(service.client.get("/objects?name=dog", status=400), 400)
    assert detail == "unknown query parameter(s) name; this route takes no query parameters"
    assert service.client.get("/objects").json  # as before without parameters


def test_include_data_on_get_by_id(gallery, photo):
    service, imgs = gallery
    img = imgs["pets.jpg"]
    got = service.client.get(f"/images/{img['id']}?include=data").json
    assert base64.b64decode(got["data"]) == photo("pets.jpg")
    assert {k: v for k, v in got.items() if k != "data"} == service.client.get(f"/images/{img['id']}").json == img
    for bad in ("bogus", "", "DATA", "data,data"):
        detail = assert_problem(service.client.get(f"/images/{img['id']}", {"include": bad}, status=400), 400)
        assert "`include` takes one value, data" in detail
    assert_problem(service.client.get("/images/999?include=data", status=404), 404)


def test_include_on_the_list_is_a_400(gallery):
    service, _ = gallery
    for query in ("include=data", "include=bogus", "objects=dog&include=data"):
        detail = assert_problem(service.client.get(f"/images?{query}", status=400), 400)
        assert "GET /images/{id}?include=data" in detail


# --------------------------------------------------------------------------------------------------------
# The Link header
# --------------------------------------------------------------------------------------------------------


def follow(service, url):
    """Every id from `url` on, page by page through Link: rel="next"; and the Link targets seen."""
    ids, links = [], []
    while url:
        page = service.client.get(url)
        ids += ids_of(page)
        m = re.match(r'<([^>]+)>; rel="next"', page.headers.get("Link", ""))
        url = m.group(1) if m else None
        if url:
            links.append(url)
    return ids, links


def test_link_carries_the_terms_as_written_and_every_objects(service):
    made = crafted(service, *[("dog",), ("cat", "person"), ("mouse",), ("car",), ("dog", "person")] * 3)
    everything, _ = follow(service, "/images?objects=dog,cat,mouse,person")
    assert everything == sorted((i for i, n in zip(made, [0, 1, 2, 3, 4] * 3, strict=True) if n != 3), reverse=True)
    ids, links = follow(service, "/images?objects=dogs&objects=CATS,mice&objects=people&limit=2")
    assert ids == everything and len(links) == 5
    for link in links:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)
        assert query["objects"] == ["dogs", "cats,mice", "people"] and query["match"] == ["any"]
    # match=all and min_confidence ride along; categories expand the same way on every page.
    ids, links = follow(service, "/images?objects=animal&objects=person&match=all&min_confidence=0.5&limit=1")
    assert ids == sorted((i for i, n in zip(made, [0, 1, 2, 3, 4] * 3, strict=True) if n in (1, 4)), reverse=True)
    assert len(links) == 5 and all("objects=animal&objects=person&match=all&min_confidence=0.5" in u for u in links)
