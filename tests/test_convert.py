"""``karlo convert-original`` (karlo_model.convert, jobs/convert.py) end to end on tiny original-layout checkpoints.

The tiny networks (tests/original_layout.py) take the tiny model's CLIP text encoder (karlo_model.make_tiny_model,
diffusers layout) as their text side; the converted repo is loaded by the ordinary loader and generates.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fsspec
import pytest
import torch
from click.testing import CliRunner
from original_layout import (
    OriginalDecoder,
    OriginalPrior,
    OriginalSuperRes,
    TinyOriginal,
    decoder_checkpoint_state,
    prior_checkpoint_state,
    save_checkpoint,
    super_res_checkpoint_state,
    write_tiny_original,
)
from transformers import CLIPConfig, CLIPModel

from jobs.cli import main
from karlo_model import Karlo, make_tiny_model, preset
from karlo_model.clip_vision import tiny_vision_config
from karlo_model.convert import IMAGE_SIZE, SUPER_RES_HEAD_DIM, prior_config, text_proj_config, unet_config
from karlo_model.original import convert_decoder, convert_prior, convert_super_res, load_checkpoint
from karlo_model.repo import build_module
from karlo_model.weights import load_into

CLIP_DIM, TEXT_CTX, PRIOR_HEADS, HEAD_DIM = 32, 77, 2, 16  # the tiny text encoder's width; CLIP's 77 tokens


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> tuple[TinyOriginal, Path]:
    tmp = tmp_path_factory.mktemp("convert")
    nets = write_tiny_original(tmp, text_ctx=TEXT_CTX, clip_dim=CLIP_DIM, prior_width=32, prior_heads=PRIOR_HEADS,
                               xf_width=24, head_dim=HEAD_DIM, extra_tokens=4, decoder_size=64, dtype=torch.float32)
    return nets, make_tiny_model(tmp / "karlo-tiny")


def args(nets: TinyOriginal, text_encoder: Path | str, out: Path, **changed: str) -> list[str]:
    files = {"prior": nets.files["prior"], "decoder": nets.files["decoder"], "super-res": nets.files["sr"],
             "clip-stats": nets.files["stats"], "text-encoder": text_encoder} | changed
    heads = ["--prior-num-heads", str(PRIOR_HEADS), "--attention-head-dim", str(HEAD_DIM)]
    return ["convert-original", *(f"--{k}={v}" for k, v in files.items()), *heads, str(out)]


def test_converted_repo_loads_and_generates_with_the_original_sampling(sources, tmp_path):
    nets, tiny = sources
    out = tmp_path / "karlo-original"
    result = CliRunner().invoke(main, args(nets, tiny, out))
    assert result.exit_code == 0, result.output
    prior_sched = json.loads((out / "prior_scheduler" / "scheduler_config.json").read_text())
    assert prior_sched["clip_sample_range"] == 10.0 and prior_sched["float64_tables"] is True
    model = Karlo.from_pretrained(out)
    assert model.prior_schedule.cfg.clip_sample_range == 10.0 and model.decoder_schedule.table_dtype == torch.float64
    assert model.config.image_size == 256 and model.config.decoder.sample_size == 64
    # The weights are the checkpoint's: the prior's stats and an SR conv, unchanged.
    assert torch.equal(model.prior.clip_std.flatten(), nets.clip_std)
    assert torch.equal(model.super_res_last.conv_in.weight, nets.sr_last.input_blocks[0][0].weight)
    out_ = model.generate(["a horse"], [0], prior_steps=2, decoder_steps=2, super_res_steps=2)
    assert out_.images.shape == (1, 256, 256, 3) and out_.image_embeds.shape == (1, CLIP_DIM)


def test_text_encoder_from_a_clip_folder_and_checkpoints_from_urls(sources, tmp_path):
    """A CLIPTextModelWithProjection folder with its tokenizer files beside it (the Hugging Face layout), the
    checkpoints behind fsspec URLs; the stock CLIP tokenizer's padding is replaced by "!" (id 0)."""
    nets, tiny = sources
    clip = tmp_path / "clip"
    shutil.copytree(tiny / "text_encoder", clip)
    for f in (tiny / "tokenizer").iterdir():
        shutil.copy(f, clip / f.name)
    config = json.loads((clip / "tokenizer_config.json").read_text())
    (clip / "tokenizer_config.json").write_text(json.dumps(config | {"pad_token": "<|endoftext|>"}))
    fs = fsspec.filesystem("memory")
    fs.pipe("/orig/prior.ckpt", nets.files["prior"].read_bytes())
    out = tmp_path / "out"
    result = CliRunner().invoke(main, args(nets, clip, out, prior="memory://orig/prior.ckpt"))
    assert result.exit_code == 0, result.output
    model = Karlo.from_pretrained(out, stages=["prior"])
    assert model.tokenizer.pad_token == "!" and model.tokenizer.pad_token_id == 0
    reference = Karlo.from_pretrained(tiny, stages=["prior"])
    assert all(torch.equal(a, b) for a, b in zip(model.text_encoder.state_dict().values(),
                                                 reference.text_encoder.state_dict().values()))


