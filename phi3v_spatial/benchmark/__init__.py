"""Benchmarks that measure the engine's choices side by side with the naive path (no ROS needed)."""
