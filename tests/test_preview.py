"""`karlo preview`: galleries of runs and sweeps written by the real shard writer (local and on S3), escaping,
refusals, a real generated run, and the pages opened in a real headless Chromium."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from browser import Browser, find_chromium
from click.testing import CliRunner
from PIL import Image

from jobs.cli import main
from jobs.preview import write_preview
from jobs.preview.read import read_output
from jobs.preview.sheet import SHEET_THUMB
from pipeline.outputs import output_filesystem
from pipeline.shards import ShardRows
from pipeline.sinks import KarloDatasink, write_json_atomic

SETTINGS = {"model": "tiny-random", "prior_steps": 3, "decoder_steps": 3, "super_res_steps": 2}


def colour(i: int) -> tuple[int, int, int]:
    """A distinct flat colour per input row, so a thumbnail shows which row's image it is."""
    return (40 * i % 256, 255 - 30 * i % 256, 90 + 50 * i % 160)


def make_run(url: str, prompts: list[str], *, storage_options=None, errors: dict[int, str] | None = None,
             scores: list[float] | None = None, shard_order: list[int] | None = None, rows_per_shard: int = 3,
             output_format: str = "webdataset", settings: dict | None = None, uncommitted: int = 0,
             extra_columns: dict[str, list] | None = None, min_clip_score: float | None = None) -> list[str]:
    """A run of flat-colour images written by the pipeline's own sink, shard by shard, and its manifest.

    ``shard_order`` permutes the rows before cutting them into shards (Ray's order is not the input order);
    ``uncommitted`` extra rows are written as a shard whose marker is then removed (an interrupted write).
    ``extra_columns`` are added to the rows as they are; with ``min_clip_score``, rows scoring below go to rejected/.
    Returns the shard ids.
    """
    errors = errors or {}
    n = len(prompts)
    order = shard_order or list(range(n))
    columns = {
        "key": [f"row-{i}" for i in range(n + uncommitted)],
        "id": [f"row-{i}" for i in range(n + uncommitted)],
        "prompt": prompts + [f"extra {i}" for i in range(uncommitted)],
        "seed": [1000 + i for i in range(n + uncommitted)],
        "error": [errors.get(i, "") for i in range(n + uncommitted)],
        "error_stage": ["prior" if i in errors else "" for i in range(n + uncommitted)],
        "source": ["prompts.parquet"] * (n + uncommitted),
        "source_row": list(range(n + uncommitted)),
    }
    columns.update(extra_columns or {})
    if scores is not None:
        columns["clip_score"] = scores + [0.0] * uncommitted
    table = pa.table(columns)
    images = np.stack([np.full((256, 256, 3), colour(i), np.uint8) for i in range(n + uncommitted)])
    emb = np.zeros((n + uncommitted, 8), np.float32)
    tensors = {"image": images, "img_emb": emb, "text_emb": emb}
    if min_clip_score is not None:
        tensors["clip_img_emb"] = emb
    rows = ShardRows(table, tensors)
    sink = KarloDatasink(url, storage_options=storage_options, output_format=output_format,
                         rows_per_shard=rows_per_shard, settings=SETTINGS, min_clip_score=min_clip_score)
    fs, root = output_filesystem(url, storage_options)
    shards = []
    for start in range(0, n, rows_per_shard):
        picked = np.zeros(n + uncommitted, bool)
        picked[order[start:start + rows_per_shard]] = True
        shards.append(sink.write_shard(fs, root, rows.filter(picked))["shard"])
    if uncommitted:
        picked = np.arange(n + uncommitted) >= n
        fs.rm(f"{root}/_commits/{sink.write_shard(fs, root, rows.filter(picked))['shard']}.json")
    write_json_atomic(fs, f"{root}/manifest.json", {
        "identity": {"model": {"model": "tiny-random"}, "settings": {"seed": 0, **(settings or {})}},
        "input_rows": n, "status": "complete",
    })
    return shards


