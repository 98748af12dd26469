"""PCA -> RGB: sign-stable orientation, foreground found by the border rule, the PNG writer."""

import numpy as np
import pytest
import torch
from PIL import Image

from fastdino.eval.pca import (
    border_mask,
    fit_pca,
    high_norm_tokens,
    image_token_norms,
    orient_by_border,
    orient_by_skew,
    pca_rgb,
    write_pca_images,
)
from fastdino.eval.weights import load_eval_backbone


def _object_features(h=8, w=10, dim=16, seed=0, centre=(2, 6, 3, 7)):
    """[h, w, dim]: background = noise around a; a centre box ("object") = noise around b, with
    internal structure along two more directions so the colour components are well defined."""
    gen = torch.Generator().manual_seed(seed)
    f = 0.3 * torch.randn(h, w, dim, generator=gen)
    y0, y1, x0, x1 = centre
    f[..., 0] -= 2.0  # background direction
    f[y0:y1, x0:x1, 0] += 4.0  # the object sits far away along dim 0
    ys, xs = torch.meshgrid(torch.arange(y0, y1), torch.arange(x0, x1), indexing="ij")
    # inside the object: a vertical gradient in [-1, 1] and a skewed horizontal pattern in
    # [0, 1.5], both smaller than the object/background gap (4) so component 1 stays fg vs bg
    vert = (ys - ys.float().mean()) / (ys.float().max() - ys.float().mean())
    horiz = (xs - xs.float().mean()) ** 2
    f[y0:y1, x0:x1, 1] += vert
    f[y0:y1, x0:x1, 2] += 1.5 * horiz / horiz.max()
    fg = torch.zeros(h, w, dtype=torch.bool)
    fg[y0:y1, x0:x1] = True
    return f, fg


