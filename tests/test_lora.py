"""LoRA adapters (karlo_model.lora) on the tiny random model: merged weights equal W + scale * (alpha / r) * B A
done by hand, in each key style, stacked, refused when they do not match, and through `karlo generate --lora`."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from peft.tuners.lora import LoraLayer
from pipeline_utils import read_output, write_table
from safetensors.torch import save_file

from jobs.cli import main
from karlo_model import Karlo, WeightsError
from karlo_model.lora import Adapter, AdapterError, apply, check, fetch, model_networks, parse_adapter
from karlo_model.repo import load_modules, read_repo_configs

STEPS = dict(prior_steps=2, decoder_steps=2, super_res_steps=2)
FEW_STEPS = ["--prior-steps", "3", "--decoder-steps", "3", "--super-res-steps", "2"]
# Modules adapted in each network: Linear layers and 3x3 / 1x1 convolutions, names as in the diffusers checkpoints.
TARGETS = {
    "prior": ("transformer_blocks.0.attn1.to_q", "transformer_blocks.0.ff.net.2", "proj_to_clip_embeddings"),
    "decoder": ("conv_in", "down_blocks.1.attentions.0.to_q", "down_blocks.1.attentions.0.to_out.0",
                "mid_block.resnets.0.conv1", "up_blocks.0.resnets.0.conv_shortcut"),
    "super_res_first": ("conv_in", "down_blocks.0.resnets.0.time_emb_proj"),
    "super_res_last": ("conv_out",),
}
RANK, ALPHA = 2, 3.0


@pytest.fixture(scope="module")
def base(tiny_model):
    """(config, the tiny model's networks but the text encoder, in float32 as loaded, before any adapter)."""
    root = Path(tiny_model)
    config = read_repo_configs(root)
    return config, load_modules(root, config, [*model_networks(config), "text_proj"])


def _factor_shapes(module, r):
    if isinstance(module, torch.nn.Linear):
        return (r, module.in_features), (module.out_features, r)
    return (r, module.in_channels, *module.kernel_size), (module.out_channels, r, 1, 1)


def random_factors(modules, seed: int, targets=TARGETS) -> dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) of rank RANK for each target module, drawn with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for network, names in targets.items():
        for name in names:
            down, up = _factor_shapes(modules[network].get_submodule(name), RANK)
            out[(network, name)] = (0.1 * torch.randn(down, generator=g), 0.1 * torch.randn(up, generator=g))
    return out


def write_peft(folder: Path, factors, alpha: float = ALPHA, *, network_in_keys: bool = True) -> Path:
    """A PEFT adapter folder; keys name their network unless the adapter was trained on one network alone."""
    folder.mkdir(parents=True)
    state = {f"base_model.model.{f'{n}.' if network_in_keys else ''}{m}.lora_{p}.weight": t
             for (n, m), (down, up) in factors.items() for p, t in (("A", down), ("B", up))}
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": alpha, "target_modules": sorted({m for _, m in factors}),
         "bias": "none"}))
    return folder


def write_diffusers(path: Path, factors, alpha: float = ALPHA) -> Path:
    state = {}
    for (n, m), (down, up) in factors.items():
        state |= {f"{n}.{m}.lora.down.weight": down, f"{n}.{m}.lora.up.weight": up, f"{n}.{m}.alpha": torch.tensor(alpha)}
    save_file(state, str(path))
    return path


def write_kohya(path: Path, factors, alpha: float = ALPHA) -> Path:
    """kohya's names: lora_<network>_<module, "." -> "_">, with lora_unet_ for the decoder."""
    state = {}
    for (n, m), (down, up) in factors.items():
        prefix = f"lora_{'unet' if n == 'decoder' else n}_{m.replace('.', '_')}"
        state |= {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up,
                  f"{prefix}.alpha": torch.tensor(alpha)}
    save_file(state, str(path))
    return path


def merged_by_hand(modules, adapters: list[tuple[dict, float]], dtype=torch.float64) -> dict[str, torch.nn.Module]:
    """Copies of ``modules`` in ``dtype`` with W += scale * (alpha / r) * B A of each (factors, scale)."""
    out = {n: copy.deepcopy(m).to(dtype) for n, m in modules.items()}
    with torch.no_grad():
        for factors, scale in adapters:
            for (network, name), (down, up) in factors.items():
                w = out[network].get_submodule(name).weight
                delta = (up.to(dtype).flatten(1) @ down.to(dtype).flatten(1)).reshape(w.shape)  # B A
                w += delta * (scale * ALPHA / RANK)
    return out


