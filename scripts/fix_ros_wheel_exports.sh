#!/usr/bin/env bash
# The ROS 2 message wheels' CMake exports name the wheel builder's Python (/opt/python/cp3XX-cp3XX/...); re-point
# them at VENV's, so that cmake / colcon can build interface packages against the wheels.
# Usage: fix_ros_wheel_exports.sh VENV   (idempotent; used by setup_venv.sh and test/test_colcon_install.py)
set -euo pipefail
VENV=${1:?usage: fix_ros_wheel_exports.sh VENV}
PYINC=$("$VENV/bin/python" -c 'import sysconfig;print(sysconfig.get_paths()["include"])')
NPINC=$("$VENV/bin/python" -c 'import numpy;print(numpy.get_include())')
sed -i -E -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/include/python3\.[0-9]+#${PYINC}#g" \
          -e "s#/opt/python/cp3[0-9]+-cp3[0-9]+/lib/python3\.[0-9]+/site-packages/numpy/_core/include#${NPINC}#g" \
    "$VENV"/share/*/cmake/export_*__rosidl_generator_pyExport.cmake
