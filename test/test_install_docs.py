"""The install path a robot follows is consistent: README pip lines = requirements.txt's runtime pins, package.xml
declares every library the package imports (rosdep key where one exists), and the README's commands are well formed.
The commands themselves run in test_colcon_install.py (needs ../shared/ros2-cli)."""
import ast
import os
import re
import sys
import xml.etree.ElementTree as ET

from fixtures.readme import code_blocks, pip_requirements, ros2_commands, section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTALL_HEADING = "Building on a robot with a ROS 2 install (colcon)"

# import name -> rosdep key (checked against ros/rosdistro rosdep/python.yaml when written)
ROSDEP_KEYS = {
    "numpy": "python3-numpy", "cv2": "python3-opencv", "PIL": "python3-pil", "yaml": "python3-yaml",
    "tqdm": "python3-tqdm", "torch": "python3-torch", "transformers": "python3-transformers-pip",
    "huggingface_hub": "python3-huggingface-hub-pip", "rosbags": "python3-rosbags-pip",
}
# import name -> pip distribution, for libraries without a rosdep key
PIP_ONLY = {"tokenizers": "tokenizers", "safetensors": "safetensors", "peft": "peft", "ray": "ray"}
# ROS packages: the import name is the package name
ROS_PACKAGES = {"rclpy", "rcl_interfaces", "lifecycle_msgs", "builtin_interfaces", "sensor_msgs", "diagnostic_msgs",
                "rosgraph_msgs", "phi3v_spatial_interfaces", "ament_index_python", "launch", "launch_ros"}


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def third_party_imports() -> dict[str, str]:
    """Top-level modules imported anywhere in the installed package and launch files -> one file that imports it."""
    found = {}
    for top in ("phi3v_spatial", "launch"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for name in sorted(files):
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
                    if isinstance(node, ast.Import):
                        modules = [a.name for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and node.level == 0:
                        modules = [node.module]
                    else:
                        continue
                    for module in modules:
                        mod = module.split(".")[0]
                        if mod not in sys.stdlib_module_names and mod not in ("__future__", "phi3v_spatial"):
                            found.setdefault(mod, os.path.relpath(path, ROOT))
    return found


def runtime_pins() -> dict[str, str]:
    """requirements.txt's pins from its first '# Runtime' comment to its '# Tests' comment: {'torch': '2.13.0', ...}."""
    pins, inside = {}, False
    for line in open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8"):
        line = line.strip()
        if line.startswith("# Runtime"):
            inside = True
        elif line.startswith("# Tests"):
            inside = False
        elif inside and line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[re.sub(r"\[.*\]", "", name).lower()] = version
    assert pins, "requirements.txt has no '# Runtime' section"
    return pins


def readme_pip_lines() -> list[str]:
    return [cmd for block in code_blocks(section(readme(), INSTALL_HEADING)) for cmd in block
            if cmd.startswith("pip install")]


def test_readme_pip_lines_install_exactly_the_runtime_pins():
    lines = readme_pip_lines()
    assert len(lines) == 2, lines   # pip-only libraries; the rosdep-keyed ones for installs without rosdep
    readme_pins = {}
    for line in lines:
        for req in pip_requirements(line):
            name, sep, version = req.partition("==")
            assert sep, f"README pip line leaves {name} unpinned: {line}"
            readme_pins[name.lower()] = version
    assert readme_pins == runtime_pins()
    first = {r.partition("==")[0].lower() for r in pip_requirements(lines[0])}
    assert set(PIP_ONLY.values()) | {"setuptools"} <= first, "pip-only libraries belong in the first pip line"


def test_runtime_pins_cover_every_pip_library_the_package_imports():
    pins = runtime_pins()
    dists = {"PIL": "pillow", "cv2": "opencv-python-headless", "yaml": "pyyaml", "huggingface_hub": None}
    for mod in set(ROSDEP_KEYS) | set(PIP_ONLY):
        dist = dists.get(mod, mod)
        if dist is not None:   # huggingface_hub comes with transformers, which pins its range
            assert dist in pins, f"{mod} has no runtime pin in requirements.txt"


def test_package_xml_declares_every_import():
    root = ET.parse(os.path.join(ROOT, "package.xml")).getroot()
    declared = {d.text for d in root.findall("exec_depend")} | {d.text for d in root.findall("depend")}
    for mod, path in sorted(third_party_imports().items()):
        if mod in ROS_PACKAGES:
            assert mod in declared, f"{path} imports ROS package {mod}: add <exec_depend>{mod}</exec_depend>"
        elif mod in ROSDEP_KEYS:
            assert ROSDEP_KEYS[mod] in declared, f"{path} imports {mod}: add <exec_depend>{ROSDEP_KEYS[mod]}"
        else:
            assert mod in PIP_ONLY, (f"{path} imports {mod}, which neither package.xml nor the pip line covers: "
                                     "declare its rosdep key (or add it to the README's pip line) and to this test")
            assert f"{mod}" in open(os.path.join(ROOT, "package.xml")).read(), \
                f"package.xml's comment should name {mod} as pip-only"
    assert declared >= set(ROSDEP_KEYS.values()) | ROS_PACKAGES


def test_readme_install_block_builds_both_packages_with_plain_colcon():
    block = code_blocks(section(readme(), INSTALL_HEADING))[0]
    assert any(c.startswith("ln -s phi3v_spatial/phi3v_spatial_interfaces ") for c in block), block
    assert "colcon build" in block and "source install/setup.bash" in block
    assert block[-1].startswith("ros2 launch phi3v_spatial spatial_node.launch.py ")
    for arg in ("namespace:=", "params_file:=", "model_path:="):
        assert arg in block[-1]


def test_readme_lifecycle_commands_come_in_a_valid_order():
    """cleanup needs an inactive node, configure an unconfigured one, activate an inactive one."""
    state = "active"   # autostart
    moves = {("active", "deactivate"): "inactive", ("inactive", "cleanup"): "unconfigured",
             ("unconfigured", "configure"): "inactive", ("inactive", "activate"): "active",
             ("inactive", "shutdown"): "finalized", ("unconfigured", "shutdown"): "finalized"}
    transitions = [c.split()[4] for c in ros2_commands(readme()) if c.startswith("ros2 lifecycle set /spatial_node ")]
    assert transitions, "the README shows no lifecycle transition"
    for t in transitions:
        assert (state, t) in moves, f"ros2 lifecycle set /spatial_node {t} fails while the node is {state}"
        state = moves[(state, t)]
