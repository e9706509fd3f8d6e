"""One metric registry: every metric pellucid reports exists once, with its element, definition, unit and direction.

A metric is registered by the module that defines it, at import, with :func:`register_metric`; a second
registration of the same name (or of a name an existing family already covers) raises
:class:`DuplicateMetricError` naming the metric and both registering modules. Readers — the report card, the W&B
logger, bundle metadata and model cards — look a name up with :func:`get_metric` and show the definition that the
value was computed under, so a value can never sit beside another metric's definition.

A *family* is one registration for a parameterised set of metrics: its name holds ``{placeholders}``
(``concept/{concept}/accuracy``) that match one path segment each; :func:`get_metric` returns the family bound to
the concrete name (placeholders filled in the definition and unit as well).

Names are grouped by element: the five elements of interpretability (Wang et al., IEEE Access 12, 2024) and
``performance`` for task metrics (accuracy, Dice ...). Bundle metadata and loggers write ``<group>/<name>`` keys
(``test/<name>`` for task metrics); :func:`metric_for_key` reads such a key back, including the keys of older
bundles through :data:`LEGACY_NAMES`, the one place where renamed metrics are mapped to their registered names.

Self-contained on purpose (standard library only): it can move into ``training/elements/`` unchanged.
"""

from __future__ import annotations

import re
import string
import sys
from dataclasses import dataclass, field, replace

ELEMENTS = ("localization", "visual_recognizability", "physical_attribution", "transparency", "actionability")
PERFORMANCE = "performance"
GROUPS = (*ELEMENTS, PERFORMANCE)
ELEMENT_TITLES = {"localization": "Localization", "visual_recognizability": "Visual recognizability",
                  "physical_attribution": "Physical attribution", "transparency": "Model transparency",
                  "actionability": "Actionability", PERFORMANCE: "Task performance"}
TASK_KEY_PREFIX = "test/"  # bundle metadata and ``pellucid zoo`` key task metrics by the split they were measured on

# Metric names that older bundles (``checkpoints/*/metadata.json``) carry and that are now registered under another
# name, as (old name pattern, registered name pattern). The one alias map: readers go through metric_for_key.
LEGACY_NAMES: tuple[tuple[str, str], ...] = (
    # the per-concept error in the unit was reported twice (ConceptMetrics and the evaluator): one name remains
    ("concept/{concept}/mae_{unit_suffix}", "concept_mae/{concept}"),
)


class DuplicateMetricError(ValueError):
    """A metric name was registered twice (or a concrete name falls inside an already registered family)."""


def _placeholders(template: str) -> tuple[str, ...]:
    return tuple(name for _, name, _, _ in string.Formatter().parse(template) if name)


def _pattern(template: str) -> re.Pattern[str]:
    """A regular expression matching ``template`` with every ``{placeholder}`` one path segment."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name:
            parts.append(f"(?P<{name}>[^/]+)")
    return re.compile("".join(parts) + r"\Z")


class _KeepMissing(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


@dataclass(frozen=True)
class MetricDefinition:
    """What one metric (or one family of metrics) is.

    Args:
        name: Registered name; a family's name holds ``{placeholders}`` (``concept/{concept}/accuracy``).
        element: One of :data:`GROUPS`.
        definition: One or two sentences a reader needs to interpret the value (placeholders allowed in a family).
        unit: Unit of the value (``"mm"``), ``None`` for plain numbers and shares; may be a placeholder.
        higher_is_better: ``True``/``False``, or ``None`` when neither direction is better (a reference value).
        module: The module that registered it (filled by :func:`register_metric`).
    """

    name: str
    element: str
    definition: str
    unit: str | None = None
    higher_is_better: bool | None = None
    module: str = field(default="", compare=False)

    @property
    def parameters(self) -> tuple[str, ...]:
        """The placeholders of a family's name (empty for a single metric)."""
        return _placeholders(self.name)

    @property
    def is_family(self) -> bool:
        """Whether this registration covers a parameterised set of names."""
        return bool(self.parameters)

    def match(self, name: str) -> dict[str, str] | None:
        """The placeholder values that make this registration's name ``name``, or ``None`` if it does not."""
        if not self.is_family:
            return {} if name == self.name else None
        found = _pattern(self.name).match(name)
        return None if found is None else found.groupdict()

    def bind(self, **values: str) -> MetricDefinition:
        """The family's member for ``values`` (placeholders filled in name, definition and unit).

        Raises:
            ValueError: naming the family and the placeholders left without a value.
        """
        missing = [name for name in self.parameters if name not in values]
        if missing:
            raise ValueError(f"metric family {self.name!r} needs values for {missing}, got {sorted(values)}")
        fill = _KeepMissing({key: str(value) for key, value in values.items()})
        unit = None if self.unit is None else self.unit.format_map(fill)
        unit = None if unit is None or _placeholders(unit) or not unit else unit
        return replace(self, name=self.name.format_map(fill), definition=self.definition.format_map(fill), unit=unit)


