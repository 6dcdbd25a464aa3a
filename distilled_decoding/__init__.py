"""Distilled Decoding: one- and two-step generators distilled from image AR teachers."""
__version__ = "0.1.0"
