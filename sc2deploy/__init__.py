"""sc2deploy: StarCoder2 from a Hugging Face checkpoint to production."""

__version__ = "0.1.0"
