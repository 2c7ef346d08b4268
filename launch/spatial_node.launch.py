"""Launch spatial_node with the package's parameter file (ros2 launch phi3v_spatial spatial_node.launch.py).

Arguments: params_file (default: <share>/phi3v_spatial/config/spatial_node.yaml), model_path ("" = the value in
params_file, which defaults to the embedded model), namespace, use_sim_time.
"""
import os

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition, UnlessCondition
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description():
    default_params = os.path.join(get_package_share_directory("phi3v_spatial"), "config", "spatial_node.yaml")
    params_file = LaunchConfiguration("params_file")
    model_path = LaunchConfiguration("model_path")
    namespace = LaunchConfiguration("namespace")
    use_sim_time = LaunchConfiguration("use_sim_time")
    sim_time = {"use_sim_time": ParameterValue(use_sim_time, value_type=bool)}
    model_given = PythonExpression(["'", model_path, "' != ''"])

    def node(overrides, condition):
        return Node(
            package="phi3v_spatial",
            executable="spatial_node",
            name="spatial_node",
            namespace=namespace,
            parameters=[params_file, overrides],
            output="screen",
            emulate_tty=True,
            condition=condition,
        )

    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=default_params,
                              description="Parameter file (default: the package's spatial_node.yaml)"),
        DeclareLaunchArgument("model_path", default_value="",
                              description="Checkpoint folder or hub id; empty keeps params_file's model_path"),
        DeclareLaunchArgument("namespace", default_value="", description="Namespace of the node"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="Use /clock (bag replay, simulators)"),
        # model_path only overrides the file when given, so an empty argument never hides the file's value.
        node({**sim_time, "model_path": model_path}, IfCondition(model_given)),
        node(sim_time, UnlessCondition(model_given)),
    ])
