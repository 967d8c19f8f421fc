"""Redis: the client, the tick batcher, and one typed wrapper per Lua script."""
