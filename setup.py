"""ament_python setup for phi3v_spatial, built by colcon (README.md, "Building on a robot").

colcon puts the executables where `ros2 run` / `ros2 launch` look for them (lib/phi3v_spatial, setup.cfg) and the
launch, config and model files under share/phi3v_spatial. Plain `pip install .` installs the Python package and the
`spatial_node` / `phi3v-spatial` commands in bin/, but `ros2 launch` / `ros2 run` do not find them there; `make setup`
uses pip this way (editable) for development and tests. Dependencies are declared in package.xml (rosdep keys) and
pinned in requirements.txt (pip), not here, so no build ever pulls a second torch.
"""
import os
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "phi3v_spatial"


def model_files():
    """The embedded model folders under models/, installed to share/phi3v_spatial/models/."""
    out = []
    for root, _, files in os.walk("models"):
        if files:
            out.append((os.path.join("share", PACKAGE, root), [os.path.join(root, f) for f in sorted(files)]))
    return out


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.xml")),
    ] + model_files(),
    maintainer="phi3v_spatial maintainers",
    maintainer_email="maintainers@phi3v-spatial.dev",
    description="Spatial reasoning for robots with a native Phi-3-vision model, as a ROS 2 node.",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "spatial_node = phi3v_spatial.ros.node:main",
            "phi3v-spatial = phi3v_spatial.cli:main",
        ],
    },
)