class Page(html.parser.HTMLParser):
    """Tags, attributes and text of a page as a browser's parser sees them."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [attrs for t, attrs in self.tags if t == tag]


def thumbnails_by_key(page_html: str) -> dict[str, tuple[int, ...]]:
    """key -> mean colour of the thumbnail in the card of that key."""
    cards = re.findall(r'<figure><img src="data:image/jpeg;base64,([^"]+)".*?<summary>([^<]+)</summary>', page_html)
    out = {}
    for data, key in cards:
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        out[key] = tuple(int(round(v)) for v in image.reshape(-1, 3).mean(axis=0))
    return out


def assert_colour(got, i: int, tolerance: int = 6) -> None:
    assert max(abs(a - b) for a, b in zip(got, colour(i))) <= tolerance, (got, colour(i))


def test_run_gallery_shows_the_first_rows_in_input_order(tmp_path):
    prompts = [f"prompt number {i}" for i in range(8)]
    make_run(str(tmp_path / "run"), prompts, errors={2: "CUDA out of memory", 5: "prompt is empty"},
             scores=[0.1 * i for i in range(8)], shard_order=[7, 4, 0, 6, 1, 5, 3, 2], uncommitted=2)
    files = write_preview(str(tmp_path / "run"), tmp_path / "preview", limit=4)
    assert files.images == 4 and files.page == tmp_path / "preview" / "index.html"
    page_html = files.page.read_text()

    # The first four good rows of the input, whatever shards they are in; nothing from the uncommitted shard.
    thumbs = thumbnails_by_key(page_html)
    assert list(thumbs) == ["row-0", "row-1", "row-3", "row-4"]
    for key, got in thumbs.items():
        assert_colour(got, int(key.split("-")[1]))
    assert "extra" not in page_html
    assert "6 images · 2 error rows · 3 shards · 8 input rows" in page_html
    assert "score 0.3000" in page_html and "seed 1003" in page_html
    assert "<li>seed=0</li>" in page_html and "<li>model=tiny-random</li>" in page_html
    # Every error row is listed, in input order, with its stage and reason.
    errors = re.findall(r"<tr><td><code>(row-\d)</code></td><td>(\w+)</td><td class=\"error\">([^<]+)</td>", page_html)
    assert errors == [("row-2", "prior", "CUDA out of memory"), ("row-5", "prior", "prompt is empty")]

    sheet = Image.open(files.sheet)
    assert sheet.width == 2 * (SHEET_THUMB + 8) + 8  # four thumbnails: two columns
    top = 2 * 16 + 8
    assert sheet.getpixel((8 + SHEET_THUMB // 2, top + SHEET_THUMB // 2)) == colour(0)
    assert sheet.getpixel((8 + SHEET_THUMB + 8 + SHEET_THUMB // 2, top + SHEET_THUMB // 2)) == colour(1)


HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "</title><style>body{display:none}</style>",
    "a & b <i>tag</i> ' \" ` ${x} $body",
]


def test_prompts_are_escaped_and_nothing_loads_from_elsewhere(tmp_path):
    make_run(str(tmp_path / "run"), HOSTILE, errors={3: "<b>bad</b>"}, rows_per_shard=2)
    page_html = write_preview(str(tmp_path / "run"), tmp_path / "preview").page.read_text()
    page = Page(page_html)
    assert page.all("script") == [] and len(page.all("style")) == 1
    images = page.all("img")
    assert len(images) == 3 and all(img["src"].startswith("data:image/jpeg;base64,") for img in images)
    assert [img["alt"] for img in images] == HOSTILE[:3]  # the prompt survives as text
    assert [a["href"] for a in page.all("a")] == ["contact_sheet.png"]
    assert not [attrs for _, attrs in page.tags if any(k.startswith("on") for k in attrs)]
    csp = next(m["content"] for m in page.all("meta") if m.get("http-equiv") == "Content-Security-Policy")
    assert csp.startswith("default-src 'none'")
    text = "".join(page.text)
    assert all(prompt in text for prompt in HOSTILE) and "<b>bad</b>" in text


def test_parquet_run_on_s3_through_the_cli(s3_bucket, tmp_path, monkeypatch):
    url = f"{s3_bucket.url}/runs/cats"
    make_run(url, [f"a cat, take {i}" for i in range(5)], storage_options=s3_bucket.storage_options,
             output_format="parquet", rows_per_shard=2, errors={1: "bad seed"})
    # As users run it: the endpoint comes from the environment.
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["preview", url, "--limit", "3"])
    assert result.exit_code == 0, result.output
    page = tmp_path / "preview-cats" / "index.html"  # the default folder, named after OUTPUT
    assert f"3 images: {page}" in result.output and (tmp_path / "preview-cats" / "contact_sheet.png").is_file()
    thumbs = thumbnails_by_key(page.read_text())
    assert list(thumbs) == ["row-0", "row-2", "row-3"]
    for key, got in thumbs.items():
        assert_colour(got, int(key.split("-")[1]))
    assert "bad seed" in page.read_text() and url in page.read_text()


def test_sweep_grid_has_one_column_per_point_in_grid_order(tmp_path):
    root = tmp_path / "sweep"
    prompts = [f"a lighthouse, variant {i}" for i in range(4)]
    points = [(f"cfg-{scale}", {"prompts": "s3://bucket/prompts.parquet", "decoder_guidance_scale": float(scale)})
              for scale in (8, 2, 16)]
    make_run(str(root / "cfg-8"), prompts, errors={1: "NaN in the decoder"}, rows_per_shard=3)
    make_run(str(root / "cfg-2"), prompts, shard_order=[3, 2, 1, 0], rows_per_shard=1, scores=[0.5, 0.6, 0.7, 0.8])
    # cfg-16 has not run yet: no folder.
    (root / "sweep.json").write_text(json.dumps({"points": [{"name": n, "settings": s} for n, s in points]}))
    files = write_preview(str(root), tmp_path / "preview", limit=3)
    view = read_output(str(root), limit=3)
    assert [p.name for p in view.points] == ["cfg-8", "cfg-2", "cfg-16"] and view.points[2].run is None
    assert view.keys == ["row-0", "row-1", "row-2"] and files.images == 2 + 3

    page_html = files.page.read_text()
    header = re.search(r"<thead>(.*?)</thead>", page_html).group(1)
    assert re.findall(r"<th>([\w-]+)<ul", header) == ["cfg-8", "cfg-2", "cfg-16"]
    assert "decoder_guidance_scale=16" in header and "prompts=" not in header  # only what differs
    rows = re.findall(r"<tr><th>(.*?)</tr>", re.search(r"<tbody>(.*?)</tbody>", page_html).group(1))
    assert len(rows) == 3 and all(row.count("<td>") == 3 for row in rows)
    assert rows[0].startswith("a lighthouse, variant 0<br><code>row-0</code>")
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in rows]
    assert "error (prior): NaN in the decoder" in cells[1][0] and "score 0.6000" in cells[1][1]
    assert all("no run yet" in row[2] for row in cells)
    for i, row in enumerate(cells):
        for cell in row[:2] if i != 1 else row[1:2]:
            data = re.search(r'src="data:image/jpeg;base64,([^"]+)"', cell).group(1)
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
            assert_colour(image.reshape(-1, 3).mean(axis=0), i)

    sheet = Image.open(files.sheet)
    assert sheet.size == (2 * SHEET_THUMB + 3 * (SHEET_THUMB + 8) + 8, 4 * 16 + 8 + 3 * (SHEET_THUMB + 16 + 8) + 8)


def test_sweep_without_sweep_json_is_its_run_subfolders(tmp_path):
    root = tmp_path / "sweep"
    for name, scale in [("b-point", 2.0), ("a-point", 4.0)]:
        make_run(str(root / name), ["a red door", "a blue door"], settings={"prior_guidance_scale": scale})
    (root / "notes").mkdir()  # not a run
    view = read_output(str(root))
    assert [p.name for p in view.points] == ["a-point", "b-point"]
    # Only what differs between the points heads their columns.
    assert [p.settings for p in view.points] == [{"prior_guidance_scale": 4.0}, {"prior_guidance_scale": 2.0}]
    assert view.prompts == {"row-0": "a red door", "row-1": "a blue door"}


def test_rejected_rows_of_committed_shards_are_listed(tmp_path):
    root = tmp_path / "run"
    shards = make_run(str(root), ["a fox", "a wolf", "a bear"], scores=[0.3, 0.31, 0.32])
    (root / "rejected").mkdir()
    table = pa.table({"key": ["row-7", "row-8"], "prompt": ["a <blurry> owl", "a hare"], "source_row": [7, 8],
                      "clip_score": [0.12, 0.05], "image": [b"png", b"png"]})
    # A shard's rejected rows are one of its files, listed in its marker.
    pq.write_table(table.slice(0, 1), root / "rejected" / f"rejected_{shards[0]}.parquet")
    marker_path = root / "_commits" / f"{shards[0]}.json"
    marker = json.loads(marker_path.read_text())
    marker["files"].append(f"rejected/rejected_{shards[0]}.parquet")
    marker_path.write_text(json.dumps(marker))
    # Its shard never committed: not listed.
    pq.write_table(table.slice(1, 1), root / "rejected" / f"rejected_{'f' * 16}.parquet")
    page_html = write_preview(str(root), tmp_path / "preview").page.read_text()
    assert "Rejected rows (1)" in page_html and "clip_score 0.1200" in page_html
    assert "a &lt;blurry&gt; owl" in page_html and "a hare" not in page_html


def test_unusable_outputs_are_refused_with_a_message(tmp_path):
    def preview(*args):
        result = CliRunner().invoke(main, ["preview", *args, "--out", str(tmp_path / "preview")])
        assert result.exit_code == 2 and "Traceback" not in result.output, result.output
        return result.output

    assert f"error: {tmp_path / 'nowhere'} does not exist" in preview(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    assert "is neither a karlo run (manifest.json) nor a sweep" in preview(str(tmp_path / "empty"))
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "sweep.json").write_text('{"grid": []}')
    assert "sweep.json is not a sweep description: KeyError('points')" in preview(str(tmp_path / "sweep"))
    assert "Invalid value for '--limit'" in preview(str(tmp_path / "empty"), "--limit", "0")
    assert not (tmp_path / "preview").exists()


# ---------------------------------------------------------------------------------------------- real runs, browser


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    binary = find_chromium()
    if binary is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is not installed: .ci/run installs Debian's chromium for the gallery tests")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    b = Browser(binary, tmp_path_factory.mktemp("chromium-profile"))
    yield b
    b.close()


def assert_shows(browser, page, screenshot, images: int) -> None:
    report = browser.open(page, screenshot)
    assert report.errors == []
    assert (report.images, report.loaded_images) == (images, images)
    shot = Image.open(report.screenshot)
    assert shot.format == "PNG" and shot.width >= 1000 and shot.height >= 600


def test_galleries_load_in_a_headless_browser(browser, tmp_path):
    make_run(str(tmp_path / "run"), HOSTILE + ["a kite"], errors={1: "bad"}, scores=[0.2] * 5)
    run_files = write_preview(str(tmp_path / "run"), tmp_path / "run-preview")
    assert_shows(browser, run_files.page, tmp_path / "run.png", images=4)
    for name in ("p1", "p2"):
        make_run(str(tmp_path / "sweep" / name), ["a kite", "a boat", "a bell"], errors={2: "bad"})
    sweep_files = write_preview(str(tmp_path / "sweep"), tmp_path / "sweep-preview")
    assert_shows(browser, sweep_files.page, tmp_path / "sweep.png", images=4)


def test_a_gallery_with_insets_rejected_images_and_a_long_prompt_loads_in_a_browser(browser, tmp_path):
    source = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (0, 0, 255)).save(source)
    make_run(str(tmp_path / "run"), ["a long prompt " * 60, "a kite", "a boat"], scores=[0.3, 0.1, 0.3],
             min_clip_score=0.2, extra_columns={"source_image": [str(source), None, None]})
    files = write_preview(str(tmp_path / "run"), tmp_path / "preview")
    assert_shows(browser, files.page, tmp_path / "run.png", images=4)  # 2 cards, 1 inset, 1 rejected image


def test_the_browser_check_catches_broken_pages(browser, tmp_path):
    """The driver sees what a user would: a missing image, a console error, an exception, a blocked request."""
    broken = tmp_path / "broken.html"
    broken.write_text('<img src="missing.png"><script>console.error("from the console"); undefinedFunction();</script>')
    report = browser.open(broken, tmp_path / "broken.png")
    assert (report.images, report.loaded_images) == (1, 0)
    text = "\n".join(report.errors)
    assert "ERR_FILE_NOT_FOUND" in text and "from the console" in text and "undefinedFunction" in text

    external = tmp_path / "external.html"
    external.write_text('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'">'
                        '<img src="https://cdn.example.invalid/logo.png">')
    report = browser.open(external, tmp_path / "external.png")
    assert (report.images, report.loaded_images) == (1, 0)
    assert "Content Security Policy" in "\n".join(report.errors)


@pytest.mark.slow
def test_preview_of_a_generated_run(generated_run, browser, tmp_path):
    generation = generated_run.result
    assert generation.exit_code == 3, f"{generation.exception!r}\n{generation.output[-3000:]}"  # one error row
    result = CliRunner().invoke(main, ["preview", str(generated_run.root), "--out", str(tmp_path / "preview")])
    assert result.exit_code == 0, result.output
    page_html = (tmp_path / "preview" / "index.html").read_text()
    assert list(thumbnails_by_key(page_html)) == ["row-0", "row-1", "row-2", "row-4", "row-5"]
    assert "Error rows (1)" in page_html and "prompt is empty" in page_html
    assert "seed 900" in page_html and "prior_steps=3" in page_html
    assert_shows(browser, tmp_path / "preview" / "index.html", tmp_path / "generated.png", images=5)


# ---------------------------------------------------------------------------------------------- run states, cards


def _with_status(root, status: str, **driver) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    manifest.pop("driver", None)
    manifest.update(status=status, **({"driver": driver} if driver else {}))
    (root / "manifest.json").write_text(json.dumps(manifest))


def test_a_running_manifest_whose_driver_is_gone_reads_as_interrupted(tmp_path):
    import socket
    import subprocess
    import sys

    root = tmp_path / "run"
    make_run(str(root), ["a kite"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    cases = [
        ({"host": socket.gethostname(), "pid": gone.pid}, "interrupted (rerun to resume)"),
        ({"host": socket.gethostname(), "pid": os.getpid()}, "running"),
        ({"host": "elsewhere", "pid": 1}, "running on elsewhere, or interrupted (rerun to resume)"),
        ({}, "running, or interrupted (rerun to resume)"),  # manifests written before the driver was recorded
    ]
    for driver, expected in cases:
        _with_status(root, "running", **driver)
        assert f"status {expected}</p>" in write_preview(str(root), tmp_path / "preview").page.read_text(), driver
    _with_status(root, "incomplete")
    assert "status incomplete</p>" in write_preview(str(root), tmp_path / "preview").page.read_text()


def test_a_long_prompt_is_clamped_with_the_whole_text_in_its_title(tmp_path):
    long = "a very long prompt " * 40
    make_run(str(tmp_path / "run"), [long, "short"])
    page_html = write_preview(str(tmp_path / "run"), tmp_path / "preview").page.read_text()
    prompts = [p for p in Page(page_html).all("p") if p.get("class") == "prompt"]
    assert [p["title"] for p in prompts] == [long, "short"]
    assert "-webkit-line-clamp: 3" in page_html


def test_variation_cards_show_the_source_image_and_only_decoder_guidance(tmp_path):
    source = tmp_path / "input.png"
    Image.new("RGB", (64, 64), (255, 0, 0)).save(source)
    make_run(str(tmp_path / "run"), ["", ""], extra_columns={
        "source_image": [str(source), "stored-with-its-bytes.png"], "decoder_guidance_scale": [8.0, 8.0]})
    page_html = write_preview(str(tmp_path / "run"), tmp_path / "preview").page.read_text()
    sources = [img for img in Page(page_html).all("img") if img.get("class") == "source"]
    assert [img["title"] for img in sources] == [f"source image {source}"]  # the name alone has nothing to show
    inset = np.asarray(Image.open(io.BytesIO(base64.b64decode(sources[0]["src"].split(",", 1)[1]))).convert("RGB"))
    assert max(abs(int(v) - w) for v, w in zip(inset.reshape(-1, 3).mean(axis=0), (255, 0, 0))) <= 6
    assert "decoder cfg 8" in page_html and "cfg /" not in page_html
    assert list(thumbnails_by_key(page_html)) == ["row-0", "row-1"]  # the variation is still the card's image


def test_rejected_rows_are_listed_with_their_images(tmp_path):
    make_run(str(tmp_path / "run"), ["a fox", "a wolf", "a bear"], scores=[0.3, 0.1, 0.05], min_clip_score=0.2)
    page_html = write_preview(str(tmp_path / "run"), tmp_path / "preview").page.read_text()
    assert "Rejected rows (2)" in page_html
    thumbs = re.findall(r'<tr><td><code>(row-\d)</code>.*?<img class="thumb" src="data:image/jpeg;base64,([^"]+)"',
                        page_html)
    assert [key for key, _ in thumbs] == ["row-1", "row-2"]
    for key, data in thumbs:
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
        assert_colour(tuple(int(round(v)) for v in image.reshape(-1, 3).mean(axis=0)), int(key[-1]))
