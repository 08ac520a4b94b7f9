"""The unit layer: pure logic. No store, no Ray, no research code run in a sandbox; a test
here may start a bare interpreter to check what a module imports (test_layout). It has no
fixtures of its own.
"""
