from fxprune.cli import main


def test_inspect_prints_analysis_plan_and_inserted_nodes(capsys):
    code = main(["inspect", "vit_tiny_patch16_224", "--img-size", "64", "--policy", "evit:keep=0.7,layers=3,6,9"])
    out = capsys.readouterr().out
    assert code == 0
    assert "12 attention blocks, 17 tokens × 192 channels" in out
    assert "fxprune plan for VisionTransformer (input 3×64×64" in out
    assert "  3  blocks.3" in out and "17 → 14" in out
    assert "blocks_9_evit = fxprune.ops.selection.evit_select(" in out


def test_inspect_without_policy_prints_only_the_analysis(capsys):
    assert main(["inspect", "deit_small_distilled_patch16_224", "--img-size", "32"]) == 0
    out = capsys.readouterr().out
    assert "2 prefix token(s)" in out and "fxprune plan" not in out


def test_errors_are_reported_with_exit_code_2(capsys):
    assert main(["inspect", "vit_tiny_patch16_224", "--img-size", "32", "--policy", "evit:keep=2,layers=1"]) == 2
    assert "PolicyError: EViT.keep_rate must be in (0, 1]" in capsys.readouterr().err


def test_demo_prints_plan_macs_and_measured_ratio(capsys):
    assert main(["demo", "--batch", "1", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "fxprune plan for VisionTransformer (input 3×224×224" in out
    assert "MACs per image (measured by fxprune.flops): dense 4.61 G, EViT 3.04 G, ratio 1.52×" in out
    assert "faster than dense" in out and "machine: CPU" in out
