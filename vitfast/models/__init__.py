"""Models vitfast ships or adds to timm's registry."""
from .digits_vit import digits_vit, load_digits_teacher

__all__ = ["digits_vit", "load_digits_teacher"]
