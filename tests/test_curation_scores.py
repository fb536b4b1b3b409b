"""Aesthetic scores and the safety checker: each equals its reference formula on tiny random weights in the published
key layout (the aesthetic MLP computed by hand, the checker against diffusers' StableDiffusionSafetyChecker), strict
loading names bad keys, and the filters move exactly the rows they should through the pipeline, with the reason."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from parity_utils import single_thread  # noqa: F401 (fixture)
from pipeline_utils import PROMPTS, STEPS, read_output, reference, score_batch, write_table
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModelWithProjection

from jobs.cli import main
from jobs.sweep.spec import parse_spec, points
from karlo_model import WeightsError
from karlo_model.aesthetic import STATE_KEYS, AestheticPredictor, load_aesthetic_predictor
from karlo_model.clip_vision import preprocess, tiny_vision_config
from karlo_model.safety_checker import load_safety_checker
from pipeline import columns as C
from pipeline.config import ConfigError, RunConfig, StageConfig
from pipeline.rejected import Filters, split_rejected
from pipeline.run import OutputConflict, run
from pipeline.scoring import ClipScoreStage, check_scorers, find_safety_tower, find_tower
from pipeline.shards import ShardRows

RNG = np.random.default_rng(7)
DIM = 32  # the tiny model's CLIP embedding width
VISION = {k: v for k, v in tiny_vision_config(DIM).items() if k not in ("architectures", "model_type")}


# ---------------------------------------------------------------------------------------------------------------
# Builders: tiny random weights in each published layout


def aesthetic_state(dim: int = DIM, seed: int = 0) -> dict[str, torch.Tensor]:
    """LAION's layout (layers.0/2/4/6/7) with tiny widths."""
    g = torch.Generator().manual_seed(seed)
    widths = (dim, 16, 8, 8, 4, 1)
    state = {}
    for n, i in enumerate((0, 2, 4, 6, 7)):
        state[f"layers.{i}.weight"] = torch.randn(widths[n + 1], widths[n], generator=g) * 0.5
        state[f"layers.{i}.bias"] = torch.randn(widths[n + 1], generator=g) * 0.5 + (5.0 if i == 7 else 0.0)
    return state


def diffusers_checker(vision: dict, seed: int, tower: CLIPVisionModelWithProjection | None = None):
    """diffusers' StableDiffusionSafetyChecker with random concept embeddings (and ``tower``'s weights if given)."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = CLIPConfig(text_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=20), vision_config=vision, projection_dim=DIM)
        checker = StableDiffusionSafetyChecker(cfg).eval()
        with torch.no_grad():
            checker.concept_embeds.copy_(torch.randn(17, DIM))
            checker.special_care_embeds.copy_(torch.randn(3, DIM))
            if tower is not None:
                checker.vision_model.load_state_dict(tower.vision_model.state_dict())
                checker.visual_projection.load_state_dict(tower.visual_projection.state_dict())
    return checker


def set_thresholds(checker, embeds: torch.Tensor, flagged_rows: int) -> None:
    """Concept 0's threshold between the cosines of the rows so that about ``flagged_rows`` images are flagged;
    special-care thresholds that make some images (not all) special-care ones; other concepts never fire."""
    def cos(e: torch.Tensor) -> torch.Tensor:  # (B, N)
        return torch.nn.functional.normalize(embeds, dim=-1) @ torch.nn.functional.normalize(e, dim=-1).T

    with torch.no_grad():
        concept = cos(checker.concept_embeds)[:, 0].sort(descending=True).values
        special = cos(checker.special_care_embeds)[:, 1].sort(descending=True).values
        checker.concept_embeds_weights.fill_(1.5)
        checker.concept_embeds_weights[0] = (concept[flagged_rows - 1] + concept[flagged_rows]) / 2
        checker.special_care_embeds_weights.fill_(1.5)
        checker.special_care_embeds_weights[1] = (special[1] + special[2]) / 2


def reference_safety(checker, pixels: torch.Tensor) -> tuple[list[bool], np.ndarray, np.ndarray]:
    """diffusers' forward, and its per-image scores written out as its loop computes them."""
    images = np.zeros((len(pixels), 4, 4, 3))
    with torch.no_grad():
        _, flags = checker(clip_input=pixels, images=images)
        embeds = checker.visual_projection(checker.vision_model(pixels)[1])
        norm = torch.nn.functional.normalize
        special_cos = (norm(embeds) @ norm(checker.special_care_embeds).T).float().numpy()
        concept_cos = (norm(embeds) @ norm(checker.concept_embeds).T).float().numpy()
    concept, special = np.zeros(concept_cos.shape, np.float32), np.zeros(special_cos.shape, np.float32)
    for i in range(len(pixels)):
        adjustment = 0.0
        for j in range(special_cos.shape[1]):
            special[i, j] = round(special_cos[i][j] - checker.special_care_embeds_weights[j].item() + adjustment, 3)
            if special[i, j] > 0:
                adjustment = 0.01
        for j in range(concept_cos.shape[1]):
            concept[i, j] = round(concept_cos[i][j] - checker.concept_embeds_weights[j].item() + adjustment, 3)
    return list(flags), concept, special


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    """A tiny CLIP score tower, a safety checker on that same tower and one on a tower of its own, each saved in
    its published layout; the diffusers modules kept for the references."""
    root = tmp_path_factory.mktemp("curation")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        tower = CLIPVisionModelWithProjection(CLIPVisionConfig(**VISION)).eval()
    tower.save_pretrained(root / "tower")
    pixels = torch.randn(8, 3, 224, 224)
    shared, own = diffusers_checker(VISION, 2, tower), diffusers_checker(VISION, 3)
    for checker in (shared, own):
        with torch.no_grad():
            set_thresholds(checker, checker.visual_projection(checker.vision_model(pixels)[1]), 3)
    shared.save_pretrained(root / "shared-checker")
    own.save_pretrained(root / "own-checker")
    save_file(aesthetic_state(), str(root / "aesthetic.safetensors"))
    return {"root": root, "tower_module": tower, "pixels": pixels, "shared": shared, "own": own}


