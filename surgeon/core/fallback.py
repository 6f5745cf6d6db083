"""What a stage reads when the user names nothing: the toy world's data, for the toy model only. The one
statement of that rule; surgeon.inputs.defaults holds the toy data itself. A real model measured on 48 px
toy shapes gives numbers that look fine and mean nothing, so its data must be named."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from surgeon.core.errors import InvalidInput

if TYPE_CHECKING:
    from typing_extensions import TypeIs  # typing's own from Python 3.13; checkers only

#: the bundled model's name, and the name that asks for the toy world's data (images, pool, suite)
TOY = "toy"


def is_toy_model(model: str | None) -> TypeIs[Literal["toy"] | None]:
    """`model` names the bundled toy model (no model named is the toy)."""
    return model in (None, TOY)


def toy_data(given: str | None) -> bool:
    """The toy world's data is named, or nothing is (sizes then take the toy's bounds)."""
    return given is None or str(given) == TOY


def data_for(model: str | None, given: str | None, what: str, hint: str | None = None) -> str:
    """The data a stage reads: what was given, else the toy world's (TOY) for the toy model only."""
    if given is not None:
        return given
    if not is_toy_model(model):
        raise InvalidInput(f"{model} is not the toy model: name the {what}", hint=hint)
    return TOY


def text_pool_for(toy_model: bool, given: str | None) -> str:
    """The text pool TextSpan ranks with: the given one, else the toy world's for the toy model, else the
    general pool (a pool describes images, so it has a default for real models too)."""
    return given or (TOY if toy_model else "general")
