"""DynamicViT: both graphs against an eager implementation of the official forward, in float64."""

import pytest
import torch
from reference import dynamicvit_vit
from torch import nn
from vits import image_batch, timm_vit

import fxprune
from fxprune.methods.dynamicvit import DynamicViT

LAYERS = (1, 3, 4)


def _predictors(gm, model):
    return [gm.get_submodule(f"fxprune.blocks_{i}.predictor") for i in LAYERS]


@pytest.mark.parametrize("name", ["deit_small_patch16_224", "deit_small_distilled_patch16_224"])
def test_evaluation_graph_matches_the_official_forward_in_float64(name):
    model = timm_vit(name, depth=6).double()
    gm = fxprune.transform(model, DynamicViT(0.7, LAYERS))
    x = image_batch(model, batch=3, dtype=torch.float64)
    with torch.no_grad():
        expected = dynamicvit_vit(model, _predictors(gm, model), x, 0.7, LAYERS, training=False)
        torch.testing.assert_close(gm(x), expected, atol=1e-8, rtol=0)
    prefix = model.num_prefix_tokens
    assert [r.tokens_out for r in gm.fxprune_plan.rows if r.policy] == [prefix + int(16 * 0.7**s) for s in (1, 2, 3)]


def test_training_graph_matches_the_official_forward_with_the_same_gumbel_noise_in_float64():
    model = timm_vit("deit_small_patch16_224", depth=6, img_size=64).double()  # 64 patches: some kept at stage 3
    gm = fxprune.transform(model, DynamicViT(0.7, LAYERS)).train()
    model.train()
    x = image_batch(model, batch=3, dtype=torch.float64)
    torch.manual_seed(5)
    got = gm(x)
    torch.manual_seed(5)
    expected = dynamicvit_vit(model, _predictors(gm, model), x, 0.7, LAYERS, training=True)
    assert not got.isnan().any()
    torch.testing.assert_close(got, expected, atol=1e-8, rtol=0)


class _KeepFirst(nn.Module):
    """A stand-in predictor that keeps the first ``keep`` patch tokens (by their input order) with certainty."""

    def __init__(self, keep: int):
        super().__init__()
        self.keep = keep

    def forward(self, x, policy=None):
        first = torch.arange(x.shape[1]) < self.keep
        keep = torch.where(first, 0.0, -1e4).to(x.dtype)
        return torch.stack([keep, torch.where(first, -1e4, 0.0).to(x.dtype)], dim=-1).expand(x.shape[0], -1, -1)


def test_training_and_evaluation_graphs_agree_when_the_decisions_are_the_same():
    model = timm_vit("deit_small_patch16_224", depth=4).double()
    gm = fxprune.transform(model, DynamicViT(0.5, (1,)))
    gm.get_submodule("fxprune.blocks_1").predictor = _KeepFirst(8)  # what evaluation keeps: int(16 · 0.5)
    x = image_batch(model, batch=3, dtype=torch.float64)
    with torch.no_grad():
        evaluated, trained = gm.eval()(x), gm.train()(x)
    torch.testing.assert_close(trained, evaluated, atol=1e-5, rtol=0)  # masked keys weigh ε/N, not 0
    assert (evaluated - model(x)).abs().max() > 1e-3


def test_training_gradients_reach_every_predictor_and_the_backbone():
    model = timm_vit("deit_small_patch16_224", depth=6, img_size=64)
    gm = fxprune.transform(model, DynamicViT(0.7, LAYERS), copy_weights=True).train()
    with fxprune.collect() as aux:
        gm(image_batch(model)).logsumexp(-1).sum().backward()
    assert sorted(aux) == ["dynamicvit/keep/blocks.1", "dynamicvit/keep/blocks.3", "dynamicvit/keep/blocks.4",
                           "dynamicvit/tokens"]
    for i in LAYERS:
        assert gm.get_submodule(f"fxprune.blocks_{i}.predictor").in_conv[1].weight.grad.abs().sum() > 0
    assert gm.get_parameter("patch_embed.proj.weight").grad.abs().sum() > 0


def test_policy_parses_plans_its_counts_and_says_when_its_predictors_are_untrained(tmp_path):
    policy = fxprune.parse_policy("dynamicvit:keep=0.5,layers=1,3,4")
    assert policy == DynamicViT(0.5, LAYERS)
    model = timm_vit("deit_small_patch16_224", depth=6)
    planned = fxprune.plan(model, policy)
    assert [r.tokens_out for r in planned.rows if r.policy] == [1 + 8, 1 + 4, 1 + 2]
    assert any("untrained" in note for note in planned.notes)
    gm = fxprune.transform(model, policy)
    path = fxprune.save_weights(gm, tmp_path / "predictors.pt")
    trained = fxprune.transform(model, DynamicViT(0.5, LAYERS, weights=str(path)))
    assert not any("untrained" in note for note in trained.fxprune_plan.notes)
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(trained(x), gm(x), atol=0, rtol=0)
    with pytest.raises(fxprune.PolicyError, match=r"\(for dynamicvit keep 0\.5 on VisionTransformer\) do not fit"):
        fxprune.transform(model, DynamicViT(0.5, (1, 3), weights=str(path)))  # before: "keep 0.5 (untrained)"