# ---------------------------------------------------------------------------------------------------------------
# The formulas


def test_aesthetic_predictor_has_the_published_layout():
    """improved-aesthetic-predictor's MLP: Linear/Dropout positions, dropout rates and widths."""
    model = AestheticPredictor()
    kinds = [(type(m).__name__, getattr(m, "p", None), getattr(m, "in_features", None),
              getattr(m, "out_features", None)) for m in model.layers]
    assert kinds == [("Linear", None, 768, 1024), ("Dropout", 0.2, None, None), ("Linear", None, 1024, 128),
                     ("Dropout", 0.2, None, None), ("Linear", None, 128, 64), ("Dropout", 0.1, None, None),
                     ("Linear", None, 64, 16), ("Linear", None, 16, 1)]
    assert tuple(model.state_dict()) == STATE_KEYS


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_aesthetic_score_equals_the_mlp_by_hand(tmp_path, fmt):
    state = aesthetic_state()
    path = tmp_path / f"aesthetic.{fmt}"
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    model = load_aesthetic_predictor(str(path))
    embeds = torch.as_tensor(RNG.standard_normal((5, DIM)) * 3, dtype=torch.float32)
    embeds[4] = 0  # a zero embedding stays zero, as upstream's normalized() leaves it
    x = embeds / torch.where(embeds.norm(dim=1, keepdim=True) == 0, 1.0, embeds.norm(dim=1, keepdim=True))
    for i in (0, 2, 4, 6, 7):  # no activations: the published MLP is linear
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    with torch.no_grad():
        torch.testing.assert_close(model(embeds), x[:, 0], rtol=1e-5, atol=1e-5)
        # Invariant to the embedding's scale: it reads the direction only.
        torch.testing.assert_close(model(embeds[:4] * 7), model(embeds[:4]), rtol=1e-5, atol=1e-5)


