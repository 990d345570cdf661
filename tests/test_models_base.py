"""Tokenizer, tiny model, base-model checks and the training config: no Prefect, no MLflow."""

import json
import shutil

import pytest
import yaml

from atelier.kernel.errors import ConfigError, ModelFormatError
from atelier.kernel.hashing import tree_hash
from atelier.models.dreambooth.base import check_sd_directory
from atelier.models.dreambooth.config import TrainConfig, load_train_config
from atelier.models.dreambooth.tiny import write_tiny_model
from atelier.models.dreambooth.tokenizer import write_clip_tokenizer
from atelier.tasks.dreambooth import TINY_CONFIG


def test_tokenizer_gives_clip_ids(tmp_path):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp_path)))
    assert tok("a photo of sks dog").input_ids == [49406, 320, 1125, 539, 48136, 1929, 49407]
    assert len(tok) == 49408


def test_tiny_model_is_reproducible(tmp_path, tiny_model):
    again = write_tiny_model(tmp_path / "again")
    assert tree_hash(again) == tree_hash(tiny_model)
    assert check_sd_directory(again) == again


def test_base_model_checks_name_the_problem(tmp_path, tiny_model):
    with pytest.raises(ModelFormatError, match="not a directory"):
        check_sd_directory(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFormatError, match="model_index.json"):
        check_sd_directory(tmp_path / "empty")
    sdxl = tmp_path / "sdxl"
    shutil.copytree(tiny_model, sdxl)
    index = json.loads((sdxl / "model_index.json").read_text())
    (sdxl / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ModelFormatError, match="StableDiffusionXLPipeline"):
        check_sd_directory(sdxl)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelFormatError, match="unet"):
        check_sd_directory(broken)


def test_config_unknown_key_names_key_and_fix(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rat: 1e-4\n")
    with pytest.raises(ConfigError) as err:
        load_train_config(cfg)
    assert "learning_rat" in str(err.value) and "spelling" in str(err.value)


def test_config_bad_values_and_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_train_steps: -3\n")
    with pytest.raises(ConfigError, match="max_train_steps"):
        load_train_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="YAML"):
        load_train_config(broken)
    with pytest.raises(ConfigError, match="no such config"):
        load_train_config(tmp_path / "none.yaml")


def test_documented_sd15_file_matches_the_defaults():
    """configs/dreambooth/sd15.yaml documents every default; keep the two in step."""
    from atelier.kernel.gitinfo import SOURCE_ROOT

    documented = yaml.safe_load((SOURCE_ROOT / "configs" / "dreambooth" / "sd15.yaml").read_text())
    assert set(documented) == set(TrainConfig.model_fields)
    assert TrainConfig(**documented) == TrainConfig()


def test_tiny_profile_loads():
    cfg = load_train_config(TINY_CONFIG)
    assert cfg.resolution == 64 and cfg.with_prior_preservation and cfg.train_text_encoder
