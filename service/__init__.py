"""tlserve server."""
