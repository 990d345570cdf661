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


def _break(model, how):
    if how == "unet without weights":
        (model / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    elif how == "config not JSON":
        (model / "vae" / "config.json").write_text("{not json")
    elif how == "garbage tokenizer":
        (model / "tokenizer" / "tokenizer.json").write_bytes(b"\x89PNG garbage \xff")
    elif how == "weights swapped":
        unet, vae = (model / p / "diffusion_pytorch_model.safetensors" for p in ("unet", "vae"))
        data = unet.read_bytes()
        unet.write_bytes(vae.read_bytes())
        vae.write_bytes(data)
    elif how == "config of another size":
        config = json.loads((model / "text_encoder" / "config.json").read_text())
        (model / "text_encoder" / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    elif how == "scheduler config missing":
        (model / "scheduler" / "scheduler_config.json").unlink()
        (model / "scheduler" / "notes.txt").write_text("x")


@pytest.mark.parametrize(
    ("how", "named", "problem"),
    [
        ("unet without weights", "unet", "has no weights"),
        ("config not JSON", "vae/config.json", "is not valid JSON"),
        ("garbage tokenizer", "tokenizer/tokenizer.json", "is not valid JSON"),
        ("weights swapped", "unet/diffusion_pytorch_model.safetensors", "holds no conv_in.weight"),
        ("config of another size", "text_encoder/model.safetensors", "weights and config differ"),
        ("scheduler config missing", "scheduler/scheduler_config.json", "is missing"),
    ],
)
def test_a_broken_base_model_is_refused_naming_the_component(tmp_path, tiny_model, how, named, problem):
    """What used to end as 'Cannot copy out of meta tensor' or a JSONDecodeError after the flow started:
    refused by the check every command runs first (exit 2), naming the file."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    _break(model, how)
    with pytest.raises(ModelFormatError) as err:
        check_sd_directory(model)
    assert err.value.exit_code == 2 and str(err.value).startswith(str(model / named)) and problem in str(err.value)


def test_lora_targets_the_base_model_lacks_are_refused_before_a_run(tiny_model):
    from atelier.models.dreambooth.base import check_lora_targets
    from atelier.models.dreambooth.config import LoraConfig

    defaults = LoraConfig()
    check_lora_targets(tiny_model, defaults.unet_target_modules, defaults.text_encoder_target_modules)  # the defaults fit SD
    with pytest.raises(ModelFormatError, match=r"lora.text_encoder_target_modules \['qproj'\]: names no module") as err:
        check_lora_targets(tiny_model, defaults.unet_target_modules, ["qproj", "k_proj"])
    assert err.value.exit_code == 2 and "q_proj" in err.value.fix


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
