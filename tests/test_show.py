import pytest
import torch
from PIL import Image

import fxprune
from fxprune import ClusTR, Compose, EViT, FxPruneError, ToMe, TopK
from fxprune.tools.datasets import DigitScenes
from fxprune.tools.models import digits_vit
from fxprune.tools.show import cluster_maps, draw_clusters, draw_kept_patches, token_sources


def _images(n=3):
    data = DigitScenes("test", n, seed=1)
    return torch.stack([data[i][0] for i in range(n)])


def test_sources_follow_every_reduction():
    gm = fxprune.transform(digits_vit(), EViT(0.5, (1, 3)))
    steps = token_sources(gm, _images())
    assert [s.block for s in steps] == [1, 3]
    first, second = (s.patch_states(prefix=1) for s in steps)
    # block 1 keeps ceil(0.5 * 64) = 32 patches and fuses the other 32; block 3 keeps 17 of 33 tokens
    assert ((first == 2).sum(-1) == 32).all() and ((first == 1).sum(-1) == 32).all()
    assert ((second == 2).sum(-1) <= 17).all()
    assert ((second == 2) <= (first == 2)).all()  # a dropped patch never comes back


def test_top_k_drops_without_merging():
    gm = fxprune.transform(digits_vit(), TopK(0.25, (2,)))
    states = token_sources(gm, _images())[0].patch_states(prefix=1)
    assert ((states == 2).sum(-1) == 16).all() and (states == 1).sum() == 0


def test_picture_has_one_row_per_image_and_one_panel_per_reduced_block(tmp_path):
    gm = fxprune.transform(digits_vit(), EViT(0.5, (1, 3, 5)))
    path = draw_kept_patches(gm, _images(4), tmp_path / "kept.png", labels=["a", "b", "c", "d"], scale=2)
    width, height = Image.open(path).size
    assert width >= 4 * 128 and height >= 4 * 128


def test_tome_merges_are_tracked_to_the_patches_they_merge():
    gm = fxprune.transform(digits_vit(), ToMe(8, (0, 1)))
    first, second = (s.patch_states(prefix=1) for s in token_sources(gm, _images()))
    for states in (first, second):
        assert (states == 0).sum() == 0  # merging never drops a patch
    # 8 patches merge into at most 8 others in block 0: 9 to 16 merged patches, the rest still alone
    merged = (first == 1).sum(-1)
    assert ((9 <= merged) & (merged <= 16)).all()
    assert ((second == 1) >= (first == 1)).all()  # a merged patch stays merged


def test_sizes_a_top_k_passes_on_are_not_taken_for_its_tokens():
    gm = fxprune.transform(digits_vit(), Compose([ToMe(8, (0,)), TopK(0.5, (2,))]))
    merged, kept = token_sources(gm, _images())
    assert (merged.block, kept.block) == (0, 2)
    assert kept.sources.shape[1] == 1 + 28  # class token and ceil(0.5 · (65 − 8 − 1)) of the merged tokens
    rows_of_merged = (kept.sources.unsqueeze(2) == merged.sources.unsqueeze(1)).all(-1).any(-1)
    assert rows_of_merged.all()  # each kept token stands for what one token after the merge stood for


def test_cluster_maps_give_each_patch_the_cluster_its_key_fell_in():
    gm = fxprune.transform(digits_vit(), ClusTR((4, 32), (0, 3)))
    maps = cluster_maps(gm, _images())
    assert [block for block, _ in maps] == [0, 3]
    for _, clusters in maps:  # first head group: 4 clusters over the 64 patches
        assert clusters.shape == (3, 64) and clusters.min() >= 0 and clusters.max() <= 3
    assert not torch.equal(maps[0][1][0], maps[0][1][1])  # the clustering follows the image


def test_cluster_picture_has_one_panel_per_clustr_block_and_needs_one(tmp_path):
    gm = fxprune.transform(digits_vit(), ClusTR(8, (1, 4)))
    width, _ = Image.open(draw_clusters(gm, _images(2), tmp_path / "c.png", scale=2)).size
    assert width >= 3 * 128
    with pytest.raises(FxPruneError, match="no ClusTR block"):
        cluster_maps(fxprune.transform(digits_vit(), ToMe(4, (1,))), _images(2))


def test_pictures_of_images_that_are_not_square_lay_the_patches_out_in_the_images_proportions(tmp_path):
    import timm

    from fxprune.tools.show import _grid, _per_pixel

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=(32, 48), patch_size=8, depth=3,
                              embed_dim=32, num_heads=2).eval()
    images = torch.rand(2, 3, 32, 48)
    gm = fxprune.transform(model, ToMe(3, (0, 1)))
    path = draw_kept_patches(gm, images, tmp_path / "kept.png", scale=2)  # before: "not a square grid"
    assert Image.open(path).size[1] > 2 * 32 * 2
    assert _grid(24, images) == (4, 6)
    spread = _per_pixel(torch.arange(24), (4, 6), images.shape[-2:])
    assert spread.shape == (32, 48) and spread[0, 47] == 5 and spread[31, 0] == 18
