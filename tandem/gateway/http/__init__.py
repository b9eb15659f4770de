"""HTTP front end of the gateway: ollama's and OpenAI's APIs, /metrics and /health."""

from tandem.gateway.http.app import HttpSettings, build_app

__all__ = ["HttpSettings", "build_app"]
