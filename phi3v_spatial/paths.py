"""Where the embedded default model and the shipped config files live, for a source checkout and for an installed
package."""
from __future__ import annotations

import os
import sys

EMBEDDED_MODEL_NAME = "phi3v-spatial-tiny"
EMBEDDED_ADAPTER_NAME = "spatial"


def _candidate_roots(folder: str) -> list[str]:
    """Where the package's ``folder`` (models, config) may be: the source checkout first, then the share folders."""
    here = os.path.dirname(os.path.abspath(__file__))
    roots = [os.path.join(os.path.dirname(here), folder)]            # source checkout / editable install
    roots.append(os.path.join(sys.prefix, "share", "phi3v_spatial", folder))  # pip / colcon install
    for prefix in os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep):
        if prefix:
            roots.append(os.path.join(prefix, "share", "phi3v_spatial", folder))
    return roots


def models_dir() -> str:
    """The first ``models/`` folder that holds the embedded model (or the source one if none does)."""
    roots = _candidate_roots("models")
    for root in roots:
        if os.path.isfile(os.path.join(root, EMBEDDED_MODEL_NAME, "config.json")):
            return root
    return roots[0]


def default_model_dir() -> str:
    """The embedded base checkpoint (official Phi-3-vision layout, small dimensions)."""
    return os.path.join(models_dir(), EMBEDDED_MODEL_NAME)


def default_adapter_dir() -> str:
    """The embedded spatial LoRA adapter trained on synthetic spatial questions."""
    return os.path.join(models_dir(), EMBEDDED_MODEL_NAME + "-lora-" + EMBEDDED_ADAPTER_NAME)


def config_file(name: str) -> str:
    """A file of the package's ``config/`` folder (source checkout first, then the installed share folders)."""
    roots = _candidate_roots("config")
    for root in roots:
        if os.path.isfile(os.path.join(root, name)):
            return os.path.join(root, name)
    raise FileNotFoundError(f"{name} is in none of the package's config folders: {', '.join(roots)}")


def large_frames_profile() -> str:
    """The Fast DDS profile for processes that publish raw frames over 512 KiB (``config/fastdds_large_frames.xml``)."""
    return config_file("fastdds_large_frames.xml")