def test_an_official_checkpoint_loads_its_backbone_into_the_model_and_its_predictors_into_the_policy(tmp_path):
    model = timm_vit("deit_small_patch16_224", depth=6)
    gm = fxprune.transform(model, DynamicViT(0.7, LAYERS), copy_weights=True)
    with torch.no_grad():
        for parameter in gm.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))  # a "trained" backbone and predictors
    official = {k: v for k, v in gm.state_dict().items() if not k.startswith("fxprune.")}
    for stage, layer in enumerate(LAYERS):  # the official code's names: one score_predictor per stage
        for key, value in gm.get_submodule(f"fxprune.blocks_{layer}.predictor").state_dict().items():
            official[f"score_predictor.{stage}.{key}"] = value
    torch.save({"model": official}, tmp_path / "dynamicvit_official.pth")
    fresh = timm_vit("deit_small_patch16_224", depth=6)
    result = fresh.load_state_dict(official, strict=False)
    assert not result.missing_keys and all(k.startswith("score_predictor.") for k in result.unexpected_keys)
    switched = fxprune.transform(fresh, DynamicViT(0.7, LAYERS, weights=str(tmp_path / "dynamicvit_official.pth")))
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(switched(x), gm(x), atol=0, rtol=0)
    with pytest.raises(fxprune.PolicyError, match="unexpected stage_2"):
        fxprune.transform(fresh, DynamicViT(0.7, (1, 3), weights=str(tmp_path / "dynamicvit_official.pth")))


def _official_loss(pred, token_pred, mask, out_pred_score, cls_t, token_t, labels, keep_ratio):
    """``DistillDiffPruningLoss_dynamic.forward`` of the official losses.py (clf 1, ratio 2, distill 0.5,
    mse_token=True), on its own inputs: scores [B, N0] per stage, the last decisions ``mask`` [B, N0, 1]."""
    pred_loss = 0.0
    for i, score in enumerate(out_pred_score):
        pred_loss = pred_loss + ((score.mean(1) - keep_ratio[i]) ** 2).mean()
    cls_loss = torch.nn.functional.cross_entropy(pred, labels)
    cls_kl_loss = torch.nn.functional.kl_div(torch.log_softmax(pred, dim=-1), torch.log_softmax(cls_t, dim=-1),
                                             reduction="batchmean", log_target=True)
    B, N, C = token_pred.size()
    bool_mask = mask.reshape(B * N) > 0.5
    token_kl_loss = torch.pow(token_pred.reshape(B * N, C)[bool_mask] - token_t.reshape(B * N, C)[bool_mask], 2).mean()
    return 1.0 * cls_loss + 2.0 * pred_loss / len(out_pred_score) + 0.5 * cls_kl_loss + 0.5 * token_kl_loss


def test_loss_is_the_official_distillation_loss_with_the_teachers_final_tokens():
    from fxprune.losses import DynamicViTLoss

    model = timm_vit("deit_small_patch16_224", depth=6, img_size=64).double()
    policy = DynamicViT(0.7, LAYERS)
    gm = fxprune.transform(model, policy, copy_weights=True).train()
    criterion = DynamicViTLoss(model, policy)
    x, labels = image_batch(model, batch=4, dtype=torch.float64), torch.tensor([1, 2, 3, 4])
    with fxprune.collect() as aux:
        out = gm(x)
    loss, parts = criterion(x, out, aux, labels)
    decisions = [aux[f"dynamicvit/keep/blocks.{i}"][0] for i in LAYERS]
    with torch.no_grad():  # timm's forward_features: the tokens after the final norm
        expected = _official_loss(out, aux["dynamicvit/tokens"][0], decisions[-1], [d[..., 0] for d in decisions],
                                  model(x), model.forward_features(x)[:, 1:], labels, [0.7, 0.49, 0.343])
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=0)
    assert set(parts) == {"cls", "ratio", "cls_kl", "token_mse"} and parts["token_mse"] > 0
    loss.backward()
    assert gm.get_submodule("fxprune.blocks_1.predictor").in_conv[1].weight.grad.abs().sum() > 0


def test_a_weights_file_with_a_fine_tuned_backbone_loads_into_a_copy_and_leaves_the_model_alone(tmp_path):
    model = timm_vit("deit_small_patch16_224", depth=6)
    gm = fxprune.transform(model, DynamicViT(0.7, LAYERS), copy_weights=True)
    with torch.no_grad():
        gm.get_parameter("blocks.0.attn.qkv.weight").add_(0.1)  # a "fine-tuned" backbone
    path = fxprune.save_weights(gm, tmp_path / "tuned.pt", backbone=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = fxprune.transform(model, DynamicViT(0.7, LAYERS, weights=str(path)))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert any("backbone weights loaded from" in note for note in loaded.fxprune_plan.notes)
    x = image_batch(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), gm(x), atol=0, rtol=0)
    with pytest.raises(fxprune.PolicyError, match="backbone weights .* do not fit"):
        fxprune.transform(timm_vit("deit_small_patch16_224", depth=5), DynamicViT(0.7, LAYERS, weights=str(path)))


def test_the_shipped_digits_states_load_for_their_keep_rates_only():
    from fxprune.tools.models import digits_vit

    model = digits_vit()
    for keep in (0.7, 0.5):
        policy = fxprune.parse_policy(f"dynamicvit:keep={keep},layers=1,3,4,weights=digits")
        notes = fxprune.plan(model, policy, fast=True).notes
        assert any("backbone weights loaded" in note for note in notes) and not any("untrained" in n for n in notes)
    with pytest.raises(fxprune.PolicyError, match="ships for keep rates 0.7, 0.5"):
        fxprune.transform(model, DynamicViT(0.6, LAYERS, weights="digits"))
