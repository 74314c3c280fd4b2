"""nanodist: parameter-server, barrier and lock services over gRPC."""

__version__ = "0.1.0"
