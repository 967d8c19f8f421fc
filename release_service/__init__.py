"""release-service: slot releases for vaccine appointments."""

__version__ = "0.1.0"
