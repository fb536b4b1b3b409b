"""Loading diffusers-format Karlo repos (karlo_model.weights, Karlo.from_pretrained): every error a user can reach,
with its message, and the formats and places weights come from.

* errors: no folder, no model_index.json, a model_index that is not Karlo's, a component without weights, a missing
  config file, unsupported or unknown config values, weight files with missing / unexpected / mis-shaped keys, a
  corrupt safetensors, a pickle that would run code (refused without running it), a file that is not PyTorch's;
* accepted: plain ``.bin`` state dicts (with the text encoder's ``position_ids`` buffer of the hub files), sharded
  safetensors, ``super_res_last`` with ``"sample_size": null``, both model_index spellings of text_proj;
* fsspec URLs (memory:// and a local S3 server): copied once into KARLO_CACHE, one weight format per component,
  only the weights of the stages asked for;
* ``stages=("decoder",)`` loads no prior and no text encoder.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from parity_utils import single_thread  # noqa: F401 (fixture)
from pipeline_utils import Payload
from safetensors.torch import load_file, save_file

from karlo_model import Karlo, WeightsError, make_tiny_model
from karlo_model.noise import generator_states, generators_from_seeds

COMPONENTS = ("prior", "text_proj", "decoder", "super_res_first", "super_res_last", "text_encoder")
WEIGHTS = {c: "model.safetensors" if c == "text_encoder" else "diffusion_pytorch_model.safetensors" for c in COMPONENTS}


@pytest.fixture(scope="module")
def base_repo(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("base") / "model", seed=0)


@pytest.fixture
def repo(base_repo, tmp_path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(base_repo, tmp_path / "model"))


def load_error(path, **kwargs) -> str:
    with pytest.raises(WeightsError) as info:
        Karlo.from_pretrained(path, **kwargs)
    return str(info.value)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def state_dicts_equal(a: Karlo, b: Karlo) -> None:
    assert a.modules.keys() == b.modules.keys()
    for name in a.modules:
        sa, sb = a.modules[name].state_dict(), b.modules[name].state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name


# ---------------------------------------------------------------------------------------------------------------
# The repo layout


def test_missing_model_folder(tmp_path):
    assert f"model folder {tmp_path / 'nowhere'} does not exist" in load_error(tmp_path / "nowhere")


def test_missing_model_index(repo):
    (repo / "model_index.json").unlink()
    assert f"missing file {repo / 'model_index.json'}" in load_error(repo)


def test_model_index_not_json(repo):
    (repo / "model_index.json").write_text("{not json")
    assert "model_index.json is not valid JSON" in load_error(repo)


def test_model_index_of_another_pipeline(repo):
    edit_json(repo / "model_index.json", decoder=["diffusers", "UNet2DModel"])
    message = load_error(repo)
    assert "expected 'decoder' to be a UNet2DConditionModel" in message and "UNet2DModel" in message


@pytest.mark.parametrize("library", ["unclip", "diffusers"])
def test_both_text_proj_spellings_load(repo, library):
    """The hub says ["unclip", ...] (its model_index.json); diffusers' save_pretrained writes ["diffusers", ...]."""
    edit_json(repo / "model_index.json", text_proj=[library, "UnCLIPTextProjModel"])
    assert "text_proj" in Karlo.from_pretrained(repo).modules


def test_tiny_model_loads_into_diffusers_component_by_component(repo):
    """The README's way into diffusers for this layout (its from_pretrained cannot resolve the text_proj entry of
    kakaobrain/karlo-v1-alpha either): every network holds the weights our loader reads."""
    from parity_utils import load_pipeline

    pipe, ours = load_pipeline(repo), Karlo.from_pretrained(repo)
    for name, module in ours.modules.items():
        theirs, mine = getattr(pipe, name).state_dict(), module.state_dict()
        assert theirs.keys() == mine.keys(), name
        assert all(torch.equal(theirs[k], mine[k]) for k in mine), name


def test_component_without_weights(repo):
    (repo / "decoder" / WEIGHTS["decoder"]).unlink()
    message = load_error(repo)
    assert f"no weight file in {repo / 'decoder'}" in message and "diffusion_pytorch_model.bin" in message


@pytest.mark.parametrize(
    "rel", ["prior/config.json", "text_encoder/config.json", "super_res_last/config.json",
            "decoder_scheduler/scheduler_config.json"],
)
def test_missing_config_file(repo, rel):
    (repo / rel).unlink()
    assert f"missing file {repo / rel}" in load_error(repo)


def test_super_res_last_with_null_sample_size_loads(repo):
    """The hub's super_res_last/config.json has "sample_size": null."""
    edit_json(repo / "super_res_last" / "config.json", sample_size=None)
    model = Karlo.from_pretrained(repo)
    assert model.config.super_res_last.sample_size is None
    assert model.config.image_size == 256


