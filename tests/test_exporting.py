"""Export (``fxprune.export``): every method's rewritten graph as ONNX, a ``torch.export`` program and an
AOTInductor package, each checked against eager PyTorch at two batch sizes; and ``torch.jit.trace`` of the same
graphs. Budget: under a minute of the suite (tiny models; every method in two compositions; AOTInductor on one
policy)."""

import onnx
import pytest
import torch
from vits import timm_vit

import fxprune
from fxprune.exporting import PLAN_KEY, ExportError, export, load
from fxprune.methods import methods


@pytest.fixture(scope="module")
def tiny():
    return timm_vit("deit_small_patch16_224", depth=3, embed_dim=64, num_heads=2)


def _inputs(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))


EVERY_METHOD = {  # two compositions on a 6-block model that, together, hold every registered method
    "selection and learned keep": fxprune.Compose([
        fxprune.EViT(0.7, (0,)), fxprune.TopK(0.7, (1,)), fxprune.Stride(2, (2,)),
        fxprune.RandomKeep(0.8, (3,), seed=3), fxprune.DynamicViT(0.7, (4,))]),
    "padding, merging, clusters, usage": fxprune.Compose([
        fxprune.ATS(0.6, (1,)), fxprune.ToMe(2, (2,)), fxprune.ClusTR(3, (3,)),
        fxprune.AdaViT(0.5, (4, 5), skip=False)]),
}


def test_the_compositions_hold_every_method():
    held = {type(part) for policy in EVERY_METHOD.values() for part in policy.policies()}
    assert held == {method.policy for method in methods()}


@pytest.mark.parametrize("name", sorted(EVERY_METHOD))
def test_every_method_exports_to_onnx_and_runs_as_in_eager_at_any_batch_size(name, tmp_path):
    model = timm_vit("deit_small_patch16_224", depth=6, embed_dim=64, num_heads=2)
    gm = fxprune.transform(model, EVERY_METHOD[name])
    exported = export(gm, _inputs(), tmp_path / "model.onnx")
    assert [batch for batch, _ in exported.errors] == [2, 3] and all(e <= 1e-4 for _, e in exported.errors)
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}
    assert props[PLAN_KEY] == str(gm.fxprune_plan) and exported.opset == 18
    run, plan = load(tmp_path / "model.onnx")
    five = _inputs(5)
    with torch.no_grad():
        torch.testing.assert_close(run(five)[0], gm(five), atol=1e-4, rtol=0)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("name", sorted(EVERY_METHOD))
def test_torch_jit_trace_of_every_method_runs_as_in_eager_at_other_batch_sizes(name):
    model = timm_vit("deit_small_patch16_224", depth=6, embed_dim=64, num_heads=2)
    gm = fxprune.transform(model, EVERY_METHOD[name])
    with torch.no_grad():
        traced = torch.jit.trace(gm, _inputs(), check_trace=False)
        for batch in (2, 3, 1):
            torch.testing.assert_close(traced(_inputs(batch)), gm(_inputs(batch)), atol=1e-5, rtol=0)


def test_torch_jit_trace_of_skipping_adavit_is_refused(tiny):
    gm = fxprune.transform(tiny, fxprune.AdaViT(0.5, (1, 2)))
    with torch.no_grad(), pytest.raises(fxprune.FxPruneError, match=r"torch\.jit\.trace would keep the example "
                                        r"inputs' choices .* skip=False"):
        torch.jit.trace(gm, _inputs(), check_trace=False)


def test_a_pt2_program_keeps_the_plan_a_dynamic_batch_and_bfloat16(tiny, tmp_path):
    gm = fxprune.transform(tiny, fxprune.ATS(0.5, (1, 2)))
    export(gm, _inputs(), tmp_path / "ats.pt2")
    run, plan = load(tmp_path / "ats.pt2")
    assert plan == str(gm.fxprune_plan)
    with torch.no_grad():
        torch.testing.assert_close(run(_inputs(7))[0], gm(_inputs(7)), atol=1e-4, rtol=0)
    half = export(gm, _inputs(), tmp_path / "ats_bf16.pt2", dtype=torch.bfloat16)
    assert all(e <= 5e-2 for _, e in half.errors)
    assert next(gm.parameters()).dtype == torch.float32  # the model itself is not cast


