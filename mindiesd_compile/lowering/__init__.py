"""Lowering of the rewritten graph to a target's graph engine: Inductor (cuda, cpu) or eager (tests)."""
