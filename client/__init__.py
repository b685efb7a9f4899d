"""fedmoe.client."""
