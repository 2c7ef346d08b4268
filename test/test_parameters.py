"""The parameter table (``settings.PARAMETERS``) is the single source: the node's descriptors, the shipped
parameter file and the README's parameter table all say what it says."""
import re

import pytest

from phi3v_spatial import settings
from phi3v_spatial.replay.params import load_node_params

RANGE = re.compile(r"Range (\S+?)\.\.(\S+)")


def _yaml_blocks(text: str) -> dict[str, str]:
    """Parameter name -> the comment lines right above it (a commented-out ``# name: value`` counts as the entry)."""
    blocks, comments = {}, []
    for line in text.splitlines():
        s = line.strip()
        entry = re.match(r"^(?:#\s*)?([a-z_]+(?:\.[a-z_]+)*):\s*\S", s)
        if entry and entry.group(1) in settings.PARAMETERS_BY_NAME | {"use_sim_time": None}:
            blocks[entry.group(1)] = "\n".join(comments)
            comments = []
        elif s.startswith("#"):
            comments.append(s)
        else:  # a blank line or a section key ends a comment block
            comments = []
    return blocks


def test_shipped_params_file_matches_the_table(repo_root):
    path = f"{repo_root}/config/spatial_node.yaml"
    text = open(path).read()
    values = load_node_params(path)  # either section key: `spatial_node:` or `/**:`
    blocks = _yaml_blocks(text)
    assert set(values) - {"use_sim_time"} <= set(settings.PARAMETERS_BY_NAME), "parameters the node does not declare"
    for p in settings.PARAMETERS:
        assert p.name in blocks, f"{p.name} is not documented in {path}"
        doc = blocks[p.name]
        if p.name in values:  # set in the file: the default (computed defaults are left commented out)
            assert settings.check_value(p.name, values[p.name]) == p.default_value(), p.name
        else:
            assert callable(p.default), f"{p.name} is commented out but has a fixed default"
        assert ("(read-only)" in doc) == p.read_only, f"{p.name}: read-only marker in {path}"
        stated = RANGE.search(doc)
        if p.range is None:
            assert stated is None, p.name
        else:
            assert stated, f"{p.name}: no 'Range lo..hi' in {path}"
            assert (float(stated.group(1)), float(stated.group(2))) == (float(p.range[0]), float(p.range[1])), p.name


def test_readme_parameter_table_is_the_table(repo_root):
    text = open(f"{repo_root}/README.md").read()
    section = text[text.index("### Parameters"):]
    rows = [line for line in section.splitlines()[1:40] if line.startswith("| `")]
    assert rows == settings.markdown_rows(), "README parameter table differs from settings.markdown_rows()"


def test_node_declares_the_table(ros_context):
    """Types, ranges, read-only flags and defaults of the running node are the table's."""
    from rcl_interfaces.msg import ParameterType
    from rclpy.parameter import Parameter

    from phi3v_spatial.ros.node import SpatialNode
    from phi3v_spatial.ros.parameters import parameter_values

    node = SpatialNode(context=ros_context, parameter_overrides=[Parameter("autostart", value=False)])
    try:
        names = [p.name for p in settings.PARAMETERS]
        assert parameter_values(node) == {**settings.node_defaults(), "autostart": False}
        for p, d in zip(settings.PARAMETERS, node.describe_parameters(names)):
            assert d.read_only == p.read_only and d.description == p.description, p.name
            types = {str: ParameterType.PARAMETER_STRING, int: ParameterType.PARAMETER_INTEGER,
                     float: ParameterType.PARAMETER_DOUBLE, bool: ParameterType.PARAMETER_BOOL,
                     list: ParameterType.PARAMETER_STRING_ARRAY}
            assert d.type == types[p.type], p.name
            bounds = [(r.from_value, r.to_value) for r in (*d.integer_range, *d.floating_point_range)]
            assert bounds == ([tuple(p.range)] if p.range else []), p.name
    finally:
        node.destroy_node()


def test_values_are_checked_against_the_table():
    assert settings.check_value("window.num_frames", "3") == 3
    with pytest.raises(ValueError, match="window.num_frames = 0 is outside 1..16"):
        settings.check_value("window.num_frames", 0)
    with pytest.raises(ValueError, match="window.num_frames"):
        settings.check_value("window.num_frames", "many")
    assert settings.check_value("image_topics", "/cam") == ["/cam"]


def test_one_adapter_list_parser_and_one_meaning_of_none():
    from phi3v_spatial.engine.engine import base_model_requested

    assert settings.parse_adapters(["a=/x/a", " /y/spatial/ ", "/z/spatial"]) == {
        "a": "/x/a", "spatial": "/y/spatial/", "spatial-2": "/z/spatial"}
    for bad in (["=/x"], ["name="]):
        with pytest.raises(ValueError, match="is not 'name=path'"):
            settings.parse_adapters(bad)
    assert all(base_model_requested(n) for n in (None, "", " none ", "None"))
    assert not base_model_requested("spatial")
    over = settings.cli_overrides("", ["/a/spatial", "/b/mine"])
    assert over == {"adapters": ["spatial=/a/spatial", "mine=/b/mine"], "active_adapter": "mine"}
    assert settings.cli_overrides("/m", ["/a/x"], no_adapter=True) == {"model_path": "/m", "adapters": [],
                                                                       "active_adapter": ""}
