"""Training / evaluation data, ROS-free: the record format (``records``), seeded synthetic 3D scenes with
true spatial labels (``synth``: ``scene``, ``render``, ``questions``), VSR (``vsr``), ``--data`` specs and
mixtures (``mixture``), and camera bags written with rosbags (``bag``)."""
