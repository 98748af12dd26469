"""Data curation (SPEC.md §5): embed an image pool, hierarchical k-means with resampling steps,
balanced hierarchical sampling into a file list that training reads (`data.file_list`).

    embed.py         images -> L2-normalised CLS embeddings (fp16 memory map), resumable
    rows.py          chunked, rank-sharded reading of an [N, D] matrix that may not fit in memory
    kmeans.py        k-means++ init + Lloyd (assignment: kernels/kmeans_assign.py on GPU)
    hierarchical.py  levels of k-means over centroids, resampling steps, save / load
    sampling.py      water-filling quotas, recursive balanced sampling, size summaries
    cli.py           `fastdino curate embed | cluster | sample`
"""
