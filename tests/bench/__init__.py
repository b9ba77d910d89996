"""Tests of grng.bench."""
