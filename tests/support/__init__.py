"""Test support code: fixtures and builders shared by the test packages (never shipped)."""
