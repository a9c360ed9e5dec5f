import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "finetune_clustr.py"


def test_fine_tuning_script_runs_a_few_steps_and_reports_accuracy_before_and_after(monkeypatch, capsys):
    argv = [str(SCRIPT), "--clusters", "4,16", "--steps", "2", "--batch", "8", "--train-scenes", "32",
            "--test-scenes", "20"]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    table = capsys.readouterr().out
    assert "| dense top-1 | ClusTR off the shelf | after fine-tuning |" in table
    assert "clustr 4,16 clusters per head group" in table
