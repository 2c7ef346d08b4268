"""The package is laid out and installed the way ROS 2 users expect."""
import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def test_interfaces_import_without_sourcing():
    env = {"PATH": "/usr/bin:/bin", "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST", "ROS_DOMAIN_ID": os.environ["ROS_DOMAIN_ID"]}
    code = (
        "import phi3v_spatial_interfaces.srv as s, phi3v_spatial_interfaces.action as a, phi3v_spatial_interfaces.msg as m, rclpy;"
        "print(s.AskSpatial, s.QueryRelations, s.SetAdapter, a.Plan, m.ObjectRelation, m.PlanStep)"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_interface_fields_match_the_spec():
    from phi3v_spatial_interfaces.action import Plan
    from phi3v_spatial_interfaces.msg import ObjectRelation, PlanStep
    from phi3v_spatial_interfaces.srv import AskSpatial, QueryRelations, SetAdapter

    def names(cls):
        return list(cls.get_fields_and_field_types().keys())

    assert names(ObjectRelation)[:5] == ["subject", "relation", "object", "holds", "probability"]
    assert names(PlanStep)[:5] == ["action", "target", "reference", "relation", "detail"]
    assert names(AskSpatial.Request)[:5] == ["question", "image_topics", "images", "num_frames", "max_new_tokens"]
    assert names(AskSpatial.Response)[:6] == ["success", "error", "answer", "relations", "frame_stamps", "latency_s"]
    assert names(QueryRelations.Request)[:4] == ["candidates", "image_topics", "images", "num_frames"]
    assert names(QueryRelations.Response)[:5] == ["success", "error", "relations", "frame_stamps", "latency_s"]
    assert names(SetAdapter.Request)[:2] == ["name", "scale"]
    assert names(SetAdapter.Response)[:4] == ["success", "error", "active", "available"]
    assert names(Plan.Goal)[:6] == ["instruction", "image_topics", "images", "num_frames", "max_new_tokens", "timeout_s"]
    assert names(Plan.Result)[:5] == ["success", "error", "steps", "raw_text", "latency_s"]
    assert names(Plan.Feedback)[:4] == ["stage", "partial_text", "tokens_generated", "queue_position"]
    t = AskSpatial.Request.get_fields_and_field_types()
    assert t["images"] == "sequence<sensor_msgs/Image>" and t["num_frames"] == "uint32"


def test_package_xml_is_format_3_ament_python():
    root = ET.parse(os.path.join(ROOT, "package.xml")).getroot()
    assert root.get("format") == "3"
    assert root.findtext("name") == "phi3v_spatial"
    assert root.find("export/build_type").text == "ament_python"
    iface = ET.parse(os.path.join(ROOT, "phi3v_spatial_interfaces", "package.xml")).getroot()
    assert iface.find("export/build_type").text == "ament_cmake"
    assert iface.findtext("member_of_group") == "rosidl_interface_packages"


def test_console_scripts_exist_and_cli_has_help():
    assert os.path.isfile(os.path.join(BIN, "spatial_node"))
    out = subprocess.run([os.path.join(BIN, "phi3v-spatial"), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "phi3v-spatial" in out.stdout


def test_launch_file_names_an_existing_executable_and_params_file():
    path = os.path.join(ROOT, "launch", "spatial_node.launch.py")
    tree = ast.parse(open(path).read())
    strings = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert "phi3v_spatial" in strings and "spatial_node" in strings
    assert any(s.endswith("spatial_node.yaml") for s in strings)
    assert os.path.isfile(os.path.join(ROOT, "config", "spatial_node.yaml"))
    setup_src = open(os.path.join(ROOT, "setup.py")).read()
    assert "spatial_node = phi3v_spatial.ros.node:main" in setup_src
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", getattr(n.func, "attr", "")) == "Node"]
    assert calls, "launch file must create a launch_ros Node action"
    kw = {k.arg: k.value for k in calls[0].keywords}
    assert kw["package"].value == "phi3v_spatial" and kw["executable"].value == "spatial_node"


def test_setup_is_idempotent():
    out = subprocess.run(["bash", os.path.join(ROOT, "scripts", "setup_venv.sh")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "[setup]" not in out.stdout, f"setup redid work although nothing changed:\n{out.stdout}"
