"""Bookings as residents see them, check-in and no-shows."""
