"""The engine and, later, the daemon around it."""
