"""The project's own test utilities (fault injection, attacks, load), shared by tests/ and bench/faults.py.

Nothing here runs in a deployed server or agent.
"""
