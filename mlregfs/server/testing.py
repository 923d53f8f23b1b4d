"""Old home of the server harness, kept for the tests that still import it from here: the
harness is mlregfs.testing."""

from mlregfs.testing.ports import free_port
from mlregfs.testing.server import ServerProcess

__all__ = ["ServerProcess", "free_port"]
