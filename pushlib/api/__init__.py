"""The operator HTTP API (`pushlib-api`): see `pushlib.api.app`."""

from pushlib.api.app import ApiConfig, create_app

__all__ = ["ApiConfig", "create_app"]
