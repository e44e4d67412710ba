"""HTTP routers: health, v1."""
