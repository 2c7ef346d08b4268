"""Warn when a ``--params-file`` sets parameters for node names that do not include this node.

Why: ROS 2 applies a parameter file section only when its key matches the node's fully qualified name, and skips
the rest without a word. A file keyed ``spatial_node:`` configures ``/spatial_node`` but not the same node
launched with ``namespace:=robot1`` (``/robot1/spatial_node``) or renamed, so the robot silently runs on defaults.
The matching rule here is rclpy's own (``_populate_node_parameters_from_rcl_params``): a key gets a leading ``/``,
``/*`` stands for one name segment and ``/**`` for any number of them, and the whole name must match.

Pure functions (no rclpy) plus :func:`warn_unmatched`, which the node calls once at startup.
"""
from __future__ import annotations

import re

PARAMS_KEY = "ros__parameters"


def node_keys(data) -> list[str]:
    """The node names a parsed parameter file has ``ros__parameters`` for, nested keys joined the way rcl does.

    ``{'/**': {'ros__parameters': ...}}`` -> ``['/**']``; ``{'robot1': {'spatial_node': {'ros__parameters': ...}}}``
    -> ``['/robot1/spatial_node']``.
    """
    out: list[str] = []

    def walk(mapping, parts):
        for key, value in mapping.items():
            if key == PARAMS_KEY:
                if parts:
                    out.append("/" + "/".join(parts))
            elif isinstance(value, dict):
                walk(value, parts + [p for p in str(key).split("/") if p])

    if isinstance(data, dict):
        walk(data, [])
    return out


def key_matches(key: str, node_fqn: str) -> bool:
    """True when parameter-file key ``key`` applies to the node named ``node_fqn`` (rclpy's rule)."""
    name = key if key.startswith("/") else "/" + key
    pattern = "".join(r"(/\w+)" if part == "\0" else ("*" if part == "*" else re.escape(part))
                      for part in re.split(r"(\0|\*)", name.replace("/*", "\0")) if part)
    return re.fullmatch(pattern, node_fqn) is not None


def params_files(argv: list[str]) -> list[str]:
    """The ``--params-file`` paths in the ``--ros-args ... [--]`` sections of a command line."""
    files: list[str] = []
    in_ros_args = False
    it = iter(argv)
    for arg in it:
        if arg == "--ros-args":
            in_ros_args = True
        elif arg == "--":
            in_ros_args = False
        elif in_ros_args and arg == "--params-file":
            path = next(it, None)
            if path is not None:
                files.append(path)
    return files


def unmatched_messages(argv: list[str], node_fqn: str) -> list[str]:
    """One operator-readable message per parameter file in ``argv`` whose sections all name other nodes."""
    import yaml

    messages = []
    for path in params_files(argv):
        try:
            with open(path, encoding="utf-8") as f:
                keys = node_keys(yaml.safe_load(f))
        except (OSError, yaml.YAMLError):
            continue  # rcl already refused to start on a file it cannot read or parse
        if keys and not any(key_matches(k, node_fqn) for k in keys):
            messages.append(
                f"parameter file {path} sets parameters only for {', '.join(keys)}, which does not match this node "
                f"({node_fqn}): none of its values apply. Key the file '/**:' (any node name or namespace) "
                f"or '{node_fqn}:'.")
    return messages


def warn_unmatched(node, argv: list[str]) -> None:
    """Log :func:`unmatched_messages` for ``node`` (an rclpy node) as warnings."""
    for message in unmatched_messages(argv, node.get_fully_qualified_name()):
        node.get_logger().warning(message)
