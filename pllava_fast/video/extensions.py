"""File extensions of the media pllava-fast reads (no imports: the CLI checks inputs with them
before torch loads)."""

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"})
VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".gif", ".flv",
                              ".mpg", ".mpeg", ".ts", ".wmv"})
MEDIA_EXTENSIONS = IMAGE_EXTENSIONS | VIDEO_EXTENSIONS
