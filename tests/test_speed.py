import time

from fxprune.speed import interleaved, machine


def test_interleaved_timing_gives_medians_and_ratios():
    timing = interleaved({"slow": lambda: time.sleep(0.004), "fast": lambda: time.sleep(0.001)}, repeats=5, warmup=1)
    assert [len(v) for v in timing.samples.values()] == [5, 5]
    assert timing.ratio("slow", "fast") > 1.5


def test_machine_line_names_cpu_and_torch():
    line = machine()
    assert line.startswith("CPU ") and "torch " in line
