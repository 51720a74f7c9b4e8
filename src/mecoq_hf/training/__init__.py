"""Training MeCoQ with Accelerate (`trainer`)."""
