"""PaySentry: the authorization gateway that AI-agent payments run through."""

__version__ = "0.1.0"
