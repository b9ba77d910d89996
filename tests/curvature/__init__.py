"""Tests of grng.curvature."""
