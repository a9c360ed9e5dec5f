"""Exceptions raised by fxprune. Every error names the model part at fault and what to do."""


class FxPruneError(Exception):
    """Base class of every error fxprune raises."""


class TraceError(FxPruneError):
    """The model could not be captured as a torch.fx graph."""


class UnsupportedModelError(FxPruneError):
    """The model, or one of its blocks, cannot be rewritten without computing wrong numbers."""


class PolicyError(FxPruneError, ValueError):
    """A policy is invalid for itself or for the model it is applied to."""


class CapturedShapeError(FxPruneError, ValueError):
    """A transformed model was called on an input for which the model's code takes another branch on a shape, or
    makes another size a Python number, than on the inputs it was captured with: its graph is not the model's
    program for that input."""


class CapturedArgumentError(FxPruneError, TypeError):
    """A captured or transformed model was called with an argument its graph does not take, or with one of the
    model's other arguments at a value for which the model runs other code than the graph has."""


def qualified_name(cls: type) -> str:
    """``cls``'s module and name, as an error names a class that a short name would not tell apart (a quantized
    ``Linear`` from ``nn.Linear``)."""
    return f"{cls.__module__}.{cls.__name__}"
