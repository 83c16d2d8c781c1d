"""The elastic core shared by every compressed encoder: an execution plan and the modules that obey it."""
from espnet_compress.core.plan import ExecutionPlan, PlanError

__all__ = ["ExecutionPlan", "PlanError"]
