"""Guest images: recipes under images/, built into a content-addressed cache (``build``)."""

from harness.images.build import BuiltImage, build, image_key, list_images
from harness.images.errors import ImageError
from harness.images.recipe import recipe_names

__all__ = ["BuiltImage", "ImageError", "build", "image_key", "list_images", "recipe_names"]