def test_an_aotinductor_package_runs_without_the_model_code(tiny, tmp_path):
    gm = fxprune.transform(tiny, fxprune.EViT(0.6, (1,)))
    exported = export(gm, _inputs(), tmp_path / "evit.pt2", "aoti")
    assert exported.format == "aoti" and all(e <= 1e-4 for _, e in exported.errors)
    run, plan = load(tmp_path / "evit.pt2", "aoti")
    assert plan == str(gm.fxprune_plan)


def test_an_artefact_that_computes_other_numbers_is_refused(tiny, tmp_path, monkeypatch):
    import fxprune.exporting as module

    gm = fxprune.transform(tiny, fxprune.TopK(0.6, (1,)))
    real_load = module.load
    monkeypatch.setattr(module, "load", lambda path, format=None: (
        (lambda *x: [out + 1e-3 for out in real_load(path, format)[0](*x)]), None))
    with pytest.raises(ExportError, match=r"differs from eager PyTorch at batch 2: max \|Δ\| 1\.0\de-03"):
        export(gm, _inputs(), tmp_path / "topk.pt2")
    assert export(gm, _inputs(), tmp_path / "topk.pt2", verify=False).errors == ()


def test_skipping_adavit_is_refused_and_its_masked_form_exports(tiny, tmp_path):
    with pytest.raises(ExportError, match=r"with adavit .* shapes that depend on the data.*skip=False.* export that"):
        export(fxprune.transform(tiny, fxprune.AdaViT(0.5, (1, 2))), _inputs(), tmp_path / "a.onnx")
    gm = fxprune.transform(tiny, fxprune.AdaViT(0.5, (1, 2), skip=False))
    gm.train()
    export(gm, _inputs(), tmp_path / "a.pt2")
    assert gm.training  # exported in evaluation mode, left as it was


def test_an_unknown_format_is_refused_naming_the_choices(tiny, tmp_path):
    with pytest.raises(ExportError, match=r"unknown export format None .*onnx, pt2, aoti"):
        fxprune.export(tiny, _inputs(), tmp_path / "model.bin")


def test_dense_outputs_export_with_their_layout_restored_or_their_rows_and_positions(tmp_path):
    import timm

    torch.manual_seed(0)  # feature maps after blocks 1 and 2; no class token read, so ATS scores by attention
    maps = timm.create_model("deit_small_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=64, num_heads=2,
                             features_only=True, out_indices=(1, 2)).eval()  # received over a padded batch's rows
    gm = fxprune.transform(maps, fxprune.ATS(0.5, (1, 2)))  # before: ONNX Runtime refused a ReduceMax of booleans
    exported = export(gm, _inputs(), tmp_path / "ats_maps.onnx")
    assert all(e <= 1e-4 for _, e in exported.errors)
    assert [out.shape for out in load(tmp_path / "ats_maps.onnx")[0](_inputs(4))] == [(4, 64, 4, 4)] * 2
    backbone = timm.create_model("deit_small_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=64,
                                 num_heads=2, num_classes=0, global_pool="").eval()
    reduced = fxprune.transform(backbone, fxprune.ATS(0.5, (1, 2)), restore=False)  # rows and positions
    exported = export(reduced, _inputs(), tmp_path / "ats_rows.onnx")
    assert all(e <= 1e-4 for _, e in exported.errors)
    rows, positions = load(tmp_path / "ats_rows.onnx")[0](_inputs(4))
    width = reduced.fxprune_plan.rows[-1].tokens_out
    assert rows.shape == (4, width, 64) and positions.shape == (4, width)


@pytest.mark.parametrize("name", ["vit_relpos_medium_patch16_cls_224", "vit_small_patch16_rope_224"])
def test_a_vit_with_relative_position_bias_or_rotary_embeddings_exports_to_onnx(name, tmp_path):
    model = timm_vit(name, img_size=40, patch_size=8, depth=2, embed_dim=64, num_heads=2)  # 25 patches
    gm = fxprune.transform(model, fxprune.EViT(0.7, (1,)))
    exported = export(gm, torch.randn(2, 3, 40, 40), tmp_path / "positions.onnx")
    assert all(e <= 1e-4 for _, e in exported.errors)
