"""`difflab export --format diffusers` and `difflab import`: a run as a diffusers pipeline
folder, and a diffusers UNet2DModel or DiTTransformer2DModel folder (the same subset) as a
difflab run.

    DIR/model_index.json                         DDPMPipeline: unet + scheduler (a U-Net run)
    DIR/unet/config.json                         UNet2DModel arguments (mapping.unet2d_config)
    DIR/unet/diffusion_pytorch_model.safetensors weights mapped key by key (keys.py)
  a DiT run (pixels: DiTPipeline.from_pretrained(DIR, vae=None)) has instead:
    DIR/transformer/config.json                  DiTTransformer2DModel arguments (dit_keys.py)
    DIR/transformer/diffusion_pytorch_model.safetensors
    DIR/scheduler/scheduler_config.json          DDPMScheduler: the betas, prediction_type
    DIR/difflab.json                             the run's config and data.json (for import)
    DIR/README.md                                the model card (card.py)
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from difflab import build
from difflab.config import ConfigError, RunConfig, preset
from difflab.model import DataKind
from difflab.runs import load_run
from difflab.share import dit_keys, mapping
from difflab.share.card import model_card
from difflab.share.folders import publish_folder
from difflab.share.keys import from_diffusers, to_diffusers
from difflab.training.checkpoint import save_checkpoint

DIFFUSERS_VERSION = "0.30.0"  # the config format written; newer diffusers read it
WEIGHTS = "diffusion_pytorch_model.safetensors"
IMPORT_PREDICTIONS = {v: k for k, v in mapping.PREDICTIONS.items()}


def _json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def _plain(config: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


# the pipeline, the network's subfolder and class of each exportable difflab network
PIPELINES = {
    "unet": ("DDPMPipeline", "unet", "UNet2DModel"),
    "dit": ("DiTPipeline", "transformer", "DiTTransformer2DModel"),
}


def _network(run) -> tuple[dict, dict]:
    """(diffusers config, weights) of the run's network; NoEquivalent where it has none."""
    cfg, state = run.cfg, run.model.net.state_dict()
    if cfg.model.name == "dit":
        config = dit_keys.transformer_config(cfg.model, run.shape, run.num_classes)
        # pipelines call step i with timestep i - 1: fold that shift in, as for the U-Net
        return config, dit_keys.to_diffusers(state, cfg.model, one_step=True)
    config = mapping.unet2d_config(cfg.model, run.shape, run.num_classes)
    return config, to_diffusers(state, cfg.model.unet)


def export_diffusers(run_dir, out, *, raw: bool = False, force: bool = False, checkpoint=None):
    """Write the run's network as a DDPMPipeline (U-Net) or DiTPipeline (DiT) folder `out`;
    returns it.

    Raises ConfigError (NoEquivalent) naming the part with no diffusers equivalent.
    """
    run = load_run(run_dir, checkpoint=checkpoint, use_ema=not raw, device="cpu")
    cfg = run.cfg
    try:
        mapping.check_kind(run.model.kind)
        mapping.check_exportable(cfg.model, cfg.diffusion)
        net_config, weights = _network(run)
    except mapping.NoEquivalent as e:
        raise ConfigError(f"cannot export {run.run_dir} to diffusers: {e}") from None
    pipeline, sub, net_class = PIPELINES[cfg.model.name]
    d = cfg.diffusion
    scheduler = {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        **mapping.scheduler_config(d),
        "trained_betas": run.model.schedule.betas.tolist(),  # exactly difflab's table
        "variance_type": "fixed_small",
        "clip_sample": d.clip_x0 > 0,
        "clip_sample_range": d.clip_x0 or 1.0,
        "timestep_spacing": cfg.sample.spacing
        if cfg.sample.spacing in ("leading", "trailing", "linspace")
        else "trailing",
        "set_alpha_to_one": True,
        "steps_offset": 0,
    }
    card = model_card(run, "raw" if raw else "EMA", run.num_classes > 0)

    index = {
        "_class_name": pipeline,
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", "DDPMScheduler"],
        sub: ["diffusers", net_class],
    }
    if cfg.model.name == "dit":
        index["vae"] = [None, None]  # pixels: DiTPipeline's VAE is absent

    def write(tmp: Path) -> None:
        _json(tmp / "model_index.json", index)
        header = {"_class_name": net_class, "_diffusers_version": DIFFUSERS_VERSION}
        _json(tmp / sub / "config.json", {**header, **_plain(net_config)})
        save_file(weights, tmp / sub / WEIGHTS, metadata={"format": "pt"})
        _json(tmp / "scheduler" / "scheduler_config.json", scheduler)
        _json(
            tmp / "difflab.json",
            {
                "config": cfg.to_dict(),
                "data": run.model.kind.info(),
                "step": run.step,
                "ema": not raw,
            },
        )
        (tmp / "README.md").write_text(card)

    return publish_folder(Path(out), force, write)


