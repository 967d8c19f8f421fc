"""Releases: the definition an admin posts, creating and changing them, and each gateway's
local view."""
