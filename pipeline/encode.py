"""The encode step: final images (uint8 arrays) -> image files (PNG, JPEG or WebP bytes), before the shard writes.

Encoding is the data plane's heaviest CPU work (a noise-like 256 px PNG takes ~8 ms on one core). Done in the
write task, it could only start once a whole shard's rows had left the last model stage, and a shard's images
were encoded one after another. As its own pool of actors it streams: each block is encoded as soon as the last
stage emits it, on whatever CPUs are free, and the write tasks only assemble and upload bytes. (A pool of actors
rather than tasks: short tasks on a small machine paid a fresh worker process each time Ray had reaped the last.)
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from ray.data import ActorPoolStrategy, Dataset
from ray.data.block import BlockAccessor

from pipeline import columns as C
from pipeline.shards import encode_image, error_mask

# A CPU share per encoder actor: the pool grows while blocks queue up and CPUs are free (pipeline.run caps it at
# one encoder per CPU).
ENCODE_CPUS = 0.25


def encode_images(table: pa.Table, *, image_format: str) -> pa.Table:
    """Replace the ``image`` column, (N, H, W, 3) uint8, by each row's encoded file (large_binary).

    Error rows carry zero-filled images that are never written; they get empty bytes.
    """
    if table.num_rows == 0:
        return table  # possibly without columns (see pipeline.shards.iter_shards)
    images = BlockAccessor.for_block(table.select([C.IMAGE])).to_numpy(C.IMAGE)  # (N, H, W, 3) uint8
    failed = error_mask(table)
    encoded = [b"" if bad else encode_image(np.asarray(image), image_format) for image, bad in zip(images, failed)]
    index = table.schema.get_field_index(C.IMAGE)
    return table.set_column(index, pa.field(C.IMAGE, pa.large_binary()), pa.array(encoded, pa.large_binary()))


class ImageFileEncoder:
    """One encoder actor (Ray Data calls it on each block)."""

    def __init__(self, image_format: str):
        self.image_format = image_format

    def __call__(self, table: pa.Table) -> pa.Table:
        return encode_images(table, image_format=self.image_format)


def add_encode(ds: Dataset, image_format: str, max_actors: int) -> Dataset:
    """Append the encode step: an actor pool of 1 to ``max_actors`` encoders."""
    return ds.map_batches(ImageFileEncoder, fn_constructor_args=(image_format,), batch_format="pyarrow",
                          compute=ActorPoolStrategy(min_size=1, max_size=max_actors), num_cpus=ENCODE_CPUS)