# ---------------------------------------------------------------------------------------------------------------
# Configs that our networks do not implement

CONFIG_ERRORS = [
    # (file, changes, expected message)
    ("decoder/config.json", dict(resnet_time_scale_shift="ada_group"),
     "resnet_time_scale_shift='ada_group' is not supported"),
    ("decoder/config.json", dict(down_block_types=["ResnetDownsampleBlock2D", "CrossAttnDownBlock2D"]),
     "down block type 'CrossAttnDownBlock2D' is not supported"),
    ("decoder/config.json", dict(up_block_types=["AttnUpBlock2D", "ResnetUpsampleBlock2D"]),
     "up block type 'AttnUpBlock2D' is not supported"),
    ("decoder/config.json", dict(mid_block_type="UNetMidBlock2DCrossAttn"),
     "mid block type 'UNetMidBlock2DCrossAttn' is not supported"),
    ("decoder/config.json", dict(act_fn="gelu"), "act_fn='gelu' is not supported (supported: ['silu'])"),
    ("decoder/config.json", dict(brand_new_option=3), "unknown config key 'brand_new_option'"),
    ("decoder/config.json", dict(class_embed_type="timestep"), "class_embed_type='timestep' is not supported"),
    ("super_res_first/config.json", dict(add_attention=True), "self-attention in the mid block is not supported"),
    ("super_res_last/config.json", dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"),
     "super-res: only UNetMidBlock2D is supported"),
    ("super_res_first/config.json", dict(norm_num_groups=3), "8 channels are not divisible by norm_num_groups=3"),
    ("prior/config.json", dict(additional_embeddings=3), "additional_embeddings must be 4"),
    ("prior/config.json", dict(time_embed_dim=99), "time_embed_dim=99 is not supported"),
    ("prior/config.json", dict(norm_in_type="layer"), "norm_in_type='layer' is not supported"),
    ("text_proj/config.json", dict(unknown=1), "unknown config key 'unknown'"),
    ("prior_scheduler/scheduler_config.json", dict(beta_schedule="linear"), "beta_schedule='linear' is not supported"),
    ("decoder_scheduler/scheduler_config.json", dict(variance_type="learned"),
     "variance_type='learned' is not supported"),
    ("super_res_scheduler/scheduler_config.json", dict(prediction_type="v_prediction"),
     "prediction_type='v_prediction' is not supported"),
]


@pytest.mark.parametrize("rel, changes, expected", CONFIG_ERRORS, ids=[f"{c[0].split('/')[0]}-{next(iter(c[1]))}"
                                                                      for c in CONFIG_ERRORS])
def test_unsupported_config_value(repo, rel, changes, expected):
    edit_json(repo / rel, **changes)
    message = load_error(repo)
    assert expected in message
    assert message.startswith(f"{repo / rel}: ")  # names the file


@pytest.mark.parametrize(
    "rel, changes, expected",
    [
        ("text_proj/config.json", dict(cross_attention_dim=99),
         "text_proj.cross_attention_dim must equal decoder.cross_attention_dim"),
        ("super_res_first/config.json", dict(sample_size=None), "super_res_first.sample_size gives the output size"),
        ("text_encoder/config.json", dict(projection_dim=16), "text_encoder.projection_dim must equal"),
    ],
)
def test_inconsistent_components(repo, rel, changes, expected):
    edit_json(repo / rel, **changes)
    message = load_error(repo)
    assert expected in message and str(repo) in message


def test_config_valid_but_weights_of_another_shape(repo):
    """A decoder config asking for additive time conditioning: the scale-shift weights then have the wrong shape."""
    edit_json(repo / "decoder" / "config.json", resnet_time_scale_shift="default")
    message = load_error(repo)
    assert f"{repo / 'decoder' / WEIGHTS['decoder']} does not match the model config" in message
    assert "mis-shaped keys: down_blocks.0.downsamplers.0.time_emb_proj.bias: file (32,) vs model (16,)" in message
    assert "(20 in all)" in message


# ---------------------------------------------------------------------------------------------------------------
# Weight files


def _edit_weights(repo: Path, component: str, edit) -> Path:
    path = repo / component / WEIGHTS[component]
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    return path


def test_weight_file_with_missing_key(repo):
    path = _edit_weights(repo, "prior", lambda sd: sd.pop("prd_embedding"))
    message = load_error(repo)
    assert f"{path} does not match the model config: missing keys: prd_embedding" in message


