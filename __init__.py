"""pdserve: disaggregated prefill/decode serving for LLMs.

Public names: ``LLM`` and ``SamplingParams`` (the offline API, shaped like
vLLM's). Serving lives in ``pdserve.router`` (the ``pdserve`` command line).
The top-level folders of the repository map onto ``pdserve.*`` subpackages.
"""

from typing import Any

__all__ = ["LLM", "SamplingParams", "__version__"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy so that `import pdserve.router` does not pull torch in.
    if name == "LLM":
        from pdserve.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from pdserve.engine.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(name)
