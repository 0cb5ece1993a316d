import json
from pathlib import Path

import pytest

from difflab.config import PRESETS, ConfigError, RunConfig, apply_overrides, preset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", PRESETS)
def test_round_trip(name, tmp_path):
    cfg = preset(name)
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    cfg.save(tmp_path / "c.json")
    assert RunConfig.load(tmp_path / "c.json") == cfg


@pytest.mark.parametrize("name", PRESETS)
def test_config_files_match_presets(name):
    # configs/*.json are the presets as files users can copy; they must not drift
    assert RunConfig.load(CONFIGS / f"{name}.json") == preset(name)


def test_overrides_coerce_types():
    cfg = apply_overrides(
        preset("toy2d"),
        [
            "train.lr=1e-3",
            "train.steps=5",
            "train.ema_warmup=false",
            "data.name=moons",
            "train.betas=0.9,0.99",
        ],
    )
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 5 and cfg.train.ema_warmup is False
    assert cfg.data.name == "moons" and cfg.train.betas == (0.9, 0.99)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lrr=1", "no such config key"),
        ("trian.lr=1", "not a config section"),
        ("train.steps=ten", "must be of type int"),
        ("train.steps=1.5", "must be of type int"),
        ("train.lr", "section.key=value"),
    ],
)
def test_bad_overrides_say_what_is_wrong(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(preset("toy2d"), [override])


def test_unknown_keys_in_files(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"train": {"stepz": 3}}))
    with pytest.raises(ConfigError, match=r"train\.stepz"):
        RunConfig.load(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("imagenet")


def test_data_channels_is_the_data_sets_own_unless_an_image_folder():
    # Fixed data sets leave data.channels at 0 (their own); an image folder converts to 3.
    assert {preset(n).data.channels for n in PRESETS if preset(n).data.name != "imagefolder"} == {0}
    assert preset("imagefolder").data.channels == 3
    # A config saved when the field defaulted to 3 everywhere reads as "the data set's own",
    # while the same 3 asked for by --set stays (build refuses it for mnist).
    saved = preset("mnist").to_dict()
    saved["data"]["channels"] = 3
    assert RunConfig.from_dict(saved).data.channels == 0
    assert apply_overrides(preset("mnist"), ["data.channels=3"]).data.channels == 3
    folder = apply_overrides(preset("imagefolder"), ["data.channels=1"]).to_dict()
    assert RunConfig.from_dict(folder).data.channels == 1
    folder["data"]["channels"] = 3
    assert RunConfig.from_dict(folder).data.channels == 3
