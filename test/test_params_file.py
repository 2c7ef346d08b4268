"""Parameter files under a namespace or a new node name: which keys apply (rclpy's rule), and the startup warning
for a file that matches none of the node's names (phi3v_spatial/ros/params_file.py)."""
import os

import pytest
import yaml

from phi3v_spatial.ros.params_file import key_matches, node_keys, params_files, unmatched_messages


@pytest.mark.parametrize("key, fqn, expected", [
    ("spatial_node", "/spatial_node", True),
    ("/spatial_node", "/spatial_node", True),
    ("spatial_node", "/robot1/spatial_node", False),          # the README example that used to be silent
    ("/robot1/spatial_node", "/robot1/spatial_node", True),
    ("/**", "/spatial_node", True),
    ("/**", "/robot1/arm/front_spatial", True),
    ("/**/spatial_node", "/robot1/spatial_node", True),
    ("/**/spatial_node", "/spatial_node", True),
    ("/**/spatial_node", "/robot1/front_spatial", False),     # renamed
    ("/*/spatial_node", "/robot1/spatial_node", True),
    ("/*/spatial_node", "/spatial_node", False),
    ("/*/spatial_node", "/a/b/spatial_node", False),
    ("/robot1/*", "/robot1/spatial_node", True),
    ("/robot1/*", "/robot2/spatial_node", False),
    ("spatial", "/spatial_node", False),                        # whole-name match, not a prefix
    ("spatial.node", "/spatial_node", False),                   # '.' is literal
])
def test_key_matches_follows_rclpy(key, fqn, expected):
    assert key_matches(key, fqn) is expected


def test_node_keys_reads_flat_nested_and_wildcard_sections():
    data = yaml.safe_load("""
/**:
  ros__parameters: {a: 1}
spatial_node:
  ros__parameters: {b: 2}
robot1:
  arm:
    spatial_node:
      ros__parameters: {c: 3}
not_a_node: 5
""")
    assert node_keys(data) == ["/**", "/spatial_node", "/robot1/arm/spatial_node"]
    assert node_keys(None) == [] and node_keys([1, 2]) == []


def test_params_files_only_inside_ros_args_sections():
    argv = ["spatial_node", "--params-file", "not-ros.yaml", "--ros-args", "-r", "__ns:=/robot1", "--params-file",
            "a.yaml", "-p", "x:=1", "--", "--params-file", "user-arg.yaml", "--ros-args", "--params-file", "b.yaml"]
    assert params_files(argv) == ["a.yaml", "b.yaml"]
    assert params_files(["spatial_node"]) == [] and params_files(["x", "--ros-args", "--params-file"]) == []


def test_unmatched_messages_name_the_file_its_keys_and_the_fix(tmp_path):
    keyed = tmp_path / "my_robot.yaml"
    keyed.write_text("spatial_node:\n  ros__parameters: {autostart: false}\n")
    wildcard = tmp_path / "wild.yaml"
    wildcard.write_text("/**:\n  ros__parameters: {autostart: false}\n")
    launch_tmp = tmp_path / "launch_params_x"   # what launch_ros writes for its dict overrides
    launch_tmp.write_text("/robot1/spatial_node:\n  ros__parameters: {use_sim_time: false}\n")
    argv = ["spatial_node", "--ros-args", "--params-file", str(keyed), "--params-file", str(wildcard),
            "--params-file", str(launch_tmp), "--params-file", str(tmp_path / "missing.yaml")]

    messages = unmatched_messages(argv, "/robot1/spatial_node")
    assert len(messages) == 1, messages
    assert str(keyed) in messages[0] and "/spatial_node" in messages[0] and "/robot1/spatial_node" in messages[0]
    assert "'/**:'" in messages[0]
    other = unmatched_messages(argv, "/spatial_node")   # now only the file keyed for /robot1 misses
    assert len(other) == 1 and str(launch_tmp) in other[0], other


def test_node_warns_at_startup_and_wildcard_file_applies_under_a_namespace(tmp_path):
    """A real spatial_node in /robot1: the fixture's file keyed `spatial_node:` is reported, the `/**` one applies."""
    from fixtures.ros import NodeProcess, RosClient

    wildcard = tmp_path / "wild.yaml"
    wildcard.write_text(yaml.safe_dump({"/**": {"ros__parameters": {"autostart": False}}}))
    proc = NodeProcess({"window.num_frames": 2}, str(tmp_path),
                       extra_args=["-r", "__ns:=/robot1", "--params-file", str(wildcard)]).start()
    client = None
    try:
        assert proc.wait_for_log("none of its values apply", timeout=60), proc.log()
        client = RosClient()
        # autostart: false came from the /** file, so the namespaced node waits unconfigured.
        assert client.get_state("/robot1/spatial_node") == "unconfigured", proc.log()
        log = proc.log()
        warnings = [line for line in log.splitlines() if "none of its values apply" in line]
        assert len(warnings) == 1 and proc.params_file in warnings[0] and str(wildcard) not in warnings[0], log
        assert "[WARN]" in warnings[0] and "robot1.spatial_node" in warnings[0]
    finally:
        if client is not None:
            client.close()
        assert proc.stop() == 0, proc.log()
        assert os.path.isfile(proc.log_file)
