"""Weights that ship with fxprune: the digits ViT and the learned methods' fine-tuned states for it."""

from __future__ import annotations

from importlib import resources

from ...errors import PolicyError

__all__ = ["SHIPPED", "shipped"]

SHIPPED = "digits"  # a learned policy's weights="digits": its state fine-tuned for the embedded digits ViT


def shipped(name: str | None, describe: str, offered: str) -> str:
    """The path of the packaged weights file ``name`` for the policy ``describe``; None (``name``): nothing ships
    for that setting, a :class:`~fxprune.PolicyError` that says what does (``offered``)."""
    if name is None:
        raise PolicyError(f"weights='{SHIPPED}' ships for {offered}, not for {describe}")
    path = resources.files(__name__).joinpath(name)
    if not path.is_file():
        raise PolicyError(f"weights='{SHIPPED}': {name} for {describe} is not in this installation of fxprune")
    return str(path)