_REGISTRY: dict[str, MetricDefinition] = {}


def _clash(definition: MetricDefinition) -> MetricDefinition | None:
    """An existing registration with the same name, or one whose family covers the new name (or vice versa)."""
    if definition.name in _REGISTRY:
        return _REGISTRY[definition.name]
    for existing in _REGISTRY.values():
        if existing.is_family and not definition.is_family and existing.match(definition.name) is not None:
            return existing
        if definition.is_family and not existing.is_family and definition.match(existing.name) is not None:
            return existing
    return None


def register_metric(name: str, element: str, definition: str, unit: str | None = None,
                    higher_is_better: bool | None = None, *, module: str | None = None) -> MetricDefinition:
    """Register a metric (or a family, when ``name`` holds ``{placeholders}``) once; returns its definition.

    Args:
        name: The metric's name as results, loggers and bundles carry it (without the element prefix).
        element: One of :data:`GROUPS`.
        definition: What the value means, in one or two sentences.
        unit: Unit of the value, or ``None``.
        higher_is_better: Direction, or ``None`` when neither is better.
        module: The registering module; default the caller's ``__name__``.

    Raises:
        ValueError: for an unknown element or an empty definition.
        DuplicateMetricError: when the name is taken (naming the metric and both modules). Registering the very
            same definition again from the same module (a module reloaded) returns the existing one.
    """
    if element not in GROUPS:
        raise ValueError(f"metric {name!r}: element must be one of {list(GROUPS)}, got {element!r}")
    if not definition.strip():
        raise ValueError(f"metric {name!r}: the definition is empty; say what the value means")
    caller = module if module is not None else sys._getframe(1).f_globals.get("__name__", "?")
    new = MetricDefinition(name, element, definition, unit, higher_is_better, caller)
    existing = _clash(new)
    if existing is not None:
        if existing == new and existing.module == caller:
            return existing
        raise DuplicateMetricError(
            f"metric {name!r} is registered twice: by {existing.module} (as {existing.name!r}, element "
            f"{existing.element}) and by {caller} (element {element}); every metric exists once, so give one of "
            "them another name")
    _REGISTRY[name] = new
    return new


def unregister_metric(name: str) -> None:
    """Remove a registration (for tests that register throw-away metrics).

    Raises:
        KeyError: naming the metric when it is not registered.
    """
    if name not in _REGISTRY:
        raise KeyError(f"no registered metric {name!r}")
    del _REGISTRY[name]


def get_metric(name: str, **values: str) -> MetricDefinition:
    """The registered definition of ``name``: a single metric, or the family that covers it, bound to ``name``.

    Args:
        name: A concrete metric name (``"pointing_game"``, ``"concept/irregular/accuracy"``).
        **values: Values of placeholders that do not appear in the name (a family's ``unit``).

    Raises:
        KeyError: naming the metric and listing the registered names.
    """
    if name in _REGISTRY and not _REGISTRY[name].is_family:
        return _REGISTRY[name]
    for registered in _REGISTRY.values():
        matched = registered.match(name) if registered.is_family else None
        if matched is not None:
            return registered.bind(**{**values, **matched})
    raise KeyError(f"no registered metric {name!r}; registered: {sorted(_REGISTRY)} (register it with "
                   "pellucid.training.elements.registry.register_metric next to the code that computes it)")


def list_metrics(element: str | None = None) -> list[MetricDefinition]:
    """Every registration (families as templates), in registration order; only ``element``'s when given.

    Raises:
        ValueError: for an unknown element.
    """
    if element is not None and element not in GROUPS:
        raise ValueError(f"element must be one of {list(GROUPS)}, got {element!r}")
    return [m for m in _REGISTRY.values() if element is None or m.element == element]


def canonical_name(name: str) -> str:
    """``name`` translated through :data:`LEGACY_NAMES` when it is an old name, else ``name`` itself."""
    for old, new in LEGACY_NAMES:
        found = _pattern(old).match(name)
        if found is not None:
            return new.format_map(_KeepMissing(found.groupdict()))
    return name


def metric_for_key(key: str) -> MetricDefinition | None:
    """The registered metric behind a metadata/logger key: ``<element>/<name>``, ``test/<name>`` or a bare name.

    Old names (:data:`LEGACY_NAMES`) resolve to their registered metric. ``None`` when nothing registered matches.
    """
    group, _, rest = key.partition("/")
    candidates = [rest] if group in GROUPS or f"{group}/" == TASK_KEY_PREFIX else []
    for name in [*candidates, key]:
        try:
            return get_metric(canonical_name(name))
        except KeyError:
            continue
    return None
