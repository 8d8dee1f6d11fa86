"""The offline API, shaped like vLLM's: ``LLM(model=...).generate(...)`` / ``.chat(...)``."""

import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine
from pdserve.engine.outputs import CompletionOutput, RequestOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.tokenizer import apply_chat_template

Prompt = str | list[int] | dict


class LLM:
    """Run a model offline. Keyword arguments are ``EngineConfig`` fields."""

    def __init__(self, model: str = "smollm2-135m", **kwargs) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def _to_ids(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return None, list(prompt["prompt_token_ids"])
            return self._to_ids(prompt["prompt"])
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise TypeError("a prompt must be a string, a list of token ids, or a dict with "
                        "'prompt' or 'prompt_token_ids'")

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs in prompt order. Bad input raises ValueError
        before anything is queued, so the engine stays usable."""
        if isinstance(prompts, str | dict) or (
                isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        encoded = [self._to_ids(p) for p in prompts]
        return self._run(encoded, sampling_params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """One conversation (a list of messages) or a list of conversations."""
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        encoded = [(None, apply_chat_template(self.tokenizer, c)) for c in convs]
        return self._run(encoded, sampling_params, use_tqdm)

    def _run(self, encoded, sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(encoded)
        else:
            params = list(sampling_params)
            if len(params) != len(encoded):
                raise ValueError("need one SamplingParams per prompt")
        engine = self.engine
        reqs = [engine.make_request("check", ids, p) for (_, ids), p in zip(encoded, params,
                                                                            strict=True)]
        del reqs  # validated: now queue for real
        results: dict[str, RequestOutput] = {}
        order = []
        for (text, ids), p in zip(encoded, params, strict=True):
            rid = f"offline-{next(self._ids)}"
            engine.add_request(rid, ids, p)
            order.append(rid)
            results[rid] = RequestOutput(rid, text, ids, [CompletionOutput(0, "", [])], False)
        bar = tqdm(total=len(order), desc="generate", disable=not use_tqdm, unit="req")
        try:
            while engine.has_unfinished():
                for d in engine.step():
                    r = results[d.request_id]
                    out = r.outputs[0]
                    out.token_ids.extend(d.new_token_ids)
                    out.text += d.new_text
                    if d.new_logprobs:
                        out.logprobs = (out.logprobs or []) + list(d.new_logprobs)
                    r.num_cached_tokens = d.num_cached_tokens
                    if d.finished:
                        r.finished = True
                        out.finish_reason = d.finish_reason
                        out.stop_reason = d.stop_reason
                        bar.update(1)
        except BaseException:
            for rid in order:
                engine.abort(rid)
            raise
        finally:
            bar.close()
        return [results[rid] for rid in order]
