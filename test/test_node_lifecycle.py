"""spatial_node lifecycle: driven through the standard lifecycle services, and in-process to prove cleanup frees the model."""
import gc
import time
import weakref

import pytest

pytest.importorskip("rclpy")

from fixtures.ros import CameraPublisher, NodeProcess, RosClient  # noqa: E402

pytestmark = pytest.mark.timeout(300)

NODE = "/spatial_node"
FRONT, SIDE = "/lc_front/image_raw", "/lc_side/image:compressed"


def _diag_values(client, got, after: float, timeout: float = 15.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        for arr in reversed(list(got)):
            stamp = arr.header.stamp.sec + arr.header.stamp.nanosec * 1e-9
            if stamp >= after:
                s = next(s for s in arr.status if s.name.endswith(": inference"))
                return {kv.key: kv.value for kv in s.values}
        time.sleep(0.1)
    raise AssertionError("no fresh /diagnostics message")


def test_lifecycle_through_the_standard_services(tiny_model_dir, tokenizer_dir, tmp_path):
    from diagnostic_msgs.msg import DiagnosticArray
    from phi3v_spatial_interfaces.srv import AskSpatial

    proc = NodeProcess({"model_path": tiny_model_dir, "device": "cpu", "autostart": False, "adapters": [],
                        "active_adapter": "", "image_topics": [FRONT, SIDE], "window.max_age_s": 5.0,
                        "generation.max_new_tokens": 4, "diagnostics_period_s": 0.3}, str(tmp_path)).start()
    client = RosClient()
    cams = CameraPublisher(client, {FRONT: "raw", "/lc_side/image": "png"}, rate_hz=10)
    diag = client.collect(DiagnosticArray, "/diagnostics")
    try:
        def ask():
            return client.call(AskSpatial, f"{NODE}/ask", AskSpatial.Request(question="where is the box?"), 60)

        assert client.get_state() == "unconfigured"
        r = ask()
        assert not r.success and "node is not configured" in r.error
        assert _diag_values(client, diag, time.time())["model_loaded"] == "false"

        assert client.change_state("configure")
        assert client.get_state() == "inactive"
        r = ask()
        assert not r.success and "node is not active" in r.error
        assert _diag_values(client, diag, time.time())["model_loaded"] == "true"

        assert client.change_state("activate")
        assert client.get_state() == "active"
        end = time.monotonic() + 30
        while not (r := ask()).success and time.monotonic() < end:  # empty image_topics = every camera
            time.sleep(0.3)
        assert r.success, r.error
        assert len(r.frame_stamps) == 2  # one frame from each of the two cameras

        assert client.change_state("deactivate")
        r = ask()
        assert not r.success and "node is not active" in r.error

        assert client.change_state("cleanup")
        assert client.get_state() == "unconfigured"
        r = ask()
        assert not r.success and "not configured" in r.error
        values = _diag_values(client, diag, time.time())
        assert values["model_loaded"] == "false" and values["lifecycle_state"] == "unconfigured"

        # and it can come back
        assert client.change_state("configure") and client.change_state("activate")
        end = time.monotonic() + 30
        while not (r := ask()).success and time.monotonic() < end:
            time.sleep(0.3)
        assert r.success, r.error
    finally:
        cams.stop()
        client.close()
        rc = proc.stop()
    assert rc == 0, proc.log()[-5000:]
    assert "Traceback" not in proc.log(), proc.log()[-5000:]


def test_missing_model_fails_configure_but_node_stays_alive(tmp_path):
    from phi3v_spatial_interfaces.srv import AskSpatial

    proc = NodeProcess({"model_path": str(tmp_path / "no_such_model"), "device": "cpu", "adapters": [],
                        "active_adapter": "", "image_topics": []}, str(tmp_path)).start()
    client = RosClient()
    try:
        assert proc.wait_for_log("configure failed", timeout=90), proc.log()
        assert client.get_state() == "unconfigured" and proc.alive
        r = client.call(AskSpatial, f"{NODE}/ask", AskSpatial.Request(question="hello?"), 30)
        assert not r.success and "not configured" in r.error and "does not exist" in r.error
        assert not client.change_state("configure")  # still failing, still alive, still answering
        assert client.get_state() == "unconfigured"
    finally:
        client.close()
        rc = proc.stop()
    assert rc == 0
    assert "does not exist" in proc.log() and "no_such_model" in proc.log()


def test_cleanup_releases_the_engine_in_process(tiny_model_dir, tokenizer_dir, ros_context):
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from phi3v_spatial.ros.node import SpatialNode

    node = SpatialNode(context=ros_context, parameter_overrides=[
        Parameter("model_path", value=tiny_model_dir), Parameter("device", value="cpu"),
        Parameter("autostart", value=False), Parameter("active_adapter", value=""),
        Parameter("image_topics", value=["/inproc/image_raw"])])
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        engine_ref = weakref.ref(node._requests.engine)
        model_ref = weakref.ref(node._requests.engine.model)
        worker = node._requests.worker
        assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        assert node.lifecycle_state == "active"
        assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
        assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
        assert node.lifecycle_state == "unconfigured" and node._requests is None and not worker.alive
        gc.collect()
        assert engine_ref() is None, gc.get_referrers(engine_ref())
        assert model_ref() is None
    finally:
        node.destroy_node()


def test_shipped_params_file_lists_every_parameter(repo_root, ros_context):
    """config/spatial_node.yaml documents every parameter the node declares, and its values are accepted."""
    import yaml
    from rclpy.parameter import Parameter

    from phi3v_spatial.ros.node import SpatialNode
    from phi3v_spatial.settings import PARAMETERS

    path = f"{repo_root}/config/spatial_node.yaml"
    text = open(path).read()
    values = yaml.safe_load(text)["/**"]["ros__parameters"]
    node = SpatialNode(context=ros_context, parameter_overrides=[Parameter("autostart", value=False)])
    try:
        names = [p.name for p in PARAMETERS]
        for name in names:
            assert f"{name}:" in text, f"{name} is not documented in {path}"
        read_only = {p.name for p in PARAMETERS if p.read_only}
        settable = {k: v for k, v in values.items() if k in names and k not in read_only}
        results = node.set_parameters([Parameter(k, value=v) for k, v in settable.items()])
        assert all(r.successful for r in results), [(k, r.reason) for k, r in zip(settable, results)]
    finally:
        node.destroy_node()
