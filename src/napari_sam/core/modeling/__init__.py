from .sam import Sam
