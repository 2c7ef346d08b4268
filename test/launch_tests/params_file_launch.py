"""launch_testing test of the installed launch file: a parameter file keyed for another node name is reported at
startup; the shipped one (keyed /**) applies under any namespace and is not.

Run with the upstream `launch_test` in a colcon workspace where phi3v_spatial is installed (test_colcon_install.py
does); the project's own pytest run does not collect this file (no test_ prefix): it needs `launch` and `launch_ros`.
"""
import os
import shutil
import tempfile
import unittest

import launch
import launch_testing
import launch_testing.actions
import launch_testing.asserts
from ament_index_python.packages import get_package_share_directory
from launch.actions import GroupAction, IncludeLaunchDescription, SetLaunchConfiguration
from launch.launch_description_sources import PythonLaunchDescriptionSource

SHARE = get_package_share_directory("phi3v_spatial")
LAUNCH_FILE = os.path.join(SHARE, "launch", "spatial_node.launch.py")
SHIPPED = os.path.join(SHARE, "config", "spatial_node.yaml")
KEYED = os.path.join(tempfile.mkdtemp(prefix="phi3v_launch_test_"), "keyed_by_name.yaml")
with open(KEYED, "w") as f:
    f.write("spatial_node:\n  ros__parameters:\n    window.capacity: 3\n")


def spatial_node(namespace, params_file):
    return GroupAction(scoped=True, actions=[IncludeLaunchDescription(
        PythonLaunchDescriptionSource(LAUNCH_FILE),
        launch_arguments={"namespace": namespace, "params_file": params_file}.items())])


def generate_test_description():
    return launch.LaunchDescription([
        # launch escalates to SIGTERM 5 s after SIGINT; two nodes shutting down on a busy 2-core machine can take
        # longer than that (one alone: about 3 s), and the check below is that they exit cleanly on SIGINT.
        SetLaunchConfiguration("sigterm_timeout", "30"),
        spatial_node("robot2", KEYED),     # silently ignored before the check existed
        spatial_node("robot3", SHIPPED),
        launch_testing.actions.ReadyToTest(),
    ])


def warning_for(fqn):
    return f"does not match this node ({fqn}): none of its values apply"


class TestParamsFileUnderNamespace(unittest.TestCase):

    def test_keyed_file_is_reported_and_the_shipped_one_is_not(self, proc_output):
        proc_output.assertWaitFor(warning_for("/robot2/spatial_node"), timeout=120)
        # Both nodes reach active; by then any startup warning of robot3 would have been printed.
        proc_output.assertWaitFor("[robot3.spatial_node]: active: serving", timeout=180)
        proc_output.assertWaitFor("[robot2.spatial_node]: active: serving", timeout=180)
        text = "".join(io.text.decode(errors="replace") for io in proc_output)
        self.assertIn(KEYED, text)
        self.assertNotIn(warning_for("/robot3/spatial_node"), text)


@launch_testing.post_shutdown_test()
class TestShutdown(unittest.TestCase):

    def test_nodes_exit_cleanly(self, proc_info):
        shutil.rmtree(os.path.dirname(KEYED), ignore_errors=True)
        launch_testing.asserts.assertExitCodes(proc_info)
