"""The HTTP gateway (aiohttp): resident, admin and operations endpoints."""
