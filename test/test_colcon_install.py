"""The README's robot install, run for real: colcon from PyPI builds a fresh workspace with the README's commands,
`ros2 launch` starts the node with the README's arguments, and every `ros2 ...` line of the README runs against it.

The "ROS 2 install" is a venv with only the Kilted wheels (requirements.txt's ROS lines), the upstream ros2 / launch
tools from ../shared/ros2-cli, colcon from PyPI (requirements.txt's pins) and the README's pip lines (the second one
standing in for `rosdep install`, which needs apt). It is kept in build/colcon-test-venv between runs, rebuilt when
any of those inputs change (about 80 s; the pip cache and the local torch wheel keep it off the network). The
workspace is new on every run: a clone of this repository (plus uncommitted changes) built with `colcon build`, and
again with `--symlink-install`.
"""
from __future__ import annotations

import hashlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from fixtures.readme import code_blocks, ros2_commands, section

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DIR = os.environ.get("PHI3V_SHARED_DIR") or os.path.join(os.path.dirname(ROOT), "shared")
ROS2_CLI = os.path.join(SHARED_DIR, "ros2-cli")
VENV = os.path.join(ROOT, "build", "colcon-test-venv")
INSTALL_HEADING = "Building on a robot with a ROS 2 install (colcon)"
ROS_SOURCE_LINE = "source /opt/ros/kilted/setup.bash"

pytestmark = [
    pytest.mark.skipif(not os.path.isfile(os.path.join(ROS2_CLI, "install.sh")),
                       reason=f"the upstream ros2 / launch tools are not at {ROS2_CLI} (../shared is absent)"),
    pytest.mark.timeout(1800),
]


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def install_blocks() -> tuple[list[str], list[str]]:
    """The README's install block and its no-rosdep pip line."""
    blocks = code_blocks(section(readme(), INSTALL_HEADING))
    no_rosdep = [c for block in blocks[1:] for c in block if c.startswith("pip install")]
    assert len(no_rosdep) == 1, blocks
    return blocks[0], no_rosdep


def clean_env() -> dict:
    """This process's environment without the project venv in it (its ROS bootstrap, library path, prefixes)."""
    env = {k: v for k, v in os.environ.items() if k not in (
        "LD_LIBRARY_PATH", "_ROS_WHEELS_BOOTSTRAP_COMPLETE", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV",
        "AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH", "COLCON_PREFIX_PATH", "PYTEST_CURRENT_TEST")}
    venv_bin = os.path.dirname(sys.executable)
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep) if p != venv_bin)
    env["PYTHONUNBUFFERED"] = "1"
    env["RCUTILS_LOGGING_BUFFERED_STREAM"] = "0"
    if shutil.which("ninja"):
        env["CMAKE_GENERATOR"] = "Ninja"   # the same commands, built faster (cmake reads the generator from here)
    return env


