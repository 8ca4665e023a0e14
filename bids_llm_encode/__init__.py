"""bids_llm_encode: couple sub-groups of a language model's neurons with functional brain networks."""

__version__ = "0.1.0"