def test_safety_checker_equals_diffusers(towers):
    """Flags equal StableDiffusionSafetyChecker.forward's and scores its loop's, with special-care images among
    them (the 0.01 adjustment in play); the transformers < 5 layout (vision_model.vision_model.*) loads the same."""
    own = towers["own"]
    pixels = towers["pixels"]
    flags, concept, special = reference_safety(own, pixels)
    assert 0 < sum(flags) < len(flags) and 0 < (special > 0).any(axis=1).sum() < len(flags)
    folder = towers["root"] / "own-checker"
    tower = find_safety_tower(str(folder), None)
    mine = load_safety_checker(tower.config, tower.weights_dir)
    with torch.no_grad():
        s = mine.scores(mine.image_embeds(pixels))
    assert s.nsfw.tolist() == flags
    np.testing.assert_array_equal(s.concept_scores, concept)
    np.testing.assert_array_equal(s.special_care_scores, special)

    nested = towers["root"] / "nested-checker"
    nested.mkdir()
    (nested / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    torch.save({k.replace("vision_model.", "vision_model.vision_model.", 1): v for k, v in state.items()},
               nested / "pytorch_model.bin")
    tower = find_safety_tower(str(nested), None)
    with torch.no_grad():
        again = load_safety_checker(tower.config, tower.weights_dir).scores(mine.image_embeds(pixels))
    np.testing.assert_array_equal(again.concept_scores, concept)


def _batch(images: np.ndarray) -> dict[str, np.ndarray]:
    return score_batch(images, RNG.standard_normal((len(images), DIM)).astype(np.float32))


@pytest.mark.parametrize("checker", ["shared", "own"])
def test_score_stage_shares_an_equal_tower_and_runs_another(towers, checker):
    """One vision forward when the checker's tower equals the score tower, its own forward otherwise; the scores are
    the checker's on its own tower either way, and the aesthetic score is the MLP of the tower's embedding."""
    root = towers["root"]
    stage = ClipScoreStage(str(root / "tower"), reference=C.TEXT_EMB,
                           aesthetic_model=str(root / "aesthetic.safetensors"),
                           safety_checker=str(root / f"{checker}-checker"))
    assert stage.shares_tower == (checker == "shared")
    assert (stage.checker.vision_model is None) == (checker == "shared")
    images = RNG.integers(0, 256, (4, 224, 224, 3), dtype=np.uint8)
    out = stage(_batch(images))
    assert set(out) == {*stage.outputs, C.ERROR, C.ERROR_STAGE}
    pixels = torch.as_tensor((images.transpose(0, 3, 1, 2) / 255.0 - np.array([0.48145466, 0.4578275, 0.40821073])
                              [:, None, None]) / np.array([0.26862954, 0.26130258, 0.27577711])[:, None, None],
                             dtype=torch.float32)  # CLIP's processing of 224 px images: no resize or crop
    flags, concept, _ = reference_safety(towers[checker], pixels)
    assert out[C.NSFW].tolist() == flags
    np.testing.assert_allclose(out[C.NSFW_CONCEPT_SCORES], concept, atol=1.5e-3)  # float noise may move a rounding
    with torch.no_grad():
        embeds = towers["tower_module"](pixel_values=pixels).image_embeds
        expected = load_aesthetic_predictor(str(root / "aesthetic.safetensors"))(embeds)
    np.testing.assert_allclose(out[C.AESTHETIC_SCORE], expected.numpy(), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Strict loading and settings


def test_strict_loading_names_the_keys(tmp_path, towers, tiny_model, tiny_variations_model):
    bad = aesthetic_state()
    bad["layers.8.weight"] = bad.pop("layers.7.weight")
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=r"missing keys: layers\.7\.weight; unexpected keys: layers\.8\.weight"):
        load_aesthetic_predictor(str(tmp_path / "bad.safetensors"))
    save_file(aesthetic_state(dim=24), str(tmp_path / "wide.safetensors"))
    cfg = RunConfig("in", "out", aesthetic_model=str(tmp_path / "wide.safetensors"))
    with pytest.raises(ConfigError, match="reads 24-dimensional CLIP image embeddings but the CLIP tower embeds "
                                          "images in 32"):
        check_scorers(cfg, DIM)

    # A checker without its concept embeddings: refused from the file's header, no weights read.
    folder = tmp_path / "checker"
    folder.mkdir()
    src = towers["root"] / "own-checker"
    (folder / "config.json").write_text((src / "config.json").read_text())
    state = load_file(str(src / "model.safetensors"))
    del state["concept_embeds"]
    state["extra"] = torch.zeros(1)
    save_file(state, str(folder / "model.safetensors"))
    cfg = RunConfig("in", "out", safety_checker=str(folder))
    with pytest.raises(ConfigError, match="missing keys: concept_embeds; unexpected keys: extra"):
        check_scorers(cfg, DIM)
    with pytest.raises(ConfigError, match="must be a CLIPConfig"):
        check_scorers(RunConfig("in", "out", safety_checker=str(towers["root"] / "tower")), DIM)

    # The command: exit 2 with one line, before Ray starts or OUTPUT exists.
    table = write_table(tmp_path / "prompts.parquet", prompt=PROMPTS[:2])
    result = CliRunner().invoke(main, ["generate", str(table), str(tmp_path / "out"), "--model", tiny_model,
                                       "--clip-model", tiny_variations_model, "--safety-checker", str(folder)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "missing keys: concept_embeds" in lines[0]
    assert not (tmp_path / "out").exists()


def test_settings_rules_and_identity():
    with pytest.raises(ConfigError, match="min_aesthetic needs aesthetic_model"):
        RunConfig("in", "out", min_aesthetic=5)
    with pytest.raises(ConfigError, match="drop_unsafe needs safety_checker"):
        RunConfig("in", "out", drop_unsafe=True)
    cfg = RunConfig("in", "out", aesthetic_model="/m/a.pth", min_aesthetic=5)
    assert cfg.clip_score and list(cfg.stages)[-1] == "clip_score"  # the scores need the stage's embeddings
    assert cfg.output_settings()["aesthetic_score"] == {"model": "/m/a.pth", "min_aesthetic": 5}
    assert "safety_checker" not in cfg.output_settings()
    plain = RunConfig("in", "out").output_settings()
    assert not {"aesthetic_score", "safety_checker", "clip_score"} & set(plain)  # other runs keep their identity


def test_min_aesthetic_and_drop_unsafe_are_sweep_axes(tmp_path):
    spec = parse_spec({"prompts": str(tmp_path / "p.parquet"), "output": str(tmp_path / "sweep"),
                       "settings": {"aesthetic_model": "/m/a.pth", "safety_checker": "/m/checker"},
                       "grid": {"min_aesthetic": [4.5, 5], "drop_unsafe": [False, True]}})
    grid = points(spec)
    assert [p.name for p in grid] == ["aes4.5_drop-unsafeFalse", "aes4.5_drop-unsafeTrue", "aes5_drop-unsafeFalse",
                                      "aes5_drop-unsafeTrue"]
    assert [(p.settings["min_aesthetic"], p.settings["drop_unsafe"]) for p in grid] == [
        (4.5, False), (4.5, True), (5, False), (5, True)]


def test_split_rejected_names_every_failed_filter():
    table = pa.table({C.KEY: ["a", "b", "c", "d"], C.CLIP_SCORE: pa.array([0.3, 0.1, 0.3, 0.1], pa.float32()),
                      C.AESTHETIC_SCORE: pa.array([6.0, 6.0, 4.0, 4.0], pa.float32()),
                      C.NSFW: [False, False, True, True]})
    rows = ShardRows(table, {C.IMAGE_EMB: np.arange(4)[:, None]})
    kept, rejected = split_rejected(rows, Filters(min_clip_score=0.2, min_aesthetic=5, drop_unsafe=True))
    assert kept.table.column(C.KEY).to_pylist() == ["a"] and kept.tensors[C.IMAGE_EMB].tolist() == [[0]]
    assert rejected.table.column(C.REJECTED_REASON).to_pylist() == [
        "clip_score < 0.2", "aesthetic_score < 5; nsfw", "clip_score < 0.2; aesthetic_score < 5; nsfw"]
    assert rejected.tensors[C.IMAGE_EMB].tolist() == [[1], [2], [3]]
    # Flag only: nsfw rows stay; no filters: nothing moves and no reason column appears.
    kept, rejected = split_rejected(rows, Filters(min_aesthetic=5))
    assert kept.table.column(C.KEY).to_pylist() == ["a", "b"]
    assert split_rejected(rows, Filters())[1].num_rows == 0
    with pytest.raises(KeyError, match="aesthetic"):
        split_rejected(ShardRows(table.drop_columns([C.AESTHETIC_SCORE]), {}), Filters(min_aesthetic=5))


# ---------------------------------------------------------------------------------------------------------------
# Through the pipeline


def _middle_gap_threshold(values: np.ndarray) -> float:
    """A threshold in the widest gap between the middle values: some rows on each side, none near it."""
    ordered = np.sort(values)
    gap = int(np.argmax(np.diff(ordered[1:-1]))) + 1
    return float((ordered[gap] + ordered[gap + 1]) / 2)


@pytest.mark.slow
def test_filters_through_the_pipeline(tmp_path, ray_local, tiny_model, tiny_variations_model):
    """Scores equal the stage's on the same images; rows below --min-aesthetic or flagged unsafe go to rejected/
    with their reasons; a resume with another threshold or other weights is refused."""
    prompts = PROMPTS[:6] + [""]
    seeds = list(range(700, 707))
    table = write_table(tmp_path / "prompts.parquet", id=[f"p{i}" for i in range(7)], prompt=prompts, seed=seeds)
    images, _, text_emb = reference(tiny_model, prompts[:6], seeds[:6])

    # A safety checker on the score tower itself (the embedded variations model's image encoder), thresholds set
    # from these images' cosines; an aesthetic predictor for its 32-wide embeddings.
    tower = CLIPVisionModelWithProjection.from_pretrained(f"{tiny_variations_model}/image_encoder").eval()
    vision = {k: v for k, v in tower.config.to_dict().items() if k in VISION}
    checker = diffusers_checker(vision, 4, tower)
    pixels = preprocess(list(images), find_tower(tiny_variations_model).processor, "cpu")
    with torch.no_grad():
        set_thresholds(checker, tower(pixel_values=pixels).image_embeds, 2)
    checker.save_pretrained(tmp_path / "checker")
    save_file(aesthetic_state(), str(tmp_path / "aesthetic.safetensors"))

    stage = ClipScoreStage(tiny_variations_model, reference=C.TEXT_EMB,
                           aesthetic_model=str(tmp_path / "aesthetic.safetensors"),
                           safety_checker=str(tmp_path / "checker"))
    assert stage.shares_tower
    batch = {**_batch(images), C.TEXT_EMB: text_emb}
    scores = stage(batch)
    nsfw = scores[C.NSFW]
    min_aesthetic = _middle_gap_threshold(scores[C.AESTHETIC_SCORE])
    low = scores[C.AESTHETIC_SCORE] < min_aesthetic
    reasons = {f"p{i}": "; ".join(r for r, hit in ((f"aesthetic_score < {min_aesthetic!r}", low[i]),
                                                     ("nsfw", nsfw[i])) if hit)
               for i in range(6) if low[i] or nsfw[i]}
    assert 0 < nsfw.sum() and 0 < len(reasons) < 6

    out = tmp_path / "out"
    stages = {n: StageConfig(batch_size=1) for n in ("prior", "decoder", "super_res", "clip_score")}
    cfg = RunConfig(str(table), str(out), model=tiny_model, clip_model=tiny_variations_model,
                    aesthetic_model=str(tmp_path / "aesthetic.safetensors"), min_aesthetic=min_aesthetic,
                    safety_checker=str(tmp_path / "checker"), drop_unsafe=True, rows_per_shard=3, stages=stages,
                    **STEPS)
    summary = run(cfg)
    assert (summary.rows_in, summary.errors, summary.rejected) == (7, 1, len(reasons))
    assert summary.written + summary.errors + summary.rejected == summary.rows_in and summary.complete

    o = read_output(out)
    assert set(o.keys) == {f"p{i}" for i in range(6)} - set(reasons)
    kept = [int(k[1:]) for k in o.keys]
    np.testing.assert_allclose(o.metadata.column(C.AESTHETIC_SCORE).to_numpy(), scores[C.AESTHETIC_SCORE][kept],
                               atol=1e-4)
    assert not any(o.metadata.column(C.NSFW).to_pylist())
    concept = np.array(o.metadata.column(C.NSFW_CONCEPT_SCORES).to_pylist())
    np.testing.assert_allclose(concept, scores[C.NSFW_CONCEPT_SCORES][kept], atol=1e-3)
    assert np.array(o.metadata.column(C.NSFW_SPECIAL_CARE_SCORES).to_pylist()).shape == (len(kept), 3)
    rejected = pq.read_table(sorted((out / "rejected").glob("rejected_*.parquet"))).to_pylist()
    assert {r["key"]: r["rejected_reason"] for r in rejected} == reasons
    for r in rejected:
        assert r["nsfw"] == bool(nsfw[int(r["key"][1:])])
    assert o.manifest["aesthetic_score"]["min"] == min_aesthetic and len(o.manifest["aesthetic_score"]["sha256"]) == 64
    assert o.manifest["safety_checker"]["drop_unsafe"] is True

    from jobs.preview import write_preview

    page = write_preview(str(out), tmp_path / "preview").page.read_text()
    assert "aesthetic " in page and "nsfw" in page

    # A dry run of the same command sees the same run (the curation models' hashes included).
    from pipeline.dry_run import dry_run

    assert dry_run(cfg, echo=lambda _: None)["output"]["conflict"] == []
    # Another threshold, or other weights under the same name, is another run: refused before any work.
    with pytest.raises(OutputConflict, match=r"settings\.aesthetic_score\.min_aesthetic"):
        run(RunConfig(**{**_fields(cfg), "min_aesthetic": min_aesthetic + 1}))
    save_file(aesthetic_state(seed=1), str(tmp_path / "aesthetic.safetensors"))
    with pytest.raises(OutputConflict, match=r"scorers\.aesthetic_score\.sha256"):
        run(cfg)


def _fields(cfg: RunConfig) -> dict:
    import dataclasses

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