def _fails(argv: list[str], match: str) -> None:
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == 2, result.output
    assert match in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_extra_and_missing_keys_are_named(sources, tmp_path):
    nets, tiny = sources
    sd = load_checkpoint(str(nets.files["decoder"]))
    extra = save_checkpoint(tmp_path / "extra.ckpt", sd | {"model.ema.decay": torch.tensor(0.9)})
    _fails(args(nets, tiny, tmp_path / "a", decoder=extra), "1 unexpected keys, not part of the known layout: "
                                                            "['model.ema.decay']")
    del sd["model.out.2.bias"]
    missing = save_checkpoint(tmp_path / "missing.ckpt", sd)
    _fails(args(nets, tiny, tmp_path / "b", decoder=missing), "missing key 'model.out.2.bias'")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_wrong_head_count_and_mismatched_text_encoder(sources, tmp_path):
    nets, tiny = sources
    argv = args(nets, tiny, tmp_path / "a")
    _fails([a if a != str(PRIOR_HEADS) else "3" for a in argv], "width 32 does not split into 3 heads")
    other = make_tiny_model(tmp_path / "alt", preset_name="tiny-alt")
    _fails(args(nets, other, tmp_path / "b"), "do not make one model")


def test_refuses_a_non_empty_output_and_a_missing_text_encoder(sources, tmp_path):
    nets, tiny = sources
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    _fails(args(nets, tiny, tmp_path / "full"), "is not empty")
    _fails(args(nets, tmp_path / "nowhere", tmp_path / "c"), "is not a folder")


def test_full_size_configs_read_off_the_weights_are_the_hub_configs():
    """On the meta device: the original structures at full size give kakaobrain/karlo-v1-alpha's configs."""
    hub = preset("karlo-v1-alpha")
    with torch.device("meta"):
        prior = convert_prior(prior_checkpoint_state(OriginalPrior()), torch.empty(768), torch.empty(768))
        decoder, text_proj = convert_decoder(decoder_checkpoint_state(OriginalDecoder()))
        first, last = convert_super_res(super_res_checkpoint_state(OriginalSuperRes(), OriginalSuperRes()))
    assert prior_config(prior, 32) == hub.prior
    assert text_proj_config(text_proj) == hub.text_proj
    assert unet_config(decoder, conditional=True, sample_size=64, head_dim=64, cross_attention_dim=1536) == hub.decoder
    sr = dict(conditional=False, head_dim=SUPER_RES_HEAD_DIM)
    assert unet_config(first, sample_size=IMAGE_SIZE, **sr) == hub.super_res_first
    assert unet_config(last, sample_size=None, **sr) == hub.super_res_last
    # 0 missing, 0 unexpected, 0 mis-shaped keys: a strict load into the project's own networks.
    state = dict(prior=prior, decoder=decoder, text_proj=text_proj, super_res_first=first, super_res_last=last)
    for comp, sd in state.items():
        with torch.device("meta"):
            load_into(build_module(hub, comp), sd, comp)


def test_text_encoder_from_a_whole_clip_model(sources, tmp_path):
    """The layout of openai/clip-vit-large-patch14: a CLIPModel whose text half is kept, vision half dropped."""
    nets, tiny = sources
    text_config = json.loads((tiny / "text_encoder" / "config.json").read_text())
    clip = CLIPModel(CLIPConfig(text_config=text_config, vision_config=tiny_vision_config(CLIP_DIM, image_size=32),
                                projection_dim=CLIP_DIM))
    folder = tmp_path / "clip-vit"
    clip.save_pretrained(folder)
    for f in (tiny / "tokenizer").iterdir():
        shutil.copy(f, folder / f.name)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, args(nets, folder, out))
    assert result.exit_code == 0, result.output
    encoder = Karlo.from_pretrained(out, stages=["prior"]).text_encoder
    assert torch.equal(encoder.text_projection.weight, clip.text_projection.weight)
    assert torch.equal(encoder.text_model.final_layer_norm.weight, clip.text_model.final_layer_norm.weight)
    assert not list((out / "text_encoder").glob("*.bin"))


class Opaque:
    """A custom class: loading it would need arbitrary unpickling."""


def test_arbitrary_pickles_and_missing_files_are_refused(sources, tmp_path):
    nets, tiny = sources
    evil = tmp_path / "prior.ckpt"
    torch.save({"state_dict": load_checkpoint(str(nets.files["prior"])), "hyper_parameters": Opaque()}, evil)
    _fails(args(nets, tiny, tmp_path / "a", prior=evil), "never unpickled")
    _fails(args(nets, tiny, tmp_path / "b", **{"clip-stats": tmp_path / "none.th"}), "not found")


@pytest.mark.slow
def test_karlo_generate_takes_a_converted_repo(sources, tmp_path, ray_local):
    """The converted repo through the whole pipeline: every row written, one row per batch equal bit for bit to
    Karlo.generate of that row alone on the same repo (original sampling included)."""
    from pipeline_utils import PROMPTS, read_output, reference, write_table
    from processes import FEW_STEPS, ONE_ROW_STAGES

    nets, tiny = sources
    repo = tmp_path / "karlo-original"
    assert CliRunner().invoke(main, args(nets, tiny, repo)).exit_code == 0
    table = write_table(tmp_path / "prompts.parquet", id=["a", "b"], prompt=PROMPTS[:2], seed=[7, 8])
    stages = tmp_path / "stages.yaml"
    stages.write_text(ONE_ROW_STAGES)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["generate", str(table), str(out), "--model", str(repo), *FEW_STEPS,
                                       "--stage-config", str(stages), "--progress-interval", "0"])
    assert result.exit_code == 0, result.output
    images = read_output(out).images()
    expected, _, _ = reference(str(repo), PROMPTS[:2], [7, 8])
    for key, image in zip(["a", "b"], expected):
        assert (images[key] == image).all(), key