def _read(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {what} {path}: {e}") from None


def _unet_settings(c: dict) -> dict:
    """difflab UNetConfig fields for a UNet2DModel config, or NoEquivalent for the first
    setting difflab's U-Net does not have."""
    channels = list(c.get("block_out_channels", (224, 448, 672, 896)))
    base, n = channels[0], len(channels)
    down = c.get("down_block_types", ())
    fixed = dict(
        time_embedding_type="positional",
        flip_sin_to_cos=True,
        freq_shift=0,
        act_fn="silu",
        class_embed_type=None,
        norm_eps=1e-5,
        center_input_sample=False,
        resnet_time_scale_shift="default",
        downsample_type="conv",
        upsample_type="conv",
        downsample_padding=1,
        mid_block_scale_factor=1,
        attn_norm_num_groups=None,
        time_embedding_dim=None,
        num_train_timesteps=None,
    )
    for key, value in fixed.items():
        if key in c and c[key] != value:
            raise mapping.NoEquivalent(f"difflab's U-Net has no {key}={c[key]!r}")
    if c.get("in_channels", 3) != c.get("out_channels", 3) or any(ch % base for ch in channels):
        raise mapping.NoEquivalent(
            "channels: out_channels must equal in_channels and every "
            "block_out_channels a multiple of the first"
        )
    attn = tuple(i for i, t in enumerate(down) if t == "AttnDownBlock2D")
    ups = [f"Attn{t[4:]}" if t.startswith("Attn") else t for t in c.get("up_block_types", ())]
    expected = ["AttnUpBlock2D" if i in attn else "UpBlock2D" for i in reversed(range(n))]
    if len(down) != n or set(down) - {"DownBlock2D", "AttnDownBlock2D"} or ups != expected:
        raise mapping.NoEquivalent(f"block types {down} / {ups} (difflab mirrors its levels)")
    attended = [channels[i] for i in attn] + ([channels[-1]] if c.get("add_attention") else [])
    head_dim = c.get("attention_head_dim")
    heads = {ch // (head_dim or ch) for ch in attended} or {1}
    if len(heads) > 1 or any(ch % (head_dim or ch) for ch in attended):
        raise mapping.NoEquivalent(f"attention_head_dim={head_dim} gives blocks unequal heads")
    return dict(
        base_channels=base,
        channel_mults=tuple(ch // base for ch in channels),
        num_res_blocks=c.get("layers_per_block", 2),
        attention_levels=attn,
        num_heads=heads.pop(),
        mid_attention=c.get("add_attention", True),
        dropout=c.get("dropout", 0.0),
        norm_groups=c.get("norm_num_groups", 32),
    )


def _dit_settings(c: dict) -> dict:
    """difflab DiTConfig fields for a DiTTransformer2DModel config, or NoEquivalent for the
    first setting difflab's DiT does not have."""
    fixed = dict(
        norm_type="ada_norm_zero",
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        upcast_attention=False,
    )
    for key, value in fixed.items():
        if c.get(key, value) != value:
            raise mapping.NoEquivalent(f"difflab's DiT has no {key}={c[key]!r}")
    if c.get("out_channels") not in (None, c.get("in_channels", 4)):
        raise mapping.NoEquivalent(
            f"out_channels={c['out_channels']} (a learned variance): difflab's DiT outputs "
            "in_channels"
        )
    heads, head_dim = c.get("num_attention_heads", 16), c.get("attention_head_dim", 72)
    return dict(
        width=heads * head_dim,
        depth=c.get("num_layers", 28),
        heads=heads,
        mlp_ratio=4.0,
        patch_size=c.get("patch_size", 2),
        dropout=c.get("dropout", 0.0),
        qk_norm=False,
        text="",
    )


def _import_config(folder: Path, sub: str, net: dict, sched: dict) -> tuple[RunConfig, DataKind]:
    """The difflab config and data kind of a diffusers folder (difflab.json's when present);
    `net` is the config of its network in subfolder `sub` (unet or transformer)."""
    if sub == "transformer":  # num_embeds_ada_norm rows + the null label; 0 = unconditional
        classes, size, default = net.get("num_embeds_ada_norm") or 0, 32, 4
    else:  # the last embedding is the null label
        classes, size, default = (net.get("num_class_embeds") or 1) - 1, 32, 3
    shape = (
        net.get("in_channels", default),
        net.get("sample_size", size),
        net.get("sample_size", size),
    )
    if (folder / "difflab.json").is_file():
        saved = _read(folder / "difflab.json", "difflab export record")
        cfg, kind = RunConfig.from_dict(saved["config"]), DataKind.from_info(saved["data"])
    else:
        pixels = "mnist" if shape[0] == 1 else "cifar10"
        cfg = preset("mnist-dit" if sub == "transformer" else pixels)
        cfg.data.channels, cfg.data.image_size = shape[0], shape[1]
        cfg.data.class_conditional = classes > 0
        kind = DataKind(shape, classes, tuple(str(k) for k in range(classes)))
    if sub == "transformer":
        cfg.model.name = "dit"
        cfg.model.dit = dataclasses.replace(cfg.model.dit, **_dit_settings(net))
    else:
        cfg.model.name = "unet"
        cfg.model.unet = dataclasses.replace(cfg.model.unet, **_unet_settings(net))
    if sched.get("prediction_type", "epsilon") not in IMPORT_PREDICTIONS:
        raise mapping.NoEquivalent(f"prediction_type={sched.get('prediction_type')!r}")
    cfg.diffusion.prediction = IMPORT_PREDICTIONS[sched.get("prediction_type", "epsilon")]
    cfg.diffusion.clip_x0 = (
        float(sched.get("clip_sample_range", 1.0)) if sched.get("clip_sample", True) else 0.0
    )
    _match_betas(cfg, sched)
    return cfg, kind


def _match_betas(cfg: RunConfig, sched: dict) -> None:
    """Set cfg's schedule to the difflab table equal to the folder's betas, or refuse."""
    from difflab.diffusion.adapters import betas_from_config

    betas = betas_from_config(sched)
    if len(betas) != mapping.EMBEDDED_STEPS:
        raise mapping.NoEquivalent(f"num_train_timesteps={len(betas)} (difflab embeds t * 1000)")
    d = cfg.diffusion
    d.num_steps = len(betas)
    candidates = [("linear", float(betas[0]), float(betas[-1])), ("cosine", 1e-4, 0.02)]
    for name, start, end in candidates:
        d.schedule, d.beta_start, d.beta_end = name, start, end
        ours = build.build_schedule(d).betas
        if torch.allclose(ours, betas, rtol=1e-6, atol=1e-9):
            return
    raise mapping.NoEquivalent("betas that are neither a linear nor a cosine table")


def _network_folder(folder: Path) -> tuple[str, dict]:
    """The network subfolder of a diffusers folder (unet or transformer) and its config."""
    for sub in ("unet", "transformer"):
        if (folder / sub / "config.json").is_file() and (folder / sub / WEIGHTS).is_file():
            break
    else:
        raise ConfigError(
            f"{folder} is not a diffusers model folder (no unet/ or transformer/ config.json "
            f"and {WEIGHTS}); export one with `difflab export RUN --format diffusers`"
        )
    net = _read(folder / sub / "config.json", f"{sub} config")
    expected = PIPELINES["unet" if sub == "unet" else "dit"][2]
    if net.get("_class_name") != expected:
        raise ConfigError(f"{folder}: {sub} is a {net.get('_class_name')}, not a {expected}")
    return sub, net


def import_diffusers(folder, name: str, runs="runs") -> Path:
    """Make RUNS/NAME a difflab run holding the folder's UNet2DModel or DiTTransformer2DModel
    as checkpoint step-0."""
    folder = Path(folder)
    sub, net = _network_folder(folder)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = _read(sched_path, "scheduler config") if sched_path.is_file() else {}
    try:
        cfg, kind = _import_config(folder, sub, net, sched)
        theirs = load_file(folder / sub / WEIGHTS)
        if sub == "transformer":  # the export's one-step fold, undone (dit_keys.py)
            state = dit_keys.from_diffusers(theirs, cfg.model, one_step=True)
        else:
            state = from_diffusers(theirs, cfg.model.unet)
    except mapping.NoEquivalent as e:
        raise ConfigError(f"cannot import {folder}: {e}") from None
    except SafetensorError as e:
        raise ConfigError(f"cannot read {folder / sub / WEIGHTS}: {e}") from None
    model = build.build_model(cfg, kind, torch.device("cpu"))
    try:
        model.net.load_state_dict(state)
    except RuntimeError as e:
        raise ConfigError(f"cannot import {folder}: weights do not fit ({e})"[:400]) from None
    run_dir = Path(runs) / name

    def write(tmp: Path) -> None:
        for sub in ("samples", "plots"):
            (tmp / sub).mkdir()
        cfg.save(tmp / "config.json")
        save_checkpoint(
            tmp / "checkpoints",
            0,
            model.net,
            model.net,
            fresh_state(cfg, model),
            cfg.to_dict(),
            kind.info(),
            keep=1,
        )

    return publish_folder(run_dir, False, write)


def fresh_state(cfg: RunConfig, model) -> dict:
    """state.pt of a run at step 0: optimizer and EMA as training would start them; no data
    stream position (a resumed run opens its stream fresh)."""
    from difflab import devices

    t = cfg.train
    optimizer = devices.adamw(model.net, t.lr, t.betas, t.weight_decay)
    ema = {"decay": t.ema_decay, "warmup": t.ema_warmup, "num_updates": 0}  # EMA.state_dict()
    return {
        "step": 0,
        "optimizer": optimizer.state_dict(),
        "ema": ema,
        "data": None,
        "loss_generator": torch.Generator().manual_seed(t.seed + 1).get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": [],
        "scaler": {},
        "smoothed_loss": None,
        "best": {},
    }
