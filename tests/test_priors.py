"""Class priors are seeded, content-addressed and reused from the cache."""

from atelier.kernel.hashing import file_hashes
from atelier.models.dreambooth.base import model_hash
from atelier.models.dreambooth.priors import PriorSpec, ensure_class_priors, read_manifest


def _spec(tiny_model, **change):
    base = dict(
        base_model_hash=model_hash(tiny_model),
        class_prompt="a photo of toy",
        count=3,
        resolution=64,
        seed=0,
        sampler="dpmsolver++",
        steps=4,
        guidance_scale=5.0,
    )
    return PriorSpec(**{**base, **change})


def test_cache_hit_reuses_without_regenerating(tiny_model, tmp_path):
    first = ensure_class_priors(tmp_path, _spec(tiny_model), tiny_model)
    stamp = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    second = ensure_class_priors(tmp_path, _spec(tiny_model), tiny_model)
    assert not first.reused and second.reused and second.path == first.path
    assert {p.name: p.stat().st_mtime_ns for p in second.path.iterdir()} == stamp
    assert read_manifest(first.path)["key"] == first.key
    assert len(list(first.path.glob("*.png"))) == 3


def test_every_part_of_the_key_matters(tiny_model):
    keys = {_spec(tiny_model).key}
    for change in (
        {"seed": 1},
        {"count": 4},
        {"resolution": 32},
        {"class_prompt": "a photo of dog"},
        {"sampler": "ddim"},
        {"base_model_hash": "0" * 64},
    ):
        keys.add(_spec(tiny_model, **change).key)
    assert len(keys) == 7


def test_same_spec_gives_the_same_images_anywhere(tiny_model, tmp_path):
    a = ensure_class_priors(tmp_path / "a", _spec(tiny_model), tiny_model, batch_size=3)
    b = ensure_class_priors(tmp_path / "b", _spec(tiny_model), tiny_model, batch_size=1)  # batching does not change images
    assert file_hashes(a.path) == file_hashes(b.path)
