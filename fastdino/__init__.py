"""fastdino: a performance-engineered DINOv3 trainer."""

__version__ = "0.1.0"
