"""Tools built on the public API: the benchmark CLI, the demo and the multi-process launcher.
Not imported by ``import hpcomm``."""