def merged_by_adapters(config, modules, adapters: list[Adapter], dtype=torch.float64,
                       options: dict | None = None) -> dict[str, torch.nn.Module]:
    out = {n: copy.deepcopy(m).to(dtype) for n, m in modules.items()}
    apply(out, adapters, model_networks(config), options)
    return out


def assert_same_weights(a: dict[str, torch.nn.Module], b: dict[str, torch.nn.Module], exact: bool = False) -> None:
    for network in a:
        sa, sb = a[network].state_dict(), b[network].state_dict()
        assert sa.keys() == sb.keys(), network
        for key in sa:
            if exact:
                assert torch.equal(sa[key], sb[key]), f"{network}.{key}"
            else:
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-12, atol=1e-12, msg=f"{network}.{key}")


def test_parse_adapter_takes_the_scale_only_from_a_trailing_number():
    assert parse_adapter("style.safetensors") == Adapter("style.safetensors", 1.0)
    assert parse_adapter("style.safetensors:0.5") == Adapter("style.safetensors", 0.5)
    assert parse_adapter("s3://bucket/loras/style.safetensors:-1.5e-1") == Adapter(
        "s3://bucket/loras/style.safetensors", -0.15)
    assert parse_adapter("http://host:8080/loras/style") == Adapter("http://host:8080/loras/style", 1.0)
    assert parse_adapter("http://host:8080/loras/style:2") == Adapter("http://host:8080/loras/style", 2.0)
    with pytest.raises(AdapterError, match="network must be one of"):
        Adapter("x.safetensors", network="text_encoder")


def test_adapter_equals_merging_by_hand(base, tmp_path):
    """Every network of a PEFT adapter (alpha != r), in float64: the merged weights are W + scale * alpha / r * B A,
    and so are the networks' outputs."""
    config, modules = base
    factors = random_factors(modules, seed=1)
    folder = write_peft(tmp_path / "peft", factors)
    ours = merged_by_adapters(config, modules, [Adapter(str(folder), 0.7)])
    hand = merged_by_hand(modules, [(factors, 0.7)])
    assert_same_weights(ours, hand)
    assert not any(isinstance(m, LoraLayer) for net in ours.values() for m in net.modules())
    assert not any(hasattr(net, "peft_config") for net in ours.values())
    # Outputs: the first super-res UNet on the same random inputs (32 px: the network is convolutional).
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config.super_res_first.in_channels, 32, 32, generator=g, dtype=torch.float64)
    t = torch.tensor([3, 5])
    torch.testing.assert_close(ours["super_res_first"](x, t), hand["super_res_first"](x, t), rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ours["super_res_first"](x, t), copy.deepcopy(modules["super_res_first"]).double()(x, t))


def test_generate_with_an_adapter_equals_the_model_merged_by_hand(base, tiny_model, tmp_path):
    """Karlo.from_pretrained(lora=...) equals a Karlo built from the networks merged by hand (in the weights'
    float32, as loading does)."""
    config, modules = base
    factors = random_factors(modules, seed=2)
    path = write_diffusers(tmp_path / "style.safetensors", factors)
    ours = Karlo.from_pretrained(tiny_model, lora=[Adapter(str(path), 0.8)])
    hand = merged_by_hand(modules, [(factors, 0.8)], dtype=torch.float32)
    assert not torch.equal(hand["decoder"].conv_in.weight, modules["decoder"].conv_in.weight)
    by_hand = Karlo(config, {**hand, "text_encoder": ours.text_encoder}, ours.tokenizer)
    a, b = (k.generate(["a red cube"], [1], **STEPS) for k in (ours, by_hand))
    np.testing.assert_allclose(a.image_embeds, b.image_embeds, rtol=1e-5, atol=1e-6)
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1


def test_scale_zero_is_the_base_model_bit_for_bit(base, tiny_model, tmp_path):
    config, modules = base
    path = write_kohya(tmp_path / "style.safetensors", random_factors(modules, seed=3))
    ours = Karlo.from_pretrained(tiny_model, lora=[Adapter(str(path), 0.0)], stages=["decoder", "super_res"])
    plain = Karlo.from_pretrained(tiny_model, stages=["decoder", "super_res"])
    assert_same_weights(ours.modules, plain.modules, exact=True)  # the same weights: the same images


