"""phi3v_spatial: spatial reasoning for robots with a native Phi-3-vision model."""
__version__ = "0.1.0"
