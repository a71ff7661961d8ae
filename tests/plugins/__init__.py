"""Test-only adaptation plug-ins, added by config alone."""