def test_the_three_key_styles_load_to_the_same_weights(base, tmp_path):
    config, modules = base
    factors = random_factors(modules, seed=4)
    styles = [write_peft(tmp_path / "peft", factors), write_diffusers(tmp_path / "diffusers.safetensors", factors),
              write_kohya(tmp_path / "kohya.safetensors", factors)]
    merged = [merged_by_adapters(config, modules, [Adapter(str(p), 1.3)]) for p in styles]
    assert_same_weights(merged[0], merged[1], exact=True)
    assert_same_weights(merged[0], merged[2], exact=True)


def test_two_adapters_stack(base, tmp_path):
    config, modules = base
    first, second = random_factors(modules, seed=5), random_factors(modules, seed=6, targets={
        "decoder": ("conv_in", "down_blocks.0.resnets.0.conv1"), "prior": ("proj_in",)})
    a, b = write_peft(tmp_path / "a", first), write_kohya(tmp_path / "b.safetensors", second)
    ours = merged_by_adapters(config, modules, [Adapter(str(a), 0.5), Adapter(str(b), -1.0)])
    assert_same_weights(ours, merged_by_hand(modules, [(first, 0.5), (second, -1.0)]))


def test_keys_without_a_network_name_take_the_adapters_network(base, tmp_path):
    """A PEFT adapter trained on one network alone (keys base_model.model.<module>...), given network: ..."""
    config, modules = base
    factors = random_factors(modules, seed=7, targets={"super_res_last": ("conv_out", "conv_in")})
    folder = write_peft(tmp_path / "bare", factors, network_in_keys=False)
    with pytest.raises(AdapterError, match="keys for no network"):
        check(config, [Adapter(str(folder))])
    ours = merged_by_adapters(config, modules, [Adapter(str(folder), 1.0, network="super_res_last")])
    assert_same_weights(ours, merged_by_hand(modules, [(factors, 1.0)]))


def test_a_mismatched_adapter_is_refused_naming_its_keys(base, tmp_path):
    config, modules = base
    factors = random_factors(modules, seed=8, targets={"decoder": ("conv_in",)})
    down, up = factors[("decoder", "conv_in")]
    path = tmp_path / "bad.safetensors"
    save_file({
        "decoder.conv_in.lora.down.weight": down, "decoder.conv_in.lora.up.weight": up,
        "decoder.down_blocks.7.attentions.0.to_q.lora.down.weight": torch.zeros(2, 4),  # no such module
        "decoder.down_blocks.7.attentions.0.to_q.lora.up.weight": torch.zeros(4, 2),
        "prior.proj_in.lora_A.weight": torch.zeros(2, 5),  # wrong in-features
        "prior.proj_in.lora_B.weight": torch.zeros(7, 2),
        "decoder.conv_out.lora.down.weight": torch.zeros(2, 8, 3, 3),  # no up factor
        "decoder.time_embedding.lora.down.weight": torch.zeros(2, 4),  # not a Linear or Conv2d
        "decoder.time_embedding.lora.up.weight": torch.zeros(4, 2),
        "decoder.conv_in.scale": torch.zeros(()),  # no LoRA key style
    }, str(path))
    with pytest.raises(AdapterError) as e:
        check(config, [Adapter(str(path))])
    message = str(e.value)
    for key in ("decoder.down_blocks.7.attentions.0.to_q.lora.down.weight", "prior.proj_in.lora_A.weight",
                "decoder.conv_out.lora.down.weight", "decoder.time_embedding.lora.down.weight",
                "decoder.conv_in.scale"):
        assert key in message, key
    assert "decoder.conv_in.lora.down.weight" not in message
    assert "mis-shaped" in message and "without their down/up partner" in message and "\n" not in message
    with pytest.raises(AdapterError, match="adapter not found"):
        check(config, [Adapter(str(tmp_path / "missing.safetensors"))])


