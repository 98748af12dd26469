"""Feature extraction (eval transform, batching) and the disk cache (hits, and misses when the
weights, the files or the image size change)."""

import os

import torch
from PIL import Image

from fastdino.eval.features import (
    BackboneExtractor,
    cached_features,
    resize_center_crop,
    to_normalized_tensor,
)
from fastdino.eval.weights import load_eval_backbone


def _images(tmp_path, sizes=((40, 56), (64, 32), (33, 33))):
    paths = []
    gen = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate(sizes):
        arr = (torch.rand(h, w, 3, generator=gen) * 255).to(torch.uint8).numpy()
        p = tmp_path / f"img{i}.png"
        Image.fromarray(arr).save(p)
        paths.append(str(p))
    return paths


def test_resize_center_crop_is_square_and_centred():
    img = Image.new("RGB", (100, 50))
    img.paste((255, 0, 0), (0, 0, 50, 50))  # left half red: the centre crop sees both halves
    out = resize_center_crop(img, 32)
    assert out.size == (32, 32)
    px = out.load()
    assert px[2, 16][0] > 200 and px[29, 16][0] < 50  # red left edge, black right edge


def test_extractor_matches_a_direct_forward(tmp_path):
    backbone, _ = load_eval_backbone("random", arch="vit_test")
    paths = _images(tmp_path)
    feats = BackboneExtractor(backbone, image_size=32, batch_size=2, progress=False)(paths)
    assert feats["cls"].shape == feats["patch_mean"].shape == (3, 32)
    x = torch.stack([to_normalized_tensor(resize_center_crop(Image.open(p).convert("RGB"), 32))
                     for p in paths])
    with torch.no_grad():
        out = backbone.forward_features(x)
    torch.testing.assert_close(feats["cls"], out["x_norm_clstoken"])
    torch.testing.assert_close(feats["patch_mean"], out["x_norm_patchtokens"].mean(1))


def test_cache_hits_without_recomputing_and_misses_on_changed_weights_or_files(tmp_path):
    paths = _images(tmp_path)
    calls = []

    def counting(extractor):
        def run(ps):
            calls.append(len(ps))
            return extractor(ps)
        return run

    # weights saved to a file; the key is the digest of what load_eval_backbone loaded
    backbone, _ = load_eval_backbone("random", arch="vit_test", seed=0)
    torch.save(backbone.state_dict(), tmp_path / "w.pth")
    cache = tmp_path / "cache"

    def features(image_size=32):
        model, info = load_eval_backbone(tmp_path / "w.pth", arch="vit_test")
        ext = counting(BackboneExtractor(model, image_size=image_size, progress=False))
        key = {"weights": info.digest, "arch": info.arch, "image_size": image_size}
        return cached_features(ext, paths, cache, key)

    first = features()
    again = features()
    assert calls == [3]  # the second call was served from disk
    for k in first:
        assert torch.equal(first[k], again[k])
    assert len(list(cache.glob("*.pt"))) == 1 and not list(cache.glob(".*tmp"))

    sd = torch.load(tmp_path / "w.pth", weights_only=True)
    sd["norm.bias"] = sd["norm.bias"] + 0.5  # one tensor changed -> a new digest
    torch.save(sd, tmp_path / "w.pth")
    changed = features()
    assert calls == [3, 3]
    assert not torch.allclose(changed["cls"], first["cls"])

    features(image_size=48)  # another resolution
    assert calls == [3, 3, 3]
    st = os.stat(paths[0])
    os.utime(paths[0], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # an image was rewritten
    features()
    assert calls == [3, 3, 3, 3]
    features()  # and that state is cached again
    assert calls == [3, 3, 3, 3]
