"""The node's ROS parameters, declared from the one table in ``phi3v_spatial.settings`` (``PARAMETERS``)."""
from __future__ import annotations

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.exceptions import ParameterUninitializedException
from rclpy.parameter import Parameter

from phi3v_spatial.settings import PARAMETERS, Param

_TYPES = {str: ParameterType.PARAMETER_STRING, int: ParameterType.PARAMETER_INTEGER,
          float: ParameterType.PARAMETER_DOUBLE, bool: ParameterType.PARAMETER_BOOL,
          list: ParameterType.PARAMETER_STRING_ARRAY}


def descriptor(p: Param) -> ParameterDescriptor:
    """Type, range (enforced by rclpy on every set), read-only flag and description of one parameter."""
    d = ParameterDescriptor(description=p.description, type=_TYPES[p.type], read_only=p.read_only)
    if p.range is not None and p.type is int:
        d.integer_range = [IntegerRange(from_value=int(p.range[0]), to_value=int(p.range[1]), step=1)]
    elif p.range is not None and p.type is float:
        d.floating_point_range = [FloatingPointRange(from_value=float(p.range[0]), to_value=float(p.range[1]), step=0.0)]
    return d


def declare_parameters(node) -> None:
    for p in PARAMETERS:
        value = p.default_value()
        if isinstance(value, list) and not value:  # an empty default cannot carry its type
            value = Parameter.Type.STRING_ARRAY
        node.declare_parameter(p.name, value, descriptor(p))


def parameter_value(node, name: str):
    """A parameter's current value; an array left unset (YAML ``[]`` carries no type) reads as empty."""
    try:
        value = node.get_parameter(name).value
    except ParameterUninitializedException:
        return []
    return [] if value is None else value


def parameter_values(node) -> dict:
    return {p.name: parameter_value(node, p.name) for p in PARAMETERS}
