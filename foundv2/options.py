"""Option groups: frozen dataclasses that hold one group of a stage's settings (the quantiser's
layout and codebook care, the objective terms, the optimiser), so that each group is declared
once, with one set of defaults, and shared by every stage that has it.

LightningCLI gives each group nested options (``--model.objectives.tau``,
``--model.optim.lr``; each attribute's docstring is its ``--help`` text) and a YAML section.
A stage keeps the group in its hyperparameters as a plain dict (:meth:`Options.keep`), so
``hparams.yaml``, ``meta.json`` and weights-only checkpoints hold plain values, and
``load_from_checkpoint`` passes that dict back in.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import ClassVar, Literal, TypeVar

T = TypeVar("T", bound="Options")


def check_choices(owner: str, hints: dict, values: typing.Mapping) -> None:
    """A ``ValueError`` naming the setting and its choices when one of ``values`` is not among the
    choices of its ``Literal`` type in ``hints`` (``typing.get_type_hints`` of a signature or a
    dataclass): the check jsonargparse makes on the command line, for settings given in Python."""
    for name, hint in hints.items():
        if typing.get_origin(hint) is Literal and name in values and values[name] not in typing.get_args(hint):
            raise ValueError(f"{owner}: {name} must be one of {list(typing.get_args(hint))}, got {values[name]!r}")


@dataclasses.dataclass(frozen=True)
class Options:
    """Base of the option dataclasses: ``from_dict`` with unknown-key errors, ``replace``. A
    dataclass itself (with no fields), so that jsonargparse sees its subclasses as plain
    dataclasses (nested options) rather than classes picked by ``class_path``."""

    GROUP: ClassVar[str] = "option"  # the group's name in error messages

    def __post_init__(self) -> None:
        check_choices(f"{self.GROUP} options", typing.get_type_hints(type(self)),
                      {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    @classmethod
    def from_dict(cls: type[T], values: dict) -> T:
        """The options from a dict (config.json, a YAML section, saved hyperparameters); an
        unknown key is an error that names it and the known ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown {cls.GROUP} option(s) {unknown}; the options are {sorted(known)}")
        return cls(**values)

    @classmethod
    def keep(cls: type[T], hparams, name: str) -> T:
        """Store the group ``hparams[name]`` (an instance or a dict) as a plain dict and return it
        as options; an unknown option fails here, when the stage is made, not at fit."""
        value = hparams[name]
        if not isinstance(value, dict):
            hparams[name] = dataclasses.asdict(value)
        return cls.from_dict(hparams[name])

    def replace(self: T, **changes) -> T:
        """A copy with ``changes`` applied."""
        return dataclasses.replace(self, **changes)
