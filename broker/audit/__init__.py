"""The broker's audit trail."""
