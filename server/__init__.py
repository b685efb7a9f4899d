"""fedmoe.server."""
