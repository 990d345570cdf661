"""The Great Expectations suite over subject photos names each bad file and rule."""

import shutil

import pytest
from PIL import Image

from atelier.kernel.settings import ImageRules
from atelier.models.validation.subject_suite import validate_subject_images

RULES = ImageRules()


def _folder(tmp_path, photos):
    folder = tmp_path / "set"
    folder.mkdir()
    for p in photos:
        shutil.copy(p, folder / p.name)
    return folder


def test_good_set_passes_with_data_docs(tmp_path, photos):
    report = validate_subject_images(_folder(tmp_path, photos), RULES, tmp_path / "report")
    assert report.success and report.failures == []
    assert (tmp_path / "report" / "validation.json").is_file()
    assert report.data_docs and report.data_docs.endswith("index.html")
    assert (tmp_path / "report").glob("gx/uncommitted/data_docs/local_site/index.html")


def test_one_data_docs_site_keeps_every_run_and_renders_offline(tmp_path, photos):
    """Every validation of the workspace lands in one site: its index lists each run by data set and
    revision, a failed run included, and no page loads anything from the internet."""
    import re

    folder = _folder(tmp_path, photos)
    root = tmp_path / "gx"
    for label, rev in (("acme/robot", "aaaa"), ("acme/robot", "bbbb"), ("beta/cat", "cccc")):
        assert validate_subject_images(folder, RULES, tmp_path / rev, label=label, docs_root=root, run_name=f"{label}@{rev}").success
    (folder / "corrupt.jpg").write_bytes(b"not an image")
    failed = validate_subject_images(folder, RULES, tmp_path / "dddd", label="beta/cat", docs_root=root, run_name="beta/cat@dddd")
    assert not failed.success and failed.data_docs.endswith("local_site/index.html")
    site = root / "gx" / "uncommitted" / "data_docs" / "local_site"
    index = (site / "index.html").read_text()
    for run in ("acme.robot@aaaa", "acme.robot@bbbb", "beta.cat@cccc", "beta.cat@dddd"):
        assert run in index
    pages = list(site.rglob("*.html"))
    assert len(pages) >= 6  # index, the suite, four validations
    remote = re.compile(r"""<(?:link|script)\b[^>]*(?:href|src)=["']https?://""", re.I)
    assert not [p for p in pages if remote.search(p.read_text())]
    assert "great-expectations-web-assets" not in index  # GX's logo (with the project id in its URL) is the local copy
    for asset in ("bootstrap.min.css", "bootstrap.bundle.min.js", "jquery.min.js", "table-lite.js", "fontawesome/css/all.min.css"):
        assert (site / "static" / "offline" / asset).is_file(), asset
    deep = next(site.glob("validations/*/*/*/*.html")).read_text()
    assert 'src="../../../../static/offline/jquery.min.js"' in deep


def test_each_bad_file_is_named_with_its_rule(tmp_path, photos):
    folder = _folder(tmp_path, photos)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "notes.txt").write_text("hello")
    Image.open(photos[0]).resize((100, 120)).save(folder / "tiny.png")
    shutil.copy(photos[1], folder / "copy.jpg")
    Image.open(photos[2]).save(folder / "again.png")  # same picture, other encoding
    Image.open(photos[3]).save(folder / "anim.gif")
    report = validate_subject_images(folder, RULES, None)
    found = {(f, rule) for f, rule, _ in report.failures}

    def pair_flagged(rule, a, b):  # one of the two is flagged, and its detail names the other
        return any(r == rule and {f, other} == {a, b} for f, r, d in report.failures for other in (a, b) if other in d and other != f)

    assert not report.success
    assert ("corrupt.jpg", "decodable") in found
    assert ("notes.txt", "decodable") in found
    assert ("tiny.png", "min_side") in found
    assert pair_flagged("exact_duplicate", "copy.jpg", photos[1].name)
    assert pair_flagged("near_duplicate", "again.png", photos[2].name)
    assert ("anim.gif", "format") in found
    assert photos[0].name not in {f for f, _ in found}


@pytest.mark.parametrize("count", [2, 21])
def test_too_few_or_too_many(tmp_path, count):
    from atelier.cli.demo_data import write_demo_photos

    folder = tmp_path / "set"
    write_demo_photos(folder, count=count, size=260)
    report = validate_subject_images(folder, RULES, None)
    rules = {rule for _, rule, _ in report.failures}
    assert "count" in rules
    assert any(str(count) in detail for _, rule, detail in report.failures if rule == "count")


def test_empty_folder_fails_count(tmp_path):
    (tmp_path / "empty").mkdir()
    report = validate_subject_images(tmp_path / "empty", RULES, None)
    assert not report.success and report.failures[0][1] == "count"


def test_size_is_measured_after_exif_orientation(tmp_path, photos):
    folder = _folder(tmp_path, photos)
    img = Image.open(photos[0]).resize((600, 250))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    img.save(folder / "rotated.jpg", exif=exif)
    report = validate_subject_images(folder, RULES, None)
    row = next(f for f in report.facts if f["file"] == "rotated.jpg")
    assert (row["width"], row["height"]) == (250, 600)
    assert ("rotated.jpg", "min_side") in {(f, r) for f, r, _ in report.failures}
