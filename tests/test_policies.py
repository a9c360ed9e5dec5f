import pytest

from fxprune import Compose, EViT, PolicyError, ToMe, TopK, parse_policy


def test_layers_are_sorted_tuples():
    assert EViT(0.7, [9, 3, 6]).layers == (3, 6, 9)
    assert TopK(0.5, 4).layers == (4,)


@pytest.mark.parametrize("keep_rate", [0.0, -0.1, 1.01, "0.5", True])
def test_keep_rate_outside_zero_one_is_refused_naming_the_field(keep_rate):
    with pytest.raises(PolicyError, match=r"EViT\.keep_rate must be in \(0, 1\]"):
        EViT(keep_rate, (1,))


@pytest.mark.parametrize(
    "layers, message", [((), "empty"), ((1, 1), "repeats"), ((-1,), "non-negative"), ("ab", "non-negative")]
)
def test_bad_layers_are_refused_naming_the_field(layers, message):
    with pytest.raises(PolicyError, match=rf"TopK\.layers.*{message}|{message}.*TopK"):
        TopK(0.5, layers)


def test_topk_is_evit_without_fusion():
    assert TopK(0.5, (1,)).fuse is False
    with pytest.raises(TypeError):
        TopK(0.5, (1,), fuse=True)


def test_tokens_out_follow_the_paper_formula():
    # DeiT-S: 197 tokens, 1 class token; EViT keeps ceil(0.7 * 196) = 138 and adds the fused token
    assert EViT(0.7, (3,)).tokens_out(197, 1, 3) == 140
    assert TopK(0.7, (3,)).tokens_out(197, 1, 3) == 139
    assert EViT(1.0, (3,)).tokens_out(197, 1, 3) == 197
    # ToMe merges min(r, (N - P) // 2) pairs, r per layer when given as a list
    assert ToMe(8).bind(12).tokens_out(197, 1, 0) == 189
    assert ToMe(100).bind(12).tokens_out(197, 1, 5) == 99
    assert ToMe((4, 2), (0, 1)).tokens_out(197, 1, 1) == 195


def test_compose_refuses_overlapping_layers():
    with pytest.raises(PolicyError, match="block 2 is claimed by both"):
        Compose([EViT(0.7, (1, 2)), TopK(0.5, (2, 3))])
    assert Compose([EViT(0.7, (1,)), TopK(0.5, (2,))]).describe() == "evit keep 0.7 + fused token | topk keep 0.5"


def test_policy_strings_parse_to_policies():
    assert parse_policy("evit:keep=0.7,layers=3,6,9") == EViT(0.7, (3, 6, 9))
    assert parse_policy("topk:keep_rate=0.5,layers=4") == TopK(0.5, (4,))
    assert parse_policy("evit:keep=0.9,layers=2,fuse=false") == EViT(0.9, (2,), fuse=False)
    assert parse_policy("topk:keep=0.5,layers=1 + evit:keep=0.7,layers=3").policies() == (
        TopK(0.5, (1,)), EViT(0.7, (3,))
    )


def test_a_plus_inside_an_option_value_is_part_of_it_not_another_policy():
    from fxprune.methods.adavit import AdaViT

    path = "runs/adavit_0.35_heads+sublayers+tokens_0.pt"
    assert parse_policy(f"adavit:usage=0.35,weights={path}") == AdaViT(0.35, weights=path)
    assert parse_policy(f"adavit:usage=0.5,layers=1,weights={path}+evit:keep=0.7,layers=3").policies() == (
        AdaViT(0.5, (1,), weights=path), EViT(0.7, (3,))
    )


@pytest.mark.parametrize("name", ["evit:keep=0.7", "topk:keep=0.7", "tome:r=2", "ats:k=9", "clustr:m=4"])
def test_every_policy_takes_ranges_of_layers(name):
    assert parse_policy(f"{name},layers=1-3,7,9-10").layers == (1, 2, 3, 7, 9, 10)


@pytest.mark.parametrize(
    "text, message",
    [
        ("vit:keep=0.7", "unknown policy"),
        ("adavit:keep=0.7", "adavit: unknown option .keep.; known: usage"),
        ("dynamicvit:keep=0.7", "dynamicvit needs layers="),
        ("evit:speed=2", "unknown option"),
        ("evit:keep=x,layers=1", "bad value"),
        ("evit:keep=0.5,layers=1-x", "bad value"),
        ("ats:k=many,layers=1", "bad value"),
        ("evit:keep=0.7,layers=3+tme:r=8,layers=4", "unknown policy 'tme'"),
    ],
)
def test_bad_policy_strings_raise_policy_error(text, message):
    with pytest.raises(PolicyError, match=message):
        parse_policy(text)
