"""cai: constitutional-AI preference data (generate → critique → revise) as a Unix tool."""

__version__ = "0.1.0"
