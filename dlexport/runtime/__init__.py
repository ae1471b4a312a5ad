from .plan import ExitPolicy, Plan, PlanError, load_plan
from .runtime import Generation, PromptTooLongError, Runtime
from .sampling import Sampling

__all__ = ["ExitPolicy", "Generation", "Plan", "PlanError", "PromptTooLongError", "Runtime", "Sampling", "load_plan"]
