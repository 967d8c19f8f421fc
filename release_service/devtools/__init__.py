"""Development tooling: the local stack, seeding, and the one-command system."""
