from .sam import Sam

__all__ = ["Sam"]