def run(script: str, cwd: str, timeout: float, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run(["bash", "-c", "set -eo pipefail\n" + script], cwd=cwd, env=env or clean_env(),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"exit {out.returncode}:\n{script}\n--- stdout\n{out.stdout[-6000:]}\n--- stderr\n{out.stderr[-6000:]}"
    return out


def ros_requirements() -> list[str]:
    """requirements.txt's ROS 2 wheels and the rosidl build pieces: the lines before its first '# Runtime' comment."""
    reqs = []
    for line in open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8"):
        line = line.strip()
        if line.startswith("# Runtime"):
            break
        if line and not line.startswith("#"):
            reqs.append(line)
    return reqs


def colcon_requirements() -> list[str]:
    return [line.strip() for line in open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8")
            if line.startswith("colcon-")]


def venv_prelude() -> str:
    """What `source /opt/ros/kilted/setup.bash` does for a ROS install that is a venv."""
    return f"source {VENV}/bin/activate && export AMENT_PREFIX_PATH={VENV} CMAKE_PREFIX_PATH={VENV}"


@pytest.fixture(scope="module")
def ros_venv():
    """The stand-in ROS 2 install (see the module docstring), built once per change of its inputs."""
    block, no_rosdep = install_blocks()
    inputs = "\n".join(ros_requirements() + colcon_requirements() + [c for c in block if c.startswith("pip ")]
                       + no_rosdep + sorted(os.listdir(os.path.join(ROS2_CLI, "wheels"))))
    key = hashlib.sha256(inputs.encode()).hexdigest()[:16]
    stamp = os.path.join(VENV, ".inputs")
    if os.path.isfile(stamp) and open(stamp).read() == key:
        return VENV
    t0 = time.monotonic()
    shutil.rmtree(VENV, ignore_errors=True)
    base_python = getattr(sys, "_base_executable", None) or "python3.11"
    pip = f"{VENV}/bin/pip install -q"
    run(f"{shlex.quote(base_python)} -m venv {VENV}\n"
        f"{pip} --upgrade pip\n"
        f"{pip} {' '.join(shlex.quote(r) for r in ros_requirements())}\n"
        f"bash {ROOT}/scripts/fix_ros_wheel_exports.sh {VENV}\n"
        f"bash {ROS2_CLI}/install.sh {VENV}\n"
        f"{pip} {' '.join(colcon_requirements())}\n", cwd=ROOT, timeout=900)
    with open(stamp, "w") as f:
        f.write(key)
    print(f"[colcon-test-venv] built in {time.monotonic() - t0:.0f} s")
    return VENV


class Launched:
    """A long-running README command (`ros2 launch` / `ros2 run`) started like a user's terminal, stopped with SIGINT."""

    def __init__(self, command: str, ws: str, env: dict, log_path: str):
        self.command = command
        self.log_path = log_path
        self._log = open(log_path, "wb")
        # exec: the ros2 process itself gets the SIGINT (a shell would ignore it for a background job).
        self.proc = subprocess.Popen(["bash", "-c", f"{venv_prelude()} && source install/setup.bash && exec {command}"],
                                     cwd=ws, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def interrupt(self) -> None:
        """What Ctrl-C sends: SIGINT to this command's process group."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    def stop(self) -> int:
        self.interrupt()
        if self.proc.poll() is None:
            try:
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)   # this process group only: the one started here
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode


def node_name_of(command: str) -> str:
    """The fully qualified node name a README launch/run line starts."""
    ns = re.search(r"namespace:=(\S+)", command) or re.search(r"__ns:=(\S+)", command)
    name = re.search(r"__node:=(\S+)", command)
    namespace = "/" + ns.group(1).strip("/") if ns else ""
    return f"{namespace}/{name.group(1) if name else 'spatial_node'}"


def is_long_running(command: str) -> bool:
    words = command.split()
    return words[1] == "run" or (words[1] == "launch" and "--show-args" not in words and "-s" not in words)


@pytest.fixture(scope="module")
def workspace(ros_venv, tmp_path_factory):
    """A fresh workspace where the README's install block ran, up to (not including) its `ros2 launch` line."""
    ws = str(tmp_path_factory.mktemp("ws"))
    block, no_rosdep = install_blocks()
    assert block[0] == ROS_SOURCE_LINE, f"the README's install block should start with `{ROS_SOURCE_LINE}`"
    assert is_long_running(block[-1]), block[-1]
    script, timings = [], {}
    for cmd in block[:-1]:
        original = cmd
        if cmd == ROS_SOURCE_LINE:
            cmd = venv_prelude()
        elif cmd.startswith("rosdep install"):
            cmd = no_rosdep[0]   # no apt here: the README's pip line for installs without rosdep
        cmd = cmd.replace("~/ws", ws).replace("<this repo>", shlex.quote(ROOT))
        if "git clone" in cmd:
            cmd += f" && {overlay_uncommitted_changes(os.path.join(ws, 'src', 'phi3v_spatial'))}"
        script.append(f"echo {shlex.quote('>>> ' + original)}\n_t=$SECONDS\n{cmd}\necho \"<<< $((SECONDS-_t)) s\"")
    t0 = time.monotonic()
    out = run("\n".join(script), cwd=ws, timeout=1200)
    timings["install block"] = time.monotonic() - t0
    print(out.stdout[-3000:])
    return {"ws": ws, "launch": block[-1], "stdout": out.stdout, "timings": timings}


def overlay_uncommitted_changes(clone: str) -> str:
    """Shell that copies this checkout's uncommitted files over the fresh clone, so a local run tests what is on disk."""
    changed = subprocess.run(["git", "ls-files", "-m", "-o", "--exclude-standard"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    deleted = subprocess.run(["git", "ls-files", "-d"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    changed = [p for p in changed if p not in deleted]
    cmds = [f"(cd {shlex.quote(ROOT)} && cp --parents {' '.join(shlex.quote(p) for p in changed)} {shlex.quote(clone)})"
            ] if changed else []
    cmds += [f"rm -f {shlex.quote(os.path.join(clone, p))}" for p in deleted]
    return " && ".join(cmds) or "true"


def test_colcon_builds_both_packages_from_the_readme(workspace):
    ws = workspace["ws"]
    out = run(f"{venv_prelude()}\ncolcon list --names-only", cwd=ws, timeout=120).stdout.split()
    assert sorted(out) == ["phi3v_spatial", "phi3v_spatial_interfaces"]
    assert "Summary: 2 packages finished" in workspace["stdout"], workspace["stdout"][-3000:]
    for path in ("phi3v_spatial/lib/phi3v_spatial/spatial_node", "phi3v_spatial/lib/phi3v_spatial/phi3v-spatial",
                 "phi3v_spatial/share/phi3v_spatial/launch/spatial_node.launch.py",
                 "phi3v_spatial/share/phi3v_spatial/config/spatial_node.yaml",
                 "phi3v_spatial/share/phi3v_spatial/config/fastdds_large_frames.xml",
                 "phi3v_spatial/share/phi3v_spatial/models/phi3v-spatial-tiny/config.json",
                 "phi3v_spatial_interfaces/share/phi3v_spatial_interfaces/srv/AskSpatial.srv"):
        assert os.path.isfile(os.path.join(ws, "install", path)), path
    # Everything the package imports is importable from the installed workspace: the pip lines are complete.
    from test_install_docs import third_party_imports

    mods = sorted(third_party_imports())
    probe = ("import importlib.util, sys; m = [x for x in sys.argv[1:] if importlib.util.find_spec(x) is None]; "
             "print('missing:', m); sys.exit(1 if m else 0)")
    run(f"{venv_prelude()} && source install/setup.bash\npython -c {shlex.quote(probe)} {' '.join(mods)}",
        cwd=ws, timeout=120)


def test_symlink_install_builds_and_points_into_the_clone(workspace):
    """`colcon build --symlink-install` of phi3v_spatial (the ament_python package, where setuptools >= 80 broke it),
    on top of the interfaces the plain build installed (a symlinked cmake install is plain cmake, and costs a minute)."""
    ws = workspace["ws"]
    t0 = time.monotonic()
    run(f"{venv_prelude()} && source install/setup.bash\n"
        "colcon build --symlink-install --packages-select phi3v_spatial --build-base build-symlink "
        "--install-base install-symlink", cwd=ws, timeout=900)
    workspace["timings"]["symlink build"] = time.monotonic() - t0
    src = os.path.join(ws, "src", "phi3v_spatial")
    launch_file = os.path.join(ws, "install-symlink", "phi3v_spatial", "share", "phi3v_spatial", "launch",
                               "spatial_node.launch.py")
    assert os.path.realpath(launch_file) == os.path.realpath(os.path.join(src, "launch", "spatial_node.launch.py"))
    out = run(f"{venv_prelude()} && source install-symlink/setup.bash\n"
              "python -c 'import phi3v_spatial, phi3v_spatial_interfaces.srv; print(phi3v_spatial.__file__)'\n"
              "ros2 pkg executables phi3v_spatial\n"
              "ros2 launch phi3v_spatial spatial_node.launch.py --show-args", cwd=ws, timeout=120).stdout
    assert os.path.realpath(out.splitlines()[0]).startswith(os.path.realpath(src) + os.sep), out
    assert "phi3v_spatial spatial_node" in out and "'namespace'" in out


def test_launch_file_under_launch_testing(workspace):
    """test/launch_tests/params_file_launch.py with the upstream `launch_test`, the way ROS 2 packages test their
    launch files: the installed launch file, two namespaced nodes, the startup warning for a name-keyed file."""
    ws = workspace["ws"]
    t0 = time.monotonic()
    out = subprocess.run(["bash", "-c", f"{venv_prelude()} && source install/setup.bash && "
                          f"launch_test {shlex.quote(os.path.join(ROOT, 'test', 'launch_tests', 'params_file_launch.py'))}"],
                         cwd=ws, env=clean_env(), capture_output=True, text=True, timeout=600)
    workspace["timings"]["launch_test"] = time.monotonic() - t0
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-8000:]
    assert text.count("\nOK\n") == 2 and "FAIL" not in text, text[-4000:]   # the active and the post-shutdown test


@pytest.fixture(scope="module")
def running_nodes(workspace, tmp_path_factory):
    """Every long-running `ros2` line of the README started (the install block's launch first), a camera feeding
    /camera/image_raw, and the ros2 daemon up and seeing all the nodes. Yields {fqn: Launched}."""
    from fixtures.ros import CameraPublisher, RosClient

    ws, env = workspace["ws"], clean_env()
    logs = tmp_path_factory.mktemp("launch-logs")
    # The user edits their copy of the shipped file; the edit must reach the namespaced node.
    my_robot = os.path.join(ws, "my_robot.yaml")
    text = open(my_robot).read()
    assert "    window.capacity: 8\n" in text
    with open(my_robot, "w") as f:
        f.write(text.replace("    window.capacity: 8\n", "    window.capacity: 5\n"))
    commands = [workspace["launch"]] + [c for c in ros2_commands(readme()) if is_long_running(c)
                                        and c != workspace["launch"]]
    nodes, client, feed, codes = {}, None, None, {}
    try:
        client = RosClient("readme_test_client")
        feed = CameraPublisher(client, {"/camera/image_raw": readme_scene_frames()}, rate_hz=5.0)
        t0 = time.monotonic()
        for i, cmd in enumerate(commands):
            fqn = node_name_of(cmd)
            assert fqn not in nodes, f"two README commands start {fqn}"
            nodes[fqn] = Launched(cmd, ws, env, str(logs / f"node{i}.log"))
        for fqn, launched in nodes.items():
            try:
                client.wait_for_state("active", node=fqn, timeout=180)
            except AssertionError as e:
                raise AssertionError(f"{e}\n`{launched.command}`:\n{launched.log()[-5000:]}") from None
        workspace["timings"]["nodes active"] = time.monotonic() - t0
        run(f"{venv_prelude()} && source install/setup.bash\nros2 daemon start", cwd=ws, timeout=60, env=env)
        end = time.monotonic() + 60
        while True:   # the daemon needs a moment before `ros2 node list` (and so `ros2 lifecycle`) sees nodes
            listed = run(f"{venv_prelude()} && source install/setup.bash\nros2 node list", cwd=ws, timeout=60,
                         env=env).stdout.split()
            if set(nodes) <= set(listed) or time.monotonic() > end:
                break
            time.sleep(1)
        assert set(nodes) <= set(listed), listed
        yield {"nodes": nodes, "client": client, "env": env}
    finally:
        if feed is not None:
            feed.stop()
        for launched in nodes.values():
            launched.interrupt()
        codes = {fqn: launched.stop() for fqn, launched in nodes.items()}
        subprocess.run(["bash", "-c", f"{venv_prelude()} && ros2 daemon stop"], cwd=ws, env=env,
                       capture_output=True, timeout=60)
        if client is not None:
            client.close()
    killed = {fqn: code for fqn, code in codes.items() if code == -signal.SIGKILL}
    assert not killed, f"needed SIGKILL after SIGINT: {killed}"


def test_launch_with_the_readme_arguments_serves_the_namespaced_node(workspace, running_nodes):
    from phi3v_spatial_interfaces.srv import AskSpatial
    from rcl_interfaces.srv import GetParameters

    fqn = node_name_of(workspace["launch"])
    assert fqn == "/robot1/spatial_node"
    client = running_nodes["client"]
    log = running_nodes["nodes"][fqn].log()
    assert "share/phi3v_spatial/models/phi3v-spatial-tiny" in log, log[-3000:]   # model_path:= reached the node
    assert "none of its values apply" not in log, log[-3000:]                       # my_robot.yaml matched
    params = client.call(GetParameters, f"{fqn}/get_parameters", GetParameters.Request(names=["window.capacity"]),
                         60, retry_s=5.0)
    assert params.values[0].integer_value == 5, "my_robot.yaml's edit did not reach the namespaced node"
    res = client.call(AskSpatial, f"{fqn}/ask",
                      AskSpatial.Request(question="Is the red cube left of the blue sphere?", num_frames=1),
                      120, retry_s=10.0)
    assert res.success, res.error
    assert res.answer.strip() and res.frame_stamps, res


ERROR_TEXT = re.compile(r"Traceback|\[ERROR\]|Exception|success=False|success: false|error='[^']|"
                        r"Unknown transition|Transitioning failed|[Ff]ailed|not found|[Ii]nvalid")
# The model's documented refusal (README): an object the instruction names is not in view -> ABORTED, error says so.
KNOWN_PLAN_REFUSAL = re.compile(r"no plan: the .* (is|are) not in view")


def readme_scene_frames():
    """Camera messages of a synthetic scene that holds the README examples' objects (the red cube and the blue
    sphere), so its ask / query_relations / plan lines are asked about a picture where they make sense."""
    from phi3v_spatial.data.synth import make_scene
    from phi3v_spatial.ros.messages import image_msg

    for seed in range(2000):
        scene = make_scene(seed, num_objects=(2, 3))
        if {"red cube", "blue sphere"} <= set(scene.names):
            return lambda stamp: image_msg(scene.images[0][0], "rgb8", stamp, "cam")
    raise AssertionError("no synthetic scene with a red cube and a blue sphere in 2000 seeds")


MODEL_TEXT = re.compile(r"(answer|raw_text|partial_text)(=|: )('[^']*'|\"[^\"]*\"|.*)")


def check_output(command: str, out: subprocess.CompletedProcess) -> None:
    text = MODEL_TEXT.sub(r"\1\2<model text>", out.stdout + out.stderr)   # what the model says is not an error
    report = f"`{command}` exited {out.returncode}:\n{text[-4000:]}"
    assert out.returncode == 0, report
    words = command.split()
    if words[1:3] == ["action", "send_goal"]:
        assert "Goal accepted" in text, report
        if "status: ABORTED" in text and KNOWN_PLAN_REFUSAL.search(text):
            # the model's documented refusal; the command itself worked
            text = re.sub(r"success: false|error: .*|status: ABORTED", "", text)
        else:
            assert "Goal finished with status: SUCCEEDED" in text, report
    assert not ERROR_TEXT.search(text), f"error text {ERROR_TEXT.search(text).group(0)!r} in {report}"
    if words[1:3] == ["service", "call"]:
        assert "response:" in text and ("success=True" in text or "success=" not in text), report
    elif words[1:3] == ["lifecycle", "set"]:
        assert "Transitioning successful" in text, report
    elif words[1:3] == ["lifecycle", "get"]:
        assert text.split()[0] == "active", report
    elif words[1:3] == ["param", "set"]:
        assert "Set parameter successful" in text, report
    elif words[1:3] == ["param", "get"]:
        assert "value is:" in text, report


def run_readme_command(command: str, ws: str, env: dict) -> subprocess.CompletedProcess:
    """Run one README line in the user's shell. A call that hangs is sent once more: right after discovery Fast DDS
    can drop a response when the server has not yet matched the new client (fixtures/ros.py, RosClient.call), and
    `ros2 service call` / `send_goal` then wait forever. Only requests that are safe to repeat are retried."""
    argv = ["bash", "-c", f"{venv_prelude()} && source install/setup.bash && {command}"]
    words = command.split()
    repeatable = words[1:3] in (["service", "call"], ["action", "send_goal"]) or words[2] in ("get", "list")
    for attempt in (1, 2) if repeatable else (1,):
        proc = subprocess.Popen(argv, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=120)
            return subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # this command's own process group
            stdout, stderr = proc.communicate()
            print(f"[readme] no answer within 120 s (attempt {attempt}): {command}\n{stdout[-2000:]}")
    raise AssertionError(f"`{command}` did not finish ({attempt} attempt(s) of 120 s):\n{stdout[-3000:]}\n{stderr[-3000:]}")


def test_every_readme_ros2_command_runs(workspace, running_nodes):
    ws, env = workspace["ws"], running_nodes["env"]
    commands = [c for c in ros2_commands(readme()) if not is_long_running(c)]
    assert len(commands) >= 10, commands
    ran, t0 = [], time.monotonic()
    for command in commands:
        check_output(command, run_readme_command(command, ws, env))
        ran.append(command)
    workspace["timings"]["readme commands"] = time.monotonic() - t0
    print("README commands run:\n  " + "\n  ".join(
        [workspace["launch"]] + [c for c in ros2_commands(readme()) if is_long_running(c) and c != workspace["launch"]]
        + ran))
    print("timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in workspace["timings"].items()))
    for fqn, launched in running_nodes["nodes"].items():
        assert launched.proc.poll() is None, f"{fqn} died:\n{launched.log()[-3000:]}"
