"""The run-root files by which other tools open a run: the list of its image shards and its dataset card.

    images.txt   every committed image shard, one a line, sorted, relative to the run root (as the card's
                 data_files are, so a copied or synced run stays true): webdataset takes brace ranges or lists, not
                 globs, and shard names are content hashes (pipeline.shards.shard_id), so no brace range names them.
    README.md    a Hugging Face dataset card whose ``configs`` give each folder of Parquet files its own config,
                 so ``datasets.load_dataset(RUN)`` does not mix the images, metadata, error and rejected tables.

Both are written by the driver alone, from the commit markers, when an attempt ends (every write task has
returned), and rewritten by every later attempt: they list exactly the committed shards, whatever the number of
writers or retries, and the same shards give the same bytes. An attempt that dies leaves the files of the one
before, which miss the shards it committed until a rerun ends. Numbering shards instead (img2dataset's
00000.tar) would need a counter shared by the writers, and a retried write could take a new number.
"""

from __future__ import annotations

from typing import Any, Iterable

import fsspec

from .outputs import ERRORS_DIR, IMAGES_DIR, METADATA_DIR, REJECTED_DIR
from .sinks import open_atomic

SHARD_LIST = "images.txt"
CARD = "README.md"

# Config name -> its folder, in the order the card lists them; a folder without files gets no config (datasets
# refuses a pattern that matches nothing). Embeddings are .npy files (embedding-reader's layout), not Parquet.
_CONFIGS = {"images": IMAGES_DIR, "metadata": METADATA_DIR, "errors": ERRORS_DIR, "rejected": REJECTED_DIR}
_DESCRIPTIONS = {
    "images": "the image (a Hugging Face Image), key, prompt and seed of each good row",
    "metadata": "one row per good row: key, prompt, seed, settings, pass-through columns",
    "errors": "rows that could not be generated, with the stage and the reason",
    "rejected": "rows a filter rejected (CLIP or aesthetic score below its minimum, nsfw), whole, with the reason",
}


def write_catalog(fs: fsspec.AbstractFileSystem, root: str, markers: Iterable[dict[str, Any]]) -> None:
    """Write ``images.txt`` and ``README.md`` under ``root`` for the committed shards ``markers``."""
    files = sorted(rel for marker in markers for rel in marker["files"])
    images = [rel for rel in files if rel.startswith(f"{IMAGES_DIR}/")]
    _write_text(fs, f"{root}/{SHARD_LIST}", "".join(f"{rel}\n" for rel in images))
    _write_text(fs, f"{root}/{CARD}", dataset_card(files))


def dataset_card(files: list[str]) -> str:
    """The dataset card of a run whose committed files (paths relative to the run root) are ``files``.

    Configs hold Parquet files only: ``images`` where images are in Parquet (then it is the default, so that
    ``load_dataset(RUN)`` gives decoded images), else ``metadata``; webdataset tars are for webdataset."""
    present = [name for name, folder in _CONFIGS.items()
               if any(rel.startswith(f"{folder}/") and rel.endswith(".parquet") for rel in files)]
    default = next((name for name in present if name in ("images", "metadata")), None)
    front = ["configs:"]
    for name in present:
        front += [f"- config_name: {name}", f"  data_files: {_CONFIGS[name]}/*.parquet"]
        front += ["  default: true"] * (name == default)
    body = ["# A karlo-pipeline run", "",
            "Images generated with Karlo v1 alpha (unCLIP) by karlo-pipeline; `manifest.json` records the model, "
            "settings and counts.", ""]
    body += [f"- `{name}` ({_CONFIGS[name]}/): {_DESCRIPTIONS[name]}" for name in present]
    body += ["- `img_emb/`, `text_emb/`: (N, D) float16 L2-normalised CLIP embeddings, `.npy` files row-aligned with "
             "`metadata/` (embedding-reader, clip-retrieval)",
             "- `raw_img_emb/`: the image embeddings as the decoder took them (the prior's output), unnormalised",
             f"- `{SHARD_LIST}`: the image shards, relative to this folder, for `wds.WebDataset` (which takes lists, "
             "not globs)"]
    # A run with no committed rows yet has no folder to name: a card without configs, which datasets reads as
    # an empty folder rather than failing on a pattern that matches nothing.
    head = ["---", *front, "---", ""] if present else []
    return "\n".join(head + body) + "\n"


def _write_text(fs: fsspec.AbstractFileSystem, path: str, text: str) -> None:
    """Write ``text`` to ``path`` unless it holds it already: a rerun that commits nothing rewrites nothing."""
    data = text.encode("utf-8")
    try:
        if fs.cat_file(path) == data:
            return
    except FileNotFoundError:
        pass
    with open_atomic(fs, path) as f:
        f.write(data)
