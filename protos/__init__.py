"""fedmoe.protos."""
