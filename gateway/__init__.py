"""OAuth2 token gateway: a reverse proxy that keeps provider tokens out of every client."""

__version__ = "0.1.0"
