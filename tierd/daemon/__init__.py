"""``tierd serve``: the daemon around the engine (server, systemd notify, metrics, launch)."""
