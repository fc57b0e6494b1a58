"""Collected only inside the interpreter's own pytest (see tests/interpreter.py)."""

from tests.interpreter import collect_only_when_interpreting

collect_ignore_glob = collect_only_when_interpreting()
