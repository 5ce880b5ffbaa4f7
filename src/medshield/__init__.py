"""medshield: stress-test and harden medical vision-language models."""

__version__ = "0.1.0"
