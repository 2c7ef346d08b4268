"""Native Phi-3(.5)-vision for phi3v_spatial (ROS-free): config, model, image processor, processor.

Other packages import this only when they need the model (it pulls in torch and transformers).
"""
from .checkpoint import CheckpointError
from .configuration_phi3v import Phi3VConfig
from .image_processing_phi3v import Phi3VImageProcessor
from .modeling_phi3v import Phi3VForCausalLM
from .processing_phi3v import Phi3VProcessor

__all__ = ["Phi3VConfig", "Phi3VForCausalLM", "Phi3VImageProcessor", "Phi3VProcessor", "CheckpointError"]
