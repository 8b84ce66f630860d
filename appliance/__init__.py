"""Edge affect-aware ranking appliance."""

__version__ = "0.1.0"
