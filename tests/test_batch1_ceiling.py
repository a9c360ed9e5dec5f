import runpy
from pathlib import Path

import pytest
import torch
from vits import image_batch, timm_vit

import fxprune
from fxprune.methods.adavit import set_usage
from fxprune.passes.skipping import calls_of, run_if_used
from fxprune.tools.show import usage
from fxprune.tools.speed import Timing

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "batch1_ceiling.py"


@pytest.fixture(scope="module")
def sliced_deit():
    return runpy.run_path(str(SCRIPT))["SlicedDeiT"]


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit3_small_patch16_224"])
def test_ceiling_model_keeping_every_token_reproduces_the_model(sliced_deit, name):
    model = timm_vit(name)
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(sliced_deit(model, {1: 17, 3: 17})(x), model(x), atol=1e-5, rtol=0)


def test_ceiling_model_equals_the_full_blocks_truncated_to_their_first_tokens(sliced_deit):
    model = timm_vit("deit_small_patch16_224")
    x = image_batch(model)
    keep = {1: 9, 3: 5}
    with torch.no_grad():
        tokens = model._pos_embed(model.patch_embed(x))
        for i, block in enumerate(model.blocks):
            tokens = block(tokens)[:, : keep.get(i, tokens.shape[1])]
        expected = model.forward_head(model.norm(tokens))
        torch.testing.assert_close(sliced_deit(model, keep)(x), expected, atol=1e-5, rtol=0)
    assert fxprune.flops(sliced_deit(model, keep), x[:1]) < fxprune.flops(model, x[:1])


def _skipping_deit(usage):
    """The AdaViT script's functions, DeiT-S (float64), three images and DeiT-S with AdaViT set to ``usage``."""
    script = runpy.run_path(str(SCRIPT.parent / "adavit_speed.py"))
    model = timm_vit("deit_small_patch16_224").double()
    x = image_batch(model, batch=3, dtype=torch.float64)
    skipping = fxprune.transform(model, fxprune.AdaViT(0.5, init_logit=0.0))
    with torch.no_grad():
        set_usage(skipping, x, usage)
    return script, model, x, skipping


def test_adavit_ceiling_computes_what_the_skipping_graph_computes_for_each_image():
    script, model, x, skipping = _skipping_deit(0.5)
    with torch.no_grad():
        for image in x:
            steps = script["ceiling_steps"](model, skipping, image[None])
            assert any(step.rows is not None for step in steps) and any(not step.mlp for step in steps)
            assert any(0 < step.slices.heads < 6 for step in steps)
            torch.testing.assert_close(script["ceiling_forward"](model, steps, image[None]), skipping(image[None]),
                                       atol=1e-10, rtol=0)


def test_adavit_hand_written_forward_decides_and_computes_what_the_skipping_graph_does():
    script, model, x, skipping = _skipping_deit({"heads": 0.3, "sublayers": 0.6, "tokens": 0.6})
    with torch.no_grad():
        used = usage(skipping, x)
        assert any(0 < block.heads.sum() < 3 * 6 for block in used if block.heads is not None)
        assert any((block.sublayers == 0).any() for block in used if block.sublayers is not None)
        assert all(not block.rows.all() for block in used)
        kept = {}
        for image in x:
            for slices in (None, kept):  # the graph's head-sliced products, or kept gathered weights
                torch.testing.assert_close(script["decided_forward"](model, skipping, image[None], slices),
                                           skipping(image[None]), atol=1e-10, rtol=0)
        assert kept and all(key[0] < 4 for key in kept)


def test_adavit_branch_free_forward_computes_what_the_skipping_graph_does():
    script, model, x, skipping = _skipping_deit({"heads": 0.2, "sublayers": 0.6, "tokens": 0.6})
    with torch.no_grad():
        used = usage(skipping, x)
        assert any((block.heads.sum(1) == 0).any() for block in used if block.heads is not None)
        assert any((block.sublayers == 0).any() for block in used if block.sublayers is not None)
        for image in x:
            torch.testing.assert_close(script["branch_free_forward"](model, skipping, image[None]),
                                       skipping(image[None]), atol=1e-10, rtol=0)


def test_adavit_block_clock_marks_every_block_in_order_and_leaves_the_outputs_as_they_are():
    script, model, x, skipping = _skipping_deit({"heads": 0.3, "sublayers": 0.6, "tokens": 0.6})
    names = [row.name for row in skipping.fxprune_plan.rows]
    dense = fxprune.trace(model, x[:1])
    clock = script["_CLOCK"]
    with torch.no_grad():
        for gm, reference in ((dense, model), (skipping, skipping)):
            timed = script["marked"](gm, names)
            for image in x:
                clock.clear()
                torch.testing.assert_close(timed(image[None]), reference(image[None]), atol=1e-10, rtol=0)
                assert [block for block, _ in clock] == list(range(len(names) + 1))
    parts = script["block_times"](dense, skipping, x[:2], 1)
    assert [part[0] for part in parts] == ["embedding", *names, "norm and head"]
    assert all(dense_ms > 0 and skipped_ms > 0 for _, dense_ms, skipped_ms in parts)


def test_adavit_one_row_whole_runs_the_whole_sub_layer_graphs_and_computes_the_same():
    script, model, x, skipping = _skipping_deit({"heads": 0.2, "sublayers": 0.6, "tokens": 0.6})
    whole = script["whole_one_row"](skipping)
    runs = [calls_of(gm, run_if_used) for gm in (skipping, whole)]
    assert any("without_heads" in node.kwargs for node in runs[0]) and not any(node.kwargs for node in runs[1])
    with torch.no_grad():
        for image in x:
            torch.testing.assert_close(whole(image[None]), skipping(image[None]), atol=1e-10, rtol=0)


def test_adavit_rows_each_call_keeps_no_row_from_biases_and_computes_the_same():
    script, model, x, skipping = _skipping_deit({"heads": 0.2, "sublayers": 0.6, "tokens": 0.6})
    each = script["rows_each_call"](skipping)
    kept, computed = (calls_of(gm, run_if_used) for gm in (skipping, each))
    assert any("fixed" in node.kwargs for node in kept) and not any("fixed" in node.kwargs for node in computed)
    assert sum("without_heads" in node.kwargs for node in kept) == sum("without_heads" in node.kwargs
                                                                        for node in computed)
    with torch.no_grad():
        for image in x:
            torch.testing.assert_close(each(image[None]), skipping(image[None]), atol=1e-10, rtol=0)


def test_adavit_speed_runs_give_the_median_of_their_ratios_and_list_each_runs_share_of_the_mac_ratio():
    script = runpy.run_path(str(SCRIPT.parent / "adavit_speed.py"))
    timings = [Timing({"dense": [8.0, 8.0, 8.0], "skipped": [skipped] * 3}) for skipped in (1.0, 2.0, 1.6)]
    runs = script["Runs"](timings)
    assert runs.ratios("dense", "skipped") == [8.0, 4.0, 5.0]
    assert runs.ratio("dense", "skipped") == 5.0
    line = script["_runs_line"](0.35, "all", runs.ratios("dense", "skipped"), 10.0)
    assert "8.00×, 4.00×, 5.00×" in line and "0.40–0.80 of it, median 0.50" in line
