"""fedmoe.simulations."""