def test_pickled_adapters_load_tensors_only(base, tmp_path):
    config, modules = base
    factors = random_factors(modules, seed=9, targets={"decoder": ("conv_in",)})
    down, up = factors[("decoder", "conv_in")]
    good = tmp_path / "style.bin"
    torch.save({"decoder.conv_in.lora.down.weight": down, "decoder.conv_in.lora.up.weight": up}, good)
    ours = merged_by_adapters(config, modules, [Adapter(str(good), 2.0)])
    torch.testing.assert_close(ours["decoder"].conv_in.weight, merged_by_hand(
        modules, [(factors, 2.0 * RANK / ALPHA)])["decoder"].conv_in.weight, rtol=1e-12, atol=1e-12)
    bad = tmp_path / "evil.bin"
    torch.save({"decoder.conv_in.lora.down.weight": down, "code": object()}, bad)
    with pytest.raises(WeightsError, match="refusing to load"):
        check(config, [Adapter(str(bad))])


@pytest.mark.slow
def test_generate_with_lora_and_a_resume_with_another_scale(base, tiny_model, tmp_path, ray_local):
    config, modules = base
    path = write_kohya(tmp_path / "style.safetensors", random_factors(modules, seed=10))
    prompts = write_table(tmp_path / "prompts.parquet", prompt=["a red cube", "a cat", "a boat"])
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(main, ["generate", str(prompts), str(out), "--lora", f"{path}:0.6", *FEW_STEPS])
    assert result.exit_code == 0, result.output
    output = read_output(out)
    assert len(output.images()) == 3 and output.error_keys == []
    record = output.manifest["identity"]["settings"]["lora"]
    assert [(r["source"], r["scale"], len(r["sha256"])) for r in record] == [(str(path), 0.6, 64)]
    other = runner.invoke(main, ["generate", str(prompts), str(out), "--lora", f"{path}:0.7", *FEW_STEPS])
    assert other.exit_code == 2 and "already holds a run with different settings" in other.output, other.output
    assert "lora" in other.output
    assert len(pq.read_table(prompts)) == len(read_output(out).images())