def _flips(dim=16, seed=0):
    """Sign flips of the features: all of them, a random subset of dims, a random rotation (an
    SVD may absorb a global flip by itself; the other two leave the signs to the rules)."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.where(torch.rand(dim, generator=gen) < 0.5, -1.0, 1.0)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    return [lambda x: -x, lambda x: x * signs, lambda x: (x.double() @ q).float()]


def test_orientation_rules_undo_a_flipped_component():
    f, _ = _object_features()
    x = f.reshape(-1, f.shape[-1]).double()
    border = border_mask(*f.shape[:2])
    ref = fit_pca(x, 3)
    orient_by_border(ref, x, border)
    orient_by_skew(ref, x, first=1)
    for i in range(3):
        b = fit_pca(x, 3)
        b.components = ref.components.clone()
        b.components[i] = -b.components[i]
        orient_by_border(b, x, border)
        orient_by_skew(b, x, first=1)
        torch.testing.assert_close(b.components, ref.components, rtol=0, atol=0)
    # component 0 points at the object: border (background) patches project negative
    assert (ref.project(x[border])[:, 0] < 0).float().mean() > 0.5


@pytest.mark.parametrize("centre", [(2, 6, 3, 7), (1, 7, 1, 9), (0, 5, 0, 6)],
                         ids=["small", "large", "corner"])
def test_foreground_is_the_object_whatever_the_sign_of_the_features(centre):
    # small: the object is 20% of the patches; large: 60% (only the border ring is background);
    # corner: the object touches the border (10 of its 32 patches) and holds patch 0, which
    # flips the SVD's own sign convention: no rule but the border one passes all three
    f, fg = _object_features(centre=centre)
    for flip in [lambda x: x, *_flips()]:
        out = pca_rgb([flip(f)])[0]
        assert torch.equal(out["foreground"], fg)
        assert out["rgb"][~fg].eq(0).all()  # background black
        assert out["rgb"][fg].gt(0).all()


@pytest.mark.parametrize("color", ["sigmoid", "minmax"])
@pytest.mark.parametrize("shared", [False, True])
def test_orientation_is_stable_under_a_sign_flip(color, shared):
    feats = [_object_features(seed=s)[0] for s in (0, 1)]
    for fg in ("threshold", "none"):
        a = pca_rgb(feats, shared=shared, fg=fg, color=color)
        for flip in _flips():
            b = pca_rgb([flip(x) for x in feats], shared=shared, fg=fg, color=color)
            for ra, rb in zip(a, b, strict=True):
                torch.testing.assert_close(ra["rgb"], rb["rgb"], rtol=0, atol=1e-4)
                assert torch.equal(ra["foreground"], rb["foreground"])
    # and not trivially so: the colour channels do vary over the object
    rgb = pca_rgb(feats, shared=shared, color=color)[0]["rgb"]
    assert (rgb[2:6, 3:7].std(dim=(0, 1)) > 0.05).all()


def test_shared_basis_spans_images_and_the_border_mask():
    f0, _ = _object_features(seed=0)
    f1 = f0 + 5.0  # a uniform shift: separate PCAs would cancel it, a shared one cannot
    sep = pca_rgb([f0, f1])
    torch.testing.assert_close(sep[0]["rgb"], sep[1]["rgb"], rtol=0, atol=1e-5)
    shared = pca_rgb([f0, f1], shared=True, fg="none")
    assert not torch.allclose(shared[0]["rgb"], shared[1]["rgb"])
    m = border_mask(3, 4).reshape(3, 4)
    assert m.sum() == 10 and not m[1, 1:3].any()


def test_writer_sizes_grid_and_determinism(tmp_path):
    backbone, _ = load_eval_backbone("random", arch="vit_test")
    rng = np.random.default_rng(0)
    for name, (w, h) in {"wide": (60, 40), "square": (50, 50)}.items():
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
    inputs = [tmp_path / "wide.png", tmp_path / "square.png"]
    files = write_pca_images(backbone, inputs, tmp_path / "out", resolution=32)
    names = sorted(p.name for p in files)
    assert names == ["grid.png", "square_pca.png", "square_side.png", "wide_pca.png",
                     "wide_side.png"]
    # height = 32, width = aspect-kept width floored to the patch: 60 * 32 / 40 = 48, 32
    assert Image.open(tmp_path / "out" / "wide_pca.png").size == (48, 32)
    assert Image.open(tmp_path / "out" / "square_pca.png").size == (32, 32)
    assert Image.open(tmp_path / "out" / "wide_side.png").size == (96, 32)
    first = {p.name: p.read_bytes() for p in files}
    again = write_pca_images(backbone, inputs, tmp_path / "out2", resolution=32)
    assert {p.name: p.read_bytes() for p in again} == first
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        write_pca_images(backbone, inputs, tmp_path / "bad", resolution=40)


def test_high_norm_tokens_and_their_map(tmp_path):
    norms = torch.full((4, 5), 10.0)
    norms[1, 3] = 35.0  # an artifact token
    norms[2, 0] = 19.0  # below 2x the median
    assert high_norm_tokens(norms).nonzero().tolist() == [[1, 3]]
    assert high_norm_tokens(norms, factor=1.5).nonzero().tolist() == [[1, 3], [2, 0]]
    backbone, _ = load_eval_backbone("random", arch="vit_test")
    with torch.no_grad():  # plant one: a huge value in block 1's output at patch (1, 2)
        hook = backbone.blocks[-1].register_forward_hook(
            lambda _m, _i, out: _plant(out, backbone.n_storage_tokens))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
        tmp_path / "img.png")
    files = write_pca_images(backbone, [tmp_path / "img.png"], tmp_path / "out", resolution=48,
                             norms=True)
    n = image_token_norms(backbone, Image.open(tmp_path / "img.png").convert("RGB"))
    hook.remove()
    assert sorted(p.name for p in files) == ["img_norms.png", "img_pca.png", "img_side.png",
                                             "norms.json"]
    import json
    rep = json.loads((tmp_path / "out" / "norms.json").read_text())["img"]
    assert rep["high_norm"] == [[1, 2]] and rep["n_tokens"] == 3 * 4
    norm_map = np.asarray(Image.open(tmp_path / "out" / "img_norms.png"))
    assert norm_map.shape == (48, 64, 3)
    assert tuple(norm_map[16 + 8, 32 + 8]) == (255, 0, 0)  # the planted patch is red
    assert norm_map[8, 8, 1] == norm_map[8, 8, 0]  # the others grey
    assert rep["median"] == pytest.approx(float(n.median()), rel=1e-5)
    assert rep["max"] == pytest.approx(float(n[1, 2]), rel=1e-5)


def _plant(out, n_storage):
    """Block output [B, 1 + n_storage + h*w, D] (or a list of them): token (1, 2) of a 3 x 4
    grid x 100."""
    outs = out if isinstance(out, list) else [out]
    for o in outs:
        o[:, 1 + n_storage + 1 * 4 + 2] *= 100.0
    return out
