"""The inference engine: prompts, generation, relation scoring, plan parsing, serving (no ROS).

``SpatialEngine`` is imported lazily so that light users (prompts, parsing, window) don't pay for torch.
"""
from .parsing import PlanParseError, Relation, parse_plan, relations_from_text


def __getattr__(name):
    if name in ("SpatialEngine", "EngineError", "AskResult", "PlanResult", "validate_images"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)


__all__ = ["SpatialEngine", "EngineError", "AskResult", "PlanResult", "Relation", "PlanParseError", "parse_plan",
           "relations_from_text", "validate_images"]
