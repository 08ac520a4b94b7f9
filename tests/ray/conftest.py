"""The ray layer: projects through the dispatcher on one local Ray head (the session's
``ray_head``, ``cluster_settings``, or a head a test starts itself: ``engine serve``, the
CLI's ``submit --wait``, the benchmark's smoke run). No volunteer nodes. It has no
fixtures of its own beyond ``tests/conftest.py``'s.
"""
