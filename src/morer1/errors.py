"""Error classes the CLI maps to exit codes that the orchestrator understands."""

EXIT_BAD_INPUT = 2
EXIT_GATE_FAILED = 3


class BadInputError(Exception):
    """Bad data, params or arguments: retrying will not help (exit code 2)."""


class GateFailedError(Exception):
    """A data-validation gate failed: nothing downstream may run (exit code 3)."""
