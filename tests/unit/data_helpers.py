"""Helpers shared by the data tests."""

import tarfile


def pack_shards(images, out, per_shard):
    """The files of folder `images` as WebDataset tar shards out/part-<k>.tar (sorted, per_shard
    per shard): their names sort as the folder's do, so the datasets index them alike."""
    files = sorted(images.iterdir())
    out.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(files), per_shard):
        with tarfile.open(out / f"part-{k // per_shard}.tar", "w") as tar:
            for f in files[k:k + per_shard]:
                tar.add(f, arcname=f.name)
    return out
