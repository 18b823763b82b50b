"""Models vitfast ships or adds to timm's registry."""
from .digits_vit import digits_vit, load_digits_teacher
from ..minivit import models as _minivit_models  # noqa: F401  (registers mini_deit_*, mini_swin_*)

__all__ = ["digits_vit", "load_digits_teacher"]
