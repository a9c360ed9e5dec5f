import numpy as np
from PIL import Image

from fxprune.tools.cli import main


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


def test_zoo_prints_the_table_and_writes_it_between_the_markers(capsys, tmp_path):
    from fxprune.tools.zoo import MARKERS

    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{MARKERS[0]}\nold\n{MARKERS[1]}\nend\n")
    assert main(["zoo", "hand-written: mean over every token", "--processes", "1", "--write", str(readme)]) == 0
    row = "| hand-written: mean over every token | refused: no class token | ✓ |"
    assert row in capsys.readouterr().out
    text = readme.read_text()
    assert row in text and "old" not in text and text.startswith("intro\n") and text.endswith("end\n")


def test_errors_are_reported_with_exit_code_2(capsys):
    assert main(["inspect", "vit_tiny_patch16_224", "--img-size", "32", "--policy", "evit:keep=2,layers=1"]) == 2
    assert "PolicyError: EViT.keep_rate must be in (0, 1]" in capsys.readouterr().err


def test_inspect_takes_the_embedded_digits_vit(capsys):
    assert main(["inspect", "digits", "--policy", "adavit:usage=0.5,weights=digits"]) == 0
    out = capsys.readouterr().out
    assert "6 attention blocks, 65 tokens × 64 channels" in out and "adavit usage 0.5" in out


