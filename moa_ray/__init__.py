"""moa-ray: Mixture-of-Agents and Sparse Mixture-of-Agents as a distributed LLM pipeline on Ray."""

__version__ = "0.1.0"
