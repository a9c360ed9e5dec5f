"""Tooling around the compiler: the evaluation harness (:mod:`.bench`) and its setting search (:mod:`.search`),
speed measurement (:mod:`.speed`), the embedded DigitScenes data and ViT (:mod:`.datasets`, :mod:`.models`,
shipped weights in ``weights/``), pictures of kept tokens (:mod:`.show`), the demo and the command line."""
