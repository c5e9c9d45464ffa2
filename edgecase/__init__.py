"""edgecase: find the rare frames in driving data with generative models."""

__version__ = "0.1.0"
