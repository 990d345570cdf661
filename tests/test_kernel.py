import os
import time

import pytest

from atelier.kernel.errors import ConfigError, InvalidIdentifier
from atelier.kernel.hashing import tree_hash, value_hash
from atelier.kernel.settings import Settings, load_settings
from atelier.kernel.storage import atomic_dir, check_slug, write_json_atomic


@pytest.mark.parametrize("good", ["acme", "acme-2", "a_b", "0x"])
def test_slugs_accepted(good):
    assert check_slug(good, "customer") == good


@pytest.mark.parametrize("bad", ["", "..", "../x", "a/b", "A", "with space", ".hidden", "-lead", "x" * 64, "a.b"])
def test_slugs_refused_with_fix(bad):
    with pytest.raises(InvalidIdentifier) as err:
        check_slug(bad, "customer")
    assert "customer" in str(err.value) and "Fix:" in str(err.value)


def test_atomic_dir_keeps_old_content_on_failure(tmp_path):
    final = tmp_path / "set"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(final, replace=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (final / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["set"]  # no temporary leftovers


def test_atomic_dir_refuses_to_overwrite_without_replace(tmp_path):
    (tmp_path / "set").mkdir()
    with pytest.raises(FileExistsError):
        with atomic_dir(tmp_path / "set"):
            pass


def test_tree_hash_ignores_timestamps_but_not_content(tmp_path):
    (tmp_path / "a").write_text("1")
    first = tree_hash(tmp_path)
    os.utime(tmp_path / "a", (time.time() + 100, time.time() + 100))
    assert tree_hash(tmp_path) == first
    (tmp_path / "a").write_text("2")
    assert tree_hash(tmp_path) != first
    assert value_hash({"b": 1, "a": 2}) == value_hash({"a": 2, "b": 1})


def test_file_hashes_on_threads_are_each_files_sha256_in_path_order(tmp_path):
    """The threaded hashing gives what one sha256 per file in sorted path order gives (the hashes recorded in
    lineage and cache keys must not change), and leaves hidden files out."""
    import hashlib

    from atelier.kernel.hashing import file_hashes

    sizes = {"unet/w.safetensors": 3 << 20, "a.json": 10, "vae/w.safetensors": 1 << 20, "z/deep/x.bin": 0, "b.txt": 5}
    for i, (name, size) in enumerate(sizes.items()):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(bytes([i]) * size)
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "cache").write_text("not content")
    hashes = file_hashes(tmp_path)
    assert list(hashes) == sorted(sizes)
    assert hashes == {name: hashlib.sha256((tmp_path / name).read_bytes()).hexdigest() for name in sizes}
    assert tree_hash(tmp_path) == value_hash(hashes)


def test_json_written_atomically(tmp_path):
    path = write_json_atomic(tmp_path / "x" / "r.json", {"a": 1})
    assert path.read_text().strip().startswith("{")


def test_settings_yaml_under_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "atelier.yaml"
    cfg.write_text("experiment: from-yaml\nimages:\n  min_side: 128\n")
    monkeypatch.setenv("ATELIER_CONFIG", str(cfg))
    monkeypatch.setenv("ATELIER_IMAGES__MIN_SIDE", "300")
    s = load_settings()
    assert s.experiment == "from-yaml"
    assert s.images.min_side == 300  # the environment wins over the file


def test_settings_unknown_key_is_a_clear_error(tmp_path, monkeypatch):
    cfg = tmp_path / "atelier.yaml"
    cfg.write_text("experimnt: typo\n")
    monkeypatch.setenv("ATELIER_CONFIG", str(cfg))
    with pytest.raises(ConfigError, match="experimnt"):
        load_settings()


def test_settings_missing_config_file(monkeypatch, tmp_path):
    monkeypatch.setenv("ATELIER_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="names no file"):
        load_settings()


def test_derived_locations_live_in_the_workspace(tmp_path):
    s = Settings(workspace=tmp_path)
    assert s.resolved_tracking_uri == f"sqlite:///{tmp_path}/.atelier/mlflow.db"
    assert s.resolved_artifact_root.startswith("file://")
    assert set(s.describe()) >= {"MLflow tracking URI", "Prefect API", "DVC remote"}


@pytest.mark.parametrize("reserved", ["ledger", "admin", "atelier", "atelier-ops", "atelier_platform", "root", "default"])
def test_platform_names_refused_as_customers(reserved):
    from atelier.kernel.storage import check_customer

    with pytest.raises(InvalidIdentifier) as err:
        check_customer(reserved)
    assert "reserves" in str(err.value) and "Fix:" in str(err.value)
    assert check_customer("acme") == "acme" and check_customer("ledgerco") == "ledgerco"


def test_a_ctrl_c_swallowed_by_a_finalizer_still_stops_the_next_commit_point():
    """Python drops a KeyboardInterrupt raised inside __del__ ("Exception ignored in ..."): a fine-tune
    interrupted while dulwich's object store was collected registered and exited 0. The handler records the
    signal, so the next commit point raises it anyway."""
    import gc
    import os
    import signal
    import sys
    import time

    from atelier.kernel import interrupts

    old_handler, old_hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    try:
        interrupts.install()

        class Finalized:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)  # the handler runs here, inside the finalizer

        Finalized()
        gc.collect()
        with pytest.raises(KeyboardInterrupt):
            interrupts.check()
    finally:
        signal.signal(signal.SIGINT, old_handler)
        sys.unraisablehook = old_hook
        interrupts._interrupted.clear()
