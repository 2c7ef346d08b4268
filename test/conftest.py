"""Test-wide setup: an isolated ROS graph for every run, and the shared model data.

The ROS environment is set here, at import time, before any test imports rclpy, so that every
process the tests start (nodes, clients, players) inherits it: DDS discovery stays on localhost,
and each pytest run gets its own ROS_DOMAIN_ID so parallel runs never see each other.
"""
import os
import random
import sys

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
# The domain chosen by the caller (make test / .ci/run pick one per run), else a random one for a bare pytest.
os.environ["ROS_DOMAIN_ID"] = os.environ.get("ROS_DOMAIN_ID") or str(random.SystemRandom().randint(10, 99))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so tests can import test/fixtures helpers

import pytest  # noqa: E402

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ../shared beside the clone (PHI3V_SHARED_DIR overrides it, e.g. to run the suite as a machine without it would)
SHARED_DIR = os.environ.get("PHI3V_SHARED_DIR") or os.path.join(os.path.dirname(REPO_ROOT), "shared")
OFFICIAL_TOKENIZER_DIR = os.path.join(SHARED_DIR, "phi3v-tokenizer")
OFFICIAL_CONFIGS_DIR = os.path.join(SHARED_DIR, "phi3v-configs")

# Shared fixtures live in test/fixtures/<concern>.py and are registered here.
pytest_plugins = ["fixtures.model", "fixtures.ros"]


@pytest.fixture(scope="session")
def repo_root():
    return REPO_ROOT


@pytest.fixture(scope="session")
def official_tokenizer_dir():
    if not os.path.isfile(os.path.join(OFFICIAL_TOKENIZER_DIR, "tokenizer.json")):
        pytest.skip(f"official Phi-3-vision tokenizer files not found at {OFFICIAL_TOKENIZER_DIR} (../shared is absent)")
    return OFFICIAL_TOKENIZER_DIR


@pytest.fixture(scope="session")
def official_configs_dir():
    if not os.path.isdir(OFFICIAL_CONFIGS_DIR):
        pytest.skip(f"official Phi-3-vision configs not found at {OFFICIAL_CONFIGS_DIR} (../shared is absent)")
    return OFFICIAL_CONFIGS_DIR


def plumbing_tokenizer_dir_or_none():
    """A Phi-3 tokenizer for tests that only need *a* working one: the official files when ../shared has them,
    else the embedded model's own (same special tokens, committed in models/)."""
    if os.path.isfile(os.path.join(OFFICIAL_TOKENIZER_DIR, "tokenizer.json")):
        return OFFICIAL_TOKENIZER_DIR
    embedded = os.path.join(REPO_ROOT, "models", "phi3v-spatial-tiny")
    return embedded if os.path.isfile(os.path.join(embedded, "tokenizer.json")) else None


@pytest.fixture(scope="session")
def tokenizer_dir():
    d = plumbing_tokenizer_dir_or_none()
    if d is None:
        pytest.skip("no tokenizer: neither ../shared/phi3v-tokenizer nor models/phi3v-spatial-tiny is present")
    return d


@pytest.fixture
def ros_context():
    """A fresh rclpy context, shut down after the test (rclpy imported lazily: model tests don't need ROS)."""
    import rclpy

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    yield ctx
    rclpy.try_shutdown(context=ctx)
