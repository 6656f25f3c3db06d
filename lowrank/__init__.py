"""lowrank."""
