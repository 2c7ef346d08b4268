"""The ``phi3v-spatial`` subcommands, one module each (``add_arguments(parser)`` and ``run(args) -> int``).

They sit above every other package: a command may use the engine, replay, data, training and the settings,
and none of those imports a command. Heavy imports (torch, ROS) happen inside ``run`` so ``--help`` stays fast.
"""
