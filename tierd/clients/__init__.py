"""Clients (embedded, and later the daemon's socket) and integrations."""
