"""The `job` command line: one module per command, registered on the group in job/cli/main.py.

Only this package reads the process environment; job/cli/common.py holds what the commands share, including
the one place where an exception becomes an exit code.
"""
