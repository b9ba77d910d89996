"""The test suite: a package, so that its modules can `from tests.cases import ...`."""