def test_weight_file_with_unexpected_key(repo):
    path = _edit_weights(repo, "text_proj", lambda sd: sd.update({"extra_head.weight": torch.zeros(2, 2)}))
    assert f"{path} does not match the model config: unexpected keys: extra_head.weight" in load_error(repo)


def test_weight_file_with_wrong_shape(repo):
    path = _edit_weights(repo, "super_res_last", lambda sd: sd.update({"conv_out.bias": torch.zeros(6)}))
    message = load_error(repo)
    assert f"{path} does not match the model config: mis-shaped keys: conv_out.bias: file (6,) vs model (3,)" in message


def test_weight_file_with_every_kind_of_problem(repo):
    removed = []

    def edit(sd):
        removed.extend(k for k in sd if k.startswith("transformer_blocks.1."))
        for key in removed:
            del sd[key]
        sd["proj_in.weight"] = torch.zeros(5, 7)
        sd["unknown"] = torch.zeros(1)

    _edit_weights(repo, "prior", edit)
    message = load_error(repo)
    assert len(removed) > 10  # more than are listed
    assert f"missing keys: {', '.join(sorted(removed)[:10])}, ... ({len(removed)} in all)" in message
    assert "unexpected keys: unknown" in message
    assert "mis-shaped keys: proj_in.weight: file (5, 7) vs model (32, 32)" in message


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors(repo, damage):
    path = repo / "decoder" / WEIGHTS["decoder"]
    data = path.read_bytes()
    path.write_bytes(b"\x00garbage, not a safetensors header" if damage == "garbage" else data[: len(data) // 2])
    assert f"{path}: not a valid safetensors file" in load_error(repo)


def test_pickle_with_code_is_refused_without_running_it(repo, tmp_path):
    marker = tmp_path / "marker"
    state = load_file(str(repo / "decoder" / WEIGHTS["decoder"]))
    (repo / "decoder" / WEIGHTS["decoder"]).unlink()
    path = repo / "decoder" / "diffusion_pytorch_model.bin"
    torch.save({**state, "payload": Payload(marker)}, path)
    message = load_error(repo)
    assert str(path) in message and "arbitrary" in message and "refusing" in message
    assert not marker.exists()


def test_bin_that_is_not_a_pytorch_file(repo):
    (repo / "prior" / WEIGHTS["prior"]).unlink()
    path = repo / "prior" / "diffusion_pytorch_model.bin"
    path.write_bytes(b"this is not a zip or pickle file")
    assert f"{path}: not a readable PyTorch file" in load_error(repo)


def test_plain_bin_state_dicts_load(repo, base_repo):
    """Every component as pickle .bin, as on the hub's image-variations repo; the text encoder
    file carries transformers' position_ids buffer (int64), as the hub files do."""
    for component, name in WEIGHTS.items():
        state = load_file(str(repo / component / name))
        (repo / component / name).unlink()
        if component == "text_encoder":
            state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
            torch.save(state, repo / component / "pytorch_model.bin")
        else:
            torch.save(state, repo / component / "diffusion_pytorch_model.bin")
    state_dicts_equal(Karlo.from_pretrained(repo), Karlo.from_pretrained(base_repo))


def test_safetensors_preferred_over_bin(repo, base_repo):
    state = load_file(str(repo / "decoder" / WEIGHTS["decoder"]))
    torch.save({k: torch.zeros_like(v) for k, v in state.items()}, repo / "decoder" / "diffusion_pytorch_model.bin")
    state_dicts_equal(Karlo.from_pretrained(repo), Karlo.from_pretrained(base_repo))


def test_sharded_safetensors(repo, base_repo):
    path = repo / "decoder" / WEIGHTS["decoder"]
    state = load_file(str(path))
    path.unlink()
    keys = sorted(state)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[::2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(repo / "decoder" / name))
    index = {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}
    (repo / "decoder" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    state_dicts_equal(Karlo.from_pretrained(repo), Karlo.from_pretrained(base_repo))


# ---------------------------------------------------------------------------------------------------------------
# Stages


def test_decoder_stage_loads_no_prior_or_text_encoder(repo):
    for component in ("prior", "text_encoder", "super_res_first"):  # not even read
        (repo / component / WEIGHTS[component]).unlink()
    shutil.rmtree(repo / "tokenizer")
    model = Karlo.from_pretrained(repo, stages=("decoder",))
    assert set(model.modules) == {"text_proj", "decoder"}
    assert model.tokenizer is None
    with pytest.raises(RuntimeError, match="loaded without the text encoder"):
        model.encode_text(["a horse"])
    with pytest.raises(RuntimeError, match="loaded without 'super_res_first'"):
        model.super_res_stage(torch.zeros(1, 3, 64, 64).numpy(), generator_states(generators_from_seeds([0])))


def test_unknown_stage(repo):
    with pytest.raises(ValueError, match=r"unknown stages \['upscaler'\]"):
        Karlo.from_pretrained(repo, stages=("decoder", "upscaler"))


# ---------------------------------------------------------------------------------------------------------------
# fsspec URLs


def _upload(local: Path, fs, root: str, *, with_bin: bool) -> None:
    """The repo's files, plus a .bin twin of every safetensors (the hub repo has both formats)."""
    for path in sorted(local.rglob("*")):
        if path.is_file():
            rel = path.relative_to(local).as_posix()
            fs.pipe(f"{root}/{rel}", path.read_bytes())
            if with_bin and path.suffix == ".safetensors":
                twin = "pytorch_model.bin" if path.name == "model.safetensors" else "diffusion_pytorch_model.bin"
                target = local.parent / f"twin-{uuid.uuid4().hex}.bin"
                torch.save(load_file(str(path)), target)
                fs.pipe(f"{root}/{path.parent.relative_to(local).as_posix()}/{twin}", target.read_bytes())


def _cached(cache: Path) -> list[str]:
    [model_dir] = (cache / "models").iterdir()
    return sorted(p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file() and
                  p.name != ".lock")


@pytest.fixture
def memory_repo(base_repo):
    fs = fsspec.filesystem("memory")
    root = f"/karlo-{uuid.uuid4().hex}"
    _upload(base_repo, fs, root, with_bin=True)
    yield f"memory://{root}", fs
    fs.rm(root, recursive=True)


def test_memory_url_downloads_once_and_one_format(memory_repo, base_repo, tmp_path, monkeypatch):
    url, fs = memory_repo
    monkeypatch.setenv("KARLO_CACHE", str(tmp_path / "cache"))
    fetched: list[str] = []
    get_file = type(fs).get_file

    def counting_get_file(self, rpath, lpath, **kwargs):
        fetched.append(rpath)
        return get_file(self, rpath, lpath, **kwargs)

    monkeypatch.setattr(type(fs), "get_file", counting_get_file)
    model = Karlo.from_pretrained(url)
    state_dicts_equal(model, Karlo.from_pretrained(base_repo))
    cached = _cached(tmp_path / "cache")
    assert not [p for p in cached if p.endswith(".bin")]
    assert {f"{c}/{w}" for c, w in WEIGHTS.items()} <= set(cached)
    assert "model_index.json" in cached and "tokenizer/vocab.json" in cached
    assert len(fetched) == len(cached)

    Karlo.from_pretrained(url)  # a second load uses the cache
    assert len(fetched) == len(cached)


def test_memory_url_with_decoder_stage_fetches_only_its_weights(memory_repo, tmp_path, monkeypatch):
    url, _ = memory_repo
    monkeypatch.setenv("KARLO_CACHE", str(tmp_path / "cache"))
    model = Karlo.from_pretrained(url, stages=("decoder",))
    assert set(model.modules) == {"text_proj", "decoder"}
    cached = _cached(tmp_path / "cache")
    weights = [p for p in cached if p.endswith((".safetensors", ".bin"))]
    assert weights == ["decoder/diffusion_pytorch_model.safetensors", "text_proj/diffusion_pytorch_model.safetensors"]
    assert not [p for p in cached if p.startswith("tokenizer/")]


def test_remote_errors(base_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("KARLO_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    root = f"/karlo-{uuid.uuid4().hex}"
    try:
        fs.pipe(f"{root}/readme.txt", b"not a model")
        assert "no model_index.json under the model URL" in load_error(f"memory://{root}")
        _upload(base_repo, fs, root, with_bin=False)
        fs.rm(f"{root}/decoder", recursive=True)
        assert "the model has no decoder/ folder" in load_error(f"memory://{root}")
    finally:
        fs.rm(root, recursive=True)


@pytest.mark.slow
def test_s3_url(s3_bucket, base_repo, tmp_path, monkeypatch):
    """The same through a local S3 server: the production path (s3fs, storage_options)."""
    monkeypatch.setenv("KARLO_CACHE", str(tmp_path / "cache"))
    root = f"{s3_bucket.url.removeprefix('s3://')}/models/tiny"
    _upload(base_repo, s3_bucket.fs, root, with_bin=True)
    s3_bucket.fs.invalidate_cache()
    model = Karlo.from_pretrained(f"s3://{root}", storage_options=s3_bucket.storage_options)
    state_dicts_equal(model, Karlo.from_pretrained(base_repo))
    cached = _cached(tmp_path / "cache")
    assert not [p for p in cached if p.endswith(".bin")]
    assert {f"{c}/{w}" for c, w in WEIGHTS.items()} <= set(cached)
