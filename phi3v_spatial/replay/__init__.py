"""Offline replay over rosbag2 bags: the node's window and engine, answers at bag times, scoring (no rclpy needed).

``player`` is the one module that imports rclpy: it plays a bag to a live node for comparison.
"""
