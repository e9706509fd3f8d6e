"""pellucid.training: the Lightning side — module, phases, metrics, data modules and the CLI."""

from pellucid.training.metrics import MultilabelBalancedAccuracy, task_metrics
from pellucid.training.module import InterpretableModule, NonFiniteLossError
from pellucid.training.phases import Phase, PhaseSchedule

__all__ = [
    "InterpretableModule",
    "MultilabelBalancedAccuracy",
    "NonFiniteLossError",
    "Phase",
    "PhaseSchedule",
    "task_metrics",
]
