"""Offline replay over rosbag2 bags: the node's window and engine, answers at bag times, scoring (no rclpy needed).

Nothing here imports rclpy; the player that feeds a bag to a live node is ``phi3v_spatial.ros.bag_player``.
"""
