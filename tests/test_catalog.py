"""The run-root shard list and dataset card (pipeline.catalog), from commit markers alone: no Ray."""

from __future__ import annotations

import fsspec
import yaml

from pipeline.catalog import dataset_card, write_catalog


def _front_matter(card: str) -> dict:
    head, sep, _ = card.removeprefix("---\n").partition("\n---\n")
    assert card.startswith("---\n") and sep, card
    return yaml.safe_load(head)


def test_card_gives_each_parquet_folder_a_config_and_parquet_images_the_default():
    files = ["images/b.parquet", "img_emb/img_emb_b.npy", "metadata/metadata_b.parquet", "errors/errors_a.parquet",
             "rejected/rejected_b.parquet"]
    configs = _front_matter(dataset_card(files))["configs"]
    assert configs == [
        {"config_name": "images", "data_files": "images/*.parquet", "default": True},
        {"config_name": "metadata", "data_files": "metadata/*.parquet"},
        {"config_name": "errors", "data_files": "errors/*.parquet"},
        {"config_name": "rejected", "data_files": "rejected/*.parquet"},
    ]


def test_card_of_a_webdataset_run_defaults_to_metadata_and_names_no_absent_folder():
    configs = _front_matter(dataset_card(["images/b.tar", "metadata/metadata_b.parquet"]))["configs"]
    assert configs == [{"config_name": "metadata", "data_files": "metadata/*.parquet", "default": True}]


def test_card_of_a_run_without_committed_rows_has_no_configs():
    assert not dataset_card([]).startswith("---")


def test_shard_list_follows_the_committed_markers_on_every_attempt(tmp_path):
    fs = fsspec.filesystem("file")
    first = {"shard": "b", "files": ["images/b.tar", "metadata/metadata_b.parquet"]}
    write_catalog(fs, str(tmp_path), [first])
    assert (tmp_path / "images.txt").read_text() == "images/b.tar\n"
    # A resumed attempt rewrites both files from all markers, in shard-id order whatever order they come in.
    write_catalog(fs, str(tmp_path), [first, {"shard": "a", "files": ["images/a.tar", "errors/errors_a.parquet"]}])
    assert (tmp_path / "images.txt").read_text().split() == ["images/a.tar", "images/b.tar"]
    assert [c["config_name"] for c in _front_matter((tmp_path / "README.md").read_text())["configs"]] == \
        ["metadata", "errors"]


def test_an_unchanged_catalog_is_not_rewritten(tmp_path):
    fs = fsspec.filesystem("file")
    markers = [{"shard": "b", "files": ["images/b.tar", "metadata/metadata_b.parquet"]}]
    write_catalog(fs, str(tmp_path), markers)
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    write_catalog(fs, str(tmp_path), markers)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
