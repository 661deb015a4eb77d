"""Core of the multi-objective video ranker: everything training and serving share."""

__version__ = "0.1.0"
