"""The bundled demo: a small synthetic naturalistic-listening dataset with known truth.

``generate.generate_demo`` / the ``bids_llm_encode-demo`` command write it;
``plants`` holds what drives its BOLD. See ``docs/demo.md``.
"""

from .generate import generate_demo  # noqa: F401

__all__ = ["generate_demo"]
