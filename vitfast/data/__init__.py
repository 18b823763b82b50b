"""Data: the embedded default data set and ImageFolder loading."""
from .digits import DIGITS_MEAN, DIGITS_STD, digits_splits, export_digits_imagefolder
from .folders import image_folder

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "digits_splits", "export_digits_imagefolder", "image_folder"]
