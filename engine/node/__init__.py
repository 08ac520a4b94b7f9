"""What runs on a node: the one part of Constellation that volunteers' machines execute.

A volunteer's machine has Python, the pinned ``ray`` and bubblewrap, nothing else of
ours. So everything in this package imports only the standard library and Ray, and
importing it imports nothing else of ``engine`` (``tests/unit/test_layout.py`` checks this in
a subprocess with SQLAlchemy, bcrypt, pandas and Streamlit blocked). Ray ships it to the
nodes with the job (``engine.cluster.connect``).

- ``entry``    the functions Ray calls on a node: one batch, and the node check. They are
               sent by value, so that a node which cannot load this package still answers
               with its own id and the reason, instead of an anonymous Ray error.
- ``batch``    rebuilds a batch's rows from dataset chunks and runs them.
- ``executor`` runs research code: the rows of a batch, through a warm child (``run_rows``).
- ``pool``     warm children, one per project and script, ended when idle.
- ``process``  one sandboxed child process, as the parent drives and reads it.
- ``probe``    the sandbox's self-test, and refusing research code where it fails.
- ``meter``    the CPU time of research code, measured from the kernel.
- ``sandbox``  the bubblewrap command line and the limits of a child.
- ``child``    the program inside the sandbox (standard library only, sent as source).
- ``result``   the one shape of what a node reports: row results and batch failures.
"""
