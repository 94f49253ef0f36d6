"""The workers' inner optimizer as one value: its name and its settings.

:class:`OptimizerSettings` travels unchanged from the run configuration (its ``optimizer`` section) to the
model rows, the engines (:func:`coopsgd.engines.optim.make_inner` builds the arithmetic from it) and the
checkpoint (:meth:`OptimizerSettings.to_dict`). Adding an option to an inner optimizer is one field here,
declared with :func:`coopsgd.settings.setting` (its help, choices and range): it is the run configuration's
``optimizer`` section, so its flag, ``--help`` line, config key and validation follow from the declaration.

Semantics are torch.optim's: ``sgd`` is ``torch.optim.SGD`` (``momentum``, ``nesterov``, dampening 0),
``adam`` / ``adamw`` are ``torch.optim.Adam`` / ``torch.optim.AdamW`` (``beta1``, ``beta2``, ``eps``,
``amsgrad``). ``weight_decay=None`` is the optimizer's own default: 0 for SGD and Adam, 0.01 for AdamW.
Through the Python API, ``torch_class`` names any other ``torch.optim.Optimizer`` class, with its arguments
in ``torch_kwargs``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from coopsgd.errors import ConfigError
from coopsgd.settings import check_section, setting, unused_settings

__all__ = ["OptimizerSettings", "INNER_OPTIMIZERS"]

#: The inner optimizers known by name (any ``torch.optim.Optimizer`` class through ``torch_class``).
INNER_OPTIMIZERS = ("sgd", "adam", "adamw")
#: The optimizer families: the settings of one are refused with the other (``Setting.used_when``).
_SGD = ("sgd",)
_ADAM = ("adam", "adamw")
#: Refused by the section alone too; the engines accept Adam's betas and eps with SGD (an engine's checkpoint
#: compares only what changes the arithmetic), a run configuration refuses them.
_REFUSED_ALONE = ("momentum", "nesterov", "amsgrad")


def _used_by(names: tuple[str, ...], what: str) -> Callable[[Any], str | None]:
    """``used_when`` of a setting only the inner optimizers ``names`` have: ``config`` is a run configuration
    (its resolved inner optimizer: the run's, else the preset's own, else sgd; the reference engine's workers
    run plain SGD without any of these settings) or an :class:`OptimizerSettings` alone (its name)."""
    def used(config: Any) -> str | None:
        if isinstance(config, OptimizerSettings):
            name = config.name
        else:
            if config.execution.engine == "reference":
                return "the reference engine's workers run plain SGD steps (no momentum, weight decay or moments)"
            name = config.inner_optimizer()
        if name is None or name in names:  # a torch class: its own settings are refused below
            return None
        return f"{what}; the optimizer is {name}"
    return used


def _engine_optimizer(config: Any) -> str | None:
    """``used_when`` of the settings every named optimizer has (the reference engine's SGD has none)."""
    if not isinstance(config, OptimizerSettings) and config.execution.engine == "reference":
        return "the reference engine's workers run plain SGD steps (no momentum, weight decay or moments)"
    return None


@dataclass(frozen=True)
class OptimizerSettings:
    """Every worker's inner optimizer (the same on every worker).

    Attributes:
        name: ``"sgd"``, ``"adam"``, ``"adamw"``, or ``None`` -- the algorithm's own (DiLoCo: AdamW), else SGD
            (:meth:`resolve`).
        momentum, nesterov: SGD's.
        weight_decay: the optimizer's weight decay (AdamW: decoupled); ``None`` is torch's default.
        beta1, beta2, eps, amsgrad: Adam's and AdamW's.
        torch_class: any other ``torch.optim.Optimizer`` class (Python API only); its arguments are
            ``torch_kwargs`` (``lr`` is each step's learning rate).
    """

    name: str | None = setting(
        None, key="optimizer", choices=INNER_OPTIMIZERS, default_text="the preset's own (diloco: adamw), else sgd",
        help="every worker's inner optimizer, with torch.optim's semantics and defaults (another torch.optim class "
             "through the Python API)")
    momentum: float = setting(0.0, help="SGD momentum", low=0.0, high=1.0, high_open=True,
                              used_when=_used_by(_SGD, "an SGD setting (adam and adamw use beta1 as their momentum)"))
    nesterov: bool = setting(False, help="Nesterov momentum", used_when=_used_by(_SGD, "an SGD setting"))
    weight_decay: float | None = setting(None, help="the optimizer's weight decay (adamw: decoupled)", low=0.0,
                                         default_text="torch's: 0 (sgd, adam), 0.01 (adamw)",
                                         used_when=_engine_optimizer)
    beta1: float = setting(0.9, help="adam / adamw: beta1 (the first moment's decay)", low=0.0, high=1.0,
                           high_open=True, used_when=_used_by(_ADAM, "an Adam setting"))
    beta2: float = setting(0.999, help="adam / adamw: beta2 (the second moment's decay)", low=0.0, high=1.0,
                           high_open=True, used_when=_used_by(_ADAM, "an Adam setting"))
    eps: float = setting(1e-8, help="adam / adamw: eps added to the denominator", low=0.0, low_open=True,
                         used_when=_used_by(_ADAM, "an Adam setting"))
    amsgrad: bool = setting(False, help="adam / adamw: AMSGrad", used_when=_used_by(_ADAM, "an Adam setting"))
    torch_class: type | None = field(default=None, compare=True)
    torch_kwargs: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.name is not None and self.name not in INNER_OPTIMIZERS:
            raise ConfigError.invalid("optimizer", self.name, f"choose one of {', '.join(INNER_OPTIMIZERS)} (or "
                                      "a torch.optim.Optimizer class as torch_class through the Python API)")
        check_section(self)  # types and ranges, from the fields' declarations
        if self.nesterov and self.momentum == 0:
            raise ConfigError.invalid("nesterov", True, "needs momentum > 0")
        # a setting of the other family, from the declarations: alone (the engines' Python API), the flags
        # that name another optimizer's mechanism; a run configuration refuses every setting its resolved
        # optimizer and engine do not use (coopsgd.train.config.RunConfig.unused)
        for s, value, reason in unused_settings(OptimizerSettings, self, self):
            if s.key in _REFUSED_ALONE:
                raise ConfigError.invalid(s.key, value, f"{reason}; leave it out")
        if self.torch_class is not None:
            if self.name is not None:
                raise ConfigError.invalid("optimizer", self.name, "give a name or a torch_class, not both")
            if not isinstance(self.torch_class, type):
                raise ConfigError.invalid("torch_class", self.torch_class, "must be a torch.optim.Optimizer class")
            changed = [f.name for f in fields(self) if f.name not in ("torch_class", "torch_kwargs", "name")
                       and getattr(self, f.name) != f.default]
            if changed:
                raise ConfigError.invalid(changed[0], getattr(self, changed[0]),
                                          "give a torch optimizer's own settings in torch_kwargs")
        elif self.torch_kwargs:
            raise ConfigError.invalid("torch_kwargs", dict(self.torch_kwargs), "only for a torch_class")

    @property
    def betas(self) -> tuple[float, float]:
        return (self.beta1, self.beta2)

    def resolve(self, prescribed: str | None) -> OptimizerSettings:
        """These settings with ``name`` filled in: the run's choice, else the algorithm's ``prescribed``
        optimizer (``AlgorithmSpec.inner_optimizer``), else ``"sgd"``. A torch class stays as it is."""
        if self.name is not None or self.torch_class is not None:
            return self
        return replace(self, name=prescribed or "sgd")

    def effective_weight_decay(self) -> float:
        """The weight decay in use: the given one, else torch's default for this optimizer."""
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.01 if self.name == "adamw" else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly record (for run records and checkpoints); a torch class by its qualified name."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)
                               if f.name not in ("torch_class", "torch_kwargs")}
        if self.torch_class is not None:
            out["torch_class"] = f"{self.torch_class.__module__}.{self.torch_class.__qualname__}"
            out["torch_kwargs"] = dict(self.torch_kwargs or {})
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> OptimizerSettings:
        """The settings of :meth:`to_dict` (a torch class cannot be restored from its name: an error says so)."""
        if "torch_class" in data:
            raise ConfigError.invalid("optimizer.torch_class", data["torch_class"],
                                      "a torch optimizer class is given through the Python API, not a record")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError.invalid(f"optimizer.{unknown[0]}", data[unknown[0]],
                                      f"unknown optimizer setting; allowed: {', '.join(sorted(known))}")
        return cls(**dict(data))
