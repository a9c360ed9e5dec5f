import time

from fxprune.tools.speed import Timing, interleaved, machine


def test_interleaved_timing_gives_medians_and_ratios():
    timing = interleaved({"slow": lambda: time.sleep(0.02), "fast": lambda: time.sleep(0.001)}, repeats=5, warmup=1)
    assert [len(v) for v in timing.samples.values()] == [5, 5]
    assert timing.ratio("slow", "fast") > 3  # 20: a loaded machine oversleeps the 1 ms by a few ms at most


def test_ratio_quartiles_are_those_of_the_per_round_ratios():
    timing = Timing({"dense": [2.0, 4.0, 6.0, 8.0, 10.0], "reduced": [1.0, 1.0, 2.0, 2.0, 2.0]})
    assert timing.ratio_quartiles("dense", "reduced") == (3.0, 4.0)
    assert timing.ratio("dense", "reduced") == 3.0


def test_machine_line_names_cpu_and_torch():
    line = machine()
    assert line.startswith("CPU ") and "torch " in line