def test_a_model_name_no_command_knows_is_an_error_that_says_what_each_takes(capsys, tmp_path):
    for command in (["inspect", "no_such_vit"], ["bench", "--model", "no_such_vit", "--data", str(tmp_path)],
                    ["export", "no_such_vit", "--format", "onnx", "--out", str(tmp_path / "m.onnx")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        assert "unknown model 'no_such_vit': give 'digits', 'digits-relpos'" in err and "timm model name" in err
    assert "a saved nn.Module" in err
    assert main(["inspect", "digits", "--img-size", "32"]) == 2
    assert "--img-size is for timm models" in capsys.readouterr().err


def test_demo_prints_plan_accuracy_macs_speed_and_writes_the_picture(capsys, tmp_path):
    assert main(["demo", "--scenes", "100", "--repeats", "1", "--out", str(tmp_path / "kept.png")]) == 0
    out = capsys.readouterr().out
    assert "fxprune plan for VisionTransformer (input 3×64×64, 1 prefix token(s))" in out
    assert "| dense | " in out and "| evit keep " in out and "DigitScenes test (held-out digits) (100 images)" in out
    assert "speed ratio" in out and "machine: CPU" in out
    assert (tmp_path / "kept.png").exists()


def test_bench_and_show_run_on_the_embedded_benchmark(capsys, tmp_path):
    assert main(["bench", "--images", "100", "--policy", "topk:keep=0.5,layers=2", "--repeats", "1",
                 "--speed-batch", "8", "--plot", str(tmp_path / "curve.png")]) == 0
    out = capsys.readouterr().out
    assert "| topk keep 0.5 @ 2 |" in out and (tmp_path / "curve.png").exists()
    assert main(["show", "--scenes", "2", "--out", str(tmp_path / "kept.png")]) == 0
    assert (tmp_path / "kept.png").exists()
    assert main(["show", "--scenes", "3", "--policy", "ats:k=40,layers=1", "--out", str(tmp_path / "ats.png")]) == 0
    assert "block 1: " in capsys.readouterr().out
    assert main(["show", "--scenes", "2", "--policy", "clustr:m=8,layers=1", "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").exists()


def test_show_dense_draws_the_true_and_predicted_patch_masks_of_each_policy(capsys, tmp_path):
    out_path = tmp_path / "masks.png"
    assert main(["show", "--dense", "--images", "12", "--scenes", "2", "--probe-scenes", "60", "--policy",
                 "topk:keep=1,layers=1", "--policy", "tome:r=10", "--out", str(out_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    dense, keep_all, tome = (next(line for line in out if line.startswith(f"  {name}:"))
                             for name in ("dense", "topk keep 1", "tome r 10"))
    assert keep_all.replace("topk keep 1", "dense") == dense  # nothing reduced: the dense model's masks and MACs
    assert "100.0% of the MACs" in dense and "100.0% of the MACs" not in tome
    with Image.open(out_path) as picture:  # input, truth, dense and the two policies; two scenes
        assert picture.width > 5 * 64 * 3 > picture.width - 6 * 64 * 3 and 2 * 64 * 3 < picture.height < 3 * 64 * 3


def test_show_dense_needs_labelled_patches_and_show_draws_one_policy_otherwise(capsys):
    assert main(["show", "--dense", "--model", "vit_tiny_patch16_224"]) != 0
    assert "needs scenes whose patches are labelled" in capsys.readouterr().err
    assert main(["show", "--policy", "topk:keep=0.5", "--policy", "tome:r=2"]) != 0
    assert "give --policy once" in capsys.readouterr().err


def test_bench_runs_a_timm_model_on_an_image_folder(capsys, tmp_path):
    rng = np.random.default_rng(0)
    for synset in ("n01440764", "n01443537"):
        (tmp_path / synset).mkdir()
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(tmp_path / synset / f"{i}.png")
    code = main(["bench", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path), "--images", "4",
                 "--policy", "evit:keep=0.7,layers=3,6,9", "--batch", "2", "--speed-batch", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"Model: vit_tiny_patch16_224 (random weights); data: ImageFolder {tmp_path} (4 images)" in out
    assert "| evit keep 0.7 + fused token @ 3,6,9 |" in out


def test_bench_on_a_timm_model_needs_data(capsys):
    assert main(["bench", "--model", "vit_tiny_patch16_224"]) == 2
    assert "--data DIR is needed" in capsys.readouterr().err


def test_train_fine_tunes_and_writes_a_checkpoint_and_the_learned_weights(capsys, tmp_path):
    import torch

    import fxprune
    from fxprune.tools.models import digits_vit

    out, weights = tmp_path / "ckpt.pt", tmp_path / "predictors.pt"
    code = main(["train", "--policy", "dynamicvit:keep=0.7,layers=1,3,4", "--steps", "2", "--batch", "8",
                 "--train-images", "32", "--images", "16", "--out", str(out), "--weights-out", str(weights)])
    printed = capsys.readouterr().out
    assert code == 0 and "2 steps of batch 8" in printed and "step 2: top-1" in printed
    assert torch.load(out, weights_only=False)["step"] == 2
    loaded = fxprune.transform(digits_vit(), fxprune.DynamicViT(0.7, (1, 3, 4), weights=str(weights)))
    notes = loaded.fxprune_plan.notes  # trained predictors and the fine-tuned backbone, loaded into a copy
    assert not any("untrained" in note for note in notes) and any("backbone weights loaded" in n for n in notes)


def test_train_fine_tunes_the_relative_bias_variant_and_writes_weights_that_load_into_it(capsys, tmp_path):

    from fxprune.tools.models import digits_vit_relpos

    weights = tmp_path / "relpos.pt"
    code = main(["train", "--model", "digits-relpos", "--policy", "topk:keep=1,layers=1", "--steps", "2", "--batch",
                 "8", "--train-images", "32", "--images", "16", "--out", str(tmp_path / "c.pt"), "--weights-out",
                 str(weights)])
    assert code == 0 and "on digits_vit_relpos" in capsys.readouterr().out
    tuned = digits_vit_relpos(weights=str(weights))
    assert any(p.abs().sum() > 0 for n, p in tuned.named_parameters() if n.endswith("relative_position_bias_table"))


def test_bench_under_torchrun_shares_the_images_and_reports_what_one_process_does(capsys, tmp_path):
    from torchrun import torchrun

    args = ["bench", "--policy", "evit:keep=0.7,layers=1,3,4", "--policy", "ats:layers=2-5", "--images", "30",
            "--batch", "10", "--speed-batch", "4", "--repeats", "1"]
    assert main(args) == 0
    alone = capsys.readouterr().out
    shared = torchrun(["-m", "fxprune", *args], tmp_path)

    def columns(table: str) -> list[list[str]]:  # method, top-1, Δ, error, MACs, % of dense: not the speed
        return [line.split("|")[1:7] for line in table.splitlines() if line.startswith("| ") and "method" not in line]

    assert columns(shared) == columns(alone) and len(columns(alone)) == 3


def test_export_writes_a_verified_artefact_and_exports_adavit_in_its_masked_form(capsys, tmp_path):
    import timm
    import torch

    from fxprune.exporting import load

    saved = tmp_path / "tiny.pt"
    torch.save(timm.create_model("deit_small_patch16_224", img_size=32, patch_size=8, depth=3, embed_dim=64,
                                 num_heads=2), saved)  # a saved module, as a user's own model
    out = tmp_path / "ats.pt2"
    assert main(["export", str(saved), "--policy", "ats:max_tokens=9,layers=1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "its cost is the cap's, not each image's" in printed and "pt2 → " in printed
    assert "batch 2: max |Δ|" in printed and "batch 3: max |Δ|" in printed
    assert "ats ≤ 9" in load(out)[1]
    out = tmp_path / "adavit.pt2"
    assert main(["export", str(saved), "--policy", "adavit:usage=0.5", "--out", str(out)]) == 0
    assert "AdaViT exports in its masked form (skip=False)" in capsys.readouterr().out
    assert main(["export", "digits", "--out", str(tmp_path / "x.bin")]) == 2
    assert "unknown export format None" in capsys.readouterr().err
