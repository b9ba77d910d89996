"""Tests of grng.optim."""