def test_cli_refuses_a_mismatched_adapter_before_ray_starts(tiny_model, tmp_path, monkeypatch):
    path = tmp_path / "bad.safetensors"
    save_file({"decoder.nothing.lora.down.weight": torch.zeros(2, 4),
               "decoder.nothing.lora.up.weight": torch.zeros(4, 2)}, str(path))
    prompts = write_table(tmp_path / "prompts.parquet", prompt=["a red cube"])
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:9")  # starting Ray would fail
    result = CliRunner().invoke(main, ["generate", str(prompts), str(tmp_path / "out"), "--lora", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "decoder.nothing.lora.down.weight" in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_stage_config_lora_section():
    from pipeline.config import ConfigError, parse_adapters, read_stage_config_file

    sections = read_stage_config_file("decoder: {batch_size: 2}\nlora:\n  - s3://b/style.safetensors:0.5\n"
                                      "  - {path: sr/, scale: 2, network: super_res_last}\n")
    assert parse_adapters(sections) == (Adapter("s3://b/style.safetensors", 0.5),
                                        Adapter("sr/", 2.0, "super_res_last"))
    assert parse_adapters(read_stage_config_file("decoder: {batch_size: 2}\n")) == ()
    for text, message in [("lora: {path: x}\n", "must be a list of adapters"),
                          ("lora: [{path: x, weight: 1}]\n", "an adapter is PATH[:SCALE] or {path, scale, network}"),
                          ("lora: [{path: x, network: text_encoder}]\n", "network must be one of")]:
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            parse_adapters(read_stage_config_file(text))


def test_runs_without_adapters_keep_their_settings(tmp_path):
    from pipeline.config import RunConfig

    path = tmp_path / "style.safetensors"
    save_file({"decoder.conv_in.lora.down.weight": torch.zeros(1, 1)}, str(path))
    plain = RunConfig(input_url="in", output_url="out")
    assert "lora" not in plain.output_settings()
    settings = RunConfig(input_url="in", output_url="out", lora=(Adapter(str(path), 0.5),)).output_settings()
    assert {k: v for k, v in settings.items() if k != "lora"} == plain.output_settings()
    assert settings["lora"] == [{"source": str(path), "scale": 0.5,
                                 "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]


def test_sweep_lora_scale_axis(tmp_path):
    from jobs.sweep.spec import parse_spec, points, run_config
    from pipeline.config import ConfigError

    spec = parse_spec({"prompts": "p.parquet", "output": "out", "stages": {"lora": ["style.safetensors:0.3"]},
                       "grid": {"lora_scale": [0, 0.5]}}, base=tmp_path)
    grid = points(spec)
    assert [p.name for p in grid] == ["lora0", "lora0.5"]
    cfgs = [run_config(spec, p, input_url="in", output_url="o") for p in grid]
    assert [c.lora for c in cfgs] == [(Adapter(str(tmp_path / "style.safetensors"), s),) for s in (0.0, 0.5)]
    assert grid[1].as_dict(spec)["settings"]["lora"] == [{"source": str(tmp_path / "style.safetensors"), "scale": 0.5}]
    with pytest.raises(ConfigError, match="grid.lora_scale needs adapters"):
        parse_spec({"prompts": "p.parquet", "output": "out", "grid": {"lora_scale": [1]}})


def test_adapters_at_urls_are_fetched_once_into_the_cache(base, tmp_path, s3_bucket):
    config, modules = base
    factors = random_factors(modules, seed=11, targets={"decoder": ("conv_in",)})
    local = write_kohya(tmp_path / "style.safetensors", factors)
    folder = write_peft(tmp_path / "peft", factors)
    s3_bucket.fs.put(str(local), f"{s3_bucket.url}/loras/style.safetensors")
    s3_bucket.fs.put(str(folder), f"{s3_bucket.url}/loras/peft", recursive=True)
    options = s3_bucket.storage_options
    remote = [Adapter(f"{s3_bucket.url}/loras/style.safetensors", 0.5), Adapter(f"{s3_bucket.url}/loras/peft", 0.5)]
    check(config, remote, options)
    files = [fetch(a, options) for a in remote]
    assert files[0].weights.read_bytes() == local.read_bytes()
    assert files[1].config.read_bytes() == (folder / "adapter_config.json").read_bytes()
    assert all(str(f.weights).startswith(os.environ["KARLO_CACHE"]) for f in files)
    merged = merged_by_adapters(config, modules, remote, options=options)
    here = [Adapter(str(local), 0.5), Adapter(str(folder), 0.5)]
    assert_same_weights(merged, merged_by_adapters(config, modules, here), exact=True)


def test_dry_run_refuses_a_mismatched_adapter(tiny_model, tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"prior.proj_in.lora_A.weight": torch.zeros(2, 1), "prior.proj_in.lora_B.weight": torch.zeros(1, 2)},
              str(path))
    prompts = write_table(tmp_path / "prompts.parquet", prompt=["a red cube"])
    result = CliRunner().invoke(main, ["generate", str(prompts), str(tmp_path / "out"), "--dry-run",
                                                 "--lora", f"{path}:0.5"])
    assert result.exit_code == 2, result.output
    assert "mis-shaped keys: prior.proj_in.lora_A.weight" in result.output


def test_modules_of_other_ranks_and_alphas(base, tmp_path):
    """A kohya file whose modules differ in rank and alpha: each module is merged with its own alpha / r."""
    config, modules = base
    g = torch.Generator().manual_seed(12)
    chosen = {"conv_in": (2, 3.0), "mid_block.resnets.0.conv1": (4, 1.0), "down_blocks.1.attentions.0.to_k": (2, 0.5),
              "time_embedding.linear_1": (3, 3.0)}
    state, expected = {}, copy.deepcopy(modules["decoder"]).double()
    with torch.no_grad():
        for name, (r, alpha) in chosen.items():
            shapes = _factor_shapes(modules["decoder"].get_submodule(name), r)
            down, up = (0.1 * torch.randn(s, generator=g) for s in shapes)
            prefix = f"lora_unet_{name.replace('.', '_')}"
            state |= {f"{prefix}.lora_down.weight": down, f"{prefix}.lora_up.weight": up,
                      f"{prefix}.alpha": torch.tensor(alpha)}
            w = expected.get_submodule(name).weight
            w += (up.double().flatten(1) @ down.double().flatten(1)).reshape(w.shape) * (0.9 * alpha / r)
    save_file(state, str(tmp_path / "ranks.safetensors"))
    ours = merged_by_adapters(config, modules, [Adapter(str(tmp_path / "ranks.safetensors"), 0.9)])
    assert_same_weights({"decoder": ours["decoder"]}, {"decoder": expected})
